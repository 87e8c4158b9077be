"""MQTT commands (cmd/update, cmd/rollback, cmd/selftest) over a REAL Mosquitto, driving a real
ModelUpdater against a real HTTP registry built by edge-deploy (see test_updater). Every command is
answered on ``events`` with its correlation id; bad commands are rejected with a reason and change
nothing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import ResultCollector
from operator_keys import OperatorKey
from test_pull import RegistryServer
from test_updater import (
    Built,
    OrtActivator,
    UpdateOutcome,
    built_registry,
    proven_here,
    publish_version,
    serve_copy,
    wait_until,
)

from agent.control.commands import Command, CommandDispatcher, CommandRejected, Handler, parse_command
from agent.core import events as typed
from agent.core.config import MqttConfig, RegistryConfig
from agent.core.db import connect
from agent.core.errors import EdgeAgentError, RegistryError
from agent.core.events import CommandCompleted, CommandFailed, RollbackOutcome
from agent.core.status import SelfTestReport
from agent.core.topics import Topics
from agent.core.types import Event
from agent.device.probe import probe
from agent.mqtt.outbox import Outbox
from agent.mqtt.payloads import event_payload, parse_event, parse_status, status_payload
from agent.mqtt.publisher import MqttPublisher
from agent.updates.client import RegistryClient
from agent.updates.store import ModelStore
from agent.updates.updater import ModelUpdater

MODEL = "mr-brain-cls"
DEVICE = "dev-c"
PREFIX = "edge"
TOPICS = Topics(PREFIX, DEVICE)
KNOWN = frozenset({"update", "rollback", "selftest"})


@pytest.fixture(scope="module")
def opkey(tmp_path_factory: pytest.TempPathFactory) -> OperatorKey:
    """The operator key every device here trusts (commands are signed, never sent unsigned)."""
    return OperatorKey(tmp_path_factory.mktemp("operator"))


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("topic", "payload", "reason", "cid"), [
    ("cmd/reboot", b'{"correlation_id": "a"}', "unknown command 'reboot' (known: rollback, selftest, update)", "a"),
    ("cmd/update/now", b'{"correlation_id": "a"}', "unknown command 'update/now'", "a"),
    ("cmd/update", b"\xff\xfe", "payload is not UTF-8 JSON", None),
    ("cmd/update", b"{not json", "payload is not UTF-8 JSON", None),
    ("cmd/update", b'["correlation_id"]', "payload must be a JSON object", None),
    ("cmd/update", b"", "payload must be a JSON object", None),
    ("cmd/update", b'{"model": "x"}', "correlation_id missing", None),
    ("cmd/update", b'{"correlation_id": "has space"}', "correlation_id missing or not 1-128 printable", None),
    ("cmd/update", b'{"correlation_id": 7}', "correlation_id missing", None),
    ("cmd/update", b'{"correlation_id": "a", "force": true}', "unknown field(s) force", "a"),
    ("cmd/rollback", b'{"correlation_id": "a", "model": "../etc"}', "model '../etc' is not a model name", "a"),
    ("cmd/rollback", b'{"correlation_id": "a", "model": 3}', "model 3 is not a model name", "a"),
    ("cmd/update", b'{"correlation_id": "' + b"x" * 70_000 + b'"}', "larger than 65536", None),
])
def test_malformed_commands_are_rejected_with_a_reason(topic: str, payload: bytes, reason: str,
                                                       cid: str | None) -> None:
    with pytest.raises(CommandRejected) as info:
        parse_command(TOPICS, f"{TOPICS.base}/{topic}", payload, KNOWN)
    assert reason in str(info.value)
    assert info.value.correlation_id == cid


def test_a_valid_command() -> None:
    cmd = parse_command(TOPICS, f"{TOPICS.base}/cmd/rollback", b'{"correlation_id":"op-1","model":"ct-x"}', KNOWN)
    assert (cmd.name, cmd.correlation_id, cmd.model) == ("rollback", "op-1", "ct-x")
    assert parse_command(TOPICS, f"{TOPICS.base}/cmd/update", b'{"correlation_id":"op-2"}', KNOWN).model is None


def test_handler_results_failures_and_crashes_are_answered(opkey: OperatorKey) -> None:
    events: list[Event] = []

    def crash(cmd: Command) -> None:
        raise ValueError("boom")

    def refuse(cmd: Command) -> None:
        raise RegistryError("no previous version")

    handlers = {
        "update": lambda c: [UpdateOutcome("m", False, "failed", "1.0.0", "1.1.0", stage="download", error="sha256")],
        "rollback": refuse,
        "selftest": crash,
    }
    d = CommandDispatcher(TOPICS, handlers, events.append, auth=opkey.auth(DEVICE))
    for i, name in enumerate(("update", "rollback", "selftest")):
        d.run_one(Command(name, f"c{i}", None, 0.0))
    kinds = [(e.kind, e.fields["correlation_id"], e.fields["error"]) for e in events]
    assert kinds == [("command.failed", "c0", "m: sha256"),
                     ("command.failed", "c1", "no previous version"),
                     ("command.failed", "c2", "internal error: ValueError: boom")]
    assert events[0].fields["result"][0]["stage"] == "download"  # the outcome travels with the answer


def test_answers_are_the_typed_command_events(opkey: OperatorKey) -> None:
    """command.* answers carry exactly the fields of their agent/core/events/ models; handler
    results (the core outcome types) travel field by field in ``result``."""
    events: list[Event] = []
    handlers: dict[str, Handler] = {
        "selftest": lambda c: [SelfTestReport("m", "1.0.0", "int8", True),
                               SelfTestReport("m", "1.0.0", "fp32", False, "output mismatch")],
        "rollback": lambda c: RollbackOutcome("m", "1.0.0", "1.1.0", "int8"),
        "update": lambda c: None,
    }
    d = CommandDispatcher(TOPICS, handlers, events.append, auth=opkey.auth(DEVICE))
    d.run_one(Command("selftest", "s-1", "m", 0.0))
    d.run_one(Command("rollback", "r-1", None, 0.0))
    d.run_one(Command("update", "u-1", None, 0.0))
    d(f"{TOPICS.base}/cmd/update", opkey.sign("update", "u-2", device=DEVICE))  # queued (not started): accepted
    d(f"{TOPICS.base}/cmd/reboot", opkey.sign("reboot", "x-1", device=DEVICE))
    assert [(e.kind, e.severity) for e in events] == [
        ("command.failed", "error"), ("command.completed", "info"), ("command.completed", "info"),
        ("command.accepted", "info"), ("command.rejected", "warning")]
    failed, rolled, updated, accepted, rejected = events
    assert list(failed.fields) == list(CommandFailed.field_names())
    assert failed.fields["error"] == "m fp32: output mismatch" and failed.message == "selftest failed: m fp32: output mismatch"
    assert failed.fields["result"][1] == {"model": "m", "version": "1.0.0", "variant": "fp32",  # type: ignore[index]
                                          "passed": False, "error": "output mismatch", "max_abs_err": None}
    assert list(rolled.fields) == list(CommandCompleted.field_names()) and rolled.message == "rollback completed"
    assert rolled.fields["result"] == {"model": "m", "version": "1.0.0", "from_version": "1.1.0",
                                       "variant": "int8", "ok": True}
    assert "result" not in updated.fields  # the handler had nothing to report
    assert accepted.fields == {"command": "update", "correlation_id": "u-2", "model": None}
    assert accepted.message == "update accepted"
    assert list(rejected.fields) == list(typed.CommandRejected.field_names())
    assert rejected.fields["correlation_id"] == "x-1" and rejected.message.startswith("command rejected: unknown")
    for e in events:
        parse_event(event_payload(e, DEVICE))


def test_queue_full_and_shutdown(opkey: OperatorKey) -> None:
    events: list[Event] = []
    gate = threading.Event()
    ran: list[str] = []

    def slow(cmd: Command) -> dict[str, str]:
        gate.wait(10)
        ran.append(cmd.correlation_id)
        return {"ok": "yes"}

    d = CommandDispatcher(TOPICS, {"update": slow}, events.append, auth=opkey.auth(DEVICE), max_pending=1)
    d.start()
    topic = f"{TOPICS.base}/cmd/update"
    d(topic, opkey.sign("update", "1", device=DEVICE))
    assert wait_until(lambda: d._queue.empty(), 5)  # "1" is running
    d(topic, opkey.sign("update", "2", device=DEVICE))  # queued
    busy = opkey.sign("update", "3", device=DEVICE)
    d(topic, busy)  # no room
    assert [(e.fields["code"], e.fields["reason"]) for e in events if e.kind == "command.rejected"] == [
        ("busy", "busy: too many update commands queued; try again later")]
    gate.set()
    assert wait_until(lambda: ran == ["1", "2"], 5)
    # busy used up neither the correlation id nor the nonce: the very same message is accepted now
    d(topic, busy)
    assert wait_until(lambda: ran == ["1", "2", "3"], 5)
    d.stop()
    assert [e.kind for e in events if e.fields["correlation_id"] == "2"] == ["command.accepted", "command.completed"]


# ------------------------------------------------------------------------- over Mosquitto


@pytest.fixture
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_registry(tmp_path_factory)  # built once per session, shared with test_updater


@pytest.fixture
def server(tmp_path: Path, built: Built) -> Iterator[RegistryServer]:
    yield from serve_copy(tmp_path, built)


class Device:
    """The device side: outbox + MqttPublisher + CommandDispatcher + ModelUpdater, as the service
    wires them (events of both go through the durable outbox)."""

    def __init__(self, tmp: Path, port: int, registry_url: str, pub_key: Path, opkey: OperatorKey,
                 protocol: str = "5") -> None:
        self.state = tmp / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        self.conn = connect(self.state / "state.db")
        self.outbox = Outbox(self.conn)
        self.store = ModelStore(self.state)
        self.activator = OrtActivator(self.store)
        self.probe = probe(self.state)
        client = RegistryClient(registry_url, [pub_key], self.state, self.probe, retry_wait_s=0, min_free_mb=0)
        self.updater = ModelUpdater(RegistryConfig(url=registry_url, public_key=[pub_key], poll_interval_s=0),
                                    self.store, client, self.activator, self.emit)
        self.dispatcher = CommandDispatcher(TOPICS, {
            "update": lambda c: self.updater.pull_now([c.model] if c.model else None, correlation_id=c.correlation_id),
            "rollback": lambda c: self.updater.rollback(c.model, correlation_id=c.correlation_id),
            "selftest": self.selftest,
        }, self.emit, auth=opkey.auth(DEVICE, connect(self.state / "state.db")), urgent={"rollback"})
        cfg = MqttConfig(host="127.0.0.1", port=port, topic_prefix=PREFIX, protocol=protocol)  # type: ignore[arg-type]
        self.publisher = MqttPublisher(cfg, DEVICE, self.outbox, birth=self.birth, on_command=self.dispatcher,
                                       reconnect_delay_s=(0.1, 0.5), poll_interval_s=0.2)

    def birth(self) -> bytes:
        return status_payload(device_id=DEVICE, version="test", started_at=0.0, device=self.probe.summary())

    def emit(self, event: Event) -> None:
        self.publisher.publish_event(event)

    def selftest(self, cmd: Command) -> Any:
        model = cmd.model or MODEL
        version = self.store.current_version(model)
        if version is None:
            raise RegistryError(f"{model} is not installed")
        return self.activator(model, version, correlation_id=cmd.correlation_id)

    def start(self) -> None:
        self.dispatcher.start()
        self.publisher.start()
        assert wait_until(lambda: self.publisher.commands_subscribed, 10)  # else early commands are lost

    def stop(self) -> None:
        self.dispatcher.stop()
        self.publisher.stop(timeout=5)
        self.conn.close()


@pytest.fixture
def make_device(tmp_path: Path, mosquitto: Any, server: RegistryServer, built: Built,
                opkey: OperatorKey) -> Iterator[Callable[..., Device]]:
    devices: list[Device] = []

    def make(protocol: str = "5") -> Device:
        d = Device(tmp_path / f"dev{len(devices)}", mosquitto.port, server.url, built.pub, opkey, protocol)
        devices.append(d)
        return d

    yield make
    for d in devices:
        d.stop()


class Operator:
    """A fleet operator's MQTT client: sends commands, reads events."""

    def __init__(self, port: int, key: OperatorKey) -> None:
        self.events = ResultCollector(port, f"{PREFIX}/{DEVICE}/events")
        self.key = key

    def send(self, name: str, payload: bytes | dict[str, Any], *, retain: bool = False) -> None:
        """Publish ``payload``: bytes as they are; a dict ``{"correlation_id", ...args}`` signed
        with the operator key (agent/core/envelope.py)."""
        if isinstance(payload, dict):
            args = {k: v for k, v in payload.items() if k != "correlation_id"}
            data = self.key.sign(name, payload["correlation_id"], device=DEVICE, args=args)
        else:
            data = payload
        info = self.events.client.publish(f"{PREFIX}/{DEVICE}/cmd/{name}", data, qos=1, retain=retain)
        info.wait_for_publish(5)

    def answers(self, cid: str | None) -> list[dict[str, Any]]:
        docs = [parse_event(p) for _t, p in list(self.events.messages)]
        return [d for d in docs if d["fields"].get("correlation_id") == cid]

    def wait_answer(self, cid: str, final: tuple[str, ...] = ("command.completed", "command.failed"),
                    timeout: float = 30) -> list[dict[str, Any]]:
        assert wait_until(lambda: any(d["kind"] in final for d in self.answers(cid)), timeout), self.answers(cid)
        return self.answers(cid)

    def close(self) -> None:
        self.events.close()


