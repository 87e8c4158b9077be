"""``edge-agent fleet``: the merge of status/telemetry/drift/events per device (malformed messages
counted, never fatal), the group rule, the JSON lines, the rich table; and 200 simulated devices on a
real Mosquitto (retained births, Last Wills published by the broker for dropped sockets, telemetry,
drift with one model-wide and one scanner-wide pattern) watched in-process and by
``python -m agent fleet --json``."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import REPO
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console

from agent.cli import build_parser
from agent.cli.fleet import JsonLines
from agent.cli.fleet_groups import GROUP_SHARE, is_wide
from agent.cli.fleet_mqtt import BrokerSettings, FleetSubscriber
from agent.cli.fleet_state import FleetState, dominant_category, format_age, parse_time
from agent.cli.fleet_view import render, rows_that_fit

PREFIX = "edge"
T0 = 1_800_000_000.0  # a fixed "now" for the pure tests


# ------------------------------------------------------------------------------ message builders


def status(device: str, state: str = "online", *, seq: int = 1, reason: str | None = None,
           model: str = "mr-brain-cls", variant: str = "ort-int8-u8s8",
           started_at: str = "2027-01-15T08:00:00.000Z") -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": "edge-agent/status/1", "state": state, "device_id": device, "version": "0.1.0",
        "started_at": started_at, "seq": seq, "capabilities": {},
        "models": [{"name": model, "version": "1.0.0", "variant": variant, "backend": "onnxruntime",
                    "accuracy": ""}],
    }
    if reason is not None:
        doc["reason"] = reason
    return doc


def telemetry(device: str, *, p95: float = 120.0, queue: int = 0, pending: int = 0, oldest: float = 0.0,
              created_at: str = "2027-01-15T08:05:00.000Z", interval_s: float = 60) -> dict[str, Any]:
    """An ``edge-agent/telemetry/1`` message as agent.mqtt.monitoring builds it (``p95`` in ms)."""
    latency = {"count": 40, "p50_s": p95 / 2000, "p95_s": p95 / 1000, "p99_s": p95 * 1.2 / 1000,
               "count_total": 400, "sum_total_s": 30.0}
    return {"schema": "edge-agent/telemetry/1", "device_id": device, "seq": 3, "created_at": created_at,
            "interval_s": interval_s, "window_s": interval_s, "uptime_s": 3600.0,
            "host": {"cpu_percent": 12.5, "load_avg": [0.5, 0.4, 0.3], "memory_total_bytes": 8 << 30,
                     "memory_available_bytes": 4 << 30, "temperatures_c": {}, "state_dir_free_bytes": 50 << 30,
                     "spool_bytes": 0, "quarantine_bytes": 0, "agent_rss_bytes": 200 << 20},
            "gpus": [],
            "pipeline": {"latency": {"inference": latency}, "series_per_hour": 4.0, "jobs_per_hour": 4.0,
                         "queue_depth": queue, "outbox_pending": pending, "outbox_oldest_age_s": oldest,
                         "outbox_dropped": {}, "counters": {}},
            "models": [{"name": "mr-brain-cls", "version": "1.0.0", "variant": "ort-int8-u8s8",
                        "backend": "onnxruntime", "shadow_agreement": 0.99}]}


def drift(device: str, *, model: str = "mr-brain-cls", state: str = "ok", signal_name: str = "input.intensity",
          phase: str = "monitoring", scanner: str | None = "SIEMENS Skyra",
          created_at: str = "2027-01-15T08:05:00.000Z", seq: int = 1) -> dict[str, Any]:
    """An ``edge-agent/drift/1`` message as agent.mqtt.monitoring builds it."""
    signals: list[dict[str, Any]] = [
        {"name": signal_name, "state": state, "statistic": "psi", "value": 0.4 if state != "ok" else 0.01,
         "warn": 0.1, "alert": 0.25, "detail": {}}]
    if scanner is not None:
        signals.append({"name": "metadata.manufacturer_model", "state": "ok", "statistic": "chi2", "value": 1.0,
                        "warn": 10.0, "alert": 20.0,
                        "detail": {"counts": {scanner: 30, "Other Scanner": 4, "other": 9}}})
    return {"schema": "edge-agent/drift/1", "device_id": device, "model": model, "version": "1.0.0",
            "state": state, "phase": phase, "window": {"size": 50, "series": 50}, "min_series": 20,
            "since": "2027-01-15T07:00:00.000Z", "responsible": [signal_name] if state != "ok" else [],
            "signals": signals, "created_at": created_at, "seq": seq}


def event(device: str, kind: str = "job.failed", severity: str = "error",
          created_at: str = "2027-01-15T08:04:00.000Z") -> dict[str, Any]:
    return {"schema": "edge-agent/event/1", "device_id": device, "kind": kind, "severity": severity,
            "message": "x", "fields": {}, "created_at": created_at}


def feed(state: FleetState, device: str, kind: str, doc: dict[str, Any] | bytes, now: float = T0) -> str | None:
    payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return state.feed(f"{PREFIX}/{device}/{kind}", payload, now)


def table_text(view: Any, now: float, max_rows: int | None = None, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(render(view, now, max_rows))
    return console.file.getvalue()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ the merge


def test_malformed_messages_are_counted_against_their_device_and_never_fatal() -> None:
    st = FleetState(PREFIX)
    feed(st, "a", "status", status("a"))
    bad: list[tuple[str, bytes]] = [
        ("status", b"not json"), ("status", b"\xff\xfe"), ("status", b"[1, 2]"), ("status", b"null"),
        ("status", json.dumps({"schema": "edge-agent/result/1", "state": "online"}).encode()),  # another kind
        ("status", json.dumps({"state": "sleeping"}).encode()),
        ("drift", json.dumps({"state": "alert"}).encode()),  # no model
        ("drift", json.dumps({"model": "m", "state": "purple"}).encode()),
        ("events", json.dumps({"severity": "error"}).encode()),  # no kind
        ("telemetry", b"{"),
    ]
    for kind, payload in bad:
        assert st.feed(f"{PREFIX}/a/{kind}", payload, T0) == "a"
    # mistyped fields inside a readable message: shown as '-', not counted
    feed(st, "a", "telemetry", {"pipeline": {"latency": {"inference": {"p95_s": "fast"}}, "queue_depth": True,
                                             "outbox_pending": [1]}, "models": "x", "interval_s": None})
    feed(st, "a", "drift", {"model": "m", "state": "warn", "signals": [1, {"name": 2}, {"name": "s", "detail": 3}],
                            "responsible": "s"})
    feed(st, "c", "telemetry", b'{"pipeline": {"queue_depth": NaN, "outbox_pending": Infinity}}')
    feed(st, "b", "events", b"")  # a device only known from a broken message still gets a row
    assert st.feed("other/a/status", b"{}", T0) is None and st.feed(f"{PREFIX}/a/results", b"{}", T0) is None
    assert st.feed(f"{PREFIX}/a/b/status", b"{}", T0) is None
    view = st.view(T0 + 1)
    assert view.summary.malformed == len(bad) + 1 and view.summary.ignored == 3
    a = next(r for r in view.rows if r.device_id == "a")
    assert a.state == "online" and a.malformed == len(bad)
    assert a.p95_ms is None and a.queue_depth is None and a.outbox_pending is None
    assert a.drift_state == "warn" and a.drift_signals == ()
    assert any("malformed" in p for p in a.problems)
    b = next(r for r in view.rows if r.device_id == "b")
    assert b.state == "unknown" and b.malformed == 1
    c = next(r for r in view.rows if r.device_id == "c")
    assert c.queue_depth is None and c.outbox_pending is None and c.malformed == 0
    assert "malformed" in table_text(view, T0 + 1)
    json.dumps([r.to_json() for r in view.rows], allow_nan=False)  # every row is strict JSON


def test_the_simulated_messages_are_valid_agent_messages() -> None:
    """What this file feeds the view is what the agent publishes (its own strict parsers)."""
    from agent.mqtt.monitoring import parse_drift, parse_telemetry
    from agent.mqtt.payloads import parse_event, parse_status

    parse_status(json.dumps(status("a")))
    parse_status(json.dumps(status("a", "offline", reason="connection-lost")))
    parse_telemetry(json.dumps(telemetry("a")))
    parse_drift(json.dumps(drift("a", state="alert")))
    parse_event(json.dumps(event("a")))


def test_latency_is_read_in_either_spelling() -> None:
    st = FleetState(PREFIX)
    feed(st, "a", "telemetry", telemetry("a", p95=250))
    feed(st, "b", "telemetry", {"pipeline": {"latency_ms": {"inference": {"p50": 1, "p95": 80.5, "n": 3}}}})
    rows = {r.device_id: r for r in st.view(T0).rows}
    assert rows["a"].p95_ms == pytest.approx(250) and rows["b"].p95_ms == 80.5


def test_unknown_fields_are_ignored_and_missing_ones_shown_as_dashes() -> None:
    st = FleetState(PREFIX)
    doc = status("a")
    doc["brand_new_field"] = {"x": 1}
    doc["models"][0]["future"] = "y"
    feed(st, "a", "status", doc)
    feed(st, "a", "drift", {"model": "mr-brain-cls", "state": "ok"})  # minimal: phase defaults to monitoring
    (row,) = st.view(T0).rows
    assert row.models[0].variant == "ort-int8-u8s8" and row.drift_state == "ok" and row.malformed == 0
    text = table_text(st.view(T0), T0)
    assert "a " in text and " - " in text


def test_status_will_of_an_older_connection_does_not_hide_a_newer_birth() -> None:
    st = FleetState(PREFIX)
    feed(st, "a", "status", status("a", seq=5))
    feed(st, "a", "status", status("a", "offline", seq=4, reason="connection-lost"))
    assert st.devices["a"].state == "online"
    feed(st, "a", "status", status("a", "offline", seq=5, reason="connection-lost"))
    assert st.devices["a"].state == "offline" and st.devices["a"].reason == "connection-lost"
    # the state database was wiped: seq restarts, but a later start is a new process
    feed(st, "a", "status", status("a", seq=0, started_at="2027-02-01T00:00:00.000Z"))
    assert st.devices["a"].state == "online"


def test_an_empty_retained_status_removes_the_device() -> None:
    st = FleetState(PREFIX)
    feed(st, "a", "status", status("a"))
    feed(st, "a", "telemetry", telemetry("a"))
    assert feed(st, "a", "status", b"") == "a"
    assert st.view(T0).rows == () and feed(st, "a", "status", b"") is None


def test_stale_after_missing_telemetry_and_old_replays_do_not_overwrite_newer_figures() -> None:
    st = FleetState(PREFIX)
    feed(st, "a", "status", status("a"))
    feed(st, "a", "telemetry", telemetry("a", p95=100, created_at="2027-01-15T08:05:00.000Z"))
    feed(st, "b", "status", status("b", "offline", reason="connection-lost"))
    feed(st, "c", "status", status("c"))  # never sends telemetry (an agent before telemetry existed)
    assert not any(r.stale for r in st.view(T0 + 170).rows)
    rows = {r.device_id: r for r in st.view(T0 + 181).rows}  # 3 x interval_s 60
    assert rows["a"].stale and rows["a"].level == 2 and "no telemetry for 3m" in rows["a"].problems
    assert not rows["b"].stale  # offline says more than stale
    assert rows["c"].stale and rows["c"].level == 1 and "no telemetry" in rows["c"].problems
    # the outbox replays an older snapshot after an outage: it proves life but shows nothing older
    feed(st, "a", "telemetry", telemetry("a", p95=999, created_at="2027-01-15T08:00:00.000Z"), now=T0 + 200)
    row = next(r for r in st.view(T0 + 201).rows if r.device_id == "a")
    assert not row.stale and row.p95_ms == 100
    assert FleetState(PREFIX, stale_after_s=30).view(T0).rows == ()
    st2 = FleetState(PREFIX, stale_after_s=30)
    feed(st2, "a", "telemetry", telemetry("a"))
    assert st2.view(T0 + 31).rows[0].stale and not st2.view(T0 + 29).rows[0].stale


def test_rows_sort_problems_first_and_say_why() -> None:
    st = FleetState(PREFIX)
    for d in ("ok1", "ok2", "gone", "stopped", "drifting", "failing", "backlog"):
        feed(st, d, "status", status(d))
        feed(st, d, "telemetry", telemetry(d, oldest=900 if d == "backlog" else 0))
    feed(st, "gone", "status", status("gone", "offline", reason="connection-lost"))
    feed(st, "stopped", "status", status("stopped", "offline", reason="shutdown"))
    feed(st, "drifting", "drift", drift("drifting", state="alert"))
    feed(st, "failing", "events", event("failing", created_at="2027-01-15T08:04:00.000Z"), now=T0)
    rows = st.view(T0 + 5).rows
    order = [r.device_id for r in rows]
    assert order[:2] == ["drifting", "gone"] and set(order[2:4]) == {"backlog", "failing"}
    assert order[4] == "stopped" and order[5:] == ["ok1", "ok2"]
    assert rows[0].problems == ("drift alert mr-brain-cls: input.intensity (local)",)
    assert rows[1].problems == ("offline (connection-lost)",)
    failing = next(r for r in rows if r.device_id == "failing")
    assert failing.event_kind == "job.failed" and failing.event_at is not None and failing.event_at <= T0


def test_helpers() -> None:
    assert dominant_category({"A": 3, "B": 5, "other": 50}) == "B"
    assert dominant_category({"other": 5}) == "other"
    assert dominant_category({"B": 2, "A": 2}) == "A" and dominant_category({"A": "x"}) is None
    assert dominant_category(None) is None
    assert parse_time("2027-01-15T08:00:00.000Z") == parse_time("2027-01-15T09:00:00+01:00")
    assert parse_time("yesterday") is None and parse_time(3) is None
    assert [format_age(s) for s in (5, 65, 7300, 200000, -3)] == ["5s", "1m", "2h", "2d", "0s"]


# ------------------------------------------------------------------------------ the group rule


def _group(st: FleetState, n: int, drifting: int, *, model: str = "m", variant: str = "v",
           scanner_of: Any = lambda i: "S", first: int = 0, signal_name: str = "input.intensity",
           collecting: int = 0) -> None:
    for i in range(first, first + n):
        d = f"d{i:03d}"
        feed(st, d, "status", status(d, model=model, variant=variant))
        phase = "collecting" if i >= first + n - collecting else "monitoring"
        feed(st, d, "drift", drift(d, model=model, state="alert" if i < first + drifting else "ok",
                                   signal_name=signal_name, phase=phase, scanner=scanner_of(i)))


def test_group_rule_thresholds() -> None:
    assert GROUP_SHARE == 0.30
    assert is_wide(3, 10) and not is_wide(2, 10) and not is_wide(1, 1) and is_wide(2, 2)
    assert is_wide(6, 20) and not is_wide(7, 40) and is_wide(12, 40)
    st = FleetState(PREFIX)
    _group(st, 12, 3, collecting=2)  # 3 of the 10 monitoring devices: 30 %
    (v,) = [g for g in st.view(T0).groups if g.kind == "model"]
    assert v.wide and v.monitoring == 10 and v.devices == 3 and v.alerts == 3
    assert v.line() == "m v: 3/10 monitoring devices alert on input.intensity -> model-wide?"
    assert all(r.drift_scope == "model-wide" for r in st.view(T0).rows if r.drift_state == "alert")
    st = FleetState(PREFIX)
    _group(st, 11, 2)
    (v,) = [g for g in st.view(T0).groups if g.kind == "model"]
    assert not v.wide and v.line().endswith("-> device-local (d000, d001)")
    assert {r.drift_scope for r in st.view(T0).rows if r.drift_state == "alert"} == {"local"}


def test_a_pattern_on_one_scanner_is_named_a_scanner_problem() -> None:
    """4 of 10 devices of a model alert (model-wide by share), but all 4 are behind scanner A, where
    4 of 5 alert, and the 5 devices on scanner B are fine: the scanner changed, not the model."""
    st = FleetState(PREFIX)
    _group(st, 10, 4, scanner_of=lambda i: "A" if i < 5 else "B")
    groups = st.view(T0).groups
    model = next(g for g in groups if g.kind == "model")
    assert model.wide and model.scanner == "A" and model.scope == "scanner-wide"
    assert model.line().endswith("-> all on scanner A: scanner-wide?")
    scanner = next(g for g in groups if g.kind == "scanner")
    assert scanner.key == "A" and scanner.wide and scanner.monitoring == 5
    assert {r.drift_scope for r in st.view(T0).rows if r.drift_state == "alert"} == {"scanner-wide"}


# ------------------------------------------------------------------------------ outputs


def test_json_lines_write_only_what_changed() -> None:
    out = io.StringIO()
    sink = JsonLines(out)
    st = FleetState(PREFIX)
    feed(st, "a", "status", status("a"))
    feed(st, "b", "status", status("b"))
    sink.show(st.view(T0), T0, True)
    first = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [d["type"] for d in first] == ["device", "device", "groups", "summary"]
    assert all(d["schema"] == "edge-agent/fleet/1" for d in first)
    sink.show(st.view(T0 + 1), T0 + 1, True)
    assert len(out.getvalue().splitlines()) == 4  # nothing changed, nothing written
    feed(st, "a", "status", status("a", "offline", reason="connection-lost"), now=T0 + 2)
    feed(st, "b", "status", b"", now=T0 + 2)
    sink.show(st.view(T0 + 2), T0 + 2, True)
    more = [json.loads(line) for line in out.getvalue().splitlines()[4:]]
    assert [(d["type"], d.get("device_id")) for d in more] == [("device", "a"), ("removed", "b"), ("summary", None)]
    assert more[0]["state"] == "offline" and more[2]["devices"] == 1 and more[2]["offline"] == 1


def test_the_fleet_command_is_registered() -> None:
    args = build_parser().parse_args(["fleet", "--broker", "broker.example:8883", "--tls", "--json",
                                      "--stale-after", "90", "--prefix", "site1/edge"])
    assert args.broker == ("broker.example", 8883) and args.tls and args.json and args.stale_after == 90
    assert args.func.__name__ == "cmd_fleet"


# ------------------------------------------------------------------------------ 200 devices on Mosquitto

N = 200
WILL = range(190, 200)  # connect with a Last Will, then drop the socket
SHUTDOWN = (186, 187)  # clean stop: retained offline / shutdown
MODEL_WIDE = range(120, 127)  # 7/20 of mr-brain-cls ort-int8-u8s8 alert on input.intensity
SCANNER_WIDE = range(110, 114)  # 4/10 devices behind the GE scanner warn on metadata.slice_thickness
LOCAL = (10, 11)  # 2/80 of ct-abdomen-seg ort-int8-u8s8 warn on metadata.kvp
COLLECTING = range(140, 150)


def device_id(i: int) -> str:
    return f"edge-{i:03d}"


def layout(i: int) -> tuple[str, str, str]:
    """(model, variant, scanner) of simulated device ``i``."""
    if i < 80:
        return "ct-abdomen-seg", "ort-int8-u8s8", "SIEMENS SOMATOM Force" if i % 2 else "Canon Aquilion"
    if i < 120:
        return "ct-abdomen-seg", "ort-fp32", "GE Revolution" if i >= 110 else "SIEMENS SOMATOM Force"
    if i < 140:
        return "mr-brain-cls", "ort-int8-u8s8", "SIEMENS Skyra" if i % 2 else "Philips Ingenia"
    return "mr-brain-cls", "ov-int8", "SIEMENS Skyra" if i % 2 else "Philips Ingenia"


def messages_of(i: int) -> list[tuple[str, dict[str, Any]]]:
    d = device_id(i)
    model, variant, scanner = layout(i)
    state, sig = "ok", "input.intensity"
    if i in MODEL_WIDE:
        state = "alert"
    elif i in SCANNER_WIDE:
        state, sig = "warn", "metadata.slice_thickness"
    elif i in LOCAL:
        state, sig = "warn", "metadata.kvp"
    tel = telemetry(d, p95=50 + i, queue=i % 3, pending=i % 5, oldest=900 if i == 7 else 3)
    tel["models"][0].update(name=model, variant=variant)
    out = [("telemetry", tel), ("drift", drift(d, model=model, state=state, signal_name=sig, scanner=scanner,
                                               phase="collecting" if i in COLLECTING else "monitoring"))]
    if i == 5:
        out.append(("events", event(d)))
    return out


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)


def _publish_all(client: mqtt.Client, msgs: list[tuple[str, bytes, bool]]) -> None:
    infos = [client.publish(topic, payload, qos=1, retain=retain) for topic, payload, retain in msgs]
    for info in infos:
        info.wait_for_publish(10)
        assert info.is_published()


def simulate_fleet(port: int) -> None:
    """Births for 200 devices (10 of them then lose their connection: the broker publishes their
    Will), two clean stops, telemetry and drift for all, a vanished device, a few broken messages."""
    def topic(i: int | str, kind: str) -> str:
        return f"{PREFIX}/{i if isinstance(i, str) else device_id(i)}/{kind}"

    def body(doc: dict[str, Any]) -> bytes:
        return json.dumps(doc).encode()

    for i in WILL:  # each its own connection, as a real device
        d = device_id(i)
        model, variant, _ = layout(i)
        c = _client(f"sim-{d}")
        c.will_set(topic(i, "status"), body(status(d, "offline", reason="connection-lost", model=model,
                                                   variant=variant)), qos=1, retain=True)
        c.connect("127.0.0.1", port, keepalive=30)
        infos = [c.publish(topic(i, "status"), body(status(d, model=model, variant=variant)), qos=1, retain=True)]
        infos += [c.publish(topic(i, kind), body(doc), qos=1) for kind, doc in messages_of(i)]
        deadline = time.monotonic() + 10
        while not all(info.is_published() for info in infos) and time.monotonic() < deadline:
            c.loop(0.05)  # driven here, not by a thread: loop_stop() would wait out a whole select()
        assert all(info.is_published() for info in infos)
        sock = c.socket()
        assert isinstance(sock, socket.socket)
        sock.close()  # no DISCONNECT: the broker publishes the Will
    pub = _client("sim-fleet")
    pub.max_inflight_messages_set(100)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    try:
        msgs: list[tuple[str, bytes, bool]] = []
        for i in (i for i in range(N) if i not in WILL):
            model, variant, _ = layout(i)
            d = device_id(i)
            msgs.append((topic(i, "status"), body(status(d, model=model, variant=variant)), True))
            msgs += [(topic(i, kind), body(doc), False) for kind, doc in messages_of(i)]
        for i in SHUTDOWN:
            model, variant, _ = layout(i)
            msgs.append((topic(i, "status"), body(status(device_id(i), "offline", reason="shutdown", model=model,
                                                         variant=variant)), True))
        msgs += [(topic("edge-050", "telemetry"), b"not json", False),
                 (topic("edge-051", "drift"), b'{"model": 1}', False),
                 (topic("edge-052", "status"), b'{"state": "sleeping"}', False),  # not retained: the birth stays
                 (topic("edge-gone", "status"), body(status("edge-gone")), True),
                 (topic("edge-gone", "telemetry"), body(telemetry("edge-gone")), False),
                 (topic("edge-gone", "status"), b"", True)]  # decommissioned: retained status cleared
        _publish_all(pub, msgs)
    finally:
        pub.disconnect()
        pub.loop_stop()


def fleet_complete(rows: dict[str, dict[str, Any]]) -> bool:
    """The JSON view of the simulated fleet is complete: every device, Wills, last drift and telemetry."""
    if len(rows) != N or "edge-gone" in rows:
        return False
    return (all(rows[device_id(i)]["state"] == "offline" for i in (*WILL, *SHUTDOWN))
            and all(r["drift"]["state"] is not None and r["inference_p95_ms"] is not None for r in rows.values()))


def check_fleet(rows: dict[str, dict[str, Any]], groups: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    assert set(rows) == {device_id(i) for i in range(N)}
    for i in WILL:
        assert rows[device_id(i)]["state"] == "offline" and rows[device_id(i)]["reason"] == "connection-lost"
        assert rows[device_id(i)]["level"] == 3
    for i in SHUTDOWN:
        assert rows[device_id(i)]["reason"] == "shutdown"
    assert summary["devices"] == N and summary["offline"] == len(WILL) + len(SHUTDOWN)
    assert summary["online"] == N - len(WILL) - len(SHUTDOWN) and summary["malformed"] == 3
    assert summary["drift_alert"] == len(MODEL_WIDE) and summary["drift_warn"] == len(SCANNER_WIDE) + len(LOCAL)
    for i in MODEL_WIDE:
        assert rows[device_id(i)]["drift"] == {"state": "alert", "model": "mr-brain-cls", "signals": ["input.intensity"],
                                               "scope": "model-wide", "scanner": layout(i)[2]}
    for i in SCANNER_WIDE:
        assert rows[device_id(i)]["drift"]["scope"] == "scanner-wide"
    for i in LOCAL:
        assert rows[device_id(i)]["drift"]["scope"] == "local"
    assert all(rows[device_id(i)]["drift"]["state"] == "collecting" for i in COLLECTING)
    assert rows["edge-005"]["last_event"]["kind"] == "job.failed"
    assert "outbox backlog 15m old" in rows["edge-007"]["problems"]
    assert rows["edge-052"]["state"] == "online" and rows["edge-052"]["malformed"] == 1
    verdicts = {(g["kind"], g["group"], g["signal"]): g for g in groups}
    mw = verdicts[("model", "mr-brain-cls ort-int8-u8s8", "input.intensity")]
    assert (mw["scope"], mw["affected"], mw["monitoring"]) == ("model-wide", 7, 20)
    ge = verdicts[("scanner", "GE Revolution", "metadata.slice_thickness")]
    assert (ge["scope"], ge["affected"], ge["monitoring"]) == ("scanner-wide", 4, 10)
    assert verdicts[("model", "ct-abdomen-seg ort-fp32", "metadata.slice_thickness")]["scope"] == "local"
    kvp = verdicts[("model", "ct-abdomen-seg ort-int8-u8s8", "metadata.kvp")]
    assert (kvp["scope"], kvp["affected"], kvp["monitoring"]) == ("local", 2, 80)
    assert [g["scope"] for g in groups[:2]] == ["model-wide", "scanner-wide"]  # group-wide first


class JsonReader:
    """``python -m agent fleet --json`` as a subprocess; its lines merged into the last state."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "fleet", "--broker", f"127.0.0.1:{port}", "--json", "--duration", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.rows: dict[str, dict[str, Any]] = {}
        self.groups: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.lines = 0
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            doc = json.loads(line)
            with self.lock:
                self.lines += 1
                if doc["type"] == "device":
                    self.rows[doc["device_id"]] = doc
                elif doc["type"] == "removed":
                    self.rows.pop(doc["device_id"], None)
                elif doc["type"] == "groups":
                    self.groups = doc["groups"]
                elif doc["type"] == "summary":
                    self.summary = doc
                    self.ready.set()  # the first summary is written once subscribed

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)  # how a person stops it: exits 0
        _, err = self.proc.communicate(timeout=15)
        self.thread.join(5)
        return self.proc.returncode, err


