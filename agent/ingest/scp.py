"""The DICOM listener: a pynetdicom Storage + Verification SCP in front of the spool.

Small handler functions are bound to pynetdicom events with their dependencies passed as handler
arguments (pynetdicom's own style)::

    (evt.EVT_C_STORE, handle_store, [spool, state])

``handle_store`` only writes the bytes the peer sent to the spool and answers a status; decoding,
assembly and inference happen elsewhere, so a slow or crashing model never stops reception.

C-STORE statuses (the peer sees these):

====== ================================================================ =========================
status meaning                                                          event (``on_event``)
====== ================================================================ =========================
0x0000 stored durably and journaled (or a duplicate of a stored one)    ``on_instance`` (new only)
0xA700 free space below ``storage.min_free_mb`` (nothing kept)           ``dicom.rejected`` error
0xA701 other spool / journal failure (nothing acknowledged)              ``dicom.rejected`` error
0xC210 malformed: unparseable, required UID missing, image w/o pixels    ``instance.quarantined``
0xC211 SOP class not accepted by this listener                            ``dicom.rejected``
0xC212 would decode beyond ``dicom.limits`` (Deflated data set inflating ``dicom.rejected``
       or declared pixel data over max_decompressed_mb / over the ratio)
0xC213 data set over ``dicom.limits.max_instance_mb`` (the transfer is    ``dicom.rejected``
       aborted when the limit is passed, see ``agent.ingest.receive``)
0xC001 unexpected exception in the handler (logged with traceback)      ``dicom.rejected`` error
====== ================================================================ =========================

Associations are refused with A-ASSOCIATE-RJ (rejected-permanent, service-user) when the called
AE title is not ours (reason 7) or the calling AE title / address is not in ``allowed_callers``
(reason 3); an ``association.rejected`` event says which. While the agent stops (``drain``), every new
association is refused with rejected-transient, service-provider (presentation), temporary congestion
(2/3/1), so the peer retries later instead of seeing a reset; those already open may finish.
``set_allowed_callers`` swaps the caller rules for the next association (SIGHUP reload). ``on_instance`` is called once per newly
stored instance, never for duplicates, in the association's thread: keep it quick (queue work).

Before any of that, ``agent.ingest.guard`` admits a connection to pynetdicom only once its whole
A-ASSOCIATE-RQ has arrived (bounded in time, size and number of such connections per peer and in
total; ``connection.refused`` otherwise), and ``agent.ingest.receive`` bounds what an admitted
peer can make us hold (data sets received to disk, instance size, free space).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from socket import socket as Socket

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event as PynetdicomEvent
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from agent.core.config import DicomConfig
from agent.core.errors import (
    ConfigError,
    InstanceTooLargeError,
    LimitExceededError,
    MalformedDicomError,
    OutOfSpaceError,
    StorageError,
    UnsupportedDicomError,
)
from agent.core.events import AssociationRejected, ConnectionRefused, DicomRejected, InstanceQuarantined
from agent.core.log import log_event
from agent.core.metrics import NO_METRICS, Metrics
from agent.core.types import Event, Instance
from agent.ingest.guard import ConnectionGuard, GuardedServer
from agent.ingest.part10 import part10_bytes, store_request
from agent.ingest.receive import ChunkedReceive, ReceiveLimiter
from agent.ingest.sopclasses import TRANSFER_SYNTAXES, VERIFICATION, unique
from agent.ingest.spool import QuarantinedError, Spool
from agent.ingest.tls import server_ssl_context

__all__ = [
    "DicomListener",
    "ListenerState",
    "handle_close",
    "handle_echo",
    "handle_open",
    "handle_rejected",
    "handle_requested",
    "handle_store",
    "parse_allowed_callers",
    "part10_bytes",
    "server_ssl_context",
]

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_UNSUPPORTED = 0xC211
STATUS_PROCESSING_FAILURE = 0xC001

# a data set received to disk up to this size is stored through the in-memory fast path
_IN_MEMORY_MAX = 16 * 1024 * 1024

# A-ASSOCIATE-RJ parameters (PS3.8 9.3.4): rejected-permanent, DUL service-user
_RJ_PERMANENT = 0x01
_RJ_SERVICE_USER = 0x01
_RJ_CALLING_AE_NOT_RECOGNISED = 0x03
# while stopping: rejected-transient, DUL service-provider (presentation), temporary congestion
_RJ_STOPPING = (0x02, 0x03, 0x01)


@dataclass
class _Counts:
    stored: int = 0
    duplicates: int = 0
    failed: int = 0


@dataclass
class ListenerState:
    """What the handlers share: accepted SOP classes, caller rules, callbacks, per-association counts."""

    sop_classes: frozenset[str]
    allowed: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network | None]]
    on_instance: Callable[[Instance], None]
    on_event: Callable[[Event], None]
    socket_timeout: float | None
    metrics: Metrics = NO_METRICS
    max_instance_bytes: int = 2048 * 1024 * 1024
    guard: ConnectionGuard | None = None
    receiving: ReceiveLimiter | None = None
    draining: bool = False  # stopping: new associations are rejected (transient)
    counts: dict[int, _Counts] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, assoc: object) -> _Counts:
        with self.lock:
            return self.counts.setdefault(id(assoc), _Counts())

    def pop_counts(self, assoc: object) -> _Counts | None:
        with self.lock:
            return self.counts.pop(id(assoc), None)

    def emit(self, event: Event) -> None:
        """Hand an event to the service; an observer's failure never changes the DICOM answer."""
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 - observer errors must not reach pynetdicom
            logger.exception("on_event.failed", extra={"ea_fields": {"kind": event.kind}})

    def instance(self, instance: Instance) -> None:
        """Hand a newly stored instance to the service (already durable: Success regardless)."""
        try:
            self.on_instance(instance)
        except Exception:  # noqa: BLE001 - the instance is journaled; the assembler can recover it
            logger.exception(
                "on_instance.failed", extra={"ea_fields": {"sop_instance_uid": instance.sop_instance_uid}}
            )