@pytest.fixture
def operator(mosquitto: Any, opkey: OperatorKey) -> Iterator[Operator]:
    op = Operator(mosquitto.port, opkey)
    yield op
    op.close()


def test_update_and_rollback_over_mosquitto(make_device: Callable[..., Device], operator: Operator,
                                            server: RegistryServer, built: Built, mosquitto: Any) -> None:
    device = make_device()
    device.start()
    # the retained birth carries the probe summary
    status = ResultCollector(mosquitto.port, f"{PREFIX}/{DEVICE}/status")
    try:
        (_t, birth), *_ = status.wait_for(1, 10)
    finally:
        status.close()
    summary = parse_status(birth)["device"]
    from deploy.variants import host

    me = host()  # the machine's own /proc/cpuinfo: the summary must say the same, whatever the CPU
    assert summary["arch"] == me.arch and summary["isa_family"] == me.isa_family
    assert summary["int8_path"] == {"x86-vnni": "vnni", "x86-avx2": "avx2"}.get(me.isa_family, summary["int8_path"])
    assert set(summary["features"]) <= set(me.cpu_flags)
    assert "onnxruntime" in summary["backends"] and summary["gpus"] == []

    operator.send("update", {"correlation_id": "u-1"})
    answers = operator.wait_answer("u-1")
    assert [d["kind"] for d in answers] == ["command.accepted", "model.updated", "command.completed"]
    done = answers[-1]["fields"]
    assert done["command"] == "update" and done["result"][0]["version"] == "1.0.0"
    assert done["result"][0]["variant"] in proven_here(server.root)  # an INT8 variant proven for this CPU
    assert device.store.current_version(MODEL) == "1.0.0"

    publish_version(built, server.root, "1.1.0")
    operator.send("update", {"correlation_id": "u-2", "model": MODEL})
    assert [d["kind"] for d in operator.wait_answer("u-2")][-1] == "command.completed"
    assert (device.store.current_version(MODEL), device.store.previous_version(MODEL)) == ("1.1.0", "1.0.0")

    operator.send("rollback", {"correlation_id": "r-1", "model": MODEL})
    answers = operator.wait_answer("r-1")
    assert [d["kind"] for d in answers] == ["command.accepted", "model.rolled_back", "command.completed"]
    assert answers[-1]["fields"]["result"]["version"] == "1.0.0"
    assert device.store.current_version(MODEL) == "1.0.0"

    operator.send("selftest", {"correlation_id": "s-1"})
    answers = operator.wait_answer("s-1")
    assert answers[-1]["kind"] == "command.completed"
    assert answers[-1]["fields"]["result"]["version"] == "1.0.0"

    # a QoS 1 re-delivery (or a reused id) must not roll forward again
    operator.send("rollback", {"correlation_id": "r-1", "model": MODEL})
    # a failing command is answered as failed
    operator.send("rollback", {"correlation_id": "r-2", "model": "ct-not-installed"})
    answers = operator.wait_answer("r-2")
    assert answers[-1]["kind"] == "command.failed"
    assert "ct-not-installed: no previous version to roll back to" in answers[-1]["fields"]["error"]
    rejected = [d for d in operator.answers("r-1") if d["kind"] == "command.rejected"]
    assert len(rejected) == 1 and "duplicate correlation_id" in rejected[0]["fields"]["reason"]
    assert device.store.current_version(MODEL) == "1.0.0"


