"""Storage SCU behind ``edge-agent send``: push DICOM files to a listener (ours or any PACS).

Each file goes in its own transfer syntax (one presentation context per SOP class + transfer
syntax pair found in the files) and its data set bytes are sent as they are on disk (pynetdicom's
chunked send), so nothing is decoded, transcoded or re-encoded on the way. All files travel on one
association; past 128 distinct pairs (the DICOM limit on proposed contexts) the files are sent in
batches, one association per batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pynetdicom import AE, _config
from pynetdicom.association import Association

from agent.core.errors import STORED_STATUSES, DicomError
from agent.core.log import log_event
from agent.ingest.spool.header import raw_str

__all__ = ["MAX_CONTEXTS", "SendReport", "send_files"]

logger = logging.getLogger(__name__)

#: At most 128 presentation contexts per association (context IDs are odd numbers 1..255).
MAX_CONTEXTS = 128

# _config.STORE_SEND_CHUNKED_DATASET is process-wide: one send at a time flips it on and back.
_CHUNKED_LOCK = threading.Lock()



@dataclass(frozen=True)
class SendReport:
    """What ``send_files`` did.

    ``statuses`` maps every file found to the C-STORE status the peer answered, or None when the
    file was not sent (not DICOM, no accepted presentation context, association lost);
    ``errors`` says why for each file that was not stored. ``sent`` counts files the peer
    stored (Success or a storage warning), ``failed`` all the others. ``skipped`` lists the
    files found while scanning a directory that are not DICOM Part 10 files (a README, a
    truth.json, a DICOMDIR's neighbours), with the reason: like storescu's ``+sd`` scan they are
    not failures; a file named explicitly that is not DICOM is.
    """

    sent: int
    failed: int
    statuses: Mapping[Path, int | None]
    elapsed_s: float
    errors: Mapping[Path, str] = field(default_factory=dict)
    skipped: Mapping[Path, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failed == 0


def send_files(
    paths: Sequence[Path],
    host: str,
    port: int,
    *,
    calling_aet: str = "EDGE_SCU",
    called_aet: str = "EDGE_AGENT",
    timeout: float = 30,
) -> SendReport:
    """Send files (directories are expanded recursively) with C-STORE; returns a SendReport.

    Raises DicomError when the peer rejects the association (the message gives pynetdicom's
    result, source and reason, e.g. "Calling AE title not recognised") or cannot be reached.
    """
    started = time.monotonic()
    statuses: dict[Path, int | None] = {}
    errors: dict[Path, str] = {}
    skipped: dict[Path, str] = {}
    # (sop class, transfer syntax) -> files, in first-seen order
    groups: dict[tuple[str, str], list[Path]] = {}
    for path, named in _expand(paths):
        try:
            sop_class, syntax = _sop_class_and_syntax(path)
        except ValueError as exc:
            if named:
                statuses[path] = None
                errors[path] = str(exc)
            else:
                skipped[path] = str(exc)
            continue
        groups.setdefault((sop_class, syntax), []).append(path)

    keys = list(groups)
    with _CHUNKED_LOCK:
        # send the encoded data set straight from the file: exact bytes, bounded memory, and no
        # pydicom round trip that could fail on (or "fix") an unusual but valid file
        saved, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
        try:
            for start in range(0, len(keys), MAX_CONTEXTS):
                batch = keys[start : start + MAX_CONTEXTS]
                _send_batch(batch, groups, host, port, calling_aet, called_aet, timeout, statuses, errors)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = saved

    sent = sum(1 for s in statuses.values() if s in STORED_STATUSES)
    report = SendReport(
        sent=sent,
        failed=len(statuses) - sent,
        statuses=statuses,
        elapsed_s=time.monotonic() - started,
        errors=errors,
        skipped=skipped,
    )
    log_event(logger, "send.done", host=host, port=port, sent=report.sent, failed=report.failed,
              skipped=len(skipped), elapsed_s=round(report.elapsed_s, 3))
    return report


def _send_batch(
    batch: list[tuple[str, str]],
    groups: Mapping[tuple[str, str], list[Path]],
    host: str,
    port: int,
    calling_aet: str,
    called_aet: str,
    timeout: float,
    statuses: dict[Path, int | None],
    errors: dict[Path, str],
) -> None:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class, syntax in batch:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        _close_socket(assoc)
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive  # the peer's A-ASSOCIATE-RJ
        why = f"{rj.reason_str} ({rj.result_str}, source: {rj.source_str})" if rj is not None else "no reason given"
        raise DicomError(
            f"association rejected by {called_aet}@{host}:{port}: {why}; calling AE title was {calling_aet!r}"
        )
    if not assoc.is_established:
        raise DicomError(
            f"could not associate with {called_aet}@{host}:{port} "
            f"({'aborted by peer' if assoc.is_aborted else 'connection refused or timed out'})"
        )
    try:
        files = [p for key in batch for p in groups[key]]
        for i, path in enumerate(files):
            if not _still_established(assoc):
                for rest in files[i:]:
                    statuses[rest] = None
                    errors[rest] = "association lost before this file was sent"
                break
            try:
                rsp = assoc.send_c_store(path)
            except Exception as exc:  # noqa: BLE001 - one unreadable/unencodable file must not stop the lot
                statuses[path] = None
                errors[path] = f"not sent: {type(exc).__name__}: {exc}"
                continue
            status = rsp.get("Status") if rsp is not None else None
            statuses[path] = int(status) if status is not None else None
            if status is None:
                errors[path] = "no response (timeout or association aborted)"
            elif int(status) not in STORED_STATUSES:
                errors[path] = f"peer answered 0x{int(status):04X}"
    finally:
        if assoc.is_established:
            assoc.release()


def _still_established(assoc: Association) -> bool:
    """``assoc.is_established`` read afresh: any send may end the association. (A function, so a
    type checker does not carry the check made before the sends over to this one.)"""
    return assoc.is_established


def _close_socket(assoc: object) -> None:
    """Close the socket of an association that did not come up.

    pynetdicom (3.0) calls ``shutdown()`` and ``close()`` in one try block; when the peer has already
    dropped the connection ``shutdown()`` raises ENOTCONN and the descriptor is left open.
    """
    dul_socket = getattr(getattr(assoc, "dul", None), "socket", None)
    sock = getattr(dul_socket, "socket", None)
    if sock is not None:
        sock.close()


def _expand(paths: Sequence[Path]) -> Iterator[tuple[Path, bool]]:
    """Every file to consider, with whether the user named it (True) or a directory scan found it."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            yield from ((q, False) for q in sorted(q for q in p.rglob("*") if q.is_file()))
        else:
            yield p, True


def _sop_class_and_syntax(path: Path) -> tuple[str, str]:
    """SOP Class UID and transfer syntax of a Part 10 file; ValueError if it is not one."""
    try:
        with open(path, "rb") as f:
            # only the file meta is needed: stop at the first data set element
            ds = read_partial(f, stop_when=lambda tag, vr, length: int(tag) >> 16 != 0x0002)
    except FileNotFoundError as exc:
        raise ValueError("not found") from exc
    except InvalidDicomError as exc:
        raise ValueError("not a DICOM Part 10 file") from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise ValueError(f"unreadable ({type(exc).__name__})") from exc
    meta = ds.file_meta
    # pynetdicom's chunked send picks the context from the file meta, so group by the same values
    syntax = raw_str(meta, 0x00020010) if meta else ""
    sop_class = raw_str(meta, 0x00020002) if meta else ""
    if not sop_class or not syntax or not (meta and raw_str(meta, 0x00020003)):
        raise ValueError("file meta lacks MediaStorageSOPClassUID/-InstanceUID or TransferSyntaxUID")
    return sop_class, syntax
