"""Durable storage of received DICOM instances and their SQLite journal.

The listener hands the spool the bytes a peer sent (preamble, file meta and the data set exactly as
encoded on the wire); the spool makes them durable before anyone acknowledges them:

1. check the free-space floor (counting the incoming size) -> ``OutOfSpaceError``, nothing written;
2. write a temp file under ``<root>/.tmp`` (same filesystem as the spool), ``fsync`` it;
3. parse only the header (pydicom, stopping before the pixel data) for UIDs and routing fields;
   a file that does not parse or lacks a required UID -> quarantine + ``MalformedDicomError``;
4. ``rename`` to ``<root>/<study_uid>/<series_uid>/<sop_instance_uid>.dcm``, ``fsync`` the
   directory (and the parents of directories it had to create);
5. insert the ``instances`` row (``synchronous=FULL``).

Only then may the caller answer Success. A SOP Instance UID already in the journal is a duplicate:
the first copy is kept, the new temp file dropped, and the call succeeds with ``created=False``.
A crash at any point leaves either nothing acknowledged (stale temp files, removed at start-up) or
a renamed file without a row (indexed again by ``reconcile()``, or replaced when the peer resends).

Nothing here reads or logs patient fields; the journal holds UIDs and routing attributes only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from agent.db import transaction
from agent.errors import MalformedDicomError, OutOfSpaceError, StorageError, UnsupportedDicomError
from agent.ingest.sopclasses import is_image_storage, is_valid_uid, sop_class_name
from agent.log import log_event
from agent.types import Instance

__all__ = ["QuarantinedError", "Spool", "dataset_offset"]

logger = logging.getLogger(__name__)

_MB = 1024 * 1024
_COPY_CHUNK = 1024 * 1024

# (7FE0,0010) Pixel Data, (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})

_TAG_SOP_CLASS = 0x00080016
_TAG_SOP_INSTANCE = 0x00080018
_TAG_MODALITY = 0x00080060
_TAG_SERIES_DESCRIPTION = 0x0008103E
_TAG_BODY_PART = 0x00180015
_TAG_STUDY_UID = 0x0020000D
_TAG_SERIES_UID = 0x0020000E
_TAG_INSTANCE_NUMBER = 0x00200013

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid   TEXT PRIMARY KEY,
    sop_class_uid      TEXT NOT NULL,
    study_uid          TEXT NOT NULL,
    series_uid         TEXT NOT NULL,
    modality           TEXT NOT NULL DEFAULT '',
    transfer_syntax    TEXT NOT NULL,
    path               TEXT NOT NULL,
    size               INTEGER NOT NULL,
    received_at        REAL NOT NULL,
    calling_ae         TEXT NOT NULL DEFAULT '',
    series_description TEXT NOT NULL DEFAULT '',
    body_part          TEXT NOT NULL DEFAULT '',
    instance_number    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE TABLE IF NOT EXISTS quarantine (
    id          TEXT PRIMARY KEY,
    path        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    calling_ae  TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL
);
"""


class DiskUsage(Protocol):
    """What ``shutil.disk_usage`` returns; only ``free`` (bytes) is used."""

    @property
    def free(self) -> int: ...