def test_unknown_and_malformed_commands_over_mosquitto(make_device: Callable[..., Device],
                                                       operator: Operator) -> None:
    device = make_device()
    device.start()
    operator.send("reboot", {"correlation_id": "x-1"})
    operator.send("update", b"{not json")
    operator.send("update", json.dumps({"model": MODEL}).encode())  # unsigned
    operator.send("update", {"correlation_id": "x-2", "verbose": True})
    assert wait_until(lambda: len([m for m in operator.events.messages]) >= 4, 10)
    docs = [parse_event(p) for _t, p in operator.events.messages]
    assert all(d["kind"] == "command.rejected" and d["severity"] == "warning" for d in docs)
    got = [(d["fields"]["command"], d["fields"]["correlation_id"], d["fields"]["code"],
            d["fields"]["reason"].split(":")[0].split(" (")[0]) for d in docs]
    assert got == [("reboot", "x-1", "unknown_command", "unknown command 'reboot'"),
                   ("update", None, "malformed", "payload is not UTF-8 JSON"),
                   ("update", None, "unsigned", "unsigned command refused"),
                   ("update", "x-2", "malformed", "unknown arg(s) verbose")]
    assert device.store.current_version(MODEL) is None  # nothing ran
    assert device.activator.calls == []


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_retained_command_is_not_replayed(protocol: str, make_device: Callable[..., Device], operator: Operator,
                                            mosquitto: Any) -> None:
    # left retained on the broker before the device connects (e.g. by a careless script)
    operator.send("update", {"correlation_id": "stale"}, retain=True)
    device = make_device(protocol)
    device.start()
    operator.send("reboot", {"correlation_id": "marker"})  # answered after any replay would be
    operator.wait_answer("marker", ("command.rejected",), 10)
    assert operator.answers("stale") == []
    assert device.store.current_version(MODEL) is None
    cleaner = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    cleaner.connect("127.0.0.1", mosquitto.port)
    cleaner.loop_start()
    cleaner.publish(f"{PREFIX}/{DEVICE}/cmd/update", b"", qos=1, retain=True).wait_for_publish(5)
    cleaner.loop_stop()
    cleaner.disconnect()