# --------------------------------------------------------------------------- handlers


def handle_open(event: PynetdicomEvent, state: ListenerState) -> None:
    """EVT_CONN_OPEN: give the accepted socket a timeout.

    Python's ``accept()`` returns a blocking socket without timeout even when the listening socket
    has one, so a peer that stalls in the middle of a PDU would hold its association (and a
    ``maximum_associations`` slot) forever. With a timeout pynetdicom's DUL sees an OSError and
    closes the connection.
    """
    if state.socket_timeout is None:
        return
    transport = event.assoc.dul.socket  # None only once the connection is gone
    sock: Socket | None = transport.socket if transport is not None else None
    if sock is not None:
        sock.settimeout(state.socket_timeout)


def handle_requested(event: PynetdicomEvent, state: ListenerState) -> None:
    """EVT_REQUESTED: reject a calling AE title / address not in ``allowed_callers``.

    pynetdicom's ``require_calling_aet`` checks the AE title alone; ``AET@IP`` entries need the
    peer address, which only this event offers before negotiation.
    """
    assoc = event.assoc
    if state.guard is not None:  # the request is whole (TLS connections are counted until now)
        state.guard.release(_raw_socket(assoc))
    request = assoc.requestor.primitive  # the peer's A-ASSOCIATE-RQ, received before this event
    calling = str(request.calling_ae_title or "").strip() if request is not None else ""
    peer = _peer_address(assoc)
    if state.draining:
        _reject(state, assoc, calling, peer, "the agent is stopping; try again later", _RJ_STOPPING)
        return
    allowed = state.allowed  # one read: a reload swaps the whole dict
    if not allowed:
        return
    rules = allowed.get(calling)
    if rules is None:
        reason = "calling AE title not recognised"
    elif _address_allowed(peer, rules):
        return
    else:
        reason = "calling AE title not allowed from this address"
    _reject(state, assoc, calling, peer, reason, (_RJ_PERMANENT, _RJ_SERVICE_USER, _RJ_CALLING_AE_NOT_RECOGNISED))


