"""Series size limits, checked in the worker from the headers before any pixel data is decoded
(``SeriesLimits``, from ``series_limits`` in the configuration).

``over_limit(paths, limits)`` returns ``(key, reason)`` for the first limit the series is over (the
configuration key, a one-line reason with counts only), or None. Reading the headers of a
100-instance series costs a few milliseconds; a header that cannot be read is left to the volume
builder, which reports it as the series' own error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from agent.inference.messages import SeriesLimits

_TAGS = ["Rows", "Columns", "NumberOfFrames"]


def over_limit(paths: Sequence[Path], limits: SeriesLimits) -> tuple[str, str] | None:
    if limits.max_instances and len(paths) > limits.max_instances:
        return ("series_limits.max_instances",
                f"{len(paths)} instances, over the limit of {limits.max_instances}")
    frames = 0
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        except (OSError, InvalidDicomError, ValueError):
            continue
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if limits.max_rows and rows > limits.max_rows:
            return "series_limits.max_rows", f"{rows} rows per frame, over the limit of {limits.max_rows}"
        if limits.max_columns and cols > limits.max_columns:
            return ("series_limits.max_columns",
                    f"{cols} columns per frame, over the limit of {limits.max_columns}")
        try:
            frames += max(1, int(ds.get("NumberOfFrames", 1) or 1))
        except (TypeError, ValueError):
            frames += 1
        if limits.max_frames and frames > limits.max_frames:
            return ("series_limits.max_frames",
                    f"more than {limits.max_frames} frames in the series (the limit)")
    return None
