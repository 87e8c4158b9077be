"""DICOM building blocks for the synthetic phantoms: UIDs, DS formatting, common modules, writing.

Everything written here is explicit VR little endian with a full Part 10 file meta header, and
every value is derived from the phantom seed so the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from ._common import UID_NAMESPACE

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
IMPLEMENTATION_VERSION_NAME = "EDGEAGENT_SYNTH"  # SH, <= 16 chars


#: UUID namespace of our name-based (version 5) UUIDs, itself derived from UID_NAMESPACE.
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, UID_NAMESPACE)


def make_uid(*parts: object) -> UID:
    """Deterministic ``2.25.<int>`` UID from ``parts`` (anything with a stable ``str``).

    Same parts -> same UID. The integer is a name-based (SHA-1, version 5) UUID, as ISO/IEC
    9834-8 wants under 2.25. Not ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``:
    pydicom 3 ignores ``entropy_srcs`` when ``prefix`` is None and returns a random UUID.
    Parts are joined with a separator so ("ab", "c") and ("a", "bc") differ.
    """
    name = "\x1f".join(str(p) for p in parts)
    return UID(f"2.25.{uuid.uuid5(_UUID_NAMESPACE, name).int}")


def ds_str(value: float, max_len: int = 16) -> str:
    """Format a float as a DICOM DS string of at most ``max_len`` (16) characters.

    Uses the most significant digits that fit; ``-0`` is written as ``0`` so formatting never
    depends on the sign of a zero.
    """
    v = float(value)
    if v == 0.0:
        return "0"
    for digits in range(10, 0, -1):
        s = f"{v:.{digits}g}"
        if "e" in s:
            # DS allows exponents, but plain decimals read better in dumps; fall back only if needed.
            s = f"{v:.{digits}f}".rstrip("0").rstrip(".")
        if len(s) <= max_len:
            return s
    raise ValueError(f"cannot format {value!r} as DS")


def ds_multi(values: Sequence[float]) -> list[str]:
    """``ds_str`` for each value of a multi-valued DS attribute (IOP, IPP, PixelSpacing)."""
    return [ds_str(v) for v in values]


def snap(value: float, decimals: int = 4) -> float:
    """Round ``value`` to what survives a DS round trip, so geometry used for rendering equals
    the geometry written to the file (and read back by the agent)."""
    return float(ds_str(round(float(value), decimals)))


@dataclass(frozen=True)
class Identity:
    """Synthetic patient / study identity of one phantom (fake PHI for PHI-leak tests)."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    accession: str
    study_id: str
    study_date: str
    study_time: str
    institution: str
    referring: str


def make_identity(rng: np.random.Generator, tag: str) -> Identity:
    """Draw a synthetic identity; ``tag`` (e.g. ``"CT0003"``) goes into name and ID.

    Takes a Generator (consumed) and the tag, returns an :class:`Identity`. Values look like real
    PHI on purpose (name, ID, birth date, accession) so leak tests have something to look for.
    """
    year = int(rng.integers(2019, 2026))
    month = int(rng.integers(1, 13))
    day = int(rng.integers(1, 29))
    age = int(rng.integers(25, 86))
    birth_month = int(rng.integers(1, 13))
    birth_day = int(rng.integers(1, 29))
    hh, mm, ss = int(rng.integers(7, 19)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    return Identity(
        patient_name=f"PHANTOM^{tag}",
        patient_id=f"PH-{tag}",
        birth_date=f"{year - age:04d}{birth_month:02d}{birth_day:02d}",
        sex=str(rng.choice(["F", "M"])),
        age=f"{age:03d}Y",
        accession=f"SYN{int(rng.integers(10**6, 10**7))}",
        study_id=str(int(rng.integers(1000, 9999))),
        study_date=f"{year:04d}{month:02d}{day:02d}",
        study_time=f"{hh:02d}{mm:02d}{ss:02d}",
        institution="SYNTHETIC PHANTOM HOSPITAL",
        referring="REFERRER^SYNTHETIC",
    )


def new_dataset(sop_class_uid: UID, sop_instance_uid: UID) -> Dataset:
    """Empty dataset with Part 10 file meta (explicit VR little endian) and SOP Common set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    return ds


def add_patient_study(ds: Dataset, ident: Identity, study_uid: UID) -> None:
    """Patient, General Study and Patient Study modules."""
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = ident.sex
    ds.PatientAge = ident.age
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ident.study_date
    ds.StudyTime = ident.study_time
    ds.ReferringPhysicianName = ident.referring
    ds.StudyID = ident.study_id
    ds.AccessionNumber = ident.accession
    ds.InstitutionName = ident.institution


def add_pixels(ds: Dataset, stored: np.ndarray, *, bits_stored: int, signed: bool) -> None:
    """Image Pixel module for a 2-D monochrome 16-bit frame.

    Takes the stored values (any integer dtype; cast to little-endian (u)int16 here) and writes
    Rows/Columns/Bits*/PixelRepresentation and PixelData (OW).
    """
    if stored.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {stored.shape}")
    dtype = np.dtype("<i2") if signed else np.dtype("<u2")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(stored, dtype=dtype).tobytes()
    # Resolve the OB/OW ambiguity now so in-memory datasets already look like what is written.
    ds["PixelData"].VR = "OW"


def write_dataset(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a Part 10 file (preamble, file meta, explicit VR little endian)."""
    ds.save_as(path, enforce_file_format=True)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as stable, indented JSON (sorted keys would reorder labels; keep order)."""
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