def _reject(state: ListenerState, assoc: Association, calling: str, peer: str, reason: str,
            rj: tuple[int, int, int]) -> None:
    """Report, then send A-ASSOCIATE-RJ (result, source, diagnostic) and wait until it is out."""
    # report first: once the peer has its A-ASSOCIATE-RJ it may already be trying again
    _association_rejected(state, calling_ae=calling, peer=peer, reason=reason,
                          result=rj[0], source=rj[1], diagnostic=rj[2])
    assoc.acse.send_reject(*rj)
    # send_reject() only queues the PDU for the DUL thread. After a reject sent from EVT_REQUESTED,
    # pynetdicom skips negotiation and closes the socket at once, usually before the A-ASSOCIATE-RJ
    # is out: the peer sees a dropped connection, not a rejection. kill() waits until the DUL is
    # back in Sta1 (RJ sent, transport closed), as pynetdicom's own rejection path does.
    assoc.kill()


def handle_rejected(event: PynetdicomEvent, state: ListenerState) -> None:
    """EVT_REJECTED: report rejections pynetdicom made itself (called AE title, too many associations)."""
    assoc = event.assoc
    rj = assoc.acceptor.primitive
    calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "").strip()
    _association_rejected(
        state,
        calling_ae=calling,
        peer=_peer_address(assoc),
        reason=str(rj.reason_str).lower() if rj is not None else "rejected",
        result=_int_or_none(getattr(rj, "result", None)),
        source=_int_or_none(getattr(rj, "result_source", None)),
        diagnostic=_int_or_none(getattr(rj, "diagnostic", None)),
    )


def handle_echo(event: PynetdicomEvent) -> int:
    """EVT_C_ECHO: answer Success (the listener is up)."""
    log_event(logger, "dicom.echo", logging.DEBUG, calling_ae=_calling_ae(event))
    return STATUS_SUCCESS


def handle_store(event: PynetdicomEvent, spool: Spool, state: ListenerState) -> int:
    """EVT_C_STORE: write the data set as received to the spool; return the C-STORE status.

    Success only after the spool has made the bytes durable (``fdatasync`` of a pool file whose
    name is already durable) and journaled them; see ``agent.ingest.spool``.
    """
    started = time.monotonic()
    calling_ae = _calling_ae(event)
    counts = state.count(event.assoc)
    command_uid = str(store_request(event).AffectedSOPInstanceUID or "")
    try:
        # set only when pynetdicom streamed the data set to a file (annotated Path, None otherwise)
        chunked_path: Path | None = event.dataset_path
        if state.receiving is not None:
            state.receiving.message_done(event.assoc)
        if chunked_path is not None:
            size = chunked_path.stat().st_size
            if size > state.max_instance_bytes:
                raise InstanceTooLargeError(f"data set of {size} bytes over dicom.limits.max_instance_mb")
            if size <= _IN_MEMORY_MAX:  # the fast path (pool file, one flush); pynetdicom removes the temp
                instance, created = spool.store_bytes(chunked_path.read_bytes(), calling_ae=calling_ae,
                                                      sop_classes=state.sop_classes)
            else:
                instance, created = spool.store_file(chunked_path, calling_ae=calling_ae,
                                                     sop_classes=state.sop_classes)
        else:
            # the data set bytes exactly as the peer encoded them, behind a file meta header
            instance, created = spool.store_bytes(
                part10_bytes(event), calling_ae=calling_ae, sop_classes=state.sop_classes
            )
    except OutOfSpaceError as exc:
        return _refuse(state, counts, DicomRejected(sop_instance_uid=command_uid, calling_ae=calling_ae,
                                                    reason=str(exc), status=exc.status, level="error"))
    except QuarantinedError as exc:
        return _refuse(state, counts, InstanceQuarantined(
            sop_instance_uid=exc.sop_instance_uid or command_uid, calling_ae=calling_ae, reason=exc.reason,
            status=exc.status, quarantine_id=exc.quarantine_id))
    except (MalformedDicomError, UnsupportedDicomError, LimitExceededError) as exc:
        return _refuse(state, counts, DicomRejected(sop_instance_uid=command_uid, calling_ae=calling_ae,
                                                    reason=str(exc), status=exc.status, level="warning"))
    except StorageError as exc:
        return _refuse(state, counts, DicomRejected(sop_instance_uid=command_uid, calling_ae=calling_ae,
                                                    reason=str(exc), status=exc.status, level="error"))
    except Exception as exc:  # noqa: BLE001 - answer 0xC001 and keep serving
        logger.exception(
            "store.failed",
            extra={"ea_fields": {"sop_instance_uid": command_uid, "calling_ae": calling_ae}},
        )
        # the event carries the exception type only: messages of third-party errors may quote data
        return _refuse(state, counts, DicomRejected(sop_instance_uid=command_uid, calling_ae=calling_ae,
                                                    reason=f"internal error ({type(exc).__name__})",
                                                    status=STATUS_PROCESSING_FAILURE, level="error"), log=False)

    # one check instead of building the fields of a record that is dropped (DEBUG is off in service)
    debug = logger.isEnabledFor(logging.DEBUG)
    state.metrics.observe("receive", time.monotonic() - started)
    if created:
        counts.stored += 1
        state.metrics.count("instances_received")
        if debug:
            log_event(logger, "instance.stored", logging.DEBUG, sop_instance_uid=instance.sop_instance_uid,
                      series_uid=instance.series_uid, transfer_syntax=instance.transfer_syntax,
                      size=instance.size, calling_ae=calling_ae)
        state.instance(instance)
    else:
        counts.duplicates += 1
        if debug:
            log_event(logger, "instance.duplicate", logging.DEBUG, sop_instance_uid=instance.sop_instance_uid,
                      calling_ae=calling_ae)
    return STATUS_SUCCESS


