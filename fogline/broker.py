"""Start an MQTT broker for ``fogline demo`` and for tests.

``start_broker`` runs either a local ``mosquitto`` binary or the embedded
Python broker (amqtt) as a child process and returns once the broker answers
an MQTT CONNECT. Both speak MQTT 3.1.1 with QoS 1, retained messages and last
wills, which is all Fogline needs from a broker.

With ``security`` (the password and ACL files of ``fogline broker config``)
either broker refuses anonymous clients and applies the per-device ACL, and
optionally listens with TLS; Mosquitto gets the same ``mosquitto.conf`` that
command writes (``common.broker_auth.render_mosquitto_conf``).

Run ``python -m fogline.broker [--kind auto|mosquitto|amqtt] [--port N]`` for
a standalone broker that prints its URL and runs until Ctrl-C. The same
module, run with ``--embedded``, is the amqtt child process itself.

NOTE: amqtt is imported only inside the embedded child (and the auth plugin
it loads): it ships with the ``cloud`` extra, and an edge-only install must be
able to import this module and use Mosquitto.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from common.broker_auth import TlsFiles, render_mosquitto_conf
from common.errors import FoglineError
from fogline.processes import die_with_parent

logger = logging.getLogger(__name__)

BrokerKind = Literal["auto", "mosquitto", "amqtt"]

_START_ATTEMPTS = 3  # only when we picked the port ourselves and lost a bind race
_TAIL_BYTES = 4000


@dataclass(frozen=True)
class BrokerSecurity:
    """Logins, ACL and optional TLS for a started broker (files from ``fogline broker config``)."""

    password_file: Path
    acl_file: Path
    tls: TlsFiles | None = None


class BrokerStartError(FoglineError, RuntimeError):
    """The broker process exited, or did not accept an MQTT connection in time."""

    def __init__(self, message: str, *, kind: str, port: int, stderr_tail: str = "") -> None:
        self.kind = kind
        self.port = port
        self.stderr_tail = stderr_tail
        detail = f"\n--- {kind} output (tail) ---\n{stderr_tail}" if stderr_tail else ""
        super().__init__(f"{kind} broker on port {port}: {message}{detail}")


class BrokerProcess:
    """A broker child process we own. ``with start_broker(...) as broker:`` stops it on exit."""

    def __init__(
        self,
        *,
        kind: Literal["mosquitto", "amqtt"],
        host: str,
        port: int,
        proc: subprocess.Popen[bytes],
        log_path: Path,
        log_file: IO[bytes],
        security: BrokerSecurity | None = None,
    ) -> None:
        self.kind = kind
        self.host = host
        self.port = port
        self.security = security
        self._proc = proc
        self._log_path = log_path
        self._log_file = log_file

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        tls = self.security is not None and self.security.tls is not None
        return f"{'mqtts' if tls else 'mqtt'}://{host}:{self.port}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def running(self) -> bool:
        return self._proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Block until the broker exits (``subprocess.TimeoutExpired`` after ``timeout``)."""
        return self._proc.wait(timeout)

    def stderr_tail(self) -> str:
        """The last few KB of what the broker wrote to stdout/stderr."""
        try:
            data = self._log_path.read_bytes()
        except OSError:
            return ""
        return data[-_TAIL_BYTES:].decode("utf-8", errors="replace").strip()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Safe to call twice."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s broker %s ignored SIGTERM; killing it", self.kind, self.url)
                self._proc.kill()
                self._proc.wait()
            logger.info("%s broker on %s stopped", self.kind, self.url)
        self._log_file.close()

    def __enter__(self) -> BrokerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"BrokerProcess(kind={self.kind!r}, url={self.url!r}, pid={self.pid})"


