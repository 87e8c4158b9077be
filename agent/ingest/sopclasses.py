"""SOP classes and transfer syntaxes the DICOM listener offers.

Constants for the storage SOP classes models ask for, the default set the listener accepts when no
model narrows it, the transfer syntaxes offered for every class, and small helpers
(``resolve_sop_class`` turns a keyword such as ``"CTImageStorage"`` from a model.toml into its UID).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import pynetdicom.sop_class as _sop
from pydicom.uid import UID
from pynetdicom.presentation import AllStoragePresentationContexts

__all__ = [
    "ALL_STORAGE_SOP_CLASSES",
    "CR_IMAGE",
    "CT_IMAGE",
    "DEFAULT_STORAGE_SOP_CLASSES",
    "DX_IMAGE_FOR_PRESENTATION",
    "DX_IMAGE_FOR_PROCESSING",
    "ENHANCED_CT_IMAGE",
    "ENHANCED_MR_IMAGE",
    "LEGACY_ENHANCED_CT_IMAGE",
    "LEGACY_ENHANCED_MR_IMAGE",
    "MG_IMAGE_FOR_PRESENTATION",
    "MG_IMAGE_FOR_PROCESSING",
    "MR_IMAGE",
    "SC_IMAGE",
    "TRANSFER_SYNTAXES",
    "VERIFICATION",
    "is_image_storage",
    "is_valid_uid",
    "resolve_sop_class",
    "sop_class_name",
    "unique",
]

VERIFICATION = "1.2.840.10008.1.1"

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.4"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_IMAGE_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
MG_IMAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_IMAGE_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"

#: Accepted when the service has no narrower list: single-frame and Enhanced (multi-frame) CT and MR,
#: since modern scanners send Enhanced objects.
DEFAULT_STORAGE_SOP_CLASSES: tuple[str, ...] = (CT_IMAGE, ENHANCED_CT_IMAGE, MR_IMAGE, ENHANCED_MR_IMAGE)

#: Every storage SOP class pynetdicom knows (170 in pynetdicom 3.0); for tools and tests.
ALL_STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
)

#: Offered for every SOP class. Uncompressed first, then every compressed syntax pydicom's pixel
#: handlers (pylibjpeg, openjpeg, gdcm) can decode, so a PACS never has to transcode for us and we
#: store exactly what it sent. MPEG/HEVC video syntaxes are left out: no model reads video.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8 bit)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12 bit)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
)


# A UID is dot-separated numbers without leading zeros, at most 64 characters (PS3.5 9.1).
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_valid_uid(value: str) -> bool:
    """True when ``value`` is a syntactically valid UID (checked without pydicom, which warns)."""
    return len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def sop_class_name(uid: str) -> str:
    """Human-readable name of a SOP class UID (``"CT Image Storage"``), or the UID when unknown."""
    # pydicom's UID() warns on invalid values (an error under pytest); only hand it valid ones.
    return UID(uid).name if is_valid_uid(uid) else uid


def is_image_storage(uid: str) -> bool:
    """True when ``uid`` is an image storage SOP class, whose instances must carry pixel data."""
    return "Image Storage" in sop_class_name(uid)


def resolve_sop_class(name_or_uid: str) -> str:
    """UID for a SOP class given as a UID or a pynetdicom keyword (``"EnhancedCTImageStorage"``).

    Raises ValueError for a keyword pynetdicom does not know or a string that is not a valid UID.
    """
    value = name_or_uid.strip()
    if value and value[0].isdigit():
        if not is_valid_uid(value):
            raise ValueError(f"{value!r} is not a valid UID")
        return value
    uid = getattr(_sop, value, None)
    if not isinstance(uid, str) or not is_valid_uid(uid):
        raise ValueError(f"{value!r} is not a SOP class keyword pynetdicom knows")
    return str(uid)


def unique(uids: Iterable[str]) -> tuple[str, ...]:
    """The UIDs in first-seen order without duplicates (the service unions model SOP classes)."""
    return tuple(dict.fromkeys(u.strip() for u in uids if u.strip()))
