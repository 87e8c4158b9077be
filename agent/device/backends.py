"""Which inference backends are installed here, and (on request) what each can use.

``probe_backends(sources, details, gpus) -> tuple[BackendProbe, ...]``, one entry per name in
``BACKENDS``. Installed-or-not and the version come from package metadata, without importing.
Listing ONNX Runtime's execution providers and OpenVINO's devices needs importing them, which the
DICOM listener's process must not do: with ``details=True`` that import happens in a short-lived
child process (``python -c``), never in the caller.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.device.nvidia import TENSORRT_DISTRIBUTIONS, GpuInfo
from agent.device.sources import ProbeSources, package_version, run_bounded

_BACKEND_DISTRIBUTIONS: Mapping[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "openvino": ("openvino",),
    "tensorrt": TENSORRT_DISTRIBUTIONS,
}
BACKENDS = tuple(_BACKEND_DISTRIBUTIONS)

# Runs in a child interpreter: imports each installed backend and lists what it can use.
_BACKEND_CHILD = r"""
import json, sys
out = {}
for name in sys.argv[1:]:
    try:
        if name == "onnxruntime":
            import onnxruntime
            out[name] = {"devices": list(onnxruntime.get_available_providers())}
        elif name == "openvino":
            import openvino
            out[name] = {"devices": list(openvino.Core().available_devices)}
        elif name == "tensorrt":
            import tensorrt
            out[name] = {"devices": ["cuda"], "version": tensorrt.__version__}
    except Exception as exc:  # report any import/initialisation failure to the parent
        out[name] = {"error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
"""


@dataclass(frozen=True)
class BackendProbe:
    """One inference backend: installed (package found), its version, and, when ``backend_details``
    was asked for, the devices / execution providers it reports (``error`` says what went wrong)."""

    name: str
    installed: bool
    version: str | None = None
    devices: tuple[str, ...] = ()
    error: str = ""


def _child_details(sources: ProbeSources, installed: list[str]) -> tuple[dict[str, dict[str, Any]], str]:
    """What the child interpreter reports per backend, and why it reported nothing ("" when it did)."""
    try:
        rc, out, err = run_bounded([sys.executable, "-c", _BACKEND_CHILD, *installed],
                                   sources.backends_timeout_s, sources.extra_env)
        if rc == 0:
            extra: dict[str, dict[str, Any]] = json.loads(out.strip().splitlines()[-1])
            return extra, ""
        return {}, f"backend probe exited {rc}: {err.strip()[-300:]}"
    except (TimeoutError, OSError, ValueError, IndexError) as exc:
        return {}, f"backend probe failed: {exc}"


def probe_backends(sources: ProbeSources, details: bool, gpus: Sequence[GpuInfo] = ()) -> tuple[BackendProbe, ...]:
    """Installed backends (by package spec + metadata); with ``details`` their devices/providers,
    listed by a child interpreter so the calling process never imports onnxruntime/openvino."""
    found = {name: package_version(name, dists) for name, dists in _BACKEND_DISTRIBUTIONS.items()}
    installed = [n for n, v in found.items() if v is not None]
    extra: dict[str, dict[str, Any]] = {}
    child_error = ""
    if details and installed:
        extra, child_error = _child_details(sources, installed)
    result = []
    for name in BACKENDS:
        version = found[name]
        if version is None:
            result.append(BackendProbe(name=name, installed=False))
            continue
        info = extra.get(name, {})
        error = str(info.get("error", "")) or (child_error if details else "")
        if name == "tensorrt" and not error:
            if not gpus:
                error = "no NVIDIA GPU"
            elif importlib.util.find_spec("cuda") is None and importlib.util.find_spec("pycuda") is None:
                error = "no CUDA Python binding (install cuda-python or pycuda)"
        result.append(BackendProbe(name=name, installed=True, version=version,
                                   devices=tuple(str(d) for d in info.get("devices", ())), error=error))
    return tuple(result)