def resolve_kind(kind: BrokerKind) -> Literal["mosquitto", "amqtt"]:
    """``auto`` means a local Mosquitto when one is on PATH, else the embedded amqtt."""
    if kind == "auto":
        return "mosquitto" if shutil.which("mosquitto") else "amqtt"
    if kind not in ("mosquitto", "amqtt"):
        raise ValueError(f"unknown broker kind {kind!r} (auto, mosquitto or amqtt)")
    if kind == "mosquitto" and shutil.which("mosquitto") is None:
        raise BrokerStartError("the mosquitto binary is not on PATH", kind=kind, port=0)
    return kind


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller may still lose a race for it).

    NOTE: picked below the kernel's ephemeral range: a port from ``bind(0)`` comes
    from that range, which every outgoing connection also draws from, so in the
    seconds before a child binds it some client's connect() could take it (seen in
    CI). Only explicit binders use the ports below the range.

    ``FOGLINE_PORT_RANGE=LOW-HIGH`` (inclusive) narrows the pick, so that processes
    picking at once (parallel test workers, each with its own range) never pick the
    same port. A port this process handed out recently is not handed out again: its
    owner may not have bound it yet.
    """
    low, high = _pick_range()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = [p for p in range(low, high + 1) if p not in _recent_ports]
    for port in random.sample(candidates, k=min(64, len(candidates))):
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _recent_ports.append(port)
            return port
    with socket.socket(family) as s:  # all taken: the kernel's pick, race and all
        s.bind((host, 0))
        return cast(int, s.getsockname()[1])


_LOWEST_PORT = 20000
PORT_RANGE_ENV = "FOGLINE_PORT_RANGE"
_recent_ports: deque[int] = deque(maxlen=256)


def _pick_range() -> tuple[int, int]:
    """Inclusive bounds for ``free_port``: ``FOGLINE_PORT_RANGE`` or below the ephemeral range."""
    value = os.environ.get(PORT_RANGE_ENV, "")
    if value:
        try:
            low, high = (int(x) for x in value.split("-"))
        except ValueError:
            raise ValueError(f"{PORT_RANGE_ENV}={value!r}: expected LOW-HIGH") from None
        if not 0 < low <= high < 65536:
            raise ValueError(f"{PORT_RANGE_ENV}={value!r}: expected 0 < LOW <= HIGH < 65536")
        return low, high
    return _LOWEST_PORT, _ephemeral_range()[0] - 1


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in Path(_PORT_RANGE_FILE).read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; other systems: still above 20000
    return max(low, _LOWEST_PORT + 1), high


_PORT_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def start_broker(
    kind: BrokerKind = "auto",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    workdir: Path,
    timeout: float = 20.0,
    security: BrokerSecurity | None = None,
) -> BrokerProcess:
    """Start a broker on ``host:port`` (``port=0``: pick a free one) and wait until it serves MQTT.

    Config and log files go in ``workdir``; ``security`` adds logins, the ACL and TLS.
    Raises BrokerStartError with the broker's output when it exits or does not accept
    a CONNECT within ``timeout``.
    """
    chosen_kind = resolve_kind(kind)
    workdir.mkdir(parents=True, exist_ok=True)
    attempts = _START_ATTEMPTS if port == 0 else 1
    for attempt in range(1, attempts + 1):
        broker = _spawn(chosen_kind, host, port or free_port(host), workdir, security)
        try:
            _wait_ready(broker, timeout)
        except BrokerStartError:
            exited = not broker.running()
            broker.stop()
            # An early exit on a port we picked is most likely a lost bind race: pick again.
            if exited and attempt < attempts:
                logger.warning("%s broker exited at start; retrying on another port", chosen_kind)
                continue
            raise
        logger.info("%s broker serving on %s", chosen_kind, broker.url)
        return broker
    raise AssertionError("unreachable: the last attempt returns or raises")


def _spawn(
    kind: Literal["mosquitto", "amqtt"],
    host: str,
    port: int,
    workdir: Path,
    security: BrokerSecurity | None,
) -> BrokerProcess:
    log_path = workdir / f"{kind}-{port}.log"
    if kind == "mosquitto":
        conf = workdir / f"mosquitto-{port}.conf"
        conf.write_text(_mosquitto_config(host, port, security, workdir / f"data-{port}"))
        argv = ["mosquitto", "-c", str(conf)]
    else:
        argv = [sys.executable, "-m", "fogline.amqtt_broker", "--host", host, "--port", str(port)]
        argv += _amqtt_security_args(security)
    log_file = log_path.open("wb")
    try:
        # NOTE: a new session keeps Ctrl-C away from the broker, so whoever started it can
        # stop its clients first and the broker last.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            start_new_session=True,
            # and if whoever started it dies without stopping it, it goes too
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
    except OSError as exc:
        log_file.close()
        raise BrokerStartError(f"could not run {argv[0]}: {exc}", kind=kind, port=port) from exc
    return BrokerProcess(
        kind=kind,
        host=host,
        port=port,
        proc=proc,
        log_path=log_path,
        log_file=log_file,
        security=security,
    )


def _amqtt_security_args(security: BrokerSecurity | None) -> list[str]:
    if security is None:
        return []
    args = ["--password-file", str(security.password_file), "--acl-file", str(security.acl_file)]
    if security.tls is not None:
        args += ["--tls-cert", str(security.tls.cert), "--tls-key", str(security.tls.key)]
        args += ["--ca", str(security.tls.ca)] if security.tls.ca else []
    return args


def _mosquitto_config(host: str, port: int, security: BrokerSecurity | None, data_dir: Path) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    if security is not None:
        # Run as whoever started it (see below); otherwise the file fogline broker config writes.
        return render_mosquitto_conf(
            port=port,
            host=host,
            password_file=security.password_file,
            acl_file=security.acl_file,
            persistence_dir=data_dir,
            tls=security.tls,
            run_as=getpass.getuser(),
        )
    return "\n".join(
        [
            f"listener {port} {host}",
            "allow_anonymous true",
            # Agents keep persistent sessions: a command queued for an offline device must
            # survive a broker restart (README, "Trust and failure behaviour").
            "persistence true",
            f"persistence_location {data_dir.resolve()}/",
            "log_dest stderr",
            # Run as whoever started it: dropping root to the mosquitto user would clear
            # the parent-death signal (and it is our own short-lived broker anyway).
            f"user {getpass.getuser()}",
            # An artifact fans out as many QoS 1 chunks; the default queue (1000) could
            # drop chunks for a briefly slow agent, which would then have to ask again.
            "max_queued_messages 10000",
            "",
        ]
    )


def _child_env() -> dict[str, str]:
    """The child must import ``fogline`` even when it runs from a source checkout."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    paths = [root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _wait_ready(broker: BrokerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not broker.running():
            raise BrokerStartError(
                f"exited with status {broker.wait()} before accepting connections",
                kind=broker.kind,
                port=broker.port,
                stderr_tail=broker.stderr_tail(),
            )
        # No bare TCP probe first: amqtt logs a connection that sends no CONNECT as an
        # ERROR. paho's connect is the TCP check; the CONNACK is the MQTT one.
        if _mqtt_connects(broker, wait=min(1.0, deadline - time.monotonic())):
            return
        time.sleep(0.05)
    raise BrokerStartError(
        f"no MQTT CONNACK within {timeout:.0f} s",
        kind=broker.kind,
        port=broker.port,
        stderr_tail=broker.stderr_tail(),
    )


