"""The embedded MQTT broker (amqtt), run as a child process by ``fogline.broker``.

Used when no ``mosquitto`` binary is on PATH. ``python -m fogline.amqtt_broker
--host H --port P`` serves until SIGTERM/SIGINT, or until its parent dies.
With ``--password-file F --acl-file F`` (the files ``fogline broker config``
writes for Mosquitto) it admits only those users, with the same topic ACL
(fogline/amqtt_auth.py), rereading both on SIGHUP as Mosquitto does; with
``--tls-cert/--tls-key`` it listens with TLS.

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
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.broker_auth import MAX_PACKET_SIZE, TlsFiles

if TYPE_CHECKING:
    from fogline.amqtt_auth import Identities

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
    if name == "FoglineAuthPlugin":
        from fogline.amqtt_auth import auth_plugin_class

        return auth_plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class AuthFiles:
    password_file: Path
    acl_file: Path


def amqtt_config(
    host: str, port: int, auth: AuthFiles | None = None, tls: TlsFiles | None = None
) -> dict[str, Any]:
    """amqtt 0.12 ``BrokerConfig`` dict: one listener, no $SYS; every client admitted
    unless ``auth`` names the password and ACL files."""
    # NOTE: no [brackets] for IPv6: amqtt 0.12.1 would pass them on to bind(). It splits
    # "::1:1883" at the last colon, which is right.
    listener: dict[str, Any] = {"type": "tcp", "bind": f"{host}:{port}"}
    if tls is not None:
        listener.update(ssl=True, certfile=str(tls.cert), keyfile=str(tls.key))
        if tls.ca is not None:
            listener["cafile"] = str(tls.ca)
    # NOTE: an explicit plugin dict replaces amqtt's defaults (event/packet loggers,
    # AnonymousAuthPlugin, $SYS publisher every 20 s); we want none of those.
    # The path names the importable module, not ``__main__`` of the embedded child.
    plugins: dict[str, Any] = {"fogline.amqtt_broker.OpenAuthPlugin": {}}
    if auth is not None:
        files = {"password_file": str(auth.password_file), "acl_file": str(auth.acl_file)}
        plugins = {"fogline.amqtt_broker.FoglineAuthPlugin": files}
    return {"listeners": {"default": listener}, "plugins": plugins}


def _patched_broker_class() -> type:
    """amqtt's Broker, minus two faults in 0.12.1 that Mosquitto does not have.

    At every CONNECT amqtt replays, to the new client, the retained messages of
    every topic filter that *any* client is subscribed to (at QoS 0, whether or
    not this client subscribed). An agent would receive every other device's
    retained status. Here a session gets retained messages only for the filters
    it holds itself (on SUBSCRIBE, and again when a persistent session resumes).

    And it finds (and takes over, or deletes) the session named by a CONNECT's
    client id before authenticating it; with ``identities`` set, the client id
    is bound to the login first (``bind_identity``).
    """
    from amqtt.broker import Broker
    from amqtt.errors import MQTTError
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.session import Session

    from fogline.amqtt_auth import bind_identity

    class PatchedBroker(Broker):
        identities: Identities | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._superseded: weakref.WeakSet[Any] = weakref.WeakSet()

        async def _initialize_client_session(
            self, reader: Any, writer: Any, remote_address: str, remote_port: int
        ) -> tuple[Any, Session]:
            if self.identities is None:
                return await super()._initialize_client_session(
                    reader, writer, remote_address, remote_port
                )
            # The body of Broker._initialize_client_session (0.12.1), with bind_identity
            # before the session lookup, and the will's retain flag carried over too.
            try:
                handler, session = await BrokerProtocolHandler.init_from_connect(
                    reader, writer, self.plugins_manager
                )
            except MQTTError:
                await writer.close()
                raise
            bind_identity(session, self.identities)
            await self._supersede(session.client_id)
            if session.clean_session:
                await self._delete_session(session.client_id)
                session.parent = 0
            elif session.client_id in self._sessions:
                existing, _ = self._sessions[session.client_id]
                for attr in _RESUMED_SESSION_FIELDS:
                    setattr(existing, attr, getattr(session, attr))
                session, session.parent = existing, 1
            else:
                session.parent = 0
            delay = self.config.get("timeout-disconnect-delay", 0)
            if session.keep_alive > 0 and isinstance(delay, int):
                session.keep_alive += delay
            return handler, session

        async def _supersede(self, client_id: str) -> None:
            """A new connection for a connected session: end the old one, as Mosquitto does.

            amqtt 0.12.1 lets the old connection's teardown run *after* the takeover:
            it sends the old will and marks the (shared) session disconnected, so the
            new connection gets nothing more; with a clean session it leaves the old
            connection open. A superseded connection here ends quietly.
            """
            previous, old_handler = self._sessions.get(client_id, (None, None))
            if previous is None or old_handler is None or not previous.transitions.is_connected():
                return
            self._superseded.add(old_handler)
            await old_handler.handle_connection_closed()

        async def _handle_disconnect(
            self, client_session: Session, handler: Any, disconnect_waiter: Any
        ) -> None:
            if handler in self._superseded:
                self._superseded.discard(handler)
                await self._stop_handler(handler)
                return
            await super()._handle_disconnect(client_session, handler, disconnect_waiter)

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Session
        ) -> None:
            holders = self._subscriptions.get(subscription[0], [])
            if any(held.client_id == session.client_id for held, _qos in holders):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return PatchedBroker


_RESUMED_SESSION_FIELDS = (
    "will_flag",
    "will_message",
    "will_topic",
    "will_qos",
    "will_retain",
    "keep_alive",
    "username",
    "password",
)


def _reload_identities(broker: Any, auth: AuthFiles) -> None:
    """(Re)read the logins and ACL; a file that cannot be read keeps the old ones."""
    from fogline.amqtt_auth import Identities

    try:
        identities = Identities.load(auth.password_file, auth.acl_file)
    except (OSError, ValueError) as exc:
        if broker.identities is None:
            raise
        logger.error("kept the old logins and ACL: %s", exc)
        return
    broker.identities = identities
    plugin = broker.plugins_manager.get_plugin("FoglineAuthPlugin")
    if plugin is not None:  # None before start: the plugin reads the files itself
        plugin.identities = identities
    logger.info("loaded %d logins and their ACL", len(identities.hashes))


class PacketTooLargeError(Exception):
    """A packet over MAX_PACKET_SIZE: the connection ends (Mosquitto's ``max_packet_size``).

    NOTE: not an amqtt MQTTError, which amqtt's reader loop swallows and reads on."""


def _limit_packet_size(max_bytes: int = MAX_PACKET_SIZE) -> None:
    """Refuse any packet whose fixed header announces more than ``max_bytes``, before its
    body is read: amqtt 0.12.1 has no limit and reads a packet whole into memory."""
    from amqtt.mqtt.packet import MQTTFixedHeader

    original = MQTTFixedHeader.from_stream.__func__  # type: ignore[attr-defined]
    if getattr(original, "fogline_limited", False):
        return

    async def from_stream(cls: type, reader: Any) -> Any:
        header = await original(cls, reader)
        if header is not None and header.remaining_length > max_bytes:
            raise PacketTooLargeError(f"packet of {header.remaining_length} bytes")
        return header

    from_stream.fogline_limited = True  # type: ignore[attr-defined]
    MQTTFixedHeader.from_stream = classmethod(from_stream)  # type: ignore[method-assign,assignment]


async def _serve_embedded(
    host: str, port: int, auth: AuthFiles | None = None, tls: TlsFiles | None = None
) -> None:
    _limit_packet_size()
    broker = _patched_broker_class()(amqtt_config(host, port, auth, tls))
    if auth is not None:
        _reload_identities(broker, auth)
    await broker.start()
    logger.info("amqtt broker listening on %s:%d", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if auth is not None:  # like Mosquitto: SIGHUP rereads the password and ACL files
        loop.add_signal_handler(signal.SIGHUP, _reload_identities, broker, auth)
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
    parser.add_argument("--password-file", type=Path, help="Mosquitto password file")
    parser.add_argument("--acl-file", type=Path, help="Mosquitto ACL file")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--ca", type=Path)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if (args.password_file is None) != (args.acl_file is None):
        parser.error("--password-file and --acl-file go together")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    auth = AuthFiles(args.password_file, args.acl_file) if args.password_file else None
    tls = TlsFiles(args.tls_cert, args.tls_key, args.ca) if args.tls_cert else None
    asyncio.run(_serve_embedded(args.host, args.port, auth, tls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
