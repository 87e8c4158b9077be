"""The base of every typed event (``TypedEvent``) and the field markers its subclasses use.

``metadata=DETAIL``: context the message line quotes but the ``fields`` object does not carry;
``metadata=OMIT_NONE``: left out of ``fields`` when None. ``plain()`` turns a field's value into
JSON-shaped data (a status record's ``to_json()``, a dataclass's fields, lists, mappings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from agent.core.types import Event

Severity = Literal["info", "warning", "error"]

#: field metadata: quoted by ``message()`` (or deciding the severity), not sent in ``fields``
DETAIL: Mapping[str, object] = {"wire": False}
#: field metadata: sent in ``fields`` only when not None
OMIT_NONE: Mapping[str, object] = {"omit_none": True}


class DataclassInstance(Protocol):
    """Any dataclass instance (what ``dataclasses.fields`` accepts)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


def plain(value: object) -> object:
    """``value`` as JSON-shaped data: a record with ``to_json()`` (agent/core/status.py) becomes
    that, other dataclasses dicts (their fields in order), mappings dicts with string keys, lists
    and tuples lists; anything else is returned as is (the payload builder makes numbers and
    strings of what is left)."""
    to_json = getattr(value, "to_json", None)
    if callable(to_json) and not isinstance(value, type):
        return plain(to_json())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class TypedEvent:
    """Base of every event kind (see the module docstring). Subclasses set ``KIND`` and
    ``SEVERITY`` and implement ``message()``."""

    KIND: ClassVar[str]
    SEVERITY: ClassVar[Severity]
    #: every severity this kind can have, when it depends on the values (else just SEVERITY)
    SEVERITIES: ClassVar[tuple[Severity, ...]] = ()

    def message(self) -> str:
        raise NotImplementedError

    def severity(self) -> Severity:
        return self.SEVERITY

    @classmethod
    def severities(cls) -> tuple[Severity, ...]:
        return cls.SEVERITIES or (cls.SEVERITY,)

    @classmethod
    def wire_fields(cls) -> tuple[dataclasses.Field[Any], ...]:
        """The dataclass fields sent in the message's ``fields``, in order."""
        return tuple(f for f in dataclasses.fields(cls) if f.metadata.get("wire", True))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in cls.wire_fields())

    @classmethod
    def optional_field_names(cls) -> frozenset[str]:
        """Fields left out of the message when None."""
        return frozenset(f.name for f in cls.wire_fields() if f.metadata.get("omit_none"))

    def fields(self) -> dict[str, object]:
        """The message's ``fields`` object (JSON-shaped; see ``plain``)."""
        out: dict[str, object] = {}
        for f in self.wire_fields():
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = plain(value)
        return out

    def to_event(self, created_at: float = 0.0) -> Event:
        """The generic Event (``created_at`` 0: stamped when it is published)."""
        return Event(self.KIND, self.severity(), self.message(), self.fields(), created_at)
