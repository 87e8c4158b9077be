"""The door in front of pynetdicom: nothing reaches an association thread before its request is whole.

pynetdicom reads a PDU as "6-byte header, then as many bytes as the header declares", and checks
its ACSE timer only between PDUs. So a peer that sends an A-ASSOCIATE-RQ header and then a byte
every 50 s holds an association slot for ever (ten of them lock the real PACS out, and the
allow-list never runs: it needs the whole request), and a header declaring 2 GB makes the listener
buffer whatever follows. ``GuardedServer`` (pynetdicom's threaded server with one override) keeps
such connections away from pynetdicom:

* at accept, a connection is admitted only while fewer than ``max_pending_per_peer`` connections
  from its IP address are *pending* (accepted, request not yet whole); otherwise it is closed at
  once. When ``max_pending_total`` connections are pending, the oldest pending connection of the
  address holding most is closed to make room, so attackers on many addresses cannot keep the
  PACS out either (a real request is whole within milliseconds, so it is hardly ever the one);
* a gate thread then waits, without reading (``MSG_PEEK``), until the socket's receive buffer holds
  the complete first PDU: it must be an A-ASSOCIATE-RQ (type 0x01) no longer than
  ``max_request_kb``, complete within ``association_request_timeout_s`` of the accept. Anything
  else closes the connection. Only then is the connection handed to pynetdicom, which finds the
  whole request waiting and answers it (the allow-list included) at once.

Memory per pending connection is the kernel's receive buffer (the listening socket asks for
``_RCVBUF`` so a request of the maximum size fits), and one small thread while it waits.

With TLS the bytes cannot be peeked before the handshake: a TLS connection is admitted and
counted the same way and handed over at once, and the guard's reaper shuts its socket down if its
association is not requested within the deadline (``request_complete`` is called from
EVT_REQUESTED); its request size is bounded only by pynetdicom.

Every closed connection is reported (``on_refused(peer, reason, limit)``: the listener makes a
``connection.refused`` event of it, rate-limited by the event sink), except connections that close
before sending anything (port scans, TCP health checks), which are only logged at DEBUG.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from agent.core.config import DicomLimitsConfig
from agent.core.log import log_event

__all__ = ["ConnectionGuard", "GuardedServer", "await_request"]

logger = logging.getLogger(__name__)

_A_ASSOCIATE_RQ = 0x01
_HEADER = 6
_RCVBUF = 256 * 1024  # > the largest request allowed (max_request_kb <= 1024 is clamped below)
_POLL_S = 0.05  # re-peek interval while a request trickles in

OnRefused = Callable[[str, str, str], None]


@dataclass
class _Pending:
    peer: str
    sock: socket.socket
    deadline: float


class ConnectionGuard:
    """Counts of pending connections per peer and in total, and their deadlines."""

    def __init__(self, limits: DicomLimitsConfig, on_refused: OnRefused, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.max_request = limits.max_request_kb * 1024
        self._on_refused = on_refused
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._per_peer: Counter[str] = Counter()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # ---- admission
    def admit(self, sock: socket.socket, peer: str) -> bool:
        """Count ``sock`` as pending, or refuse it (False) when a limit is reached."""
        victim: _Pending | None = None
        with self._lock:
            if self._per_peer[peer] >= self.limits.max_pending_per_peer:
                refused = True
            else:
                refused = False
                if len(self._pending) >= self.limits.max_pending_total:
                    victim = self._evict_locked()
                deadline = self._clock() + self.limits.association_request_timeout_s
                self._pending[id(sock)] = _Pending(peer, sock, deadline)
                self._per_peer[peer] += 1
        if victim is not None:
            _shutdown(victim.sock)  # its gate thread sees the connection closed and ends
            self.refuse(victim.peer, f"{self.limits.max_pending_total} connections without a complete association "
                        "request: the oldest of the address holding most was closed (dicom.limits.max_pending_total)",
                        "pending_total")
        if refused:
            self.refuse(peer, f"{self.limits.max_pending_per_peer} connections from this address without a complete "
                        "association request (dicom.limits.max_pending_per_peer)", "pending_peer")
        return not refused

    def _evict_locked(self) -> _Pending:
        """The total is reached: make room for a newcomer by dropping the oldest pending connection
        of the address that holds most, so no set of addresses can keep another peer out."""
        top = max(self._per_peer.values())
        victim = min((e for e in self._pending.values() if self._per_peer[e.peer] == top), key=lambda e: e.deadline)
        self._pending.pop(id(victim.sock))
        self._per_peer[victim.peer] -= 1
        if self._per_peer[victim.peer] <= 0:
            del self._per_peer[victim.peer]
        return victim

    def deadline(self, sock: socket.socket) -> float:
        with self._lock:
            entry = self._pending.get(id(sock))
            return entry.deadline if entry is not None else self._clock()

    def release(self, sock: object) -> None:
        """``sock`` is no longer pending (request complete, or closed). Idempotent."""
        with self._lock:
            entry = self._pending.pop(id(sock), None)
            if entry is not None:
                self._per_peer[entry.peer] -= 1
                if self._per_peer[entry.peer] <= 0:
                    del self._per_peer[entry.peer]

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def refuse(self, peer: str, reason: str, limit: str) -> None:
        log_event(logger, "connection.refused", logging.WARNING, peer=peer, reason=reason, limit=limit)
        try:
            self._on_refused(peer, reason, limit)
        except Exception:  # noqa: BLE001 - an observer must not break the accept loop
            logger.exception("connection.refused_report_failed")

    # ---- the reaper: shuts down sockets past their deadline (TLS; a stuck gate as a backstop)
    def start(self) -> None:
        if self._reaper is None:
            self._stop.clear()
            self._reaper = threading.Thread(target=self._reap_loop, name="dicom-guard", daemon=True)
            self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
            self._reaper = None
        with self._lock:
            entries = list(self._pending.values())
        for entry in entries:
            _shutdown(entry.sock)

    def _reap_loop(self) -> None:
        while not self._stop.wait(0.5):
            now = self._clock()
            with self._lock:
                late = [e for e in self._pending.values() if e.deadline + 1.0 < now]
            for entry in late:
                self.release(entry.sock)
                _shutdown(entry.sock)
                self.refuse(entry.peer, self._timeout_reason(), "timeout")

    def _timeout_reason(self) -> str:
        return (f"no complete association request within {self.limits.association_request_timeout_s:g} s "
                "(dicom.limits.association_request_timeout_s)")

    # ---- the gate (in the connection's own thread)
    def gate(self, sock: socket.socket, peer: str) -> bool:
        """Wait for a complete, acceptable A-ASSOCIATE-RQ on ``sock``; False: refused and closed."""
        if isinstance(sock, ssl.SSLSocket):
            return True  # released by request_complete() or the reaper (see the module docstring)
        try:
            verdict = await_request(sock, self.deadline(sock), self.max_request, clock=self._clock)
        finally:
            self.release(sock)
        if verdict is None:
            return True
        reason, limit = verdict
        _shutdown(sock)
        if limit == "closed":
            log_event(logger, "connection.closed_before_request", logging.DEBUG, peer=peer)
        else:
            self.refuse(peer, reason if limit != "timeout" else self._timeout_reason(), limit)
        return False


def await_request(sock: socket.socket, deadline: float, max_request: int, *,
                  clock: Callable[[], float] = time.monotonic) -> tuple[str, str] | None:
    """None once ``sock``'s receive buffer holds a whole A-ASSOCIATE-RQ of at most ``max_request``
    bytes (nothing is consumed); else (reason, limit) with limit one of closed, timeout, pdu_type,
    pdu_size."""
    need = _HEADER
    seen = -1
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return "timeout", "timeout"
        try:
            readable, _, _ = select.select([sock], [], [], min(remaining, 1.0))
            if not readable:
                continue
            data = sock.recv(need, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except (OSError, ValueError):
            return "connection error", "closed"
        if not data:
            return "closed before the request was complete", "closed"
        if len(data) >= _HEADER and need == _HEADER:
            pdu_type, _, length = struct.unpack(">BBL", data[:_HEADER])
            if pdu_type != _A_ASSOCIATE_RQ:
                return f"first PDU is not an A-ASSOCIATE-RQ (type 0x{pdu_type:02X})", "pdu_type"
            if length > max_request:
                return (f"A-ASSOCIATE-RQ of {length} bytes exceeds {max_request} "
                        "(dicom.limits.max_request_kb)", "pdu_size")
            need = _HEADER + length
            continue
        if len(data) >= need:
            return None
        if len(data) == seen:
            if _peer_hung_up(sock):  # buffered bytes keep a peek from ever seeing EOF
                return "closed before the request was complete", "closed"
            time.sleep(min(_POLL_S, max(0.0, deadline - clock())))  # select() stays readable: don't spin
        seen = len(data)


def _peer_hung_up(sock: socket.socket) -> bool:
    """True when the peer has shut down its side (Linux POLLRDHUP; elsewhere: never known early)."""
    flag = getattr(select, "POLLRDHUP", 0)
    if not flag:
        return False
    poller = select.poll()
    poller.register(sock, flag)
    return any(ev & flag for _, ev in poller.poll(0))


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server behind a ``ConnectionGuard`` (module docstring).

    Created by ``AE.make_server(..., server_class=GuardedServer, guard=guard)``.
    """

    # gate threads must not hold up shutdown; the guard shuts their sockets down on stop()
    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        self.guard = guard
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        # accepted sockets inherit the buffer; set before listen() so the window scale allows it
        try:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(_RCVBUF, 2 * self.guard.max_request))
        except OSError:  # pragma: no cover - a platform refusing it keeps its default
            pass
        super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:  # accept thread: never blocks
        peer = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        if not self.guard.admit(request, peer):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # a thread: process_request_thread
        except Exception:  # pragma: no cover - thread creation failed (out of threads)
            self.guard.release(request)
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        peer = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        if not self.guard.gate(request, peer):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def server_close(self) -> None:
        self.guard.stop()
        super().server_close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