def handle_data_recv(event: PynetdicomEvent, state: ListenerState) -> None:
    """EVT_DATA_RECV: count the data set in flight; abort past the size or free-space limits."""
    if state.receiving is not None:
        state.receiving.data(event.assoc, event.data)


def handle_accepted(event: PynetdicomEvent, state: ListenerState) -> None:
    """EVT_ACCEPTED: counted for telemetry (rejections are counted where they are reported)."""
    state.metrics.count("associations_accepted")


def handle_close(event: PynetdicomEvent, state: ListenerState) -> None:
    """EVT_CONN_CLOSE: one summary line per association (counts, not one line per instance)."""
    if state.guard is not None:
        state.guard.release(_raw_socket(event.assoc))
    if state.receiving is not None:
        state.receiving.closed(event.assoc)
    counts = state.pop_counts(event.assoc)
    if counts is None:
        return  # no C-STORE on this connection (echo, rejected association)
    log_event(logger, "association.closed", calling_ae=_calling_ae(event), stored=counts.stored,
              duplicates=counts.duplicates, failed=counts.failed)


# --------------------------------------------------------------------------- listener


class DicomListener:
    """Storage SCP for ``sop_classes`` (plus Verification) on ``cfg.bind:cfg.port``.

    ``start()`` returns the bound port (``cfg.port == 0`` picks a free one); ``stop()`` aborts
    open associations and closes the socket. With ``chunked_receive=True`` (the default)
    pynetdicom streams each data set to a temp file in ``<spool>/.tmp/recv`` instead of memory
    (``agent.ingest.receive.ChunkedReceive``: process-wide while the listener runs).
    """

    def __init__(
        self,
        cfg: DicomConfig,
        spool: Spool,
        sop_classes: Sequence[str],
        on_instance: Callable[[Instance], None],
        on_event: Callable[[Event], None],
        *,
        chunked_receive: bool = True,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.sop_classes = tuple(u for u in unique(sop_classes) if u != VERIFICATION)
        if not self.sop_classes:
            raise ConfigError("dicom: the listener needs at least one storage SOP class")
        self.chunked_receive = chunked_receive
        self.state = ListenerState(
            sop_classes=frozenset(self.sop_classes),
            allowed=parse_allowed_callers(cfg.allowed_callers),
            on_instance=on_instance,
            on_event=on_event,
            socket_timeout=cfg.network_timeout_s,
            metrics=metrics,
            max_instance_bytes=cfg.limits.max_instance_mb * 1024 * 1024,
        )
        self.state.guard = ConnectionGuard(cfg.limits, self._connection_refused)
        self.state.receiving = ReceiveLimiter(self.state.max_instance_bytes, spool.free_mb, spool.min_free_mb,
                                              self._transfer_aborted)
        # built now so a bad certificate path fails at construction, not at the first peer
        self._ssl_context = server_ssl_context(cfg.tls, handshake_timeout=cfg.acse_timeout_s) if cfg.tls.enabled else None
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None
        self._accept: threading.Thread | None = None
        self._chunked = ChunkedReceive(spool.tmp_dir / "recv") if chunked_receive else None

    @property
    def port(self) -> int:
        """The bound TCP port (after ``start()``)."""
        if self._server is None:
            raise RuntimeError("listener not started")
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> int:
        """Start serving in background threads; returns the bound port."""
        if self._server is not None:
            return self.port
        cfg = self.cfg
        ae = AE(ae_title=cfg.ae_title)
        ae.require_called_aet = True
        # pynetdicom checks the bare titles; AET@IP rules are enforced in handle_requested
        ae.require_calling_aet = sorted(self.state.allowed)
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = cfg.max_pdu
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.add_supported_context(VERIFICATION, list(TRANSFER_SYNTAXES[:3]))
        for uid in self.sop_classes:
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))

        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, handle_open, [self.state]),
            (evt.EVT_REQUESTED, handle_requested, [self.state]),
            (evt.EVT_REJECTED, handle_rejected, [self.state]),
            (evt.EVT_ACCEPTED, handle_accepted, [self.state]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.spool, self.state]),
            (evt.EVT_CONN_CLOSE, handle_close, [self.state]),
            (evt.EVT_DATA_RECV, handle_data_recv, [self.state]),
        ]
        if self._chunked is not None:
            self._chunked.start()
        guard = self.state.guard
        assert guard is not None
        try:
            # ae.start_server(block=False) with the guarded server class (agent.ingest.guard)
            server = ae.make_server((cfg.bind, cfg.port), evt_handlers=handlers, ssl_context=self._ssl_context,
                                    server_class=GuardedServer, guard=guard)
        except OSError as exc:
            self._restore_chunked()
            raise ConfigError(f"dicom.port: cannot listen on {cfg.bind}:{cfg.port}: {exc.strerror}") from exc
        guard.start()
        self._accept = threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True)
        self._accept.start()
        ae._servers.append(server)  # what ae.start_server does, so ae.shutdown() stops it
        self._ae, self._server = ae, server
        if not self.state.allowed:
            log_event(logger, "listener.open_to_any_caller", logging.WARNING,
                      hint="set dicom.allowed_callers to restrict calling AE titles")
        log_event(logger, "listener.started", ae_title=cfg.ae_title, bind=cfg.bind, port=self.port,
                  tls=bool(self._ssl_context), sop_classes=len(self.sop_classes),
                  transfer_syntaxes=len(TRANSFER_SYNTAXES), max_associations=cfg.max_associations)
        return self.port

    @property
    def accepting(self) -> bool:
        """The accept thread runs (the watchdog's receiver check)."""
        return self._accept is not None and self._accept.is_alive()

    def open_associations(self) -> int:
        """Associations established now (C-STOREs may be in progress on them)."""
        ae = self._ae
        return 0 if ae is None else sum(1 for a in ae.active_associations if a.is_established)

    def drain(self, timeout_s: float) -> int:
        """Reject new associations from now on and wait up to ``timeout_s`` for the open ones to end;
        returns how many are still open (``stop()`` aborts them)."""
        self.state.draining = True
        deadline = time.monotonic() + timeout_s
        while (n := self.open_associations()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return n

    def set_allowed_callers(self, entries: Sequence[str]) -> None:
        """New caller rules for the next association (one in progress keeps going). ConfigError
        for an entry that does not parse; then nothing changes."""
        allowed = parse_allowed_callers(entries)
        self.state.allowed = allowed
        if self._ae is not None:
            self._ae.require_calling_aet = sorted(allowed)

    def stop(self) -> None:
        """Stop accepting, abort open associations, close the socket. Idempotent."""
        server, ae = self._server, self._ae
        self._server = self._ae = None
        if server is not None:
            server.shutdown()
        if ae is not None:
            ae.shutdown()
        self._restore_chunked()
        if server is not None:
            log_event(logger, "listener.stopped", ae_title=self.cfg.ae_title)

    def _restore_chunked(self) -> None:
        if self._chunked is not None:
            self._chunked.stop()

    def _connection_refused(self, peer: str, reason: str, limit: str) -> None:
        self.state.metrics.count("associations_rejected")
        self.state.emit(ConnectionRefused(peer=peer, reason=reason, limit=limit).to_event(created_at=time.time()))

    def _transfer_aborted(self, assoc: Association, status: int, reason: str) -> None:
        self.state.metrics.count("instances_refused")
        self.state.emit(DicomRejected(sop_instance_uid="", calling_ae=_calling_ae_of(assoc), reason=reason,
                                      status=status, level="error" if status == 0xA700 else "warning"
                                      ).to_event(created_at=time.time()))

    def __enter__(self) -> DicomListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- helpers


def parse_allowed_callers(
    entries: Sequence[str],
) -> dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network | None]]:
    """``["PACS", "CT1@10.0.0.5", "CT2@10.0.1.0/24"]`` -> {AET: [network or None (any address)]}.

    Raises ConfigError for an address that does not parse.
    """
    out: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network | None]] = {}
    for entry in entries:
        aet, _, addr = entry.partition("@")
        aet = aet.strip()
        if not addr:
            out.setdefault(aet, []).append(None)
            continue
        try:
            net = ipaddress.ip_network(addr.strip(), strict=False)
        except ValueError as exc:
            raise ConfigError(f"dicom.allowed_callers: {entry!r}: {exc}") from exc
        out.setdefault(aet, []).append(net)
    return out


