"""The ``[[export]]`` destinations: where results go back as DICOM SEG and SR (docs/export.md).

One table per destination (a DICOM Storage SCP: a PACS, a viewer, Orthanc), a list in the TOML file;
none by default (export off). Kept apart from ``agent/core/config.py``, which includes it as
``Config.export``; its fields are documented there too (``render_reference``)::

    [[export]]
    name = "pacs"            # used in events and telemetry
    host = "10.1.2.3"
    port = 104
    called_ae = "PACS"
    objects = ["seg", "sr"]  # default: both
    models = []              # default: every model
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ObjectKind = Literal["seg", "sr"]
_BOTH: tuple[ObjectKind, ...] = ("seg", "sr")

#: what the reference page shows above the ``[[export]]`` table
EXPORT_EXAMPLE = """```toml
[[export]]
name = "pacs"            # used in events and telemetry
host = "10.1.2.3"
port = 104
called_ae = "PACS"
objects = ["seg", "sr"]  # default: both
models = []              # default: every model
```"""


class ExportTlsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="DICOM TLS to this destination.")
    cafile: Path | None = Field(None, description="CA bundle that verifies the destination (PEM); none: the system's.")
    certfile: Path | None = Field(None, description="Our client certificate (PEM), when the destination wants one.")
    keyfile: Path | None = Field(None, description="Our client key (PEM).")
    check_hostname: bool = Field(True, description="The destination's certificate must name `host`.")


class ExportDestination(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                      description="Names the destination in events and telemetry (unique).")
    host: str = Field(min_length=1, description="The destination's host name or address.")
    port: int = Field(104, ge=1, le=65535, description="Its DICOM port.")
    called_ae: str = Field(pattern=r"^[ -~]{1,16}$", description="Its AE title.")
    calling_ae: str = Field("", pattern=r"^[ -~]{0,16}$", description="Our AE title towards it; empty: `dicom.ae_title`.")
    tls: ExportTlsConfig = Field(default_factory=ExportTlsConfig, description="DICOM TLS.")
    objects: list[ObjectKind] = Field(default_factory=lambda: list(_BOTH),
                                      description="What goes there: `seg` (segmentations), `sr` (measurement reports).")
    models: list[str] = Field(default_factory=list, description="Models whose results go there; empty: every model.")
    max_attempts: int = Field(10, ge=1, description="Tries per object before it is dead-lettered (`export.dead_lettered`).")
    retry_initial_s: float = Field(30, gt=0, description="Wait after the first failed try; doubles per try, with jitter.")
    retry_max_s: float = Field(1800, gt=0, description="Longest wait between two tries.")
    timeout_s: float = Field(30, gt=0, description="Network, association and DIMSE timeout of one send.")

    @field_validator("objects")
    @classmethod
    def _some_objects(cls, value: list[ObjectKind]) -> list[ObjectKind]:
        if not value:
            raise ValueError("name at least one of seg, sr")
        return list(dict.fromkeys(value))


def check_unique_names(destinations: list[ExportDestination]) -> list[ExportDestination]:
    """``Config.export``'s validator: destination names are unique (they key the queue)."""
    names = [d.name for d in destinations]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"destination names must be unique: {', '.join(twice)}")
    return destinations
