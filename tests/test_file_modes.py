"""Secrets and files (issue 13), against the real agent process: whatever umask it is started
with (022 here, the usual default), every file and folder it writes under storage.dir (spool,
quarantine, state.db and its -wal/-shm, models) is its user's alone, and folders an older version
left wider are tightened at start. A broker password from the environment validates as the text
it is and is never printed: not by the daemon, not by ``config check --show``, not in an error."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
from conftest import REPO, AgentProcess, ResultCollector, storescu

from deploy.synth import make_mr_slice, write_mr_series

PASSWORD = "9183746501"  # digits only: the env parser used to turn it into an int


def _private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & 0o077 == 0, f"{path}: mode {mode:o} gives group/others access"


def test_state_files_are_private_under_umask_022(tmp_path: Path, mosquitto: Any) -> None:
    # what an older version left: a world-readable state folder, database and spool
    state = tmp_path / "state"
    (state / "spool").mkdir(parents=True, mode=0o755)
    for d in (state, state / "spool"):
        d.chmod(0o755)
    old_db = state / "state.db"
    old_db.touch(mode=0o644)
    old_db.chmod(0o644)

    results = ResultCollector(mosquitto.port, "edge/+/results")
    agent = AgentProcess(tmp_path, mosquitto.port, env={"EDGE_AGENT_MQTT__PASSWORD": PASSWORD})
    previous = os.umask(0o022)  # the agent inherits it and must set its own
    try:
        agent.start()
    finally:
        os.umask(previous)
    try:
        series = write_mr_series(make_mr_slice(7, difficulty="obvious"), tmp_path / "mr")
        files = sorted(series.glob("*.dcm"))
        assert storescu(agent.dicom_port, files).returncode == 0
        broken = tmp_path / "broken.dcm"
        ds = pydicom.dcmread(files[0])
        del ds.SeriesInstanceUID
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
        ds.save_as(broken, enforce_file_format=True)
        storescu(agent.dicom_port, [broken])  # refused 0xC210, quarantined
        assert results.wait_for(1, 120), agent.log_text()[-3000:]
    finally:
        results.close()
        assert agent.stop() == 0

    spooled = [p for p in (state / "spool").rglob("*.dcm")]
    quarantined = [p for p in (state / "quarantine").rglob("*") if p.is_file()]
    assert len(spooled) == len(files) and quarantined, (spooled, quarantined)
    db_files = [p for p in state.iterdir() if p.name.startswith("state.db")]
    assert {p.name for p in db_files} >= {"state.db"}
    everything = [p for p in state.rglob("*") if not p.is_symlink()]
    for path in [state, *everything]:
        _private(path)
    for path in [*spooled, *quarantined, *db_files]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    log = agent.log_text()
    assert "storage.permissions_tightened" in log and "state.db" in log
    assert PASSWORD not in log  # the password validated (agent started) and was never printed


def test_wal_and_shm_are_private_while_the_agent_runs(tmp_path: Path, mosquitto: Any) -> None:
    agent = AgentProcess(tmp_path, mosquitto.port)
    previous = os.umask(0o022)
    try:
        agent.start()
    finally:
        os.umask(previous)
    try:
        deadline = time.monotonic() + 10
        wal = tmp_path / "state" / "state.db-wal"
        while not wal.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            path = tmp_path / "state" / name
            assert path.exists(), name
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, (name, oct(path.stat().st_mode))
    finally:
        agent.stop()


def _edge_agent(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, timeout=60)


def test_a_password_from_the_environment_validates_and_is_never_printed(tmp_path: Path) -> None:
    env = {"EDGE_AGENT_MQTT__PASSWORD": PASSWORD, "EDGE_AGENT_MQTT__USERNAME": "0042"}
    shown = _edge_agent("config", "check", "--show", env=env)
    assert shown.returncode == 0, shown.stderr
    assert PASSWORD not in shown.stdout + shown.stderr
    assert '"password": "**********"' in shown.stdout
    assert '"username": "0042"' in shown.stdout  # a str field keeps its text (leading zeros too)

    # a config that is invalid elsewhere: the error names the key, never the secret
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nport = "not a port"\n')
    out = _edge_agent("config", "check", "--config", str(bad), env=env)
    assert out.returncode == 2 and "mqtt.port" in out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    # an invalid secret (a TOML number, not text): the error names mqtt.password, not the value
    bad.write_text(f"[mqtt]\npassword = {PASSWORD}\n")
    out = _edge_agent("config", "check", "--config", str(bad), env={})
    assert out.returncode == 2 and "mqtt.password" in out.stderr, out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    # a whole section of the wrong shape carrying the secret: redacted inside too
    bad.write_text(f'mqtt = {{ password = "{PASSWORD}", port = "x" }}\n')
    out = _edge_agent("config", "check", "--config", str(bad), env={})
    assert out.returncode == 2 and PASSWORD not in out.stdout + out.stderr, out.stderr
