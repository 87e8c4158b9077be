"""MQTT publisher against a real Mosquitto (and the embedded amqtt broker): order, QoS 1, birth and
Last Will, outage, refused connections, results --follow, telemetry and drift (bounded during an
outage, seq gaps visible) and the publish latency reported to Metrics."""

from __future__ import annotations

import getpass
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import REPO, free_port, wait_port
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.cli.follow import follow_results
from agent.core.config import MqttConfig, TlsConfig
from agent.core.db import connect
from agent.core.drift import DriftReport, DriftSignal
from agent.core.errors import PublishError
from agent.core.telemetry import TelemetrySnapshot
from agent.core.types import (
    ClassificationOutput,
    Event,
    LabelStats,
    ModelRef,
    Prediction,
    Result,
    SegmentationOutput,
)
from agent.mqtt.outbox import Outbox
from agent.mqtt.payloads import (
    parse_drift,
    parse_event,
    parse_result,
    parse_status,
    parse_telemetry,
    result_id,
    status_payload,
)
from agent.mqtt.publisher import MqttPublisher
from agent.telemetry import HostSampler, TelemetryCollector, build_snapshot
from deploy.demo_broker import EmbeddedBroker, broker_reachable

DEVICE = "dev1"
PREFIX = "edge"


# ------------------------------------------------------------------------------------ helpers


def make_result(i: int, revision: int = 1) -> Result:
    series = f"1.2.826.0.1.3680043.8.498.{1000 + i}"
    model = ModelRef("ct-abdomen-seg", "1.0.0", "int8", "onnxruntime", "int8")
    out = SegmentationOutput({"liver": LabelStats(1000 + i, 12.5 + i, (0, 0, 0, 4, 5, 6))})
    pred = Prediction(model, "segmentation", out, {"infer": 10.0})
    return Result(result_id(series, model.name, model.version), revision, DEVICE, "1.2.3", series, pred,
                  "2024-05-01T12:00:00.000Z")


def birth() -> bytes:
    return status_payload(device_id=DEVICE, version="0.1.0", started_at=1714564800.0,
                          capabilities={"backends": ["onnxruntime"]}, models=[ModelRef("ct-abdomen-seg", "1.0.0")])


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


