"""Who may command a device (issue 13), against the real agent process, a real Mosquitto and a real
HTTP registry built by edge-deploy: only commands signed by a trusted operator key, fresh, never
seen before, for this device and for a model it follows, are run; every other one is answered
``command.rejected`` with its code. A busy answer leaves the command usable. A stalled registry
download hits its overall deadline, and a rollback sent during one completes at once."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess, ResultCollector
from operator_keys import OperatorKey
from test_pull import RegistryHandler
from test_updater import Built, built_registry, publish_version

from agent.mqtt.payloads import parse_event

MODEL = "mr-brain-cls"
DEVICE = "test-device"  # conftest.AgentProcess
FINAL = ("command.completed", "command.failed", "command.rejected")


class StallingHandler(RegistryHandler):
    """The registry's files; a model file of a version in ``server.stall`` is answered with its
    headers and then one byte every ``server.trickle_s`` seconds (a stalled, never-idle transfer)."""

    server: StallingServer

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        rel = self.path.lstrip("/")
        parts = rel.split("/")
        if len(parts) >= 3 and parts[1] in self.server.stall and not parts[-1].startswith(("manifest", "index")):
            size = (self.server.root / rel).stat().st_size
            self.server.stalled.append(rel)
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            try:
                for _ in range(size):
                    if self.server.stopping.wait(self.server.trickle_s):
                        break
                    self.wfile.write(b"\0")
                    self.wfile.flush()
            except OSError:
                pass  # the client gave up
            self.close_connection = True
            return
        super().do_GET()


class StallingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), StallingHandler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}
        self.stall: set[str] = set()
        self.stalled: list[str] = []
        self.trickle_s = 2.0
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


@pytest.fixture
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_registry(tmp_path_factory)


@pytest.fixture
def registry(tmp_path: Path, built: Built) -> Iterator[StallingServer]:
    import shutil

    root = tmp_path / "registry"
    shutil.copytree(built.registry, root)
    srv = StallingServer(root)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.stopping.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


class Console:
    """The operator's side over the real broker: publish on cmd/, read answers on events."""

    def __init__(self, port: int, key: OperatorKey) -> None:
        self.events = ResultCollector(port, f"edge/{DEVICE}/events")
        self.key = key

    def publish(self, name: str, data: bytes) -> None:
        self.events.client.publish(f"edge/{DEVICE}/cmd/{name}", data, qos=1).wait_for_publish(5)

    def signed(self, name: str, cid: str, **kw: Any) -> bytes:
        return self.key.sign(name, cid, device=kw.pop("device", DEVICE), **kw)

    def answers(self, cid: str | None) -> list[dict[str, Any]]:
        docs = [parse_event(p) for _t, p in list(self.events.messages)]
        return [d for d in docs if d["fields"].get("correlation_id") == cid]

    def final(self, cid: str, timeout: float = 120.0, after: int = 0) -> dict[str, Any]:
        """The first final answer for ``cid`` after the first ``after`` ones."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [d for d in self.answers(cid) if d["kind"] in FINAL][after:]
            if done:
                return done[0]
            time.sleep(0.1)
        raise AssertionError(f"no final answer for {cid}: {self.answers(cid)}")

    def close(self) -> None:
        self.events.close()


def _agent(tmp: Path, port: int, key: OperatorKey, registry_url: str, pub: Path, extra: str = "") -> AgentProcess:
    return AgentProcess(tmp, port, extra_toml=(
        f'[registry]\nurl = "{registry_url}"\npublic_key = "{pub}"\nmodels = ["{MODEL}"]\n'
        f"poll_interval_s = 0\nmin_free_mb = 0\n{extra}"
        f'[control]\noperator_keys = ["{key.public}"]\n'))


def _subscribed(agent: AgentProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "mqtt.commands_subscribed" in agent.log_text():
            return
        time.sleep(0.1)
    raise AssertionError(agent.log_text()[-3000:])


def test_only_fresh_unseen_signed_commands_for_this_device_run(tmp_path: Path, mosquitto: Any,
                                                               registry: StallingServer, built: Built) -> None:
    key = OperatorKey(tmp_path / "operator")
    stranger = OperatorKey(tmp_path / "stranger")
    agent = _agent(tmp_path, mosquitto.port, key, registry.url, built.pub)
    agent.start()
    console = Console(mosquitto.port, key)
    try:
        _subscribed(agent)
        # a properly signed update acts: the registry's version is installed and activated
        good = console.signed("update", "u-1", model=MODEL)
        console.publish("update", good)
        done = console.final("u-1")
        assert done["kind"] == "command.completed", done
        assert done["fields"]["result"][0]["version"] == "1.0.0"
        assert [d["kind"] for d in console.answers("u-1")][0] == "command.accepted"

        tampered = json.loads(console.signed("rollback", "bad-sig", model=MODEL))
        tampered["signed"] = tampered["signed"].replace('"rollback"', '"rollback" ', 1)  # one byte more
        refusals = {
            "unsigned": ("rollback", json.dumps({"correlation_id": "unsigned", "model": MODEL}).encode()),
            "bad-sig": ("rollback", json.dumps(tampered).encode()),
            "stranger": ("rollback", stranger.sign("rollback", "stranger", device=DEVICE, model=MODEL)),
            "stranger-nokid": ("rollback", stranger.sign("rollback", "stranger-nokid", device=DEVICE, model=MODEL,
                                                         with_key_id=False)),
            "stale": ("rollback", console.signed("rollback", "stale", model=MODEL, issued_at=time.time() - 3600)),
            "future": ("rollback", console.signed("rollback", "future", model=MODEL, issued_at=time.time() + 3600)),
            "elsewhere": ("rollback", console.signed("rollback", "elsewhere", model=MODEL, device="other-device")),
            "wrong-topic": ("rollback", console.signed("update", "wrong-topic", model=MODEL)),
            "not-followed": ("update", console.signed("update", "not-followed", model="ct-unknown")),
            "u-1": ("update", good),  # the very message again: a replay
        }
        for name, data in refusals.values():
            console.publish(name, data)
        expected = {"unsigned": "unsigned", "bad-sig": "bad_signature", "stranger": "unknown_key",
                    "stranger-nokid": "bad_signature", "stale": "stale", "future": "stale",
                    "elsewhere": "not_for_device", "wrong-topic": "not_for_device",
                    "not-followed": "model_not_followed", "u-1": "replay"}
        for cid, code in expected.items():
            answer = console.final(cid, 30, after=1 if cid == "u-1" else 0)
            assert (answer["kind"], answer["fields"]["code"]) == ("command.rejected", code), (cid, answer)
            assert answer["severity"] == "warning" and answer["fields"]["reason"]
        assert "command.rejected" in agent.log_text() and "code=bad_signature" in agent.log_text()
        store = tmp_path / "state" / "models" / MODEL
        assert (store / "current").resolve().name == "1.0.0"  # nothing refused ran

        # the operator's tool: edge-deploy command send signs, publishes and waits for the final answer
        from deploy.cli import main as deploy_main

        rc = deploy_main(["command", "send", "selftest", "--key", str(key.private), "--device", DEVICE,
                          "--model", MODEL, "--broker", f"127.0.0.1:{mosquitto.port}", "--correlation-id",
                          "cli-1", "--timeout", "120"])
        assert rc == 0 and console.final("cli-1")["kind"] == "command.completed"

        # the nonce store is durable: after a restart the same signed message is still a replay
        assert agent.stop() == 0
        agent.start()
        _subscribed(agent)
        console.publish("update", good)
        assert console.final("u-1", 30, after=2)["fields"]["code"] == "replay"
    finally:
        console.close()
        agent.stop()


def test_busy_does_not_use_up_the_correlation_id(tmp_path: Path, mosquitto: Any, registry: StallingServer,
                                                 built: Built) -> None:
    key = OperatorKey(tmp_path / "operator")
    agent = _agent(tmp_path, mosquitto.port, key, registry.url, built.pub)
    agent.start()
    console = Console(mosquitto.port, key)
    try:
        _subscribed(agent)
        console.publish("update", console.signed("update", "u-1", model=MODEL))
        assert console.final("u-1")["kind"] == "command.completed"
        # 6 self-tests at once: one runs, at most one waits (control.max_pending_per_command = 1), the rest are busy
        burst = {f"s-{i}": console.signed("selftest", f"s-{i}", model=MODEL) for i in range(6)}
        for data in burst.values():
            console.publish("selftest", data)
        finals = {cid: console.final(cid) for cid in burst}
        busy = [cid for cid, d in finals.items() if d["kind"] == "command.rejected"]
        assert busy and all(finals[c]["fields"]["code"] == "busy" for c in busy), finals
        ran = [cid for cid, d in finals.items() if d["kind"] == "command.completed"]
        assert "s-0" in ran and len(ran) <= 2, finals  # the second may arrive before the first starts
        # the same message again once the queue has room: accepted and run (id and nonce not used up)
        again = busy[0]
        console.publish("selftest", burst[again])
        answer = console.final(again, after=1)
        assert answer["kind"] == "command.completed", console.answers(again)
        assert answer["fields"]["result"][0]["model"] == MODEL
    finally:
        console.close()
        agent.stop()


def test_stalled_download_hits_its_deadline_and_does_not_block_a_rollback(
        tmp_path: Path, mosquitto: Any, registry: StallingServer, built: Built) -> None:
    key = OperatorKey(tmp_path / "operator")
    deadline_s = 10
    # timeout_s (per request) longer than the deadline: a trickle never trips it, the deadline must
    agent = _agent(tmp_path, mosquitto.port, key, registry.url, built.pub,
                   extra=f"timeout_s = 60\ndownload_deadline_s = {deadline_s}\nretries = 1\n")
    agent.start()
    console = Console(mosquitto.port, key)
    try:
        _subscribed(agent)
        console.publish("update", console.signed("update", "u-1", model=MODEL))
        assert console.final("u-1")["kind"] == "command.completed"
        publish_version(built, registry.root, "1.1.0")
        console.publish("update", console.signed("update", "u-2", model=MODEL))
        assert console.final("u-2")["kind"] == "command.completed"
        current = tmp_path / "state" / "models" / MODEL / "current"
        assert current.resolve().name == "1.1.0"

        # 1.2.0's files trickle in a byte every 2 s: the update stalls in its download
        publish_version(built, registry.root, "1.2.0")
        registry.stall.add("1.2.0")
        console.publish("update", console.signed("update", "u-3", model=MODEL))
        t0 = time.monotonic()
        while not registry.stalled and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        assert registry.stalled, "the download never started"
        # a rollback during the stalled download completes promptly
        t1 = time.monotonic()
        console.publish("rollback", console.signed("rollback", "r-1", model=MODEL))
        rolled = console.final("r-1", 60)
        rollback_s = time.monotonic() - t1
        assert rolled["kind"] == "command.completed", rolled
        assert rolled["fields"]["result"]["version"] == "1.0.0" and current.resolve().name == "1.0.0"
        assert rollback_s < deadline_s, f"rollback waited {rollback_s:.1f} s for the download"
        # the rollback took precedence: the stalled update is abandoned, not switched in later
        stalled = console.final("u-3", 60)
        assert stalled["kind"] == "command.failed" and stalled["fields"]["result"][0]["stage"] == "download"
        assert current.resolve().name == "1.0.0"

        # a stalled download alone: abandoned at the overall deadline, the partial kept to resume
        console.publish("update", console.signed("update", "u-4", model=MODEL))
        t2 = time.monotonic()
        failed = console.final("u-4", 120)
        took = time.monotonic() - t2
        assert failed["kind"] == "command.failed", failed
        assert "download_deadline_s" in failed["fields"]["error"], failed
        assert deadline_s - 1 <= took < deadline_s + 60, took
        assert current.resolve().name == "1.0.0"
        assert "registry.download_abandoned" in agent.log_text()
    finally:
        console.close()
        agent.stop()


