"""An asyncio MQTT session over paho-mqtt, used by the agent and the control plane.

paho runs the socket in its own thread and reconnects with capped backoff;
this wrapper moves every callback onto the event loop, restores
subscriptions after each reconnect, and lets ``publish`` await the broker's
PUBACK. It speaks MQTT 3.1.1 so that any broker works.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from common.errors import FoglineError

logger = logging.getLogger(__name__)
# A connection the broker closes within _FLAP_WINDOW_S of connecting counts as a quick
# drop; this many in a row is worth a warning.
_FLAP_WINDOW_S = 5.0
_FLAP_WARN_AFTER = 3

Handler = Callable[[str, bytes], Awaitable[None] | None]
_client_ids = itertools.count()


class MqttError(FoglineError, ConnectionError):
    """The broker is unreachable or did not acknowledge a message in time."""

    http_status = 503  # for an API that needed the broker: try again later


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the broker: the CA that signed its certificate, and an optional client cert."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttLink:
    """``async with MqttLink(...) as link``: connect, subscribe, publish, dispatch.

    The link stays usable while the broker is away: ``publish`` raises
    MqttError (callers keep what they must not lose in an outbox) and paho
    reconnects in the background.
    """

    def __init__(
        self,
        *,
        client_id: str,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        keepalive: int = 10,
        ack_timeout_s: float = 10.0,
        persistent_session: bool = False,
        tls: TlsConfig | None = None,
    ) -> None:
        self.client_id = client_id
        self._host, self._port, self._keepalive = host, port, keepalive
        self._ack_timeout_s = ack_timeout_s
        # A persistent session makes the broker queue QoS 1 messages (commands) for a
        # device while it is offline; the client id must then be stable per device.
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=not persistent_session,
        )
        if username:
            self._client.username_pw_set(username, password)
        if tls is not None:
            # Certificate and host name are checked (paho's defaults); a plain-TCP broker
            # or a certificate from another CA fails the connect.
            self._client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
        if will:
            self._client.will_set(will.topic, will.payload, will.qos, will.retain)
        # Jittered per client: after a broker restart a whole fleet reconnects spread over
        # seconds (then doubling, capped) instead of all at once in lockstep.
        # NOTE: paho annotates int but only does float arithmetic and sleeps with them.
        self._client.reconnect_delay_set(
            min_delay=random.uniform(0.5, 2.0),  # type: ignore[arg-type]
            max_delay=random.uniform(6.0, 10.0),  # type: ignore[arg-type]
        )
        self._client.max_queued_messages_set(1000)
        self._client.max_inflight_messages_set(64)  # a chunk broadcast keeps a window in flight
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._subs: dict[str, tuple[int, list[Handler]]] = {}
        self._live_only: set[str] = set()  # filters whose retained messages are dropped
        self._on_connected: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._early_acks: set[int] = set()
        self._ignored_acks: set[int] = set()
        # NOTE: paho calls on_publish while holding its own message mutex, so these locks
        # are never held while calling into paho's publish (that order would deadlock).
        self._ack_lock = threading.Lock()
        self._sub_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: asyncio.Queue[paho.MQTTMessage] = asyncio.Queue()
        self._dispatcher: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self._connected_at = -math.inf  # monotonic time of the last successful connect
        self._quick_drops = 0  # disconnects in a row soon after connecting
        # Called with ("in" | "out", topic) for each message received or published
        # (the control plane's /metrics counts them); on the event loop, so keep it cheap.
        self.observers: list[Callable[[str, str], None]] = []

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> MqttLink:
        self._loop = asyncio.get_running_loop()
        self._dispatcher = asyncio.create_task(self._dispatch(), name=f"mqtt-{self.client_id}")
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive)
        self._client.loop_start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, *, graceful: bool = True) -> None:
        """Disconnect (a graceful DISCONNECT suppresses the will) and stop tasks."""
        if graceful:
            self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
            self._dispatcher = None
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(MqttError("link closed"))

    async def wait_connected(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            raise MqttError(f"no connection to {self._host}:{self._port} in {timeout}s") from None

    # -- subscribe / publish ---------------------------------------------------

    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, *, retained: bool = True
    ) -> None:
        """Call ``handler(topic, payload)`` for each message; kept across reconnects.

        ``retained=False`` drops the messages the broker replays from its retained
        store on subscribing (anyone may have left one there): live messages only.
        """
        # NOTE: under the lock so that a CONNACK racing with this call cannot miss the
        # filter: either _on_connect sees it, or is_connected() is already true here.
        with self._sub_lock:
            _, handlers = self._subs.setdefault(topic_filter, (qos, []))
            handlers.append(handler)
            if not retained:
                self._live_only.add(topic_filter)
            if self._client.is_connected():
                self._client.subscribe(topic_filter, qos)

    def on_connected(self, callback: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``callback`` on the loop after every (re)connect, e.g. to republish status."""
        self._on_connected.append(callback)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._sub_lock:
            self._live_only.discard(topic_filter)
            if self._subs.pop(topic_filter, None) is not None and self._client.is_connected():
                self._client.unsubscribe(topic_filter)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish; for QoS 1 wait for the PUBACK. Raise MqttError when offline."""
        if not self.connected.is_set():
            raise MqttError(f"not connected; cannot publish to {topic}")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        for observe in self.observers:
            observe("out", topic)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._ack_lock:
            if info.mid in self._early_acks:  # acknowledged before we got here
                self._early_acks.discard(info.mid)
                return
            if qos == 0:
                self._ignored_acks.add(info.mid)
                return
            self._acks[info.mid] = fut
        try:
            await asyncio.wait_for(fut, self._ack_timeout_s)
        except TimeoutError:
            with self._ack_lock:
                if self._acks.pop(info.mid, None) is not None:
                    self._ignored_acks.add(info.mid)
            raise MqttError(f"no PUBACK for {topic} in {self._ack_timeout_s}s") from None
        with self._ack_lock:
            self._acks.pop(info.mid, None)

    # -- paho callbacks (network thread) -----------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            logger.warning("MQTT connect to %s:%s refused: %s", self._host, self._port, rc)
            return
        with self._sub_lock:
            for topic_filter, (qos, _) in list(self._subs.items()):
                client.subscribe(topic_filter, qos)
        logger.info("MQTT connected to %s:%s as %s", self._host, self._port, self.client_id)
        self._connected_at = time.monotonic()
        self._call(self._connected)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        logger.info("MQTT disconnected from %s:%s (%s)", self._host, self._port, rc)
        self._call(self.connected.clear)
        # MQTT 3.1.1 gives no reason when the broker hands our session to a newer client
        # with the same id; a connection that keeps dropping right after it was made is
        # the sign of two processes sharing one login (e.g. two control-plane replicas).
        if time.monotonic() - self._connected_at < _FLAP_WINDOW_S:
            self._quick_drops += 1
            if self._quick_drops == _FLAP_WARN_AFTER:
                logger.warning(
                    "the broker closed the connection as %s %d times within %.0f s of "
                    "connecting: is another client using the same login or client id? "
                    "(control-plane replicas each need their own: `fogline broker config "
                    "--control-replicas N`, `fogline control serve --replica K`)",
                    self.client_id,
                    self._quick_drops,
                    _FLAP_WINDOW_S,
                )
        else:
            self._quick_drops = 0

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        self._call(self._inbox.put_nowait, msg)

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with self._ack_lock:
            if mid in self._ignored_acks:
                self._ignored_acks.discard(mid)
                return
            fut = self._acks.pop(mid, None)
            if fut is None:
                self._early_acks.add(mid)
                return
        self._call(_resolve, fut)

    # -- dispatch (event loop) ------------------------------------------------------

    def _connected(self) -> None:
        self.connected.set()
        for callback in self._on_connected:
            task = asyncio.create_task(callback())
            task.add_done_callback(_log_failure)

    async def _dispatch(self) -> None:
        while True:
            msg = await self._inbox.get()
            for observe in self.observers:
                observe("in", msg.topic)
            for topic_filter, (_, handlers) in list(self._subs.items()):
                if not paho.topic_matches_sub(_unshared(topic_filter), msg.topic):
                    continue
                if msg.retain and topic_filter in self._live_only:
                    logger.debug("ignored a retained message on %s", msg.topic)
                    continue
                for handler in handlers:
                    try:
                        result = handler(msg.topic, bytes(msg.payload))
                        if inspect.isawaitable(result):
                            await result
                    except Exception:
                        logger.exception("handler for %s failed", msg.topic)


def _unshared(topic_filter: str) -> str:
    """``$share/{group}/{filter}`` -> ``{filter}``: what a shared subscription matches."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else topic_filter
    return topic_filter


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("on-connect callback failed: %s", task.exception())


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
