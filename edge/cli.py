"""``fogline edge run``: the agent daemon; ``fogline edge health``: is it ready (for
container HEALTHCHECKs and scripts)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from common.cli_errors import one_line_errors
from common.errors import FoglineError
from edge.config import AgentConfig
from edge.sd_notify import READY, STOPPING, Notifier

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
    health = subparsers.add_parser(
        "health",
        help="check that the local agent is ready (exit 0) or not (exit 1), in one line",
        description="Ask the local agent's /v2/health/ready, with its api_token. For a "
        "container HEALTHCHECK or a script; reads the same config and FOGLINE_AGENT_* "
        "variables as `fogline edge run`.",
    )
    health.add_argument(
        "--config", type=Path, default=Path("/etc/fogline/agent.json"), help="agent config (JSON)"
    )
    health.add_argument("--api-port", type=int, help="override api_port from the config")
    health.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    health.set_defaults(func=one_line_errors(_health))


def load_config(args: argparse.Namespace) -> AgentConfig:
    """The agent config; precedence: flags over environment over the file."""
    overrides = AgentConfig.env_overrides(dict(os.environ))
    overrides.update(
        {
            k: v
            for k in ("device_id", "api_port", "insecure_public")
            if (v := getattr(args, k, None)) is not None
        }
    )
    return AgentConfig.from_file(args.config, **overrides)


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args)
    except FoglineError as exc:
        logger.error("%s", exc)
        return 2
    asyncio.run(run_agent(config))
    return 0


async def run_agent(config: AgentConfig) -> None:
    """Run until SIGINT or SIGTERM, then shut down cleanly (status goes offline).

    Under systemd (``Type=notify``) it says READY=1 once the API serves (with the
    active model loaded, if there is one), feeds the watchdog while the agent is
    live, and says STOPPING=1 before shutting down.
    """
    from edge.agent import EdgeAgent  # lazy: keeps ``--help`` fast

    notifier = Notifier()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with EdgeAgent(config) as agent:
        notifier.notify(READY, f"STATUS=serving on {config.api_url}")
        watchdog = asyncio.create_task(notifier.feed_watchdog(agent.dataplane.live))
        try:
            await stop.wait()
        finally:
            notifier.notify(STOPPING)
            watchdog.cancel()
    logger.info("agent %s stopped", config.device_id)


def _health(args: argparse.Namespace) -> int:
    config = load_config(args)
    host = config.api_host
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: ask over loopback
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{config.api_port}/v2/health/ready"
    status = asyncio.run(_ready_status(url, config.api_token, args.timeout))
    if status != 200:
        print(f"error: agent at {url} is not ready ({status})", file=sys.stderr)
        return 1
    print(f"ready: {url}")
    return 0


async def _ready_status(url: str, token: str | None, timeout_s: float) -> int:
    import aiohttp  # lazy, as EdgeAgent: ``fogline --help`` imports this module

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(url, headers=headers) as resp,
        ):
            return resp.status
    except TimeoutError:
        raise FoglineError(f"agent at {url} did not answer in {timeout_s}s") from None
    except aiohttp.ClientError as exc:
        raise FoglineError(f"cannot reach the agent at {url}: {exc}") from None
