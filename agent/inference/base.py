"""The backend protocol: what every inference backend (ONNX Runtime, OpenVINO, TensorRT, ...) offers.

A backend is small on purpose, three calls:

``load(model_path, *, precision, threads, options)``
    Open the model file and prepare it for inference. The backend's heavy package (onnxruntime,
    openvino, tensorrt) is imported HERE, never at module import, so the registry can list backends
    and the listener process stays light. ``load`` ends with one warm-up inference so the first real
    job is not the one paying for lazy initialisation. Failures raise ``BackendError`` (or
    ``BackendUnavailableError`` when the package itself cannot be imported).
``run(inputs)``
    One batch in, one batch out: ``inputs`` is float32 ``(N, C, *spatial)``, the result the model's
    first output as float32 ``(N, K, ...)``. Failures raise ``BackendError``.
``describe()``
    A ``BackendInfo``: which library, version, device and the precision it *actually* computes in
    (OpenVINO, for one, silently runs FP32 models in bf16 on CPUs that have it).

Backends are found through ``agent.inference.catalog``; nothing else should branch on backend names.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from agent.core.errors import BackendError

#: Precisions the agent knows how to ask for. Quantized variants (int8, fp8) carry their precision
#: in the graph; the float ones may be a compute hint (OpenVINO bf16, TensorRT fp16).
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")


@dataclass(frozen=True)
class BackendInfo:
    """What a loaded backend reports about itself (goes into logs, health and ``ModelRef``).

    ``precision`` is the precision actually used, in the agent's names (fp32, bf16, fp16, int8, ...);
    ``providers`` the execution providers / devices in priority order (ORT EPs, OpenVINO devices).
    """

    name: str
    version: str
    device: str
    precision: str
    providers: tuple[str, ...] = ()


@runtime_checkable
class Backend(Protocol):
    """One loaded model on one inference library. See the module docstring for the contract."""

    #: registry name ("onnxruntime", "openvino", ...)
    name: str

    def load(self, model_path: Path, *, precision: str, threads: int, options: Mapping[str, Any]) -> None:
        """Load ``model_path`` (an ONNX file) and warm up with one inference.

        ``threads``: intra-op threads, 0 lets the library choose (all cores). ``options``: backend
        specific (see each backend); every backend understands ``warmup_shape`` (a tuple, the input
        shape used for the warm-up inference, e.g. ``(1, C, *patch_size)``).
        """
        ...

    def run(self, inputs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Run one batch ``(N, C, *spatial)`` float32; return the first output as float32."""
        ...

    def describe(self) -> BackendInfo:
        """Return what is loaded and how it runs (valid after ``load``)."""
        ...


def require_package(name: str) -> None:
    """Raise ImportError when the optional package ``name`` is not installed, without importing it.

    Backend modules call this at import time so the registry can tell an unavailable backend from
    an available one cheaply (``find_spec`` reads the path; it does not load onnxruntime/openvino).
    A package that is installed but broken still fails later, inside ``load()``.
    """
    if importlib.util.find_spec(name) is None:
        raise ImportError(f"No module named {name!r}", name=name)


def check_precision(precision: str) -> str:
    """Return ``precision`` lower-cased if it is one of ``PRECISIONS``; raise BackendError otherwise."""
    p = precision.lower()
    if p not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return p


def as_input_batch(inputs: npt.NDArray[Any], rank: int | None, backend: str) -> npt.NDArray[np.float32]:
    """Validate a batch before it reaches native code: ndarray, expected rank, float32, contiguous.

    ``rank`` is the model input's rank when known (None: not checked). Returns the array as
    C-contiguous float32 (a copy only when needed). Raises BackendError naming the problem, because a
    wrong rank crashes some native kernels instead of raising.
    """
    if not isinstance(inputs, np.ndarray):
        raise BackendError(f"{backend}: expected a numpy array, got {type(inputs).__name__}")
    if rank is not None and inputs.ndim != rank:
        raise BackendError(
            f"{backend}: model input has rank {rank} (N, C, *spatial), got an array of shape {inputs.shape}"
        )
    return np.ascontiguousarray(inputs, dtype=np.float32)


def warmup_shape(static: tuple[int | None, ...], options: Mapping[str, Any]) -> tuple[int, ...]:
    """Shape for the warm-up inference: ``options['warmup_shape']`` if given, else the model's shape
    with a dynamic batch set to 1 and other dynamic dimensions set to 32 (a size most
    encoder-decoder networks accept, as it is divisible by 2**5)."""
    given = options.get("warmup_shape")
    if given is not None:
        return tuple(int(d) for d in given)
    return tuple((1 if i == 0 else 32) if d is None or d <= 0 else int(d) for i, d in enumerate(static))
