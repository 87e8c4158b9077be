"""Reading the few header fields the spool needs from a Part 10 stream, without the pixel data.

Takes a Part 10 stream or file (preamble, file meta, data set); returns a ``Header`` (the UIDs and
routing attributes that name and journal the instance) or raises ``MalformedDicomError`` saying
what is wrong. The same parser judges an instance when it arrives and when ``reconcile()`` finds
it after a crash, so both reach the same verdict.

Values are read from the raw elements, never through pydicom's value converters: conversion
validates values and its warnings quote them, which must not happen for patient fields. Nothing
here reads or logs a patient field.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from agent.core.errors import LimitExceededError, MalformedDicomError
from agent.core.limits import DecodeLimits, declared_pixel_bytes, inflate_bounded
from agent.core.types import Instance
from agent.ingest.sopclasses import is_image_storage, is_valid_uid, sop_class_name

__all__ = ["Header", "dataset_offset", "file_meta_summary", "parse_header", "raw_str", "read_header"]

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

_REQUIRED = (
    ("SOPClassUID", _TAG_SOP_CLASS),
    ("SOPInstanceUID", _TAG_SOP_INSTANCE),
    ("StudyInstanceUID", _TAG_STUDY_UID),
    ("SeriesInstanceUID", _TAG_SERIES_UID),
)


@dataclass(frozen=True)
class Header:
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

    def instance(self, path: Path, size: int, calling_ae: str, received_at: float) -> Instance:
        """The journal record of this instance stored at ``path``."""
        return Instance(
            sop_instance_uid=self.sop_instance_uid,
            sop_class_uid=self.sop_class_uid,
            study_uid=self.study_uid,
            series_uid=self.series_uid,
            path=path,
            transfer_syntax=self.transfer_syntax,
            modality=self.modality,
            received_at=received_at,
            size=size,
            calling_ae=calling_ae,
            series_description=self.series_description,
            body_part=self.body_part,
            instance_number=self.instance_number,
        )


def read_header(path: Path, limits: DecodeLimits | None = None) -> Header:
    """``parse_header`` of a file; a file that cannot be opened is MalformedDicomError too."""
    try:
        f = open(path, "rb")  # closed by the with below; an open error is reported like a parse error
    except OSError as exc:
        raise MalformedDicomError(f"unreadable file ({type(exc).__name__})") from exc
    with f:
        return parse_header(f, limits)


_DEFLATED = "1.2.840.10008.1.2.1.99"
#: syntaxes whose pixel data is stored as is (anything else is encapsulated: compressed)
_NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", _DEFLATED})


def parse_header(fp: BinaryIO, limits: DecodeLimits | None = None) -> Header:
    """Parse the header of a Part 10 stream up to the pixel data; MalformedDicomError when unusable.

    With ``limits``: a Deflated data set is first inflated as a stream (output discarded) and
    refused with LimitExceededError beyond them, before pydicom inflates it into memory; the
    declared decoded pixel size (rows x columns x frames x bits x samples) is checked against
    them too (and, for compressed pixel data, its ratio to the encoded size).
    """
    encoded = 0
    if limits is not None:
        encoded = _check_deflate(fp, limits)
    seen_pixels: list[int] = []

    def stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
        # called for top-level elements only (pydicom reads sequence items without it), so an
        # icon image's pixel data inside a sequence does not count
        if int(tag) in _PIXEL_TAGS:
            seen_pixels.append(int(tag))
            return True
        return False

    try:
        ds = read_partial(fp, stop_when=stop_at_pixels)
        transfer_syntax = raw_str(ds.file_meta, 0x00020010) if ds.file_meta else ""
        fields = {tag: raw_str(ds, tag) for tag in (
            _TAG_SOP_CLASS, _TAG_SOP_INSTANCE, _TAG_STUDY_UID, _TAG_SERIES_UID, _TAG_MODALITY,
            _TAG_SERIES_DESCRIPTION, _TAG_BODY_PART, _TAG_INSTANCE_NUMBER,
        )}
    except InvalidDicomError as exc:
        raise MalformedDicomError(f"not a DICOM Part 10 file: {_short(exc)}") from exc
    except MalformedDicomError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise MalformedDicomError(f"unparseable data set ({type(exc).__name__}: {_short(exc)})") from exc

    if limits is not None and seen_pixels:
        _check_pixels(ds, transfer_syntax, encoded, limits)
    missing = [name for name, tag in _REQUIRED if not fields[tag]]
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
    return Header(
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


def _check_deflate(fp: BinaryIO, limits: DecodeLimits) -> int:
    """The stream's size; inflates a Deflated data set bounded by ``limits`` first (then rewinds)."""
    start = fp.tell()
    fp.seek(0, 2)
    size = fp.tell() - start
    fp.seek(start)
    try:
        if _file_meta_summary_of(fp).get("transfer_syntax") != _DEFLATED:
            return size
        offset = dataset_offset(fp)
        fp.seek(offset)
        inflate_bounded(fp, size - offset, limits, "the Deflated data set")
    except LimitExceededError:
        raise
    except Exception as exc:  # noqa: BLE001 - zlib.error, no group length: pydicom judges it below
        if isinstance(exc, zlib.error):
            raise MalformedDicomError(f"Deflated data set does not inflate ({type(exc).__name__})") from exc
    finally:
        fp.seek(start)
    return size


def _check_pixels(ds: Dataset, transfer_syntax: str, encoded: int, limits: DecodeLimits) -> None:
    """LimitExceededError when the declared decoded pixel data is beyond ``limits``."""
    try:
        declared = declared_pixel_bytes(
            int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0),
            int(float(raw_str(ds, 0x00280008) or 1)), int(ds.get("BitsAllocated", 0) or 0),
            int(ds.get("SamplesPerPixel", 1) or 1))
    except (TypeError, ValueError):
        return  # unreadable geometry: the worker's decoder refuses it
    if transfer_syntax in _NATIVE:
        limits.check(declared, declared, "the pixel data")  # size only: stored as is
    else:
        limits.check(declared, encoded, "the compressed pixel data")


def raw_str(ds: Dataset, tag: int) -> str:
    """A short string attribute as text, without pydicom's value conversion (and its warnings)."""
    if tag not in ds:
        return ""
    value = ds.get_item(tag).value
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


def file_meta_summary(source: Path | BinaryIO) -> dict[str, str]:
    """UIDs from the file meta of a quarantined file or stream (set by the receiver from the C-STORE
    command), for its sidecar; ``meta_error`` names what failed instead of raising."""
    if not isinstance(source, Path):
        return _file_meta_summary_of(source)
    try:
        f = open(source, "rb")  # closed by the with below
    except OSError as exc:
        return {"meta_error": type(exc).__name__}
    with f:
        return _file_meta_summary_of(f)


def _file_meta_summary_of(f: BinaryIO) -> dict[str, str]:
    """``file_meta_summary`` of an open stream positioned at the start of the preamble."""
    out: dict[str, str] = {}
    try:
        if f.read(132)[128:] != b"DICM":
            return out
        f.seek(0)  # read_partial reads the preamble itself
        ds = read_partial(f, stop_when=lambda tag, vr, length: int(tag) >> 16 != 0x0002)
        meta = ds.file_meta
        out["media_storage_sop_class_uid"] = raw_str(meta, 0x00020002)
        out["media_storage_sop_instance_uid"] = raw_str(meta, 0x00020003)
        out["transfer_syntax"] = raw_str(meta, 0x00020010)
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