class QuarantinedError(MalformedDicomError):
    """A malformed instance whose bytes were moved to quarantine (status 0xC210).

    ``quarantine_id`` names ``<quarantine>/<id>.dcm`` and its ``.json`` sidecar; ``reason`` says
    what was wrong without quoting any patient field.
    """

    def __init__(self, reason: str, *, quarantine_id: str, path: Path, sop_instance_uid: str = "") -> None:
        super().__init__(f"malformed instance quarantined as {quarantine_id}: {reason}")
        self.reason = reason
        self.quarantine_id = quarantine_id
        self.path = path
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True)
class _Header:
    """The header fields the spool needs, read without touching the pixel data."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    modality: str
    series_description: str
    body_part: str
    instance_number: int


class Spool:
    """The spool directory, its quarantine and the ``instances`` / ``quarantine`` tables.

    ``root`` and ``quarantine`` are created if missing. ``conn`` comes from ``agent.db.connect``;
    the spool serialises its own use of it with a lock, so the listener's association threads and
    the assembler may call the spool concurrently. Give the spool a connection of its own: other
    code using the same connection outside this lock could interleave with its statements. ``min_free_mb`` is the floor below which
    instances are refused; ``disk_usage`` is injectable so tests can fake a full disk.
    """

    def __init__(
        self,
        root: Path,
        quarantine: Path,
        conn: sqlite3.Connection,
        min_free_mb: int,
        *,
        disk_usage: Callable[[Path], DiskUsage] = shutil.disk_usage,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root).absolute()
        self.quarantine_dir = Path(quarantine).absolute()
        self.tmp_dir = self.root / ".tmp"
        self.min_free_mb = min_free_mb
        self._conn = conn
        self._disk_usage = disk_usage
        self._clock = clock
        # One lock for the journal and for directory create/rename/delete: sqlite3 connections are
        # not safe for interleaved use across threads, and retention must not rmdir a series
        # directory between a store's mkdir and its rename.
        self._lock = threading.RLock()
        for d in (self.root, self.tmp_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._conn.executescript(_SCHEMA)
        self._remove_stale_temps()

    # ------------------------------------------------------------------ storing

    def store_bytes(
        self,
        data: bytes | bytearray | memoryview,
        *,
        calling_ae: str = "",
        sop_classes: Collection[str] | None = None,
    ) -> tuple[Instance, bool]:
        """Store one Part 10 encoded instance (preamble + file meta + data set) durably.

        Returns ``(instance, created)``; ``created`` is False for a SOP Instance UID already
        stored (the first copy is kept). ``sop_classes``, when given, is the set of SOP classes
        accepted: anything else raises ``UnsupportedDicomError`` and is not kept.
        Raises ``OutOfSpaceError`` (nothing written), ``QuarantinedError`` (a
        ``MalformedDicomError``; bytes moved to quarantine) or ``StorageError``.
        """
        self._check_space(len(data))
        tmp = self._new_temp_path()
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            _unlink_quietly(tmp)
            raise _storage_error(exc, "writing a received instance") from exc
        except BaseException:
            _unlink_quietly(tmp)  # nothing half-written stays behind, whatever interrupted us
            raise
        return self._commit(tmp, calling_ae=calling_ae, sop_classes=sop_classes)

    def store_file(
        self,
        tmp_path: Path,
        *,
        calling_ae: str = "",
        sop_classes: Collection[str] | None = None,
    ) -> tuple[Instance, bool]:
        """Store a Part 10 file durably; same result and errors as ``store_bytes``.

        A file already under the spool's ``.tmp`` directory is consumed (renamed into place or
        removed). Any other file (pynetdicom's chunked-receive temp file, a file on disk) is left
        where it is: it is hard-linked into ``.tmp`` when on the same filesystem, copied otherwise.
        """
        tmp_path = Path(tmp_path)
        try:
            size = tmp_path.stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot read {tmp_path.name}: {exc.strerror}") from exc
        if tmp_path.absolute().parent == self.tmp_dir:
            tmp = tmp_path.absolute()
            try:
                # the bytes are already on the spool's disk; count only what is left
                self._check_space(0)
                _fsync_file(tmp)
            except OSError as exc:
                _unlink_quietly(tmp)
                raise _storage_error(exc, "syncing a received instance") from exc
            except BaseException:
                _unlink_quietly(tmp)
                raise
        else:
            self._check_space(size)
            tmp = self._new_temp_path()
            self._link_or_copy(tmp_path, tmp)
        return self._commit(tmp, calling_ae=calling_ae, sop_classes=sop_classes)

    def _link_or_copy(self, src: Path, dst: Path) -> None:
        """Put ``src``'s bytes at ``dst`` (in .tmp) durably without modifying ``src``."""
        try:
            os.link(src, dst)
        except OSError:
            # other filesystem (EXDEV), or links not permitted: stream a copy instead
            try:
                with open(src, "rb") as fin, open(dst, "xb") as fout:
                    shutil.copyfileobj(fin, fout, _COPY_CHUNK)
                    fout.flush()
                    os.fsync(fout.fileno())
            except OSError as exc:
                _unlink_quietly(dst)
                raise _storage_error(exc, "copying a received instance") from exc
            except BaseException:
                _unlink_quietly(dst)
                raise
            return
        try:
            _fsync_file(dst)
        except OSError as exc:
            _unlink_quietly(dst)
            raise _storage_error(exc, "syncing a received instance") from exc

    def _commit(
        self, tmp: Path, *, calling_ae: str, sop_classes: Collection[str] | None
    ) -> tuple[Instance, bool]:
        """Parse the durable temp file, then rename it into place and journal it (or not)."""
        try:
            header = _read_header(tmp)
        except MalformedDicomError as exc:
            raise self._quarantine(tmp, str(exc), calling_ae=calling_ae) from exc
        except BaseException:
            _unlink_quietly(tmp)
            raise
        if sop_classes is not None and header.sop_class_uid not in sop_classes:
            _unlink_quietly(tmp)
            raise UnsupportedDicomError(
                f"SOP class {header.sop_class_uid} ({sop_class_name(header.sop_class_uid)}) not accepted"
            )

        size = tmp.stat().st_size
        series_dir = self.root / _path_part(header.study_uid) / _path_part(header.series_uid)
        final = series_dir / f"{_path_part(header.sop_instance_uid)}.dcm"
        with self._lock:
            existing = self._get_locked(header.sop_instance_uid)
            if existing is not None:
                _unlink_quietly(tmp)
                return existing, False
            try:
                _makedirs_durable(series_dir, stop_at=self.root)
                # replace, not link: a file left there by a crash between rename and insert (never
                # acknowledged) is simply superseded by this copy of the same instance
                os.replace(tmp, final)
                _fsync_dir(series_dir)
            except OSError as exc:
                _unlink_quietly(tmp)
                raise _storage_error(exc, "moving an instance into the spool") from exc
            instance = Instance(
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                study_uid=header.study_uid,
                series_uid=header.series_uid,
                path=final,
                transfer_syntax=header.transfer_syntax,
                modality=header.modality,
                received_at=self._clock(),
                size=size,
                calling_ae=calling_ae,
                series_description=header.series_description,
                body_part=header.body_part,
                instance_number=header.instance_number,
            )
            try:
                self._insert_locked(instance)
            except sqlite3.Error as exc:
                # the file stays (it is the peer's data) but is not acknowledged; a resend or
                # reconcile() journals it
                raise StorageError(f"journal insert failed: {exc}") from exc
        return instance, True

    # ------------------------------------------------------------------ quarantine

    def _quarantine(self, tmp: Path, reason: str, *, calling_ae: str) -> QuarantinedError:
        """Move ``tmp`` (the raw bytes as received) to quarantine with a JSON sidecar and a row."""
        qid = uuid.uuid4().hex
        dst = self.quarantine_dir / f"{qid}.dcm"
        received_at = self._clock()
        meta = _file_meta_summary(tmp)
        try:
            size = tmp.stat().st_size
            digest = _sha256(tmp)
            try:
                os.replace(tmp, dst)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # quarantine on another filesystem: copy durably, then drop the temp
                shutil.copyfile(tmp, dst)
                _fsync_file(dst)
                _unlink_quietly(tmp)
            sidecar = {
                "id": qid,
                "reason": reason,
                "calling_ae": calling_ae,
                "received_at": received_at,
                "size": size,
                "sha256": digest,
                **meta,
            }
            side = self.quarantine_dir / f"{qid}.json"
            with open(side, "x", encoding="utf-8") as f:
                json.dump(sidecar, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.quarantine_dir)
            with self._lock:
                self._conn.execute(
                    "INSERT INTO quarantine (id, path, reason, calling_ae, received_at) VALUES (?,?,?,?,?)",
                    (qid, str(dst), reason, calling_ae, received_at),
                )
        except (OSError, sqlite3.Error) as exc:
            # the peer still gets a failure status, so it keeps its copy; a temp that could not be
            # moved stays in .tmp until the next start-up
            log_event(logger, "quarantine.failed", logging.ERROR, quarantine_id=qid, error=repr(exc))
        log_event(
            logger,
            "instance.quarantined",
            logging.WARNING,
            quarantine_id=qid,
            reason=reason,
            calling_ae=calling_ae,
            sop_instance_uid=meta.get("media_storage_sop_instance_uid", ""),
        )
        return QuarantinedError(
            reason,
            quarantine_id=qid,
            path=dst,
            sop_instance_uid=str(meta.get("media_storage_sop_instance_uid", "")),
        )

    # ------------------------------------------------------------------ queries

    def get(self, sop_instance_uid: str) -> Instance | None:
        """The journaled instance with this SOP Instance UID, or None."""
        with self._lock:
            return self._get_locked(sop_instance_uid)

    def instances_for_series(self, series_uid: str) -> list[Instance]:
        """All journaled instances of a series, by instance number then arrival."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM instances WHERE series_uid = ? ORDER BY instance_number, received_at",
                (series_uid,),
            ).fetchall()
        return [_row_to_instance(r) for r in rows]

    def count(self) -> int:
        """Number of journaled instances."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def delete_series(self, series_uid: str) -> int:
        """Delete a series' rows and files (retention); returns how many instances were removed.

        Rows go first, then files, so a crash in between leaves unreferenced files (harmless,
        removed with the directory next time) rather than rows pointing at nothing.
        """
        with self._lock:
            rows = self._conn.execute(
                "SELECT path FROM instances WHERE series_uid = ?", (series_uid,)
            ).fetchall()
            with transaction(self._conn) as c:
                c.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
            dirs: set[Path] = set()
            for row in rows:
                path = Path(row["path"])
                _unlink_quietly(path)
                dirs.add(path.parent)
            for d in dirs:
                self._remove_empty_dirs(d)
        log_event(logger, "series.deleted", series_uid=series_uid, instances=len(rows))
        return len(rows)

    def free_mb(self) -> float:
        """Free space on the spool's filesystem, in MiB."""
        return self._disk_usage(self.root).free / _MB

    def reconcile(self) -> int:
        """Journal spooled files that have no row (a crash between rename and insert).

        Such files were never acknowledged, but they are the peer's data, so they are indexed
        rather than deleted. Returns how many were added. Meant for service start-up.
        """
        added = 0
        with self._lock:
            known = {r["path"] for r in self._conn.execute("SELECT path FROM instances")}
        for path in self._iter_spooled():
            if str(path) in known:
                continue
            try:
                header = _read_header(path)
            except MalformedDicomError as exc:
                log_event(logger, "reconcile.skipped", logging.WARNING, file=path.name, reason=str(exc))
                continue
            instance = Instance(
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                study_uid=header.study_uid,
                series_uid=header.series_uid,
                path=path,
                transfer_syntax=header.transfer_syntax,
                modality=header.modality,
                received_at=path.stat().st_mtime,
                size=path.stat().st_size,
                series_description=header.series_description,
                body_part=header.body_part,
                instance_number=header.instance_number,
            )
            with self._lock:
                if self._get_locked(instance.sop_instance_uid) is None:
                    self._insert_locked(instance)
                    added += 1
        if added:
            log_event(logger, "spool.reconciled", logging.WARNING, added=added)
        return added

    # ------------------------------------------------------------------ internals

    def _check_space(self, incoming: int) -> None:
        free = self.free_mb()
        if free - incoming / _MB < self.min_free_mb:
            raise OutOfSpaceError(
                f"free space {free:.0f} MB minus incoming {incoming / _MB:.1f} MB is below the "
                f"{self.min_free_mb} MB floor"
            )

    def _new_temp_path(self) -> Path:
        return self.tmp_dir / f"{uuid.uuid4().hex}.part"

    def _remove_stale_temps(self) -> None:
        # a temp file is never acknowledged data: the peer got no Success for it
        removed = 0
        for p in self.tmp_dir.iterdir():
            if p.is_file():
                _unlink_quietly(p)
                removed += 1
        if removed:
            log_event(logger, "spool.stale_temps_removed", logging.WARNING, count=removed)

    def _iter_spooled(self) -> Iterator[Path]:
        for study in self.root.iterdir():
            if not study.is_dir() or study == self.tmp_dir:
                continue
            for series in study.iterdir():
                if series.is_dir():
                    yield from (p for p in series.iterdir() if p.suffix == ".dcm" and p.is_file())

    def _remove_empty_dirs(self, d: Path) -> None:
        """Remove ``d`` and its parents up to (not including) the root while they are empty."""
        while d != self.root and self.root in d.parents:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass  # already gone: nothing to remove at this level
            except OSError:
                return  # not empty (another series of the study, or an orphan): keep it
            d = d.parent

    def _get_locked(self, sop_instance_uid: str) -> Instance | None:
        row = self._conn.execute(
            "SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
        return None if row is None else _row_to_instance(row)

    def _insert_locked(self, i: Instance) -> None:
        self._conn.execute(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, modality,"
            " transfer_syntax, path, size, received_at, calling_ae, series_description, body_part,"
            " instance_number) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                i.sop_instance_uid, i.sop_class_uid, i.study_uid, i.series_uid, i.modality,
                i.transfer_syntax, str(i.path), i.size, i.received_at, i.calling_ae,
                i.series_description, i.body_part, i.instance_number,
            ),
        )


# ---------------------------------------------------------------------- header parsing


def _read_header(path: Path) -> _Header:
    """Parse the header of a Part 10 file up to the pixel data; MalformedDicomError when unusable.

    Values are read from the raw elements rather than through pydicom's converters: conversion
    validates values and its warnings quote them, which must not happen for patient fields (and we
    only need a handful of ASCII attributes anyway).
    """
    seen_pixels: list[int] = []

    def stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
        # called for top-level elements only (pydicom reads sequence items without it), so an
        # icon image's pixel data inside a sequence does not count
        if int(tag) in _PIXEL_TAGS:
            seen_pixels.append(int(tag))
            return True
        return False

    try:
        with open(path, "rb") as f:
            ds = read_partial(f, stop_when=stop_at_pixels)
            transfer_syntax = _raw_str(ds.file_meta, 0x00020010) if ds.file_meta else ""
            fields = {tag: _raw_str(ds, tag) for tag in (
                _TAG_SOP_CLASS, _TAG_SOP_INSTANCE, _TAG_STUDY_UID, _TAG_SERIES_UID, _TAG_MODALITY,
                _TAG_SERIES_DESCRIPTION, _TAG_BODY_PART, _TAG_INSTANCE_NUMBER,
            )}
    except InvalidDicomError as exc:
        raise MalformedDicomError(f"not a DICOM Part 10 file: {_short(exc)}") from exc
    except MalformedDicomError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise MalformedDicomError(f"unparseable data set ({type(exc).__name__}: {_short(exc)})") from exc

    missing = [
        name
        for name, tag in (
            ("SOPClassUID", _TAG_SOP_CLASS),
            ("SOPInstanceUID", _TAG_SOP_INSTANCE),
            ("StudyInstanceUID", _TAG_STUDY_UID),
            ("SeriesInstanceUID", _TAG_SERIES_UID),
        )
        if not fields[tag]
    ]
    if missing:
        raise MalformedDicomError(f"missing {', '.join(missing)}")
    if not transfer_syntax:
        raise MalformedDicomError("missing TransferSyntaxUID in file meta")
    sop_class = fields[_TAG_SOP_CLASS]
    if is_image_storage(sop_class) and not seen_pixels:
        raise MalformedDicomError(f"no pixel data in an image storage instance ({sop_class_name(sop_class)})")
    try:
        instance_number = int(float(fields[_TAG_INSTANCE_NUMBER] or 0))
    except ValueError:
        instance_number = 0  # a bad InstanceNumber only affects ordering; assembly sorts by position
    return _Header(
        sop_class_uid=sop_class,
        sop_instance_uid=fields[_TAG_SOP_INSTANCE],
        study_uid=fields[_TAG_STUDY_UID],
        series_uid=fields[_TAG_SERIES_UID],
        transfer_syntax=transfer_syntax,
        modality=fields[_TAG_MODALITY],
        series_description=fields[_TAG_SERIES_DESCRIPTION],
        body_part=fields[_TAG_BODY_PART],
        instance_number=instance_number,
    )


def _raw_str(ds: Dataset, tag: int) -> str:
    """A short string attribute as text, without pydicom's value conversion (and its warnings)."""
    if tag not in ds:
        return ""
    elem: Any = ds.get_item(tag)
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        # UI/CS/IS are ASCII; LO (SeriesDescription) may use another character set, but it is
        # only a routing hint, so undecodable bytes are replaced rather than rejected
        text = bytes(value).decode("utf-8", errors="replace")
    elif value is None:
        text = ""
    elif isinstance(value, (list, tuple)):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.strip(" \x00")


def _file_meta_summary(path: Path) -> dict[str, str]:
    """UIDs from a quarantined file's meta (set by the receiver from the C-STORE command)."""
    out: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            if f.read(132)[128:] != b"DICM":
                return out
            f.seek(0)  # read_partial reads the preamble itself
            ds = read_partial(f, stop_when=lambda tag, vr, length: int(tag) >> 16 != 0x0002)
            meta = ds.file_meta
            out["media_storage_sop_class_uid"] = _raw_str(meta, 0x00020002)
            out["media_storage_sop_instance_uid"] = _raw_str(meta, 0x00020003)
            out["transfer_syntax"] = _raw_str(meta, 0x00020010)
    except Exception as exc:  # noqa: BLE001 - best effort for the sidecar only
        out["meta_error"] = type(exc).__name__
    # only well-formed UIDs go into the sidecar: whatever else a broken file holds stays in it
    return {k: (v if k == "meta_error" or is_valid_uid(v) else "") for k, v in out.items()}


def dataset_offset(fp: BinaryIO) -> int:
    """Byte offset of the data set in a Part 10 file (after preamble and file meta).

    Uses the (0002,0000) group length, which pynetdicom and pydicom always write. Handy for
    comparing the data set a peer sent with what was stored.
    """
    fp.seek(0)
    head = fp.read(144)
    if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00" or head[136:138] != b"UL":
        raise ValueError("no (0002,0000) File Meta Information Group Length")
    return 144 + int.from_bytes(head[140:144], "little")


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------- filesystem helpers


def _path_part(uid: str) -> str:
    """A UID as a safe file/directory name; anything else (../, odd characters) is hashed."""
    if is_valid_uid(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _makedirs_durable(d: Path, *, stop_at: Path) -> None:
    """mkdir -p ``d``; fsync the parent of each directory created so the entry survives a crash."""
    missing: list[Path] = []
    p = d
    while not p.exists() and p != stop_at:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(p.parent)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(_COPY_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _unlink_quietly(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass  # already gone is the goal
    except OSError as exc:
        log_event(logger, "spool.unlink_failed", logging.WARNING, file=p.name, error=exc.strerror)


def _storage_error(exc: OSError, what: str) -> StorageError:
    """Translate an OS error into the domain error the C-STORE handler maps to a status."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpaceError(f"disk full while {what}")
    return StorageError(f"{what}: {exc.strerror or exc}")


def _row_to_instance(row: sqlite3.Row) -> Instance:
    return Instance(
        sop_instance_uid=row["sop_instance_uid"],
        sop_class_uid=row["sop_class_uid"],
        study_uid=row["study_uid"],
        series_uid=row["series_uid"],
        path=Path(row["path"]),
        transfer_syntax=row["transfer_syntax"],
        modality=row["modality"],
        received_at=row["received_at"],
        size=row["size"],
        calling_ae=row["calling_ae"],
        series_description=row["series_description"],
        body_part=row["body_part"],
        instance_number=row["instance_number"],
    )
