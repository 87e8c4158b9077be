"""docs/mqtt.md against the event catalog (agent/core/events/), the way test_config checks
docs/configuration.md: every kind the agent can publish is documented with exactly its fields, the
docs name no kind the agent does not publish, and no code emits a kind outside the catalog.

Format parsed here (docs/mqtt.md, section "Event kinds"): table rows
``| `kind` | severity[, severity] | when | fields |`` where the fields cell lists every field as
`` `name` `` in wire order, each followed by an optional note in words (no backticks); a note that
starts with "(optional" marks a field that is left out when it has no value.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.core import events
from agent.core.config import Config
from agent.core.events import CATALOG, TypedEvent
from agent.mqtt.payloads import EVENT_SCHEMA, ModelInfo, parse_event

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "mqtt.md"
AGENT = ROOT / "agent"
KIND = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


# --------------------------------------------------------------------------------------------
# the documented catalog


@dataclass(frozen=True)
class DocKind:
    kind: str
    severities: frozenset[str]
    fields: tuple[str, ...]
    optional: frozenset[str]
    line: int


def catalog_section(text: str) -> tuple[str, int]:
    """The "## Event kinds" section of ``text`` and the line it starts on."""
    start = text.index("\n## Event kinds\n") + 1
    end = text.find("\n## ", start)
    return text[start:end if end >= 0 else len(text)], text.count("\n", 0, start) + 1


def parse_fields(cell: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """Field names of a fields cell (every backticked token), and those whose note says optional."""
    names: list[str] = []
    optional: set[str] = set()
    tokens = list(re.finditer(r"`([^`]*)`", cell))
    for i, m in enumerate(tokens):
        note = cell[m.end():tokens[i + 1].start() if i + 1 < len(tokens) else len(cell)].strip()
        names.append(m.group(1))
        if note.startswith("(optional"):
            optional.add(m.group(1))
    return tuple(names), frozenset(optional)


def documented_kinds(text: str) -> list[DocKind]:
    section, first_line = catalog_section(text)
    out: list[DocKind] = []
    for n, line in enumerate(section.splitlines(), start=first_line):
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, f"docs/mqtt.md:{n}: want | kind | severity | when | fields |, got {len(cells)} cells"
        kind = re.fullmatch(r"`([^`]+)`", cells[0])
        assert kind is not None, f"docs/mqtt.md:{n}: the kind cell must be one `kind`"
        names, optional = parse_fields(cells[3])
        severities = frozenset(s.strip() for s in cells[1].split(","))
        out.append(DocKind(kind.group(1), severities, names, optional, n))
    return out


@pytest.fixture(scope="module")
def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def documented(doc_text: str) -> dict[str, DocKind]:
    kinds = documented_kinds(doc_text)
    seen: dict[str, DocKind] = {}
    for k in kinds:
        assert k.kind not in seen, f"docs/mqtt.md:{k.line}: {k.kind} documented twice (also line {seen[k.kind].line})"
        seen[k.kind] = k
    return seen


def test_every_kind_in_the_catalog_is_documented(documented: dict[str, DocKind]) -> None:
    missing = sorted(set(CATALOG) - set(documented))
    assert not missing, f"docs/mqtt.md 'Event kinds' lacks {missing}: add a row per kind (agent/core/events/)"


def test_the_docs_name_no_kind_outside_the_catalog(documented: dict[str, DocKind]) -> None:
    unknown = sorted(set(documented) - set(CATALOG))
    assert not unknown, f"docs/mqtt.md documents {unknown}, which agent/core/events/ CATALOG does not have"


@pytest.mark.parametrize("kind", sorted(CATALOG))
def test_documented_fields_and_severities_match_the_model(kind: str, documented: dict[str, DocKind]) -> None:
    cls = CATALOG[kind]
    doc = documented.get(kind)
    if doc is None:
        pytest.skip("not documented (test_every_kind_in_the_catalog_is_documented fails)")
    where = f"docs/mqtt.md:{doc.line} ({kind})"
    assert doc.fields == cls.field_names(), f"{where}: fields differ from {cls.__name__} (in wire order)"
    assert doc.optional == cls.optional_field_names(), f"{where}: fields marked optional differ"
    assert doc.severities == set(cls.severities()), f"{where}: severities differ"


def _not_kinds() -> set[str]:
    """Dotted names in docs/mqtt.md that are not event kinds: configuration keys, result fields."""
    keys: set[str] = set()

    def walk(model: type, prefix: str) -> None:  # nested sections too: dicom.limits.max_pdu
        for key, info in getattr(model, "model_fields", {}).items():
            name = f"{prefix}.{key}" if prefix else key
            keys.add(name)
            if isinstance(info.annotation, type):
                walk(info.annotation, name)

    walk(Config, "")
    return keys | {f"model.{name}" for name in ModelInfo.model_fields}


def test_every_kind_named_anywhere_in_the_docs_is_in_the_catalog(doc_text: str) -> None:
    prefixes = {k.split(".")[0] for k in CATALOG}
    not_kinds = _not_kinds()
    assert "dicom.allowed_callers" in not_kinds and "model.version" in not_kinds
    named = {t for t in re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)`", doc_text)
             if t.split(".")[0] in prefixes and t not in not_kinds and not t.endswith((".toml", ".json", ".db"))}
    unknown = sorted(named - set(CATALOG))
    assert not unknown, f"docs/mqtt.md names {unknown}: not event kinds the agent publishes"


def test_the_example_events_are_what_the_code_sends(doc_text: str) -> None:
    """Every complete event message in a ```json block carries exactly its kind's fields."""
    blocks = re.findall(r"```json\n(.*?)```", doc_text, re.S)
    examples = []
    for block in blocks:
        try:
            doc = json.loads(block)
        except json.JSONDecodeError:
            continue  # fragments
        if isinstance(doc, dict) and doc.get("schema") == EVENT_SCHEMA:
            examples.append(doc)
    assert examples, "docs/mqtt.md has no event example"
    for doc in examples:
        parse_event(json.dumps(doc))
        cls = CATALOG[doc["kind"]]
        assert doc["severity"] in cls.severities()
        required = set(cls.field_names()) - cls.optional_field_names()
        assert required <= set(doc["fields"]) <= set(cls.field_names()), (doc["kind"], sorted(doc["fields"]))


# --------------------------------------------------------------------------------------------
# the catalog itself


def _event_classes() -> set[type[TypedEvent]]:
    out: set[type[TypedEvent]] = set()
    todo = list(TypedEvent.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("agent."):
            out.add(cls)
    return out


def test_the_catalog_is_every_event_class() -> None:
    assert _event_classes() == set(CATALOG.values())
    for kind, cls in CATALOG.items():
        assert cls.KIND == kind and KIND.match(kind), kind
        assert cls.SEVERITY in cls.severities() and set(cls.severities()) <= {"info", "warning", "error"}
        assert cls.field_names(), f"{kind} has no fields"
        assert cls.message is not TypedEvent.message, f"{cls.__name__} does not say its message"
    assert set(events.__all__) >= {cls.__name__ for cls in CATALOG.values()}


# --------------------------------------------------------------------------------------------
# no kind emitted from the source outside the catalog


def _callee(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _kind_literal(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and KIND.match(node.value):
        return node.value
    return None


def takes_kind(trees: list[ast.Module]) -> dict[str, int | None]:
    """Functions with a parameter named ``kind``: name -> its position as called (None: keyword
    only). ``Event`` (agent.core.types) takes the kind first."""
    out: dict[str, int | None] = {"Event": 0}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in (*node.args.posonlyargs, *node.args.args)]
                if names[:1] in (["self"], ["cls"]):
                    names = names[1:]
                if "kind" in names:
                    out[node.name] = names.index("kind")
                elif "kind" in {a.arg for a in node.args.kwonlyargs}:
                    out[node.name] = None
    return out


SEVERITIES = {"info", "warning", "error"}


def _is_severity(node: ast.AST) -> bool:
    """``"warning"``, ``"info" if ok else "warning"``, or a variable named ``severity``."""
    if isinstance(node, ast.IfExp):
        return _is_severity(node.body) and _is_severity(node.orelse)
    if isinstance(node, ast.Name):
        return node.id == "severity"
    return isinstance(node, ast.Constant) and node.value in SEVERITIES


def literal_kinds(sources: dict[str, ast.Module]) -> dict[str, str]:
    """Event kinds written as string literals in ``sources`` (name -> parsed module): the kind of
    ``Event(...)``; the ``kind`` argument (positional or keyword) of any function that takes one
    (defined in any of the sources); a dotted literal passed just before a severity, the shape of
    every event helper (``notify("engine.fallback", "warning", ...)``, even through ``__call__``);
    a ``kind`` parameter's default. ``log_event`` is skipped: its names are log records, not MQTT
    events. Returns kind -> "name:line" of its first use."""
    helpers = takes_kind(list(sources.values()))
    found: dict[str, str] = {}
    for name, tree in sources.items():
        for node in ast.walk(tree):
            candidates: list[ast.AST | None] = []
            if isinstance(node, ast.Call) and _callee(node) != "log_event":
                candidates += [k.value for k in node.keywords if k.arg == "kind"]
                pos = helpers.get(_callee(node))
                if pos is not None and len(node.args) > pos:
                    candidates.append(node.args[pos])
                candidates += [a for a, b in zip(node.args, node.args[1:], strict=False) if _is_severity(b)]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = [a.arg for a in (*args.posonlyargs, *args.args)]
                defaults: dict[str, ast.AST | None] = dict(
                    zip(positional[len(positional) - len(args.defaults):], args.defaults, strict=True))
                defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)})
                candidates.append(defaults.get("kind"))
            for c in candidates:
                kind = _kind_literal(c)
                if kind is not None:
                    found.setdefault(kind, f"{name}:{getattr(c, 'lineno', 0)}")
    return found


def test_the_scanner_finds_literal_kinds() -> None:
    src = '''
def _refuse(state, counts, kind, severity, status): ...
class M:
    def _event(self, kind, severity, message, /, **fields): ...
    def _demote(self, model, *, kind="engine.demoted", severity="warning"): ...
    def run(self):
        self._event("engine.trial", "info", "m")
        self._demote("m", kind="engine.shadow_disagreement")
        emit(Event("job.failed", "error", "x"))
        emit(Event(kind="association.rejected", severity="warning", message=""))
        log_event(logger, "job.inferred", kind="not.an_event")
        log_event(logger, "job.inferred", "warning")
        outbox.put(topic, payload, qos=1, kind="event")
        self.notify("engine.device_gate", "info" if ok else "warning", "m", None, model="m")
        self._notify("engine.selftest_failed", "error", "m", cid)
        logger.exception("store.failed")
'''
    other = "_refuse(s, c, 'dicom.rejected', 'error', 1)\nqueue.put('x.y')\n"  # a helper of another module
    found = literal_kinds({"a.py": ast.parse(src), "b.py": ast.parse(other)})
    assert set(found) == {"engine.demoted", "engine.trial", "engine.shadow_disagreement", "dicom.rejected",
                          "job.failed", "association.rejected", "engine.device_gate", "engine.selftest_failed"}
    assert found["dicom.rejected"] == "b.py:1"


def _agent_sources() -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for p in sorted(AGENT.rglob("*.py"))}


def test_every_kind_emitted_as_a_literal_is_in_the_catalog() -> None:
    found = literal_kinds(_agent_sources())
    unknown = sorted(f"{where}: {kind}" for kind, where in found.items() if kind not in CATALOG)
    assert not unknown, ("event kinds emitted but not in agent/core/events/ CATALOG (add a typed event and "
                         "document it in docs/mqtt.md): " + ", ".join(unknown))


def test_event_classes_live_in_the_catalog_module() -> None:
    """A TypedEvent subclass defined elsewhere would escape CATALOG (and the docs)."""
    stray = []
    for name, tree in _agent_sources().items():
        if name.startswith("agent/core/events/"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                         for b in node.bases}
                if "TypedEvent" in bases:
                    stray.append(f"{name}:{node.lineno}: {node.name}")
    assert not stray, stray
