"""Import direction: cli -> service -> variants -> stages -> foundation; agent never imports deploy.

Every package and module directly under ``agent/`` is assigned to exactly one layer below, and the
assignment must match the tree: a new folder fails ``test_every_part_of_the_tree_has_a_layer``
until someone decides where it belongs. Relative imports (``from . import x``) are resolved to
their absolute name, so no import escapes the check.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AGENT = REPO / "agent"

# lower layers never import higher ones; within STAGES, no stage imports another
FOUNDATION = {"core", "imaging", "device"}  # records, config, helpers, numpy imaging, hardware facts
STAGES = {"ingest", "assembly", "inference", "mqtt", "control", "updates", "drift", "telemetry", "export"}
COORDINATORS = {"variants"}  # uses the update store, the inference worker and the device probe
SERVICE = {"service"}
ENTRY = {"cli", "__main__", "__init__"}
LAYERS = [FOUNDATION, STAGES, COORDINATORS, SERVICE, ENTRY]
HEAVY = {"torch", "monai", "onnx", "deploy", "matplotlib", "onnxscript", "onnxconverter_common"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports, relative imports resolved."""
    return _imports_of(path.read_text(), _module_name(path), is_package=path.name == "__init__.py")


def _imports_of(source: str, module: str, *, is_package: bool) -> set[str]:
    tree = ast.parse(source)
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            # `from agent import variants` imports the package agent.variants
            names.update(f"{prefix}.{a.name}" for a in node.names if a.name != "*")
    return names


def _agent_files() -> list[Path]:
    return sorted(p for p in AGENT.rglob("*.py") if "__pycache__" not in p.parts)


def _part(name: str) -> str | None:
    """The top-level part of ``agent`` a module name belongs to (None for other packages)."""
    bits = name.split(".")
    if bits[0] != "agent":
        return None
    if len(bits) > 1 and ((AGENT / bits[1]).is_dir() or (AGENT / f"{bits[1]}.py").is_file()):
        return bits[1]
    return "__init__"  # `agent` itself, or a name it defines (`from agent import __version__`)


def _layer(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"agent/{part} has no layer in tests/test_architecture.py")


def test_every_part_of_the_tree_has_a_layer() -> None:
    tree = {p.name.removesuffix(".py") for p in AGENT.iterdir()
            if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    declared = set().union(*LAYERS)
    assert tree - declared == set(), f"parts of agent/ without a layer: {sorted(tree - declared)}"
    assert declared - tree == set(), f"layers name parts agent/ does not have: {sorted(declared - tree)}"
    assert sum(len(layer) for layer in LAYERS) == len(declared), "a part is in two layers"


def test_relative_imports_are_resolved() -> None:
    """The checker itself: a relative import is seen under its absolute name."""
    source = "from ..mqtt import outbox\nfrom . import journal\nfrom .pool import Pool\n"
    names = _imports_of(source, "agent.ingest.spool", is_package=False)
    assert {"agent.mqtt.outbox", "agent.ingest.journal", "agent.ingest.pool"} <= names
    names = _imports_of("from .. import variants\n", "agent.mqtt", is_package=True)
    assert "agent.variants" in names


def test_agent_never_imports_heavy_packages() -> None:
    offenders = [
        f"{p.relative_to(REPO)} imports {name}"
        for p in _agent_files()
        for name in _imports(p)
        if name.split(".")[0] in HEAVY
    ]
    assert not offenders, offenders


def test_imports_point_down_and_stages_do_not_import_each_other() -> None:
    offenders = []
    for p in _agent_files():
        own = _part(_module_name(p))
        assert own is not None
        own_layer = _layer(own)
        for name in _imports(p):
            other = _part(name)
            if other is None or other == own or other == "__init__":
                continue
            other_layer = _layer(other)
            if other_layer > own_layer:
                offenders.append(f"{p.relative_to(REPO)} imports {name} (a higher layer)")
            elif other_layer == own_layer and LAYERS[own_layer] is STAGES:
                offenders.append(f"{p.relative_to(REPO)} imports {name} (stages never import each other)")
    assert not offenders, "\n".join(offenders)


def test_the_layer_rule_rejects_a_violation() -> None:
    """An empty offender list means something: a stage importing a stage, or the foundation
    importing a stage, is what the rule reports."""
    assert _layer("ingest") == _layer("mqtt") and LAYERS[_layer("ingest")] is STAGES
    assert _layer("core") < _layer("ingest") < _layer("variants") < _layer("service") < _layer("cli")
    assert _part("agent.mqtt.outbox") == "mqtt" and _part("deploy.gate") is None


def test_importing_the_daemon_loads_no_inference_engine() -> None:
    code = (
        "import sys, agent.service, agent.cli; "
        "bad = [m for m in ('torch', 'monai', 'onnx', 'onnxruntime', 'openvino', 'deploy') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, f"loaded in the listener's process: {proc.stdout} {proc.stderr[-2000:]}"


def test_the_architecture_page_names_modules_that_exist() -> None:
    """docs/architecture.md walks an instance and a pull through named modules: each must exist
    (the table of what moved names old paths on purpose, so it is left out)."""
    import re

    text = (REPO / "docs" / "architecture.md").read_text()
    text = text.split("## What moved in the restructure")[0] + text.split("## State on disk")[-1]
    named = set(re.findall(r"`((?:agent|deploy)/[\w/]+(?:\.py|/))`", text))
    assert len(named) > 30, "the walkthroughs name their modules"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
