"""systemd's notify protocol in a few lines, without a dependency (sd_notify(3)).

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (an AF_UNIX datagram socket;
a leading ``@`` means the abstract namespace) and, with ``WatchdogSec=``,
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process meant). The agent says
``READY=1`` once it serves, ``WATCHDOG=1`` at half the watchdog interval while its
event loop runs and it is live, and ``STOPPING=1`` when it begins to shut down.
Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

READY, STOPPING, WATCHDOG = "READY=1", "STOPPING=1", "WATCHDOG=1"


class Notifier:
    """Sends state lines to the service manager named by the environment."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]  # abstract namespace
        elif path.startswith("/"):
            self.address = path
        elif path:
            logger.warning("ignoring NOTIFY_SOCKET %r: not a unix socket path", path)
        self.watchdog_s = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; False (and a log line) if it could not go.

        NOTE: non-blocking: a receiver that stopped reading fills its queue, and a
        blocking send would then stall the agent's event loop (found by the test).
        """
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.connect(self.address)
                sock.sendall("\n".join(lines).encode())
        except OSError as exc:
            logger.warning("sd_notify %s failed: %s", lines, exc)
            return False
        return True

    async def feed_watchdog(self, healthy: Callable[[], bool]) -> None:
        """``WATCHDOG=1`` every half interval while ``healthy()``; runs until cancelled.

        A blocked event loop or an unhealthy agent stops the pings, and systemd
        restarts the service after ``WatchdogSec``.
        """
        if self.watchdog_s is None or self.address is None:
            return
        while True:
            if healthy():
                self.notify(WATCHDOG)
            else:
                logger.warning("agent not live: withholding the systemd watchdog ping")
            await asyncio.sleep(self.watchdog_s / 2)


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """``WATCHDOG_USEC`` in seconds, if it is meant for this process."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # set for another process (a parent that exec'd us keeps its own pid)
    return int(usec) / 1e6