def _refuse(state: ListenerState, counts: _Counts, refusal: DicomRejected | InstanceQuarantined, *,
            log: bool = True) -> int:
    counts.failed += 1
    state.metrics.count("instances_quarantined" if isinstance(refusal, InstanceQuarantined) else "instances_refused")
    if log:
        log_event(logger, "store.refused", logging.WARNING,
                  **{**refusal.fields(), "status": f"0x{refusal.status:04X}"})
    state.emit(refusal.to_event(created_at=time.time()))
    return refusal.status


def _int_or_none(value: object) -> int | None:
    """pynetdicom's A-ASSOCIATE-RJ parameters are ints (PS3.8 9.3.4); anything else is not one."""
    return value if isinstance(value, int) else None


def _association_rejected(state: ListenerState, *, calling_ae: str, peer: str, reason: str,
                          result: int | None, source: int | None, diagnostic: int | None) -> None:
    rejection = AssociationRejected(calling_ae=calling_ae, peer=peer, reason=reason, result=result,
                                    source=source, diagnostic=diagnostic)
    state.metrics.count("associations_rejected")
    log_event(logger, "association.rejected", logging.WARNING, **rejection.fields())
    state.emit(rejection.to_event(created_at=time.time()))


def _address_allowed(peer: str, rules: list[ipaddress.IPv4Network | ipaddress.IPv6Network | None]) -> bool:
    if any(r is None for r in rules):
        return True
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return any(r is not None and ip.version == r.version and ip in r for r in rules)


def _peer_address(assoc: Association) -> str:
    try:
        return str(assoc.requestor.address)
    except (AttributeError, ValueError):
        return ""


def _calling_ae(event: PynetdicomEvent) -> str:
    return _calling_ae_of(event.assoc)


def _calling_ae_of(assoc: Association) -> str:
    try:
        return str(assoc.requestor.ae_title or "").strip()
    except AttributeError:
        return ""


def _raw_socket(assoc: Association) -> object:
    """The accepted socket under an association (the guard's key), or None once it is gone."""
    transport = getattr(assoc.dul, "socket", None)
    return getattr(transport, "socket", None)

