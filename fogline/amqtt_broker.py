"""The embedded MQTT broker (amqtt), run as a child process by ``fogline.broker``.

Used when no ``mosquitto`` binary is on PATH. ``python -m fogline.amqtt_broker
--host H --port P`` serves until SIGTERM/SIGINT, or until its parent dies.

NOTE: amqtt is imported only inside functions, so importing this module (which
amqtt does, to find the auth plugin by dotted path) stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
from typing import Any

logger = logging.getLogger(__name__)


@functools.cache
def _open_auth_plugin() -> type:
    """An amqtt auth plugin that admits every client *without* flagging it anonymous.

    amqtt's own AnonymousAuthPlugin marks every session it admits as anonymous,
    and amqtt then neither queues QoS 1 messages for an offline persistent
    session nor keeps that session: unlike Mosquitto with ``allow_anonymous
    true``. Admitting clients as regular users keeps the two brokers alike.
    """
    from amqtt.plugins.base import BaseAuthPlugin
    from amqtt.session import Session

    class OpenAuthPlugin(BaseAuthPlugin):
        async def authenticate(self, *, session: Session) -> bool:
            return True

    return OpenAuthPlugin


def __getattr__(name: str) -> Any:
    # amqtt loads plugins by dotted path ("fogline.amqtt_broker.OpenAuthPlugin"); built lazily so
    # importing this module never imports amqtt.
    if name == "OpenAuthPlugin":
        return _open_auth_plugin()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def amqtt_config(host: str, port: int) -> dict[str, Any]:
    """amqtt 0.12 ``BrokerConfig`` dict: one TCP listener, every client admitted, no $SYS."""
    # NOTE: no [brackets] for IPv6: amqtt 0.12.1 would pass them on to bind(). It splits
    # "::1:1883" at the last colon, which is right.
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # NOTE: an explicit plugin dict replaces amqtt's defaults (event/packet loggers,
        # AnonymousAuthPlugin, $SYS publisher every 20 s); we want none of those.
        # The path names the importable module, not ``__main__`` of the embedded child.
        "plugins": {"fogline.amqtt_broker.OpenAuthPlugin": {}},
    }


def _patched_broker_class() -> type:
    """amqtt's Broker, minus one bug in 0.12.1 that Mosquitto does not have.

    At every CONNECT amqtt replays, to the new client, the retained messages of
    every topic filter that *any* client is subscribed to (at QoS 0, whether or
    not this client subscribed). An agent would receive every other device's
    retained status. Here a session gets retained messages only for the filters
    it holds itself (on SUBSCRIBE, and again when a persistent session resumes).
    """
    from amqtt.broker import Broker
    from amqtt.session import Session

    class PatchedBroker(Broker):
        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Session
        ) -> None:
            holders = self._subscriptions.get(subscription[0], [])
            if any(held.client_id == session.client_id for held, _qos in holders):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return PatchedBroker


async def _serve_embedded(host: str, port: int) -> None:
    broker = _patched_broker_class()(amqtt_config(host, port))
    await broker.start()
    logger.info("amqtt broker listening on %s:%d", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    while not stop.is_set():
        # Exit with our parent: a test run that is killed must not leave brokers behind.
        if os.getppid() != parent:
            logger.warning("parent process %d is gone; shutting down", parent)
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
    await broker.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fogline.amqtt_broker",
        description="Serve MQTT with the embedded amqtt broker.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(_serve_embedded(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
