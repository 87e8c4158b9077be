from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.core.config import load_config
from agent.core.errors import ConfigError


def test_defaults_work_without_a_file() -> None:
    cfg = load_config(None, environ={})
    assert cfg.dicom.ae_title == "EDGE_AGENT"
    assert cfg.mqtt.port == 1883
    assert cfg.storage.dir == Path("var")
    assert cfg.pipeline.stable_age_s == 10


def test_toml_and_environment_overrides(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('device_id = "exam-room-3"\n[mqtt]\nport = 1884\n[dicom]\nallowed_callers = ["PACS@10.1.2.3"]\n')
    cfg = load_config(f, environ={"EDGE_AGENT_MQTT__PORT": "2883", "EDGE_AGENT_DICOM__AE_TITLE": "ROOM3"})
    assert cfg.device_id == "exam-room-3"
    assert cfg.mqtt.port == 2883  # environment wins over the file
    assert cfg.dicom.ae_title == "ROOM3"
    assert cfg.dicom.allowed_callers == ["PACS@10.1.2.3"]


@pytest.mark.parametrize(
    "text, key",
    [
        ("[mqtt]\nport = 70000\n", "mqtt.port"),
        ("[mqtt]\nprot = 1\n", "mqtt.prot"),
        ('[dicom]\nae_title = "THIS_TITLE_IS_FAR_TOO_LONG"\n', "dicom.ae_title"),
        ('device_id = "a/b"\n', "device_id"),
        ("[storage]\nmin_free_mb = -1\n", "storage.min_free_mb"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(f, environ={})
    assert key in str(info.value)


def test_config_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[pipeline]\nstable_age_s = 'soon'\n")
    assert main(["config", "check", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "pipeline.stable_age_s" in err
    good = tmp_path / "good.toml"
    good.write_text('device_id = "exam-room-3"\n')
    assert main(["config", "check", "--config", str(good)]) == 0
    assert "configuration OK" in capsys.readouterr().out


def test_unreadable_toml_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text("device_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", environ={})


def test_configuration_reference_is_current() -> None:
    from agent.core.config_reference import render_reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text().strip() == render_reference().strip(), (
        "docs/configuration.md is stale: python -m agent.core.config > docs/configuration.md"
    )


def test_the_fault_injection_variable_is_not_taken_for_a_configuration_key() -> None:
    cfg = load_config(None, environ={"EDGE_AGENT_FAULT": "hang", "EDGE_AGENT_DEVICE_ID": "room-7"})
    assert cfg.device_id == "room-7"
    with pytest.raises(ConfigError, match="faults"):
        load_config(None, environ={"EDGE_AGENT_FAULTS": "x"})  # a typo is still an error
