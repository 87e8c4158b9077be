"""The Part 10 encoding of a received C-STORE, built without pydicom on the hot path.

Takes a pynetdicom EVT_C_STORE event; returns the bytes the spool stores: a zero preamble,
``DICM``, the file meta group and the data set exactly as the peer encoded it.
"""

from __future__ import annotations

import struct
from typing import cast

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event as PynetdicomEvent

from agent.ingest.sopclasses import is_valid_uid

__all__ = ["part10_bytes", "store_request"]

_PREAMBLE_AND_PREFIX = bytes(128) + b"DICM"


def part10_bytes(event: PynetdicomEvent) -> bytes:
    """What ``event.encoded_dataset(include_meta=True)`` returns, in a fraction of the time.

    pynetdicom builds a pydicom FileMetaDataset and runs pydicom's writer on it: about 0.6 ms per
    instance on the bench machine, on the path every C-STORE waits for. The file meta here is the
    same seven elements, encoded directly (a test holds the two byte for byte); values that are
    not plain UIDs take pynetdicom's path so pydicom's handling of odd input is unchanged.
    """
    req = store_request(event)
    meta = _file_meta_bytes(str(req.AffectedSOPClassUID or ""), str(req.AffectedSOPInstanceUID or ""),
                            str(event.context.transfer_syntax or ""))
    dataset = req.DataSet
    if meta is None or dataset is None:
        return bytes(event.encoded_dataset(include_meta=True))
    return b"".join((_PREAMBLE_AND_PREFIX, meta, dataset.getvalue()))


def store_request(event: PynetdicomEvent) -> C_STORE:
    """The C-STORE request of an EVT_C_STORE event.

    ``Event.request`` is typed as the union of every DIMSE request, since one Event class serves
    all events; an EVT_C_STORE event always carries a C_STORE (pynetdicom casts the same way).
    """
    return cast(C_STORE, event.request)


def _file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes | None:
    """Group 0002 (explicit VR little endian) as pydicom writes ``pynetdicom.dsutils.create_file_meta``.

    None when a value is not a valid UID: the caller falls back to pydicom then.
    """
    if not all(is_valid_uid(v) and v for v in (sop_class, sop_instance, transfer_syntax)):
        return None
    body = b"".join((
        b"\x02\x00\x01\x00OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01",  # (0002,0001) version
        _short_element(0x0002, b"UI", _padded(sop_class, b"\x00")),
        _short_element(0x0003, b"UI", _padded(sop_instance, b"\x00")),
        _short_element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _short_element(0x0012, b"UI", _padded(str(PYNETDICOM_IMPLEMENTATION_UID), b"\x00")),
        _short_element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    return _short_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _short_element(element: int, vr: bytes, value: bytes) -> bytes:
    """A group 0002 element with a 2-byte length (every VR of the file meta except OB)."""
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw
