"""``edge-agent install`` in a throwaway root (``--root tmp_path``), never the machine's real /etc.

The real CLI runs as a child process each time. These tests leave the venv out (``--no-venv``);
tests/test_systemd.py builds a real one and verifies the installed units with systemd-analyze.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.install_files import CONFIG_FILE, render_config_template
from agent.core.config import load_config
from agent.core.config_reference import reference_sections

REPO = Path(__file__).resolve().parents[1]
UNIT = "etc/systemd/system/edge-agent.service"
DROPINS = "etc/systemd/system/edge-agent.service.d"


def run_install(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "agent", "install", "--root", str(root), *args],
                          capture_output=True, text=True, env=env, timeout=120, cwd=root.parent)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int, int]]:
    """Every path under root with its content, mode and mtime (ns): a second run must keep all three."""
    out: dict[str, tuple[bytes | None, int, int]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.read_bytes() if p.is_file() else None, st.st_mode, st.st_mtime_ns)
    return out


def actions(stdout: str) -> dict[str, str]:
    """``{path: action}`` from the report: the indented lines under the first line."""
    out = {}
    for line in stdout.splitlines()[1:]:
        if not line.startswith("  "):
            break
        action, _, path = line.strip().rpartition("  ")
        out[path.strip()] = action.strip()
    return out


def set_port(root: Path, port: int) -> None:
    """The operator's edit: dicom.port in the installed agent.toml."""
    cfg = root / "etc/edge-agent/agent.toml"
    head, sep, rest = cfg.read_text().partition("\n[dicom]\n")
    section, sep2, tail = rest.partition("\n[dicom.tls]\n")
    section = re.sub(r"^(# )?port = \d+$", f"port = {port}", section, flags=re.M)
    cfg.write_text(head + sep + section + sep2 + tail)
    assert load_config(cfg, environ={}).dicom.port == port


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = run_install(root, "--no-venv", "--gpu", "none")
    made = actions(first.stdout)
    assert made["/etc/systemd/system/edge-agent.service"] == "created"
    assert made["/etc/edge-agent/agent.toml"] == "created"
    assert made["/etc/sysusers.d/edge-agent.conf"] == "created"
    assert made["/etc/tmpfiles.d/edge-agent.conf"] == "created"
    assert "next steps" in first.stdout and "systemctl enable --now edge-agent.service" in first.stdout
    before = snapshot(root)

    second = run_install(root, "--no-venv", "--gpu", "none")
    again = actions(second.stdout)
    assert set(again) == set(made)
    assert {a for p, a in again.items() if not p.endswith("/venv")} == {"unchanged"}, second.stdout
    assert "nothing changed" in second.stdout
    assert snapshot(root) == before  # not one byte, mode or mtime moved


