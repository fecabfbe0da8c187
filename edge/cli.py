"""``fogline edge run``: the agent daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from common.errors import FoglineError
from edge.config import AgentConfig

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run",
        help="run the edge agent daemon",
        description="Run the edge agent: connect to the broker, accept signed deployments, "
        "serve the V2 inference API locally and escalate to the cloud fallback.",
    )
    run.add_argument(
        "--config",
        type=Path,
        required=True,
        help="agent config (JSON); any key can be overridden by FOGLINE_AGENT_<KEY>",
    )
    run.add_argument("--device-id", help="override device_id from the config")
    run.add_argument("--api-port", type=int, help="override api_port from the config")
    run.add_argument(
        "--insecure-public",
        action="store_const",
        const=True,
        help="allow a non-loopback API without api_token; anonymous callers get the local "
        "model only, never the cloud (the device's fallback token is never theirs to use)",
    )
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        # Precedence: flags over environment over the file.
        overrides = AgentConfig.env_overrides(dict(os.environ))
        overrides.update(
            {
                k: v
                for k, v in (
                    ("device_id", args.device_id),
                    ("api_port", args.api_port),
                    ("insecure_public", args.insecure_public),
                )
                if v is not None
            }
        )
        config = AgentConfig.from_file(args.config, **overrides)
    except FoglineError as exc:
        logger.error("%s", exc)
        return 2
    asyncio.run(run_agent(config))
    return 0


async def run_agent(config: AgentConfig) -> None:
    """Run until SIGINT or SIGTERM, then shut down cleanly (status goes offline)."""
    from edge.agent import EdgeAgent  # lazy: keeps ``--help`` fast

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with EdgeAgent(config):
        await stop.wait()
    logger.info("agent %s stopped", config.device_id)
