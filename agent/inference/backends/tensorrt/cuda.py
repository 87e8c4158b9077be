"""The few CUDA runtime calls the TensorRT backend needs, on one device and one stream.

``import_cuda(device)`` returns a ``CudaApi`` over NVIDIA's cuda-python when it is installed, else
over pycuda (the ``gpu`` extra's default); BackendUnavailableError when neither is, BackendError
when the device cannot be opened. Device memory is handed around as plain ``int`` pointers, host
staging buffers as page-locked uint8 arrays. Nothing here is imported before ``load()`` asks.
"""

from __future__ import annotations

import ctypes
import importlib
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.core.errors import BackendError, BackendUnavailableError


class CudaApi(Protocol):
    """The few CUDA runtime calls the backend needs, on one device and one stream."""

    stream_handle: int

    def device_info(self) -> tuple[str, str]:
        """(GPU name, compute capability "major.minor")."""
        ...

    def malloc(self, nbytes: int) -> int: ...

    def free(self, ptr: int) -> None: ...

    def pinned(self, nbytes: int) -> npt.NDArray[np.uint8]:
        """A page-locked host buffer of ``nbytes`` (uint8) for asynchronous copies."""
        ...

    def htod_async(self, dst: int, src: npt.NDArray[np.uint8]) -> None: ...

    def dtoh_async(self, dst: npt.NDArray[np.uint8], src: int) -> None: ...

    def synchronize(self) -> None: ...

    def close(self) -> None: ...


class _CudaPython:
    """CudaApi over NVIDIA's cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""

    def __init__(self, cudart: Any, device: int) -> None:
        self._rt = cudart
        self._device = device
        self._pinned: list[int] = []
        self._check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self._stream = self._check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = int(self._stream)

    def _check(self, result: Any, what: str) -> Any:
        # cuda-python returns (error, *values)
        err = result[0] if isinstance(result, tuple) else result
        if err != self._rt.cudaError_t.cudaSuccess:
            raise BackendError(f"CUDA {what} failed: {self._rt.cudaGetErrorName(err)[1]!r}")
        if isinstance(result, tuple) and len(result) > 1:
            return result[1]
        return None

    def device_info(self) -> tuple[str, str]:
        prop = self._check(self._rt.cudaGetDeviceProperties(self._device), "cudaGetDeviceProperties")
        name = prop.name
        name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
        return name.strip(), f"{prop.major}.{prop.minor}"

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self._rt.cudaMalloc(nbytes), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._check(self._rt.cudaFree(ptr), "cudaFree")

    def pinned(self, nbytes: int) -> npt.NDArray[np.uint8]:
        ptr = int(self._check(self._rt.cudaMallocHost(nbytes), "cudaMallocHost"))
        self._pinned.append(ptr)
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))

    def htod_async(self, dst: int, src: npt.NDArray[np.uint8]) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        result = self._rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self._stream)
        self._check(result, "memcpy H2D")

    def dtoh_async(self, dst: npt.NDArray[np.uint8], src: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        result = self._rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self._stream)
        self._check(result, "memcpy D2H")

    def synchronize(self) -> None:
        self._check(self._rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        for ptr in self._pinned:
            self._check(self._rt.cudaFreeHost(ptr), "cudaFreeHost")
        self._pinned.clear()
        self._check(self._rt.cudaStreamDestroy(self._stream), "cudaStreamDestroy")


class _PyCuda:
    """CudaApi over pycuda (the ``gpu`` extra's default), using the device's primary context."""

    def __init__(self, driver: Any, device: int) -> None:
        self._cuda = driver
        driver.init()
        self._dev = driver.Device(device)
        self._ctx = self._dev.retain_primary_context()
        self._ctx.push()
        self._stream = driver.Stream()
        self.stream_handle = int(self._stream.handle)
        self._allocs: dict[int, Any] = {}

    def device_info(self) -> tuple[str, str]:
        major, minor = self._dev.compute_capability()
        return str(self._dev.name()), f"{major}.{minor}"

    def malloc(self, nbytes: int) -> int:
        alloc = self._cuda.mem_alloc(nbytes)
        self._allocs[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        alloc = self._allocs.pop(ptr, None)
        if alloc is not None:
            alloc.free()

    def pinned(self, nbytes: int) -> npt.NDArray[np.uint8]:
        buf: npt.NDArray[np.uint8] = self._cuda.pagelocked_empty(nbytes, np.uint8)  # pycuda is untyped
        return buf

    def htod_async(self, dst: int, src: npt.NDArray[np.uint8]) -> None:
        self._cuda.memcpy_htod_async(dst, src, self._stream)

    def dtoh_async(self, dst: npt.NDArray[np.uint8], src: int) -> None:
        self._cuda.memcpy_dtoh_async(dst, src, self._stream)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        for ptr in list(self._allocs):
            self.free(ptr)
        self._ctx.pop()


def import_cuda(device: int) -> CudaApi:
    """A CudaApi on ``device``: cuda-python if installed, else pycuda."""
    # cuda-python >= 12.6 moved the runtime bindings to cuda.bindings; older ones have cuda.cudart
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            cudart = importlib.import_module(name)
        except ImportError:
            continue
        return _CudaPython(cudart, device)
    try:
        import pycuda.driver as driver
    except ImportError as exc:
        raise BackendUnavailableError(
            "TensorRT needs a CUDA Python binding: pip install cuda-python (or pycuda)"
        ) from exc
    try:
        return _PyCuda(driver, device)
    except driver.Error as exc:
        raise BackendError(f"CUDA device {device} cannot be opened: {exc}") from exc
