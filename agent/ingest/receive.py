"""Bounding what an admitted peer can make the listener hold while a data set arrives.

* Data sets are received to disk (pynetdicom's chunked receive, ``_config.STORE_RECV_CHUNKED_DATASET``)
  into ``<spool>/.tmp/recv`` (``ChunkedReceive``: pynetdicom's temp files are redirected there, so
  they are on the spool's filesystem and never in a RAM-backed ``/tmp``). Memory per association is
  then one PDU (``dicom.max_pdu``, offered to the peer) whatever the data set's size.
* ``ReceiveLimiter`` (bound to ``EVT_DATA_RECV``) counts the P-DATA bytes of the message being
  received on each association. Past ``dicom.limits.max_instance_mb``, or when the spool's free
  space would fall below ``storage.min_free_mb`` (checked every ``_SPACE_EVERY`` bytes while a
  large data set arrives, so it cannot fill the disk; a smaller one is answered 0xA700 by the
  spool, which checks before it writes), the connection is shut down:
  DICOM has no way to refuse a data set half way, so the peer sees the association aborted, and
  a ``dicom.rejected`` event (0xC213 too large, 0xA700 out of space) says why.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Any

import pynetdicom.dimse_messages as dimse_messages
from pynetdicom import _config

from agent.core.log import log_event

__all__ = ["ChunkedReceive", "ReceiveLimiter"]

logger = logging.getLogger(__name__)

_P_DATA_TF = 0x04
_MB = 1024 * 1024
_SPACE_EVERY = 32 * _MB
_NTF = "NamedTemporaryFile"  # what pynetdicom.dimse_messages creates chunked-receive files with

#: (association, status, reason) -> None: report an aborted transfer
OnAbort = Callable[[Any, int, str], None]


class ReceiveLimiter:
    """Per-association byte counts of the message in flight; aborts beyond the limits."""

    def __init__(self, max_instance_bytes: int, free_mb: Callable[[], float], min_free_mb: int,
                 on_abort: OnAbort) -> None:
        self.max_instance_bytes = max_instance_bytes
        self._free_mb = free_mb
        self._min_free_mb = min_free_mb
        self._on_abort = on_abort
        self._lock = threading.Lock()
        self._received: dict[int, int] = {}

    def data(self, assoc: Any, data: bytes) -> None:
        """EVT_DATA_RECV: one PDU received on ``assoc``."""
        if not data or data[0] != _P_DATA_TF:
            return
        key = id(assoc)
        with self._lock:
            before = self._received.get(key, 0)
            if before < 0:
                return  # already aborted
            now = before + len(data)
            self._received[key] = now
        if now > self.max_instance_bytes:
            self._abort(assoc, 0xC213, f"data set larger than {self.max_instance_bytes // _MB} MiB "
                                       "(dicom.limits.max_instance_mb): transfer aborted")
        elif before // _SPACE_EVERY != now // _SPACE_EVERY:  # smaller ones: the spool answers 0xA700
            free = self._free_mb()
            if free - now / _MB < self._min_free_mb:
                self._abort(assoc, 0xA700, f"free space {free:.0f} MB is below the {self._min_free_mb} MB floor "
                                           "while receiving: transfer aborted")

    def message_done(self, assoc: Any) -> None:
        """A C-STORE (or any message) was handed over: the next one counts from zero."""
        with self._lock:
            if self._received.get(id(assoc), 0) >= 0:
                self._received.pop(id(assoc), None)

    def closed(self, assoc: Any) -> None:
        with self._lock:
            self._received.pop(id(assoc), None)

    def _abort(self, assoc: Any, status: int, reason: str) -> None:
        with self._lock:
            self._received[id(assoc)] = -1
        log_event(logger, "receive.aborted", logging.WARNING, status=f"0x{status:04X}", reason=reason)
        try:
            self._on_abort(assoc, status, reason)
        finally:
            transport = getattr(getattr(assoc, "dul", None), "socket", None)
            sock = getattr(transport, "socket", None)
            if isinstance(sock, socket.socket):
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the DUL's next read fails: connection closed
                except OSError:
                    pass


class ChunkedReceive:
    """Turns pynetdicom's chunked receive on, into ``directory``; ``stop()`` restores both settings.

    Both are process-wide (pynetdicom reads them when a C-STORE's command set arrives): one
    listener per process.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._saved: tuple[bool, Any] | None = None

    def start(self) -> None:
        if self._saved is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.iterdir():  # never acknowledged: the peer got no answer
            if stale.is_file():
                stale.unlink(missing_ok=True)
        self._saved = (_config.STORE_RECV_CHUNKED_DATASET, getattr(dimse_messages, _NTF))
        _config.STORE_RECV_CHUNKED_DATASET = True
        setattr(dimse_messages, _NTF, functools.partial(NamedTemporaryFile, dir=str(self.directory)))

    def stop(self) -> None:
        if self._saved is None:
            return
        _config.STORE_RECV_CHUNKED_DATASET, saved = self._saved
        setattr(dimse_messages, _NTF, saved)
        self._saved = None
