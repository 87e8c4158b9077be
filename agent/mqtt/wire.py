"""JSON on the wire, shared by every payload builder (``payloads``, ``monitoring``).

``dumps(doc)`` -> compact UTF-8 JSON bytes (NaN/Infinity refused with PublishError);
``finite(value, what)`` -> the float or PublishError; ``jsonable(value)`` -> JSON-shaped data
(numpy scalars unwrapped, non-finite floats as strings, unknown objects as their string form);
``parse(model, data)`` -> the received message as a dict, validated against a pydantic model
(PublishError when it is not JSON or does not match).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from agent.core.errors import PublishError


def dumps(doc: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; NaN/Infinity are refused because they are not JSON."""
    try:
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except ValueError as exc:
        raise PublishError(f"payload is not representable as JSON: {exc}") from exc


def finite(value: float, what: str) -> float:
    f = float(value)
    if not math.isfinite(f):
        # A NaN confidence or volume is a model/pipeline bug: refuse to publish it rather than
        # send a number a consumer would misread.
        raise PublishError(f"{what} is not a finite number ({f!r})")
    return f


def jsonable(value: object) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return jsonable(value.item())
    return str(value)


def parse(model: type[BaseModel], data: bytes | str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublishError(f"not a JSON message: {exc}") from exc
    if not isinstance(doc, dict):
        raise PublishError("message is not a JSON object")
    try:
        model.model_validate(doc)
    except ValidationError as exc:
        raise PublishError(f"message does not match {model.__name__}: {exc}") from exc
    return doc
