"""Decode limits: how much a received object may expand, checked before it is decoded.

A Deflated data set or compressed pixel data can declare or inflate to far more than it weighs
(a 2 MB deflate stream inflates to 2 GB). ``DecodeLimits`` says how far is acceptable: at most
``max_decoded`` bytes, and above ``ratio_floor`` bytes at most ``max_ratio`` times the encoded
size (a blank image compresses a thousandfold, so the ratio applies only to large objects).
The listener checks both when an instance arrives (``dicom.limits``, C-STORE status 0xC212); the
inference worker checks the declared pixel size again before it decodes (``check_declared``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import BinaryIO

from agent.core.errors import LimitExceededError

__all__ = ["DEFAULT_LIMITS", "DecodeLimits", "declared_pixel_bytes", "inflate_bounded"]

_MB = 1024 * 1024
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DecodeLimits:
    max_decoded: int = 2048 * _MB  # bytes
    max_ratio: float = 100.0
    ratio_floor: int = 64 * _MB  # bytes decoded below which the ratio is not checked

    @classmethod
    def from_mb(cls, max_decoded_mb: int, max_ratio: float) -> DecodeLimits:
        return cls(max_decoded=max_decoded_mb * _MB, max_ratio=max_ratio)

    def allowed(self, encoded: int) -> int:
        """Most bytes an object of ``encoded`` bytes may decode to."""
        return min(self.max_decoded, max(self.ratio_floor, int(self.max_ratio * max(encoded, 1))))

    def check(self, decoded: int, encoded: int, what: str) -> None:
        """LimitExceededError when ``decoded`` bytes from ``encoded`` is beyond the limits."""
        if decoded > self.max_decoded:
            raise LimitExceededError(
                f"{what} decodes to {decoded / _MB:.0f} MiB, over the {self.max_decoded / _MB:.0f} MiB limit "
                "(dicom.limits.max_decompressed_mb)")
        if decoded > self.allowed(encoded):
            raise LimitExceededError(
                f"{what} decodes to {decoded / _MB:.0f} MiB from {encoded} bytes: ratio over "
                f"{self.max_ratio:g} (dicom.limits.max_decompression_ratio)")


DEFAULT_LIMITS = DecodeLimits()


def declared_pixel_bytes(rows: int, columns: int, frames: int, bits_allocated: int, samples: int) -> int:
    """Bytes the pixel data declares when decoded (rows x columns x frames x samples x bits / 8)."""
    dims = [max(0, int(v)) for v in (rows, columns, max(frames, 1), max(samples, 1))]
    n = dims[0] * dims[1] * dims[2] * dims[3]
    return (n * max(int(bits_allocated), 1) + 7) // 8


def inflate_bounded(fp: BinaryIO, encoded: int, limits: DecodeLimits, what: str) -> int:
    """Inflate the raw deflate stream from ``fp``'s position to its end, discarding the output,
    and return the inflated size; LimitExceededError as soon as it passes ``limits.allowed``.
    Memory: one chunk. A corrupt stream raises ``zlib.error``."""
    allowed = limits.allowed(encoded)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while not inflater.eof:
        chunk = fp.read(_CHUNK)
        if not chunk:
            break
        while chunk and not inflater.eof:
            total += len(inflater.decompress(chunk, _CHUNK))
            if total > allowed:
                limits.check(total, encoded, what)  # raises: names the size or ratio limit
                raise LimitExceededError(f"{what} inflates beyond {allowed} bytes")  # pragma: no cover
            chunk = inflater.unconsumed_tail
    return total + len(inflater.flush())
