"""What ``edge-agent install`` puts on a device: the probed facts that decide it, and every file.

Pure planning, no writes: ``probe_host()`` reads the hardware facts, ``plan_files()`` returns each
file with its target path (as seen on the device: ``/etc/...``, never the ``--root`` prefix), bytes
and mode, and ``render_config_template()`` writes the commented default ``agent.toml`` from the
configuration model (agent/core/config.py), so a key added there appears here with its description.

The unit, drop-ins, sysusers.d and tmpfiles.d files are the ones under ``systemd/`` in a checkout,
installed into ``<venv>/share/edge-agent/systemd`` by pip (pyproject.toml ``data-files``).
"""

from __future__ import annotations

import inspect
import json
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from agent.core.config_reference import reference_sections
from agent.core.errors import EdgeAgentError
from agent.device.cpu import normalise_arch
from agent.device.nvidia import probe_jetson
from agent.device.sources import ProbeSources

DEFAULT_PREFIX = Path("/opt/edge-agent")
CONFIG_FILE = Path("/etc/edge-agent/agent.toml")
CONFIG_DIR = CONFIG_FILE.parent
STATE_DIR = Path("/var/lib/edge-agent")
CACHE_DIR = Path("/var/cache/edge-agent")
UNIT_DIR = Path("/etc/systemd/system")
UNIT_NAME = "edge-agent.service"
SYSUSERS_FILE = Path("/etc/sysusers.d/edge-agent.conf")
TMPFILES_FILE = Path("/etc/tmpfiles.d/edge-agent.conf")
#: where NVIDIA's kernel driver announces itself (any discrete-GPU driver, no nvidia-smi needed)
NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")
#: values the installed agent.toml sets (everything else stays commented at its default)
INSTALLED_VALUES: Mapping[str, Any] = {"storage.dir": str(STATE_DIR), "models.dir": str(STATE_DIR / "models")}


class InstallError(EdgeAgentError):
    """The install could not be planned or carried out (the message says what to fix)."""


@dataclass(frozen=True)
class HostFacts:
    """What decides the extras and drop-ins: CPU architecture, an NVIDIA driver, a Jetson board."""

    arch: str
    nvidia_driver: bool
    jetson: bool

    @property
    def gpu(self) -> bool:
        return self.nvidia_driver or self.jetson

    def extras(self) -> tuple[str, ...]:
        """pip extras: ``openvino`` on x86_64; ``gpu`` (TensorRT from NVIDIA's index) with a discrete
        driver; a Jetson's TensorRT comes from JetPack through the system site packages instead."""
        out = ["openvino"] if self.arch == "x86_64" else []
        if self.nvidia_driver and not self.jetson:
            out.append("gpu")
        return tuple(out)

    def extra_packages(self) -> tuple[str, ...]:
        return ("pycuda",) if self.jetson else ()  # docs/gpu.md: JetPack's tensorrt + pycuda from pip


def probe_host(sources: ProbeSources | None = None, nvidia_driver_file: Path = NVIDIA_DRIVER_FILE) -> HostFacts:
    src = sources or ProbeSources()
    return HostFacts(arch=normalise_arch(src.machine or platform.machine()),
                     nvidia_driver=nvidia_driver_file.exists(), jetson=probe_jetson(src) is not None)


@dataclass(frozen=True)
class PlannedFile:
    """One file ``install`` owns. ``keep_if_present``: an operator's file (agent.toml), never overwritten."""

    path: Path  # as on the device (/etc/...); the --root prefix is added when written
    content: bytes
    mode: int
    keep_if_present: bool = False


def systemd_source_dir() -> Path:
    """``systemd/`` of this checkout, else the copy pip installed next to the interpreter."""
    candidates = [Path(__file__).resolve().parents[2] / "systemd", Path(sys.prefix) / "share" / "edge-agent" / "systemd"]
    for c in candidates:
        if (c / UNIT_NAME).is_file():
            return c
    raise InstallError("the systemd unit files were not found (looked in "
                       + ", ".join(str(c) for c in candidates) + "); reinstall edge-agent")


def plan_files(facts: HostFacts, *, prefix: Path, dicom_port: int, source: Path | None = None) -> list[PlannedFile]:
    """Every file for this host: the unit (ExecStart under ``prefix``), the drop-ins that fit
    (gpu.conf with a GPU, openvino.conf with the openvino extra, low-port.conf when the DICOM
    port is below 1024), sysusers.d, tmpfiles.d and the commented default configuration."""
    src = source or systemd_source_dir()

    def text(rel: str) -> bytes:
        body = (src / rel).read_text()
        if prefix != DEFAULT_PREFIX:
            body = body.replace(f"{DEFAULT_PREFIX}/", f"{prefix}/")
        return body.encode()

    dropins = UNIT_DIR / f"{UNIT_NAME}.d"
    files = [PlannedFile(UNIT_DIR / UNIT_NAME, text(UNIT_NAME), 0o644)]
    wanted = [("gpu.conf", facts.gpu), ("openvino.conf", "openvino" in facts.extras()),
              ("low-port.conf", 0 < dicom_port < 1024)]
    files += [PlannedFile(dropins / name, text(f"{UNIT_NAME}.d/{name}"), 0o644) for name, on in wanted if on]
    files += [PlannedFile(SYSUSERS_FILE, text("sysusers.d/edge-agent.conf"), 0o644),
              PlannedFile(TMPFILES_FILE, text("tmpfiles.d/edge-agent.conf"), 0o644),
              PlannedFile(CONFIG_FILE, render_config_template().encode(), 0o640, keep_if_present=True)]
    return files


def toml_value(value: Any) -> str | None:
    """A default as TOML (None: no value to show)."""
    if value is None or isinstance(value, SecretStr):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        items = [toml_value(v) for v in value]
        return "[" + ", ".join(i for i in items if i is not None) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string for these values


def render_config_template(values: Mapping[str, Any] = INSTALLED_VALUES) -> str:
    """The installed ``agent.toml``: every section and key of the configuration model, each key
    commented out at its default with its description above it; ``values`` are set uncommented."""
    lines = [
        "# edge-agent configuration, written by `edge-agent install`. Yours to edit: a later install or",
        "# upgrade never overwrites this file. Every key is optional; a commented line shows the default.",
        "# Reference: docs/configuration.md. Check: edge-agent config check --config /etc/edge-agent/agent.toml",
        "# Apply: systemctl reload edge-agent (settings that need a restart say so in the log).",
    ]
    for prefix, model, fields in reference_sections():
        if prefix:
            lines += ["", f"[{prefix}]"]
            lines += [f"# {d}" for d in inspect.cleandoc(model.__doc__ or "").splitlines() if d]
        for name, field in fields:
            key = f"{prefix}.{name}" if prefix else name
            lines.append("")
            lines += [f"# {d}" for d in (field.description or "").splitlines()]
            if key in values:
                lines.append(f"{name} = {toml_value(values[key])}")
                continue
            shown = toml_value(field.get_default(call_default_factory=True))
            lines.append(f"# {name} = {shown}" if shown is not None else f"# {name} = (unset)")
    return "\n".join(lines) + "\n"
