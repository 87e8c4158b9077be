"""Shared fixtures: real peers on loopback (Mosquitto on an ephemeral port), clean environment."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
REPO = Path(__file__).resolve().parents[1]


def require_binary(name: str) -> str:
    """Path of a system binary; a missing one fails in CI and skips (loudly) elsewhere."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        msg = f"{name} not installed (apt-get install {'dcmtk' if name != 'mosquitto' else name})"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class Mosquitto:
    """A real Mosquitto broker on an ephemeral loopback port; can be stopped and restarted."""

    def __init__(self, tmp: Path, *, persistence: bool = False) -> None:
        self.binary = require_binary("mosquitto")
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        if persistence:
            # sessions and queued QoS 1 messages survive a broker restart (outage tests)
            pdir = tmp / "mosquitto-data"
            pdir.mkdir(exist_ok=True)
            pdir.chmod(0o777)  # mosquitto drops to its own user when started as root
            lines += ["persistence true", f"persistence_location {pdir}/", "autosave_interval 1"]
            if hasattr(os, "getuid") and os.getuid() == 0:
                lines.append("user root")
        else:
            lines.append("persistence false")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path):
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(autouse=True)
def _clean_edge_agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("EDGE_AGENT_"):
            monkeypatch.delenv(key)


class ResultCollector:
    """A real MQTT subscriber (paho) collecting messages on a topic filter."""

    def __init__(self, port: int, topic: str, protocol: str = "5", persistent_id: str | None = None) -> None:
        import threading

        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self._cv = threading.Condition()
        if persistent_id:
            # MQTT 3.1.1 persistent session: the broker queues QoS 1 messages while we reconnect
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=persistent_id,
                                      clean_session=False, protocol=mqtt.MQTTv311)
            self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        else:
            proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=proto)
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *a, **k: self._subscribed.set()
        self.topic = topic
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("subscription not acknowledged")

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001 - paho callback
        with self._cv:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cv.notify_all()

    def wait_for(self, n: int, timeout: float) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        with self._cv:
            while len(self.messages) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class AgentProcess:
    """``edge-agent run`` as a real subprocess, with a config file in a temp dir."""

    def __init__(self, tmp: Path, broker_port: int, *, stable_age_s: float = 1.0,
                 extra_toml: str = "", env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.dicom_port = free_port()
        self.state = tmp / "state"
        self.config = tmp / "agent.toml"
        self.config.write_text(
            f'device_id = "test-device"\n'
            f"[dicom]\nport = {self.dicom_port}\nbind = \"127.0.0.1\"\n"
            f"allowed_callers = [\"STORESCU\", \"EDGE_SCU\", \"PACS@127.0.0.1\"]\n"
            f"[mqtt]\nport = {broker_port}\n"
            f"[storage]\ndir = \"{self.state}\"\nmin_free_mb = 50\n"
            f"[pipeline]\nstable_age_s = {stable_age_s}\nthreads = 2\n"
            f"[models]\ndir = \"{REPO / 'models'}\"\n" + extra_toml
        )
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.log = tmp / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        import sys

        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=self._logf, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"agent did not listen in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        import signal

        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None
            self._logf.close()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        self._logf.close()
        return rc

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def storescu(port: int, files: list[Path], *, aet: str = "STORESCU", aec: str = "EDGE_AGENT",
             syntax: str = "", timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Push files with DCMTK's storescu (verbose, so refusals are printed).

    ``syntax``: storescu's proposal option for compressed files (``-xv`` JPEG 2000 lossless,
    ``-xr`` RLE, ...); storescu only sends a compressed file on a matching context.
    """
    binary = require_binary("storescu")
    return subprocess.run(
        [binary, "-v", *([syntax] if syntax else []), "-aet", aet, "-aec", aec, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=timeout,
    )