@pytest.mark.timeout(180)
def test_200_devices_on_a_real_broker(mosquitto: Any) -> None:
    reader = JsonReader(mosquitto.port)
    sub = FleetSubscriber(BrokerSettings(port=mosquitto.port), PREFIX)
    try:
        sub.start()
        assert reader.ready.wait(30), reader.proc.stderr.read() if reader.proc.poll() is not None else "no output"
        state = FleetState(PREFIX)
        started = time.monotonic()
        simulate_fleet(mosquitto.port)
        published = time.monotonic() - started
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for topic, payload in sub.drain(0.2):
                state.feed(topic, payload, time.time())
            view = state.view(time.time())
            if fleet_complete({r.device_id: r.to_json() for r in view.rows}) and view.summary.malformed == 3:
                break
        merged_in_process = time.monotonic() - started
        while time.monotonic() < deadline:  # the subprocess writes at most once a second
            with reader.lock:
                if fleet_complete(reader.rows) and reader.summary.get("devices") == N \
                        and reader.summary.get("malformed") == 3:
                    break
            time.sleep(0.2)
        merged_json = time.monotonic() - started
    finally:
        sub.close()
        rc, err = reader.stop()
    print(f"\n200 devices: published in {published:.2f}s, merged in-process after {merged_in_process:.2f}s, "
          f"by `fleet --json` after {merged_json:.2f}s ({reader.lines} JSON lines)")
    assert rc == 0, err[-2000:]
    view = state.view(time.time())
    check_fleet({r.device_id: r.to_json() for r in view.rows}, [g.to_json() for g in view.groups],
                view.summary.to_json())
    check_fleet(reader.rows, reader.groups, reader.summary)
    # the table: every row at a fixed width, and a screenful with the rest counted
    now = time.time()
    full = table_text(view, now, width=160)
    assert all(device_id(i) in full for i in range(N)) and full.startswith("200 devices: 188 online, 12 offline")
    assert "mr-brain-cls ort-int8-u8s8: 7/20 monitoring devices alert on input.intensity -> model-wide?" in full
    assert max(len(line) for line in full.splitlines()) <= 160
    screen = table_text(view, now, max_rows=rows_that_fit(40, view), width=120)
    assert len(screen.splitlines()) <= 40 and "more device(s) not shown" in screen
    assert screen.index("edge-120") < screen.index("more device(s)")  # problems first: alerts are on screen


def test_an_unreachable_broker_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import free_port

    from agent.cli import main

    assert main(["fleet", "--broker", f"127.0.0.1:{free_port()}", "--json", "--duration", "1"]) == 2
    assert "cannot reach the MQTT broker" in capsys.readouterr().err
