"""sd_notify(3) in a few lines: tell the service manager (systemd, ``Type=notify``) how we are.

The protocol: one AF_UNIX *datagram* to the socket named in ``$NOTIFY_SOCKET``, holding
newline-separated ``KEY=VALUE`` assignments. A name starting with ``@`` is in Linux's abstract
namespace (the ``@`` stands for a leading NUL byte); any other name is a filesystem path. Without
``NOTIFY_SOCKET`` (a terminal, a test, another service manager) every call is a silent no-op.
No package is needed: python-systemd and sdnotify wrap exactly this ``sendto``.

Messages the agent sends (docs/lifecycle.md has the whole contract):

    READY=1                  the database is open and the DICOM listener is bound
    STATUS=...               one line for ``systemctl status`` (models, queue, outbox, broker, drift)
    WATCHDOG=1               every loop made progress (agent/service/lifecycle.py Watchdog)
    RELOADING=1 / READY=1    around a SIGHUP configuration reload
    STOPPING=1               the graceful stop began
    EXTEND_TIMEOUT_USEC=n    (before READY only) asks for more start time

A send that fails (the manager went away, a full socket buffer) is logged once and otherwise
ignored: telling systemd is never a reason to stop serving.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

from agent.core.log import log_event

log = logging.getLogger(__name__)

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"


def _address(name: str) -> str | bytes:
    """``@name`` -> the abstract address (b"\\0name"); a path stays a path."""
    return b"\0" + name[1:].encode() if name.startswith("@") else name


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET`` (``environ``: default ``os.environ``)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.socket_name = env.get(ENV_SOCKET, "")
        self.watchdog_usec = _watchdog_usec(env)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.socket_name)

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False when not sent (no socket, or it failed)."""
        if not self.socket_name:
            return False
        data = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, _address(self.socket_name))
                return True
            except OSError as exc:
                if not self._warned:  # once: a manager that went away would flood the log
                    log_event(log, "notify.failed", logging.WARNING, socket=self.socket_name, error=str(exc))
                    self._warned = True
                return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        return self.send("RELOADING=1")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _watchdog_usec(env: Mapping[str, str]) -> int:
    """``$WATCHDOG_USEC`` when it is meant for this process (``$WATCHDOG_PID`` unset or ours), else 0."""
    pid = env.get(ENV_WATCHDOG_PID, "")
    if pid and pid != str(os.getpid()):
        return 0
    try:
        return max(0, int(env.get(ENV_WATCHDOG_USEC, "0") or 0))
    except ValueError:
        return 0