def test_files_land_under_root_and_name_device_paths(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_install(root, "--no-venv", "--gpu", "none", "--arch", "aarch64")
    unit = (root / UNIT).read_text()
    assert "ExecStart=/opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/agent.toml" in unit
    assert str(tmp_path) not in unit
    assert (root / "etc/edge-agent/agent.toml").stat().st_mode & 0o777 == 0o640  # may hold the MQTT password
    assert not (root / DROPINS).exists()  # CPU-only aarch64, DICOM port 11112: no drop-in fits
    assert "u edge-agent" in (root / "etc/sysusers.d/edge-agent.conf").read_text()


def test_prefix_moves_the_entry_point(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_install(root, "--no-venv", "--gpu", "none", "--prefix", "/srv/ea")
    assert "ExecStart=/srv/ea/venv/bin/edge-agent run" in (root / UNIT).read_text()
    assert (root / "srv/ea/install-manifest.json").is_file()


def test_drop_ins_follow_the_host_and_the_configured_port(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_install(root, "--no-venv", "--gpu", "nvidia", "--arch", "x86_64")
    assert sorted(p.name for p in (root / DROPINS).iterdir()) == ["gpu.conf", "openvino.conf"]
    gpu = (root / DROPINS / "gpu.conf").read_text()
    assert "PrivateDevices=no" in gpu and "DevicePolicy=closed" in gpu and "DeviceAllow=/dev/nvidiactl rw" in gpu

    set_port(root, 104)  # DICOM's registered port: the operator's edit, then install again
    out = actions(run_install(root, "--no-venv", "--gpu", "none", "--arch", "x86_64").stdout)
    assert out[f"/{DROPINS}/low-port.conf"] == "created"
    assert out[f"/{DROPINS}/gpu.conf"] == "removed"  # no GPU any more: its drop-in goes
    assert out["/etc/edge-agent/agent.toml"] == "kept (yours)"
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in (root / DROPINS / "low-port.conf").read_text()

    set_port(root, 11112)
    out = actions(run_install(root, "--no-venv", "--gpu", "none", "--arch", "aarch64").stdout)
    assert out[f"/{DROPINS}/low-port.conf"] == "removed"
    assert out[f"/{DROPINS}/openvino.conf"] == "removed"
    assert not (root / DROPINS).exists()


def test_edited_config_is_never_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_install(root, "--no-venv", "--gpu", "none")
    cfg = root / "etc/edge-agent/agent.toml"
    edited = cfg.read_text().replace('# device_id = "edge-dev"', 'device_id = "ct-room-3"')
    cfg.write_text(edited)
    out = actions(run_install(root, "--no-venv", "--gpu", "none").stdout)
    assert out["/etc/edge-agent/agent.toml"] == "kept (yours)"
    assert cfg.read_text() == edited


def test_config_template_documents_every_key_and_loads() -> None:
    text = render_config_template()
    cfg = load_config_text(text)
    assert str(cfg.storage.dir) == "/var/lib/edge-agent"
    assert str(cfg.models.dir) == "/var/lib/edge-agent/models"
    for prefix, _model, fields in reference_sections():
        if prefix:
            assert f"\n[{prefix}]\n" in text
        for name, field in fields:
            assert f"# {name} = " in text or f"\n{name} = " in text, f"{prefix}.{name} missing"
            first = (field.description or "").splitlines()[0]
            assert f"# {first}" in text, f"{prefix}.{name}: description missing"
    # commented defaults are real TOML: uncommenting every key gives the defaults back
    uncommented = "\n".join(ln[2:] if ln.startswith("# ") and " = " in ln and "(unset)" not in ln else ln
                            for ln in text.splitlines())
    assert load_config_text(uncommented).model_dump(exclude={"storage", "models"}) == \
        load_config(None, environ={}).model_dump(exclude={"storage", "models"})


def load_config_text(text: str):  # noqa: ANN201 - the Config of a TOML text
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name, environ={})
    finally:
        os.unlink(f.name)


def test_uninstall_keeps_state_and_edits_purge_removes_them(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_install(root, "--no-venv", "--gpu", "nvidia")
    state = root / "var/lib/edge-agent"
    (state / "spool").mkdir(parents=True)
    (state / "state.db").write_bytes(b"acknowledged instances live here")
    override = root / DROPINS / "override.conf"  # `systemctl edit edge-agent`: the operator's
    override.write_text("[Service]\nEnvironment=X=1\n")

    out = actions(run_install(root, "--uninstall").stdout)
    assert out["/etc/systemd/system/edge-agent.service"] == "removed"
    assert out[f"/{DROPINS}/gpu.conf"] == "removed"
    assert out["/opt/edge-agent/install-manifest.json"] == "removed"
    assert out["/var/lib/edge-agent"].startswith("kept")
    assert not (root / UNIT).exists() and not (root / "etc/sysusers.d/edge-agent.conf").exists()
    assert (state / "state.db").read_bytes() == b"acknowledged instances live here"
    assert override.is_file()  # a drop-in install did not write stays
    assert not (root / "etc/edge-agent/agent.toml").exists()  # unedited: it was install's
    assert not (root / "opt/edge-agent").exists()

    again = run_install(root, "--uninstall", check=False)
    assert again.returncode == 1 and "nothing to uninstall" in again.stderr


def test_uninstall_keeps_an_edited_config_until_purge(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_install(root, "--no-venv", "--gpu", "none")
    cfg = root / CONFIG_FILE.relative_to("/")
    cfg.write_text(cfg.read_text().replace('# device_id = "edge-dev"', 'device_id = "mr-2"'))
    (root / "var/lib/edge-agent").mkdir(parents=True)
    (root / "var/cache/edge-agent").mkdir(parents=True)
    out = actions(run_install(root, "--uninstall").stdout)
    assert out["/etc/edge-agent/agent.toml"].startswith("kept (edited")
    assert cfg.is_file()

    run_install(root, "--no-venv", "--gpu", "none")  # reinstall over the kept config and state
    out = actions(run_install(root, "--uninstall", "--purge").stdout)
    assert out["/etc/edge-agent/agent.toml"] == "removed"
    for gone in ("/var/lib/edge-agent", "/var/cache/edge-agent", "/etc/edge-agent"):
        assert out[gone] == "removed" and not (root / gone[1:]).exists()


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    proc = run_install(root, "--no-venv", "--dry-run")
    assert "would be created" in proc.stdout
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--purge"], "--purge goes with --uninstall"),
    (["--prefix", "opt/x"], "--prefix must be an absolute path"),
])
def test_bad_arguments_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_install(tmp_path, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr
