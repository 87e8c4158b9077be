"""Device telemetry: the collector (Metrics), the host sampler on this machine, GPU sources (fake
NVML, a fake Jetson sysfs), the snapshot and its MQTT message, and /metrics scraped over HTTP
agreeing with the message built from the same snapshot."""

from __future__ import annotations

import dataclasses
import importlib.machinery
import math
import os
import subprocess
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.core.errors import PublishError
from agent.core.events import JobFailed
from agent.core.metrics import COUNTERS, STAGES
from agent.core.status import ModelSummary, PublisherHealth
from agent.core.telemetry import TelemetrySnapshot
from agent.core.types import Event, ModelRef
from agent.mqtt.payloads import parse_telemetry, telemetry_payload
from agent.telemetry import (
    HostSampler,
    PrometheusExporter,
    TelemetryCollector,
    build_snapshot,
    count_event,
    model_sample,
)
from agent.telemetry.collector import quantile
from agent.telemetry.host import JetsonGpu, NvmlGpus, dir_bytes


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------------------------ collector


def test_collector_windows_quantiles_and_totals() -> None:
    clock = FakeClock()
    c = TelemetryCollector(clock=clock)
    for i in range(1, 101):
        c.observe("inference", i / 100)
    c.count("series_completed", 3)
    c.count("jobs_inferred")
    clock.t += 60
    w = c.take_window()
    assert w.seconds == 60 and w.observed["inference"] == 100 and w.observed["receive"] == 0
    values = sorted(w.samples["inference"])
    assert quantile(values, 0.5) == pytest.approx(0.505) and quantile(values, 0.99) == pytest.approx(0.9901)
    assert w.counts["series_completed"] == 3 and w.counts_total["jobs_inferred"] == 1
    assert set(w.counts) == set(COUNTERS) and set(w.samples) == set(STAGES)

    c.observe("inference", 2.0)
    clock.t += 30
    w2 = c.take_window()
    assert w2.seconds == 30 and w2.samples["inference"] == (2.0,) and w2.observed["inference"] == 1
    assert w2.observed_total["inference"] == 101 and w2.seconds_total["inference"] == pytest.approx(50.5 + 2.0)
    assert w2.counts["series_completed"] == 0 and w2.counts_total["series_completed"] == 3


def test_collector_is_bounded_and_never_raises() -> None:
    c = TelemetryCollector(max_samples=10)
    for i in range(1000):
        c.observe("receive", float(i))
    for bad in (float("nan"), float("inf"), "x"):
        c.observe("receive", bad)  # type: ignore[arg-type]
    c.observe("nonsense", 1.0)  # type: ignore[arg-type]
    c.count("nonsense")  # type: ignore[arg-type]
    c.count("fallbacks", -5)
    c.observe("load", -1.0)  # a clock step backwards counts as 0, not as a negative latency
    w = c.take_window()
    assert w.samples["receive"] == tuple(float(i) for i in range(990, 1000))  # the newest ones
    assert w.observed["receive"] == 1000  # the count stays exact
    assert w.samples["load"] == (0.0,) and w.counts["fallbacks"] == 0 and "nonsense" not in w.observed


def test_collector_is_thread_safe() -> None:
    c = TelemetryCollector()

    def hammer() -> None:
        for _ in range(5000):
            c.observe("inference", 0.001)
            c.count("instances_received")

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    windows = []
    while any(t.is_alive() for t in threads):
        windows.append(c.take_window())
    for t in threads:
        t.join()
    windows.append(c.take_window())
    assert sum(w.observed["inference"] for w in windows) == 20000
    assert sum(w.counts["instances_received"] for w in windows) == 20000
    assert windows[-1].counts_total["instances_received"] == 20000


def test_count_event_maps_kinds_to_counters() -> None:
    c = TelemetryCollector()
    count_event(c, JobFailed(series_uid="1.2", model="m", kind="error", attempts=3, error="boom"))
    count_event(c, Event("engine.fallback", "warning", "re-run on FP32"))
    count_event(c, Event("engine.demoted", "warning", "demoted"))
    count_event(c, Event("engine.shadow_disagreement", "error", "demoted"))
    count_event(c, Event("association.rejected", "warning", "counted by the listener itself"))
    w = c.take_window()
    assert (w.counts["jobs_failed"], w.counts["fallbacks"], w.counts["demotions"]) == (1, 1, 2)
    assert w.counts["associations_rejected"] == 0


# ------------------------------------------------------------------------------------ host


@pytest.fixture
def worker() -> Any:
    proc = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(32 << 20); time.sleep(60)"])
    time.sleep(0.5)
    yield proc
    proc.kill()
    proc.wait()


def _state_dir(tmp_path: Path) -> Path:
    state = tmp_path / "var"
    (state / "spool" / "1.2" / "1.2.3").mkdir(parents=True)
    (state / "spool" / "1.2" / "1.2.3" / "a.dcm").write_bytes(b"x" * 1000)
    (state / "spool" / "1.2" / "1.2.3" / "b.dcm").write_bytes(b"y" * 234)
    (state / "quarantine").mkdir()
    (state / "quarantine" / "q.dcm").write_bytes(b"z" * 77)
    os.symlink("/etc", state / "spool" / "link")  # never followed
    return state


def test_host_sample_is_sane_on_this_machine(tmp_path: Path, worker: Any) -> None:
    sampler = HostSampler(_state_dir(tmp_path))
    time.sleep(0.2)
    h = sampler.sample(worker.pid)
    assert 0.0 <= h.cpu_percent <= 100.0
    assert len(h.load_avg) == 3 and all(x >= 0 for x in h.load_avg)
    assert h.memory_total_bytes > h.memory_available_bytes > 0
    assert all(isinstance(v, float) and -40 < v < 150 for v in h.temperatures_c.values())
    assert h.state_dir_free_bytes > 0
    assert (h.spool_bytes, h.quarantine_bytes) == (1234, 77)
    assert 10 << 20 < h.agent_rss_bytes < 8 << 30
    assert h.worker_rss_bytes is not None and h.worker_rss_bytes > 32 << 20
    assert sampler.sample(2**22 + 12345).worker_rss_bytes is None  # no such process
    assert sampler.sample(None).worker_rss_bytes is None
    assert sampler.gpu_source in ("nvml", "jetson", "none")
    sampler.close()


def test_missing_dirs_count_zero_and_free_space_of_the_parent(tmp_path: Path) -> None:
    assert dir_bytes(tmp_path / "nope") == 0
    h = HostSampler(tmp_path / "not" / "yet", gpus=False).sample()
    assert (h.spool_bytes, h.quarantine_bytes, h.gpus) == (0, 0, ())
    assert h.state_dir_free_bytes > 0


def test_jetson_sysfs(tmp_path: Path) -> None:
    (tmp_path / "sys/devices/gpu.0").mkdir(parents=True)
    (tmp_path / "sys/devices/gpu.0/load").write_text("523\n")
    for i, (kind, temp) in enumerate((("CPU-therm", "51000"), ("GPU-therm", "45500"))):
        zone = tmp_path / f"sys/class/thermal/thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(temp + "\n")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin\x00")
    gpu = JetsonGpu.open(tmp_path)
    assert gpu is not None
    (g,) = gpu.sample()
    assert (g.name, g.source, g.utilization_percent, g.temperature_c) == ("NVIDIA Jetson AGX Orin GPU", "jetson", 52.3, 45.5)
    assert g.memory_total_bytes is None and g.power_w is None
    assert g.to_json() == {"index": 0, "name": "NVIDIA Jetson AGX Orin GPU", "source": "jetson",
                           "utilization_percent": 52.3, "temperature_c": 45.5}  # absent figures left out
    assert JetsonGpu.open(tmp_path / "elsewhere") is None


def test_nvml_fields_left_out_when_unsupported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class NVMLError(Exception):
        pass

    def unsupported(*_: Any) -> Any:
        raise NVMLError("Not Supported")

    fake = types.ModuleType("pynvml")
    fake.__spec__ = importlib.machinery.ModuleSpec("pynvml", None)
    calls: list[str] = []
    fake.__dict__.update(
        NVMLError=NVMLError, NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetName=lambda h: "NVIDIA H200",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=37, memory=5),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 << 30, total=141 << 30),
        nvmlDeviceGetTemperature=lambda h, sensor: 41, nvmlDeviceGetPowerUsage=unsupported,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = HostSampler(tmp_path)
    assert sampler.gpu_source == "nvml"
    (g,) = sampler.sample().gpus
    assert g.to_json() == {"index": 0, "name": "NVIDIA H200", "source": "nvml", "utilization_percent": 37.0,
                           "memory_used_bytes": 3 << 30, "memory_total_bytes": 141 << 30, "temperature_c": 41.0}
    sampler.close()
    assert calls == ["init", "shutdown"]

    fake.__dict__["nvmlInit"] = unsupported  # no driver: NVML is not a source, nothing raises
    assert NvmlGpus.open() is None


# ------------------------------------------------------------------------------------ snapshot


def _snapshot(tmp_path: Path, *, health: PublisherHealth | None = None, seq: int = 7) -> TelemetrySnapshot:
    c = TelemetryCollector()
    for i in range(50):
        c.observe("inference", 0.2 + i / 1000)
        c.observe("publish", 0.01)
    c.count("associations_accepted", 4)
    c.count("series_completed", 2)
    c.count("jobs_inferred", 2)
    c.count("fallbacks")
    models = [model_sample(ModelSummary("ct-abdomen-seg", "1.1.0", "int8", "onnxruntime", "int8", "", "registry"), 0.975),
              model_sample(ModelRef("mr-brain-cls", "1.0.0"))]
    time.sleep(0.05)
    return build_snapshot(c, HostSampler(_state_dir(tmp_path)), seq=seq, interval_s=60, queue_depth=3,
                          health=health if health is not None else PublisherHealth(True, 5, 1, None, 12, 3.25),
                          models=models, outbox_dropped={"telemetry": 380, "drift": 0})


def test_snapshot_and_its_message(tmp_path: Path) -> None:
    snap = _snapshot(tmp_path)
    doc = parse_telemetry(telemetry_payload(snap, "edge-01"))
    assert doc["schema"] == "edge-agent/telemetry/1" and doc["device_id"] == "edge-01" and doc["seq"] == 7
    assert doc == {"schema": "edge-agent/telemetry/1", "device_id": "edge-01", **snap.to_json()}
    assert doc["created_at"].endswith("Z") and doc["interval_s"] == 60 and 0 < doc["window_s"] < 5
    p = doc["pipeline"]
    assert set(p["latency"]) == set(STAGES) and set(p["counters"]) == set(COUNTERS)
    inf = p["latency"]["inference"]
    assert inf["count"] == inf["count_total"] == 50 and 0.2 <= inf["p50_s"] <= inf["p95_s"] <= inf["p99_s"] <= 0.25
    assert p["latency"]["receive"] == {"count": 0, "count_total": 0, "sum_total_s": 0.0}  # no quantiles of nothing
    assert p["counters"]["associations_accepted"] == {"total": 4, "window": 4}
    assert p["series_per_hour"] > 0 and p["queue_depth"] == 3
    assert (p["outbox_pending"], p["outbox_oldest_age_s"], p["outbox_dropped"]["telemetry"]) == (12, 3.2, 380)
    assert doc["mqtt"] == {"connected": True, "status_seq": 5, "inflight": 1, "last_error": None}
    assert doc["models"][0] == {"name": "ct-abdomen-seg", "version": "1.1.0", "variant": "int8",
                                "backend": "onnxruntime", "shadow_agreement": 0.975}
    assert doc["models"][1]["shadow_agreement"] is None
    assert doc["host"]["spool_bytes"] == 1234 and "worker_rss_bytes" not in doc["host"]


def test_telemetry_message_refuses_nan_and_no_mqtt_without_publisher(tmp_path: Path) -> None:
    snap = _snapshot(tmp_path)
    bad = dataclasses.replace(snap, host=dataclasses.replace(snap.host, cpu_percent=math.nan))
    with pytest.raises(PublishError):
        telemetry_payload(bad, "d")
    bare = dataclasses.replace(snap, mqtt=None)
    assert "mqtt" not in parse_telemetry(telemetry_payload(bare, "d"))
    with pytest.raises(PublishError):
        parse_telemetry(telemetry_payload(dataclasses.replace(snap, seq=0), "d"))