def _mqtt_connects(broker: BrokerProcess, *, wait: float) -> bool:
    """One MQTT 3.1.1 CONNECT; False if not answered within ``wait`` s, BrokerStartError if refused.

    The wait is short so that a broker that died while something else holds its
    port (and accepts the TCP connection) is noticed promptly.
    """
    deadline = time.monotonic() + wait
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"fogline-probe-{os.getpid()}",
        protocol=paho.MQTTv311,
    )
    client.connect_timeout = max(wait, 0.1)
    if broker.security is not None and broker.security.tls is not None:
        # A liveness probe of our own child: any certificate will do here; clients verify.
        client.tls_set(cert_reqs=ssl.CERT_NONE)
        client.tls_insecure_set(True)
    answers: list[Any] = []
    client.on_connect = lambda _c, _u, _f, reason_code, _p: answers.append(reason_code)
    try:
        client.connect(broker.host, broker.port, keepalive=10)
        while not answers and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != paho.MQTT_ERR_SUCCESS:
                break  # a refusing broker closes the socket right after its CONNACK
        if answers and not answers[0].is_failure:
            client.disconnect()
            client.loop(timeout=0.1)
    except OSError:
        return False
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()
    # With logins, refusing the probe's anonymous CONNECT is the right answer, and proof
    # that the broker speaks MQTT.
    if answers and answers[0].is_failure and broker.security is None:
        raise BrokerStartError(
            f"refused an anonymous CONNECT: {answers[0]}",
            kind=broker.kind,
            port=broker.port,
            stderr_tail=broker.stderr_tail(),
        )
    return bool(answers)


# --- command line ---------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fogline.broker",
        description="Run an MQTT broker (Mosquitto if on PATH, else the embedded amqtt).",
    )
    parser.add_argument("--kind", choices=["auto", "mosquitto", "amqtt"], default="auto")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    with tempfile.TemporaryDirectory(prefix="fogline-broker-") as tmp:
        workdir = Path(tmp)
        try:
            with start_broker(args.kind, host=args.host, port=args.port, workdir=workdir) as b:
                print(b.url, flush=True)
                status = b.wait()
                print(f"{b.kind} broker exited with status {status}", file=sys.stderr)
                return status or 1
        except KeyboardInterrupt:
            return 0
        except BrokerStartError as exc:
            print(exc, file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