def test_the_service_wires_updates_and_commands(mosquitto: Any, operator: Operator, server: RegistryServer,
                                                built: Built, tmp_path: Path) -> None:
    """agent.service.Service as deployed: cmd/update and cmd/rollback drive the real VariantManager."""
    from agent.core.config import Config
    from agent.service import Service

    cfg = Config.model_validate({
        "device_id": DEVICE,
        "dicom": {"port": 0, "bind": "127.0.0.1"},
        "mqtt": {"port": mosquitto.port, "topic_prefix": PREFIX},
        "storage": {"dir": str(tmp_path / "svc"), "min_free_mb": 0},
        "pipeline": {"threads": 1},
        "models": {"dir": str(Path(__file__).resolve().parents[1] / "models")},
        "registry": {"url": server.url, "public_key": str(built.pub), "poll_interval_s": 0, "min_free_mb": 0},
        "control": {"operator_keys": [str(operator.key.public)]},
    })
    service = Service(cfg)
    service.start()
    try:
        assert service.publisher is not None
        assert wait_until(lambda: service.publisher is not None and service.publisher.commands_subscribed, 10)
        store = ModelStore(cfg.storage.dir)
        operator.send("update", {"correlation_id": "svc-1", "model": MODEL})
        answers = operator.wait_answer("svc-1", timeout=60)
        assert answers[-1]["kind"] == "command.completed", answers[-1]
        assert "model.updated" in [d["kind"] for d in answers]
        variant = answers[-1]["fields"]["result"][0]["variant"]
        assert variant in proven_here(server.root) | {"fp32"}  # chosen by measurement on this machine
        assert store.current_version(MODEL) == "1.0.0"

        publish_version(built, server.root, "1.1.0")
        operator.send("update", {"correlation_id": "svc-2", "model": MODEL})
        assert operator.wait_answer("svc-2", timeout=60)[-1]["kind"] == "command.completed"
        assert (store.current_version(MODEL), store.previous_version(MODEL)) == ("1.1.0", "1.0.0")

        operator.send("rollback", {"correlation_id": "svc-3", "model": MODEL})
        answers = operator.wait_answer("svc-3", timeout=60)
        assert answers[-1]["kind"] == "command.completed", answers[-1]
        assert store.current_version(MODEL) == "1.0.0"

        operator.send("selftest", {"correlation_id": "svc-4", "model": MODEL})
        answers = operator.wait_answer("svc-4", timeout=60)
        assert answers[-1]["kind"] == "command.completed", answers[-1]  # every variant passed
        reports = answers[-1]["fields"]["result"]
        assert {r["version"] for r in reports} == {"1.0.0"} and any(r["variant"] == "fp32" for r in reports)
    finally:
        service.stop()


def test_the_acceptance_is_always_answered_before_the_outcome(opkey: OperatorKey) -> None:
    """A command that fails at once on its own lane (rollback of a model with no previous version)
    must still be answered accepted first: the operator's tooling reads the answers in order."""
    events: list[Event] = []
    lock = threading.Lock()

    def record(e: Event) -> None:
        if e.kind == "command.accepted":
            time.sleep(0.005)  # a slow event queue widens the window the lane thread could use
        with lock:
            events.append(e)

    def refuse(cmd: Command) -> None:
        raise EdgeAgentError("no previous version to roll back to")

    d = CommandDispatcher(TOPICS, {"rollback": refuse}, record, auth=opkey.auth(DEVICE), max_pending=64,
                          max_pending_per_command=64, urgent=("rollback",))
    d.start()
    topic = f"{TOPICS.base}/cmd/rollback"
    try:
        for i in range(40):
            d(topic, opkey.sign("rollback", f"r{i}", device=DEVICE, model="m"))
        assert wait_until(lambda: sum(e.kind == "command.failed" for e in events) == 40, 10)
    finally:
        d.stop()
    for i in range(40):
        assert [e.kind for e in events if e.fields["correlation_id"] == f"r{i}"] == [
            "command.accepted", "command.failed"], i