# ---------------------------------------------------------------------------------- prometheus


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_over_http_equal_the_message_of_the_same_snapshot(tmp_path: Path, worker: Any) -> None:
    snap = _snapshot(tmp_path, health=PublisherHealth(False, 9, 0, "disconnected: timeout", 2, 1.5))
    snap = dataclasses.replace(snap, host=dataclasses.replace(snap.host, worker_rss_bytes=123456789,
                                                               temperatures_c={"k10temp/Tctl": 48.5}))
    doc = parse_telemetry(telemetry_payload(snap, "edge-01"))  # what MQTT carries
    exporter = PrometheusExporter("127.0.0.1:0")
    port = exporter.start()
    try:
        assert port > 0 and exporter.port == port
        assert _scrape(port) == {}  # nothing before the first snapshot
        exporter.update(snap)
        m = _scrape(port)
    finally:
        exporter.stop()

    def v(name: str, **labels: str) -> float:
        return m[("edge_agent_" + name, tuple(sorted(labels.items())))]

    host, pipe = doc["host"], doc["pipeline"]
    assert v("telemetry_seq") == doc["seq"] and v("uptime_seconds") == doc["uptime_s"]
    assert v("telemetry_window_seconds") == doc["window_s"] and v("telemetry_timestamp_seconds") == snap.created_at
    assert v("host_cpu_utilization_ratio") == host["cpu_percent"] / 100
    assert [v("host_load_average", period=p) for p in ("1m", "5m", "15m")] == host["load_avg"]
    assert v("host_memory_total_bytes") == host["memory_total_bytes"]
    assert v("host_memory_available_bytes") == host["memory_available_bytes"]
    assert v("host_temperature_celsius", sensor="k10temp/Tctl") == host["temperatures_c"]["k10temp/Tctl"] == 48.5
    assert v("state_dir_free_bytes") == host["state_dir_free_bytes"]
    assert (v("spool_bytes"), v("quarantine_bytes")) == (host["spool_bytes"], host["quarantine_bytes"])
    assert v("process_resident_memory_bytes", process="agent") == host["agent_rss_bytes"]
    assert v("process_resident_memory_bytes", process="worker") == host["worker_rss_bytes"] == 123456789
    for stage, lat in pipe["latency"].items():
        assert v("stage_latency_seconds_count", stage=stage) == lat["count_total"]
        assert v("stage_latency_seconds_sum", stage=stage) == lat["sum_total_s"]
        assert v("stage_window_observations", stage=stage) == lat["count"]
        for q, key in (("0.5", "p50_s"), ("0.95", "p95_s"), ("0.99", "p99_s")):
            if key in lat:
                assert v("stage_latency_seconds", stage=stage, quantile=q) == lat[key]
            else:
                assert ("edge_agent_stage_latency_seconds", (("quantile", q), ("stage", stage))) not in m
    for name, c in pipe["counters"].items():
        assert v(f"{name}_total") == c["total"]
    assert v("series_per_hour") == pipe["series_per_hour"] and v("jobs_per_hour") == pipe["jobs_per_hour"]
    assert v("jobs_pending") == pipe["queue_depth"] == 3
    assert v("outbox_pending_messages") == pipe["outbox_pending"] == 2
    assert v("outbox_oldest_age_seconds") == pipe["outbox_oldest_age_s"]
    assert v("outbox_dropped_messages_total", kind="telemetry") == pipe["outbox_dropped"]["telemetry"] == 380
    assert v("mqtt_connected") == 0 and v("mqtt_status_seq") == doc["mqtt"]["status_seq"] == 9
    assert v("mqtt_inflight_messages") == doc["mqtt"]["inflight"]
    for model in doc["models"]:
        assert v("model_info", model=model["name"], version=model["version"], variant=model["variant"],
                 backend=model["backend"]) == 1
    assert v("model_shadow_agreement_ratio", model="ct-abdomen-seg", version="1.1.0", variant="int8") == 0.975
    assert not any(k[0] == "edge_agent_model_shadow_agreement_ratio" and ("model", "mr-brain-cls") in k[1] for k in m)
    assert not any(k[0].startswith(("python_", "process_")) for k in m)  # our registry, not the global one

    import socket

    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass  # stopped: nothing listens any more
    exporter.stop()  # idempotent


def test_exporter_rejects_bad_listen_and_a_second_start() -> None:
    with pytest.raises(ValueError):
        PrometheusExporter("localhost")
    e = PrometheusExporter("127.0.0.1:0")
    e.start()
    try:
        with pytest.raises(RuntimeError):
            e.start()
    finally:
        e.stop()
