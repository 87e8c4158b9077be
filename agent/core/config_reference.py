"""The configuration reference, generated from the model in agent/core/config.py: the Markdown of
docs/configuration.md (``python -m agent.core.config > docs/configuration.md``) and the sections the
installed, commented agent.toml is made from (agent/cli/install_files.py)."""

from __future__ import annotations

import typing
from collections.abc import Iterator

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from agent.core.config import Config
from agent.core.export_config import EXPORT_EXAMPLE


def render_reference() -> str:
    """Markdown reference of every key (docs/configuration.md is generated from this)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `agent/core/config.py` (`python -m agent.core.config > docs/configuration.md`); the field",
        "descriptions there are the one place each key is documented. Every key is optional.",
        "Environment overrides: `EDGE_AGENT_<SECTION>__<KEY>`, e.g. `EDGE_AGENT_MQTT__PORT=1884`.",
        "",
    ]

    for prefix, _model, fields in reference_sections():
        title = f"`[{prefix}]`" if prefix else "Top level"
        lines.extend([f"## {title}", "", "| key | default | meaning |", "|---|---|---|", *_rows(fields), ""])
    for name, sub, desc in table_lists():  # lists of tables: one [[name]] per entry, none by default
        lines.extend([f"## `{name}`: a list of tables", "", f"{desc} One `[[{name}]]` table per entry:", "",
                      EXPORT_EXAMPLE, ""])
        for prefix, _model, fields in reference_sections(sub, f"[{name}]"):
            title = f"`{prefix}` (a sub-table of each entry)" if "." in prefix else f"`{prefix}`"
            lines.extend([f"## {title}", "", "| key | default | meaning |", "|---|---|---|", *_rows(fields), ""])
    return "\n".join(lines)


def _rows(fields: list[tuple[str, FieldInfo]]) -> list[str]:
    return [f"| `{name}` | {'required' if f.is_required() else f'`{f.get_default(call_default_factory=True)!s}`'} "
            f"| {f.description or ''} |" for name, f in fields]


def reference_sections(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[
        tuple[str, type[BaseModel], list[tuple[str, FieldInfo]]]]:
    """Each section (``""`` for the top level, then ``dicom``, ``dicom.tls``, ...) with its own keys, in
    declaration order: what docs/configuration.md and the installed agent.toml template are made from."""
    own = [(n, f) for n, f in model.model_fields.items()
           if not _is_model(f.annotation) and _listed_model(f) is None]
    yield prefix, model, own
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from reference_sections(ann, f"{prefix}.{name}" if prefix else name)


def table_lists(model: type[BaseModel] = Config) -> list[tuple[str, type[BaseModel], str | None]]:
    """The keys that are lists of tables (``[[export]]``): name, the entry's model, description."""
    found = []
    for name, field in model.model_fields.items():
        entry = _listed_model(field)
        if entry is not None:
            found.append((name, entry, field.description))
    return found


def _is_model(t: object) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _listed_model(field: FieldInfo) -> type[BaseModel] | None:
    args = typing.get_args(field.annotation)
    return args[0] if args and isinstance(args[0], type) and issubclass(args[0], BaseModel) else None
