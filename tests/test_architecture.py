"""Import direction: cli -> service -> stages -> core; agent never imports deploy or torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = {"ingest", "assembly", "inference", "publish", "telemetry", "registry"}
CORE = {"types", "errors", "config", "modelspec", "db", "log", "manifest", "imaging"}
HEAVY = {"torch", "monai", "onnx", "deploy", "matplotlib"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _agent_files() -> list[Path]:
    return sorted((REPO / "agent").rglob("*.py"))


def test_agent_never_imports_heavy_packages() -> None:
    offenders = [
        f"{p.relative_to(REPO)} imports {name}"
        for p in _agent_files()
        for name in _imports(p)
        if name.split(".")[0] in HEAVY
    ]
    assert not offenders, offenders


def test_stages_do_not_import_each_other() -> None:
    offenders = []
    for p in _agent_files():
        parts = p.relative_to(REPO / "agent").parts
        if len(parts) < 2 or parts[0] not in STAGES:
            continue
        own = parts[0]
        for name in _imports(p):
            bits = name.split(".")
            if bits[0] == "agent" and len(bits) > 1 and bits[1] in STAGES and bits[1] != own:
                offenders.append(f"{p.relative_to(REPO)} imports {name}")
    assert not offenders, offenders


def test_core_does_not_import_stages_or_service() -> None:
    offenders = []
    for p in _agent_files():
        rel = p.relative_to(REPO / "agent")
        top = rel.parts[0].removesuffix(".py")
        if top not in CORE:
            continue
        for name in _imports(p):
            bits = name.split(".")
            if bits[0] == "agent" and len(bits) > 1 and (bits[1] in STAGES | {"service", "cli"}):
                offenders.append(f"{p.relative_to(REPO)} imports {name}")
    assert not offenders, offenders


def test_importing_the_daemon_loads_no_inference_engine() -> None:
    code = (
        "import sys, agent.service, agent.cli; "
        "bad = [m for m in ('torch', 'monai', 'onnx', 'onnxruntime', 'openvino', 'deploy') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, f"loaded in the listener's process: {proc.stdout} {proc.stderr[-2000:]}"