class Subscriber:
    """A plain paho client recording every message on ``topic`` (re-subscribes on reconnect)."""

    def __init__(self, port: int, topic: str = f"{PREFIX}/#", *, protocol: str = "5",
                 client_id: str | None = None, persistent: bool = False,
                 auth: tuple[str, str] | None = None) -> None:
        self.msgs: list[mqtt.MQTTMessage] = []
        self._cv = threading.Condition()
        self._subscribed = threading.Event()
        v5 = protocol == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"sub-{os.urandom(3).hex()}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not persistent,
        )
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        if auth:
            self.client.username_pw_set(*auth)

        def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
            if not rc.is_failure:
                c.subscribe(topic, qos=1)

        def on_subscribe(*a: Any) -> None:
            self._subscribed.set()

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            with self._cv:
                self.msgs.append(msg)
                self._cv.notify_all()

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self._subscribed.wait(5), "subscriber did not get a SUBACK"

    def on(self, suffix: str) -> list[mqtt.MQTTMessage]:
        with self._cv:
            return [m for m in self.msgs if m.topic.endswith(suffix)]

    def wait(self, pred: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def make_sub() -> Iterator[Callable[..., Subscriber]]:
    subs: list[Subscriber] = []

    def make(*args: Any, **kwargs: Any) -> Subscriber:
        s = Subscriber(*args, **kwargs)
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.close()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    conn = connect(tmp_path / "state.db")
    yield Outbox(conn)
    conn.close()


@pytest.fixture
def make_pub(outbox: Outbox) -> Iterator[Callable[..., MqttPublisher]]:
    pubs: list[MqttPublisher] = []

    def make(port: int, protocol: str = "5", **kwargs: Any) -> MqttPublisher:
        on_command = kwargs.pop("on_command", None)
        extra = {"metrics": kwargs.pop("metrics")} if "metrics" in kwargs else {}
        cfg = MqttConfig(host="127.0.0.1", port=port, topic_prefix=PREFIX, protocol=protocol,  # type: ignore[arg-type]
                         max_inflight=kwargs.pop("max_inflight", 4), **kwargs)
        p = MqttPublisher(cfg, DEVICE, outbox, birth=birth, on_command=on_command,
                          reconnect_delay_s=(0.1, 0.5), poll_interval_s=0.2, **extra)
        pubs.append(p)
        return p

    yield make
    for p in pubs:
        p.stop(timeout=5)


def restart_with(broker: Any, conf: str) -> None:
    """Restart the fixture's Mosquitto on the same port with ``conf`` (listener line added).

    ``user`` keeps a broker started as root from dropping to the ``mosquitto`` user, which could
    not read files under pytest's private tmp_path (no effect when not root).
    """
    broker.stop()
    broker.conf.write_text(f"user {getpass.getuser()}\nlistener {broker.port} 127.0.0.1\n{conf}")
    broker.start()


def results_of(sub: Subscriber) -> list[dict[str, Any]]:
    return [parse_result(m.payload) for m in sub.on("/results")]


def first_arrivals(docs: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for d in docs:
        key = f"{d['result_id']}:{d['revision']}"
        if key not in seen:
            seen.append(key)
    return seen


# -------------------------------------------------------------------------------- Mosquitto


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_results_arrive_in_order_with_birth_and_clean_offline(
    protocol: str, mosquitto: Any, outbox: Outbox, make_pub: Callable[..., MqttPublisher],
    make_sub: Callable[..., Subscriber],
) -> None:
    sub = make_sub(mosquitto.port, protocol=protocol)
    commands: list[tuple[str, bytes]] = []
    pub = make_pub(mosquitto.port, protocol, on_command=lambda t, p: commands.append((t, p)))
    # 6 rows before start (more than max_inflight=4, so the window has to slide) ...
    expected = [make_result(i) for i in range(6)]
    for r in expected:
        pub.publish_result(r)
    pub.start()
    assert wait_until(lambda: pub.connected, 10)
    # ... and 4 while connected, plus an event
    more = [make_result(i) for i in range(6, 10)]
    for r in more:
        pub.publish_result(r)
    pub.publish_event(Event("job.failed", "error", "inference timed out", {"series_uid": "1.2.3"}))
    expected += more

    assert sub.wait(lambda: len(sub.on("/results")) >= 10 and sub.on("/events"), 10)
    docs = results_of(sub)
    assert [d["result_id"] for d in docs] == [r.result_id for r in expected]  # order, no gaps, no dups
    assert all(m.qos == 1 for m in sub.on("/results"))  # published with QoS 1 (sub asked for 1)
    assert parse_event(sub.on("/events")[0].payload)["kind"] == "job.failed"
    assert wait_until(lambda: outbox.count() == 0, 5)

    # birth: first message on status, online, seq 1, retained (a late subscriber gets it)
    status = [parse_status(m.payload) for m in sub.on("/status")]
    assert status[0]["state"] == "online" and status[0]["seq"] == 1
    late = make_sub(mosquitto.port, f"{PREFIX}/{DEVICE}/status", protocol=protocol)
    assert late.wait(lambda: bool(late.msgs), 5)
    assert late.msgs[0].retain and parse_status(late.msgs[0].payload)["state"] == "online"

    # commands reach on_command
    sub.client.publish(f"{PREFIX}/{DEVICE}/cmd/ping", b"{}", qos=1)
    assert wait_until(lambda: commands == [(f"{PREFIX}/{DEVICE}/cmd/ping", b"{}")], 5)

    # clean stop: offline published (retained) before the disconnect
    pub.stop(timeout=5)
    assert not pub.connected
    assert sub.wait(lambda: parse_status(sub.on("/status")[-1].payload)["state"] == "offline", 5)
    off = parse_status(sub.on("/status")[-1].payload)
    assert off["reason"] == "shutdown" and off["seq"] == 1
    after = make_sub(mosquitto.port, f"{PREFIX}/{DEVICE}/status", protocol=protocol)
    assert after.wait(lambda: bool(after.msgs), 5)
    assert after.msgs[0].retain and parse_status(after.msgs[0].payload)["state"] == "offline"


def test_duplicate_revision_is_enqueued_once(
    mosquitto: Any, outbox: Outbox, make_pub: Callable[..., MqttPublisher], make_sub: Callable[..., Subscriber],
) -> None:
    sub = make_sub(mosquitto.port)
    pub = make_pub(mosquitto.port)
    r = make_result(1)
    assert pub.publish_result(r) == pub.publish_result(r)  # crash-and-retry re-enqueue: one row
    pub.publish_result(make_result(1, revision=2))  # a new revision is a new message
    assert outbox.count() == 2
    pub.start()
    assert sub.wait(lambda: len(sub.on("/results")) >= 2, 10)
    time.sleep(0.3)
    assert [d["revision"] for d in results_of(sub)] == [1, 2]


LWT_SCRIPT = textwrap.dedent("""
    import sys, time
    from agent.core.config import MqttConfig, TlsConfig
    from agent.core.db import connect
    from agent.mqtt import MqttPublisher, Outbox, status_payload
    port, db, protocol = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = MqttConfig(host="127.0.0.1", port=port, topic_prefix="edge", protocol=protocol)
    pub = MqttPublisher(cfg, "dev1", Outbox(connect(db)),
                        birth=lambda: status_payload(device_id="dev1", version="t", started_at=time.time()))
    pub.start()
    deadline = time.time() + 10
    while not pub.connected and time.time() < deadline:
        time.sleep(0.02)
    print("connected" if pub.connected else "failed", flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_last_will_marks_device_offline_when_the_process_dies(
    protocol: str, mosquitto: Any, tmp_path: Path, make_sub: Callable[..., Subscriber],
) -> None:
    sub = make_sub(mosquitto.port, f"{PREFIX}/{DEVICE}/status", protocol=protocol)
    script = tmp_path / "lwt.py"
    script.write_text(LWT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(mosquitto.port), str(tmp_path / "lwt.db"), protocol],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        assert line == "connected", proc.stderr.read().decode() if proc.stderr else line
        assert sub.wait(lambda: any(parse_status(m.payload)["state"] == "online" for m in sub.msgs), 5)
        proc.kill()  # no DISCONNECT: the broker must publish the Will
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert sub.wait(lambda: parse_status(sub.msgs[-1].payload)["state"] == "offline", 10)
    will = parse_status(sub.msgs[-1].payload)
    assert will["reason"] == "connection-lost" and will["seq"] == 1 and will["device_id"] == DEVICE
    late = make_sub(mosquitto.port, f"{PREFIX}/{DEVICE}/status", protocol=protocol)
    assert late.wait(lambda: bool(late.msgs), 5)
    assert late.msgs[0].retain and parse_status(late.msgs[0].payload)["state"] == "offline"


def test_outage_keeps_results_on_disk_and_delivers_them_in_order(
    mosquitto: Any, tmp_path: Path, outbox: Outbox, make_pub: Callable[..., MqttPublisher],
    make_sub: Callable[..., Subscriber],
) -> None:
    # Broker persistence, so the subscriber's persistent session (and its queued messages)
    # survives the broker restart: what we test is the publisher, not the subscriber's timing.
    (tmp_path / "persist").mkdir()
    restart_with(mosquitto, f"allow_anonymous true\npersistence true\npersistence_location {tmp_path / 'persist'}/\n")
    sub = make_sub(mosquitto.port, f"{PREFIX}/#", protocol="3.1.1", client_id="fleet-monitor", persistent=True)
    pub = make_pub(mosquitto.port)
    pub.start()
    before = [make_result(i) for i in range(3)]
    for r in before:
        pub.publish_result(r)
    assert sub.wait(lambda: len(sub.on("/results")) >= 3, 10)
    seq_before = pub.status_seq

    mosquitto.stop()
    assert wait_until(lambda: not pub.connected, 5)
    during = [make_result(i) for i in range(3, 8)]
    for r in during:
        pub.publish_result(r)
    time.sleep(2.0)  # paho keeps trying; nothing may be lost or marked sent meanwhile
    assert not pub.connected
    assert outbox.count() == 5
    assert pub.last_error is not None
    health = pub.health()
    assert health.connected is False and health.outbox_pending == 5 and health.outbox_oldest_age_s >= 1.5

    mosquitto.start()
    assert wait_until(lambda: pub.connected, 10)
    assert sub.wait(lambda: len({d["result_id"] for d in results_of(sub)}) >= 8, 15)
    assert wait_until(lambda: outbox.count() == 0, 5)
    docs = results_of(sub)
    expected = [f"{r.result_id}:{r.revision}" for r in before + during]
    assert first_arrivals(docs) == expected  # every result, first arrivals in order
    assert len(docs) <= len(expected) + 4  # duplicates bounded by the in-flight window
    births = [parse_status(m.payload) for m in sub.on("/status") if parse_status(m.payload)["state"] == "online"]
    assert births[-1]["seq"] > seq_before


def telemetry_of(sub: Subscriber) -> list[dict[str, Any]]:
    return [parse_telemetry(m.payload) for m in sub.on("/telemetry")]


def first_seqs(docs: list[dict[str, Any]]) -> list[int]:
    seen: list[int] = []
    for d in docs:
        if d["seq"] not in seen:
            seen.append(d["seq"])
    return seen


def a_snapshot(tmp_path: Path, collector: TelemetryCollector) -> TelemetrySnapshot:
    return build_snapshot(collector, HostSampler(tmp_path / "var", gpus=False), seq=1, interval_s=60,
                          queue_depth=0, health=None)


def test_telemetry_and_drift_arrive_and_publish_latency_is_measured(
    mosquitto: Any, tmp_path: Path, outbox: Outbox, make_pub: Callable[..., MqttPublisher],
    make_sub: Callable[..., Subscriber],
) -> None:
    sub = make_sub(mosquitto.port)
    collector = TelemetryCollector()
    pub = make_pub(mosquitto.port, metrics=collector)
    snap = replace(a_snapshot(tmp_path, collector), seq=outbox.next_seq("telemetry"))
    pub.publish_telemetry(snap)
    report = DriftReport("mr-brain-cls", "1.0.0", "warn", "monitoring", 50, 50, 20,
                         (DriftSignal("metadata.kvp", "warn", "ks", 0.2, 0.15, 0.3),), since=1714564800.0)
    pub.publish_drift(report, outbox.next_seq("drift"))
    pub.publish_result(make_result(0))
    time.sleep(0.3)  # rows wait in the outbox a moment: that is publish latency too
    pub.start()
    assert sub.wait(lambda: bool(sub.on("/telemetry") and sub.on("/drift") and sub.on("/results")), 10)
    (tele,) = telemetry_of(sub)
    assert tele == {"schema": "edge-agent/telemetry/1", "device_id": DEVICE, **snap.to_json()} and tele["seq"] == 1
    drift = parse_drift(sub.on("/drift")[0].payload)
    assert (drift["seq"], drift["state"], drift["responsible"]) == (1, "warn", ["metadata.kvp"])
    assert not sub.on("/telemetry")[0].retain and sub.on("/telemetry")[0].qos == 1
    assert wait_until(lambda: outbox.count() == 0, 5)
    win = collector.take_window()
    assert win.counts["messages_published"] == 3 and win.observed["publish"] == 3  # status messages not counted
    assert all(0.3 <= s < 10 for s in win.samples["publish"])


def test_outage_drops_only_the_oldest_telemetry_and_its_seq_shows_the_gap(
    mosquitto: Any, tmp_path: Path, outbox: Outbox, make_pub: Callable[..., MqttPublisher],
    make_sub: Callable[..., Subscriber],
) -> None:
    # broker persistence + a persistent subscriber session, as in the outage test above
    (tmp_path / "persist").mkdir()
    restart_with(mosquitto, f"allow_anonymous true\npersistence true\npersistence_location {tmp_path / 'persist'}/\n")
    sub = make_sub(mosquitto.port, f"{PREFIX}/#", protocol="3.1.1", client_id="fleet-monitor", persistent=True)
    collector = TelemetryCollector()
    pub = make_pub(mosquitto.port, metrics=collector)
    pub.start()
    base = a_snapshot(tmp_path, collector)

    def telemetry() -> None:
        pub.publish_telemetry(replace(base, seq=outbox.next_seq("telemetry")), max_queued=120)

    telemetry()
    telemetry()
    pub.publish_result(make_result(0))
    assert sub.wait(lambda: len(sub.on("/telemetry")) >= 2 and bool(sub.on("/results")), 10)
    assert wait_until(lambda: outbox.count() == 0, 5)

    mosquitto.stop()
    assert wait_until(lambda: not pub.connected, 5)
    results = [make_result(i) for i in range(1, 11)]
    for i in range(500):
        telemetry()
        if i % 50 == 0:
            pub.publish_result(results[i // 50])
            pub.publish_event(Event("job.failed", "error", "inference failed", {"series_uid": f"1.2.{i}"}))
        if i == 0:
            first_queued = time.time()
    assert (outbox.count("result"), outbox.count("event"), outbox.count("telemetry")) == (10, 10, 120)
    assert outbox.dropped()["telemetry"] == 380

    broker_back = time.time()
    mosquitto.start()
    assert wait_until(lambda: pub.connected, 10)
    assert sub.wait(lambda: any(d["seq"] == 502 for d in telemetry_of(sub))
                    and len({d["result_id"] for d in results_of(sub)}) >= 11 and len(sub.on("/events")) >= 10, 20)
    assert wait_until(lambda: outbox.count() == 0, 5)
    seqs = first_seqs(telemetry_of(sub))
    assert seqs == [1, 2, *range(383, 503)]  # the newest 120 survived, in order
    assert seqs[2] - seqs[1] - 1 == 380 == outbox.dropped()["telemetry"]  # the gap a consumer sees
    expected = [f"{r.result_id}:{r.revision}" for r in [make_result(0), *results]]
    assert first_arrivals(results_of(sub)) == expected  # every result, in order
    assert len({json.dumps(parse_event(m.payload)["fields"]) for m in sub.on("/events")}) == 10  # every event
    win = collector.take_window()
    assert win.counts_total["messages_published"] == 2 + 1 + 10 + 10 + 120
    # the backlog's wait is publish latency: the first result queued waited at least this long
    assert max(win.samples["publish"]) >= broker_back - first_queued > 0


MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_refused_connection_is_not_connected_and_deletes_nothing(
    protocol: str, mosquitto: Any, tmp_path: Path, outbox: Outbox, make_pub: Callable[..., MqttPublisher],
    make_sub: Callable[..., Subscriber],
) -> None:
    if not os.path.exists(MOSQUITTO_PASSWD):
        pytest.skip("mosquitto_passwd not installed: cannot build a broker that needs credentials")
    pwfile = tmp_path / "passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(pwfile), "agent", "s3cret"], check=True,
                   capture_output=True)
    pwfile.chmod(0o600)
    restart_with(mosquitto, f"allow_anonymous false\npassword_file {pwfile}\npersistence false\n")
    for i in range(3):
        outbox.put(f"{PREFIX}/{DEVICE}/results", json.dumps({"n": i}).encode())

    anon = make_pub(mosquitto.port, protocol)
    anon.start()
    assert wait_until(lambda: anon.last_error is not None, 10), "no CONNACK refusal observed"
    assert "refused" in (anon.last_error or "")
    time.sleep(0.5)
    assert not anon.connected
    assert outbox.count() == 3
    anon.stop(timeout=2)

    wrong = make_pub(mosquitto.port, protocol, username="agent", password="wrong")
    wrong.start()
    assert wait_until(lambda: wrong.last_error is not None, 10)
    assert not wrong.connected and outbox.count() == 3
    wrong.stop(timeout=2)

    sub = make_sub(mosquitto.port, protocol=protocol, auth=("agent", "s3cret"))
    good = make_pub(mosquitto.port, protocol, username="agent", password="s3cret")
    good.start()
    assert wait_until(lambda: good.connected, 10)
    assert sub.wait(lambda: len(sub.on("/results")) >= 3, 10)
    assert [json.loads(m.payload)["n"] for m in sub.on("/results")] == [0, 1, 2]
    assert wait_until(lambda: outbox.count() == 0, 5)


def test_mqtt5_session_expiry_is_sent(mosquitto: Any, make_pub: Callable[..., MqttPublisher]) -> None:
    pub = make_pub(mosquitto.port, "5", session_expiry_s=3600)
    pub.start()
    assert wait_until(lambda: pub.connected, 10)
    client = pub._client
    assert client is not None
    props = client._connect_properties  # what paho sends in every CONNECT
    assert isinstance(props, Properties) and props.packetType == PacketTypes.CONNECT
    assert props.SessionExpiryInterval == 3600


def test_follow_prints_results(
    mosquitto: Any, make_pub: Callable[..., MqttPublisher],
) -> None:
    pub = make_pub(mosquitto.port)
    out = io.StringIO()
    got: list[int] = []
    ready = threading.Event()
    t = threading.Thread(target=lambda: got.append(
        follow_results("127.0.0.1", mosquitto.port, PREFIX, protocol="5", count=2, timeout=15, out=out,
                       on_ready=ready.set)))
    t.start()
    assert ready.wait(10)  # subscribed (results are not retained)
    seg = make_result(1)
    pub.publish_result(seg)
    cls_model = ModelRef("mr-brain-cls", "2.0.0")
    cls = Result("cls-id-0001", 1, DEVICE, "1.2.3", "1.2.3.4", Prediction(
        cls_model, "classification", ClassificationOutput("glioma", 0.9, {"glioma": 0.9, "no_tumour": 0.1}),
        {"infer": 18.0}), "2024-05-01T12:00:00.000Z")
    pub.publish_result(cls)
    pub.start()
    t.join(20)
    assert not t.is_alive() and got == [2]
    text = out.getvalue()
    assert "ct-abdomen-seg 1.0.0" in text and "liver" in text and "13.5" in text
    assert "glioma" in text and "0.900" in text
    assert follow_results("127.0.0.1", mosquitto.port, PREFIX, protocol="3.1.1", timeout=0.3, out=out) == 0
    with pytest.raises(PublishError):
        follow_results("127.0.0.1", free_port(), PREFIX, protocol="5", timeout=1, out=out)


# ------------------------------------------------------------------------ embedded broker


def test_embedded_broker_round_trip_and_demo_publisher(
    outbox: Outbox, make_pub: Callable[..., MqttPublisher], make_sub: Callable[..., Subscriber],
) -> None:
    port = free_port()
    assert not broker_reachable("127.0.0.1", port, 0.5)
    broker = EmbeddedBroker("127.0.0.1", port)
    broker.start()
    try:
        assert broker_reachable("127.0.0.1", port, 2)
        sub = make_sub(port, "demo/#", protocol="3.1.1")
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-pub", protocol=mqtt.MQTTv311)
        client.connect("127.0.0.1", port)
        client.loop_start()
        info = client.publish("demo/x", b"hello", qos=1)
        info.wait_for_publish(5)
        assert info.is_published()
        assert sub.wait(lambda: bool(sub.msgs), 5)
        assert (sub.msgs[0].topic, sub.msgs[0].payload, sub.msgs[0].qos) == ("demo/x", b"hello", 1)
        client.disconnect()
        client.loop_stop()

        # the demo path: our publisher with MQTT 3.1.1 against amqtt
        rsub = make_sub(port, f"{PREFIX}/#", protocol="3.1.1")
        pub = make_pub(port, "3.1.1")
        for i in range(3):
            pub.publish_result(make_result(i))
        pub.start()
        assert rsub.wait(lambda: len(rsub.on("/results")) >= 3, 10)
        assert [d["series_uid"] for d in results_of(rsub)] == [make_result(i).series_uid for i in range(3)]
        assert wait_until(lambda: outbox.count() == 0, 5)
        pub.stop(timeout=5)
        rsub.close()
        sub.close()
    finally:
        broker.stop()
    assert not broker_reachable("127.0.0.1", port, 0.5)


class CutProxy:
    """TCP proxy in front of the broker that can withhold the broker's answers and cut the line.

    ``hold()`` stops forwarding broker -> client bytes (PUBACKs are withheld, so the client's
    messages are certainly in flight, though delivered); ``cut()`` drops every connection and
    refuses new ones until ``restore()``.
    """

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(0.05)
        self.port = self.lsock.getsockname()[1]
        self._held = threading.Event()
        self._accepting = True
        self._closing = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self.lsock.accept()
            except TimeoutError:
                continue
            if not self._accepting:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._socks += [client, upstream]
                for src, dst, down in ((client, upstream, False), (upstream, client, True)):
                    t = threading.Thread(target=self._pump, args=(src, dst, down), daemon=True)
                    self._threads.append(t)
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while downstream and self._held.is_set():
                    time.sleep(0.01)
                dst.sendall(data)
        except OSError:
            return  # the line was cut under us: the end this pump exists for
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    continue  # already shut down by the other pump

    def hold(self) -> None:
        self._held.set()

    def cut(self) -> None:
        self._accepting = False
        with self._lock:
            socks, self._socks = self._socks, []
            threads, self._threads = self._threads, []
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue  # a pump already shut it down
        self._held.clear()
        for t in threads:
            t.join(5)
        for sock in socks:
            sock.close()

    def restore(self) -> None:
        self._accepting = True

    def close(self) -> None:
        self.cut()
        self._closing = True
        self._acceptor.join(5)
        self.lsock.close()


# the TCP proxy's half-closed client sockets can be collected late on a loaded machine; what this
# test checks is delivery, so a late ResourceWarning from the proxy must not fail it
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_connection_lost_with_messages_in_flight_loses_nothing(
    mosquitto: Any, outbox: Outbox, make_pub: Callable[..., MqttPublisher], make_sub: Callable[..., Subscriber],
) -> None:
    # The line drops while max_inflight messages wait for their PUBACK: the broker (and the
    # subscriber) got them, we do not know it. After the reconnect paho re-sends its copies
    # and the drain re-sends from the oldest row: duplicates, but nothing lost, order kept.
    proxy = CutProxy(mosquitto.port)
    try:
        sub = make_sub(mosquitto.port, f"{PREFIX}/{DEVICE}/results")
        pub = make_pub(proxy.port, max_inflight=20)
        for i in range(300):
            outbox.put(f"{PREFIX}/{DEVICE}/results", json.dumps({"n": i}).encode())
        pub.start()
        assert sub.wait(lambda: len(sub.msgs) >= 30, 10)
        proxy.hold()
        time.sleep(0.5)  # the window fills up with delivered but unacknowledged messages
        pending_at_cut = outbox.count()
        delivered_at_cut = len(sub.msgs)
        proxy.cut()
        assert wait_until(lambda: not pub.connected, 5)
        assert outbox.count() == pending_at_cut  # nothing acknowledged without a PUBACK
        assert 300 - delivered_at_cut < pending_at_cut  # some delivered rows are still in the outbox
        proxy.restore()
        assert wait_until(lambda: pub.connected, 10)
        assert sub.wait(lambda: len({json.loads(m.payload)["n"] for m in sub.msgs}) >= 300, 20)
        assert wait_until(lambda: outbox.count() == 0, 5)
        got = [json.loads(m.payload)["n"] for m in sub.msgs]
        assert first_seen(got) == list(range(300))
        assert 300 < len(got) <= 300 + 2 * 20  # duplicates, only from the in-flight window
    finally:
        proxy.close()


def first_seen(values: list[int]) -> list[int]:
    seen: list[int] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def test_rejected_puback_keeps_the_row_and_others_flow(
    mosquitto: Any, tmp_path: Path, outbox: Outbox, make_pub: Callable[..., MqttPublisher],
    make_sub: Callable[..., Subscriber],
) -> None:
    # MQTT 5 brokers answer a publish the ACL denies with a failure PUBACK (0x87): the row must
    # stay in the outbox (retried later), not be deleted as if delivered.
    acl = tmp_path / "acl"
    acl.write_text(f"topic write {PREFIX}/{DEVICE}/results\ntopic write {PREFIX}/{DEVICE}/status\n"
                   f"topic read {PREFIX}/#\n")
    restart_with(mosquitto, f"allow_anonymous true\nacl_file {acl}\npersistence false\n")
    sub = make_sub(mosquitto.port)
    pub = make_pub(mosquitto.port, "5")
    denied = pub.publish_event(Event("job.failed", "error", "x"))
    for i in range(3):
        pub.publish_result(make_result(i))
    pub.start()
    assert sub.wait(lambda: len(sub.on("/results")) >= 3, 10)
    assert wait_until(lambda: outbox.count() == 1, 5)
    time.sleep(1.5)  # at least one retry of the denied row
    left = outbox.pending(10)
    assert [r.seq for r in left] == [denied] and left[0].attempts >= 2
    assert sub.on("/events") == []


def _write_pki(d: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(cn: str, key: Any, issuer: x509.Name, signer: Any, ca: bool, san: Any = None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san is not None:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("edge-test-ca", ca_key, name("edge-test-ca"), ca_key, True)
    out: dict[str, Path] = {}
    for role, san in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        c = cert(f"edge-{role}", key, ca.subject, ca_key, False, san)
        out[f"{role}_cert"] = d / f"{role}.pem"
        out[f"{role}_key"] = d / f"{role}.key"
        out[f"{role}_cert"].write_bytes(c.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    out["ca"] = d / "ca.pem"
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return out


def test_tls_with_client_certificate(
    mosquitto: Any, tmp_path: Path, outbox: Outbox, make_pub: Callable[..., MqttPublisher],
    make_sub: Callable[..., Subscriber],
) -> None:
    pki = _write_pki(tmp_path)
    tls_port = free_port()
    # plain listener (the subscriber) + a TLS listener that demands a client certificate
    restart_with(mosquitto, f"allow_anonymous true\npersistence false\nlistener {tls_port} 127.0.0.1\n"
                            f"cafile {pki['ca']}\ncertfile {pki['server_cert']}\nkeyfile {pki['server_key']}\n"
                            "require_certificate true\n")
    wait_port(tls_port)
    sub = make_sub(mosquitto.port)
    pub = make_pub(tls_port, "5", tls=TlsConfig(enabled=True, cafile=pki["ca"], certfile=pki["client_cert"],
                                                keyfile=pki["client_key"]))
    pub.publish_result(make_result(1))
    pub.start()
    assert wait_until(lambda: pub.connected, 10)
    assert sub.wait(lambda: len(sub.on("/results")) == 1, 10)

    # without a client certificate the handshake fails: never connected, row kept
    pub.stop(timeout=5)
    outbox.put(f"{PREFIX}/{DEVICE}/results", b"{}")
    nocert = make_pub(tls_port, "5", tls=TlsConfig(enabled=True, cafile=pki["ca"]))
    nocert.start()
    time.sleep(1.5)
    assert not nocert.connected and outbox.count() == 1


def test_a_bug_in_the_drain_is_logged_and_the_thread_goes_on(
    mosquitto: Any, outbox: Outbox, make_pub: Callable[..., MqttPublisher], make_sub: Callable[..., Subscriber],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only one thread sends the outbox: an unexpected exception in it (not a database error) must not
    end it silently; the message queued before the fault is delivered once the fault is gone."""
    sub = make_sub(mosquitto.port)
    pub = make_pub(mosquitto.port)
    real = outbox.pending
    failures = {"left": 3}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("injected bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(outbox, "pending", flaky)
    pub.start()
    assert wait_until(lambda: pub.connected, 10)
    pub.publish_result(make_result(1))
    assert sub.wait(lambda: len(sub.on("/results")) == 1, 20)
    assert failures["left"] == 0 and pub._thread is not None and pub._thread.is_alive()


def test_the_offline_status_at_stop_names_the_models_that_ran(
    mosquitto: Any, outbox: Outbox, make_sub: Callable[..., Subscriber],
) -> None:
    """Models are activated after the connect (READY comes first): the clean-stop status must name
    what ran by then, not what the birth at connect time said."""
    models = [ModelRef("ct-abdomen-seg", "1.0.0")]

    def current() -> bytes:
        return status_payload(device_id=DEVICE, version="0.1.0", started_at=1714564800.0,
                              capabilities={"backends": ["onnxruntime"]}, models=list(models))

    sub = make_sub(mosquitto.port)
    cfg = MqttConfig(host="127.0.0.1", port=mosquitto.port, topic_prefix=PREFIX)
    pub = MqttPublisher(cfg, DEVICE, outbox, birth=current, reconnect_delay_s=(0.1, 0.5), poll_interval_s=0.2)
    pub.start()
    try:
        assert wait_until(lambda: pub.connected, 10)
        models.append(ModelRef("mr-brain-cls", "1.1.0", "ov-int8"))  # activated after the birth
    finally:
        pub.stop(timeout=5)
    assert sub.wait(lambda: parse_status(sub.on("/status")[-1].payload)["state"] == "offline", 5)
    offline = parse_status(sub.on("/status")[-1].payload)
    assert [m["name"] for m in offline["models"]] == ["ct-abdomen-seg", "mr-brain-cls"]
