"""The latest telemetry snapshot as Prometheus text on ``[metrics] listen`` (e.g. 127.0.0.1:9108).

``PrometheusExporter(listen)``: ``update(snapshot)`` after every ``build_snapshot``, ``start()``
(returns the bound port; port 0 picks a free one), ``stop()``. It serves ``GET /metrics`` (any path,
as prometheus_client's WSGI app does) from its own registry, never prometheus_client's global one
(which would add the Python process collectors and leak between tests). The text is made from the
one snapshot object the MQTT telemetry message was made from, so /metrics and MQTT always agree;
before the first ``update`` the page is empty.

``metric_families(snapshot)`` is the mapping itself. Names: ``edge_agent_`` prefix, base units
(seconds, bytes, ratios 0..1 where the message says percent), counters end in ``_total`` (since the
agent started), ``edge_agent_stage_latency_seconds`` is a summary (quantiles over the last window,
``_count``/``_sum`` since start), ``edge_agent_model_info{model,version,variant,backend} 1``.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.core.telemetry import TelemetrySnapshot

P = "edge_agent_"


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(P + name, doc, value=value)


def _labelled(name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(P + name, doc, labels=labels)
    for values, v in rows:
        g.add_metric(values, v)
    return g


def _host(s: TelemetrySnapshot) -> Iterator[Metric]:
    h = s.host
    yield _gauge("host_cpu_utilization_ratio", "CPU busy share of all cores since the previous sample.",
                 h.cpu_percent / 100.0)
    yield _labelled("host_load_average", "Load average.", ["period"],
                    zip([["1m"], ["5m"], ["15m"]], h.load_avg, strict=True))
    yield _gauge("host_memory_total_bytes", "Physical memory.", h.memory_total_bytes)
    yield _gauge("host_memory_available_bytes", "Memory available without swapping.", h.memory_available_bytes)
    yield _labelled("host_temperature_celsius", "Temperature by sensor (chip/label).", ["sensor"],
                    (([k], v) for k, v in h.temperatures_c.items()))
    yield _gauge("state_dir_free_bytes", "Free bytes of the state directory's filesystem.", h.state_dir_free_bytes)
    yield _gauge("spool_bytes", "Bytes of received instances in the spool.", h.spool_bytes)
    yield _gauge("quarantine_bytes", "Bytes of quarantined instances.", h.quarantine_bytes)
    rss = [(["agent"], float(h.agent_rss_bytes))]
    if h.worker_rss_bytes is not None:
        rss.append((["worker"], float(h.worker_rss_bytes)))
    yield _labelled("process_resident_memory_bytes", "Resident memory of the agent and the inference worker.",
                    ["process"], rss)


def _gpus(s: TelemetrySnapshot) -> Iterator[Metric]:
    labels = ["gpu", "name"]
    fields = (("utilization_percent", "gpu_utilization_ratio", "GPU busy share.", 0.01),
              ("memory_used_bytes", "gpu_memory_used_bytes", "GPU memory in use.", 1.0),
              ("memory_total_bytes", "gpu_memory_total_bytes", "GPU memory.", 1.0),
              ("temperature_c", "gpu_temperature_celsius", "GPU temperature.", 1.0),
              ("power_w", "gpu_power_watts", "GPU power draw.", 1.0))
    for attr, name, doc, scale in fields:
        rows = [([str(g.index), g.name], float(getattr(g, attr)) * scale)
                for g in s.host.gpus if getattr(g, attr) is not None]
        if rows:
            yield _labelled(name, doc, labels, rows)


def _pipeline(s: TelemetrySnapshot) -> Iterator[Metric]:
    p = s.pipeline
    summary = Metric(P + "stage_latency_seconds", "Pipeline stage latency: quantiles over the last "
                     "telemetry window, count and sum since the agent started.", "summary")
    window = GaugeMetricFamily(P + "stage_window_observations", "Observations per stage in the last window.",
                               labels=["stage"])
    for stage, lat in p.latency.items():
        for q, v in (("0.5", lat.p50_s), ("0.95", lat.p95_s), ("0.99", lat.p99_s)):
            if v is not None:
                summary.add_sample(summary.name, {"stage": stage, "quantile": q}, v)
        summary.add_sample(summary.name + "_count", {"stage": stage}, lat.count_total)
        summary.add_sample(summary.name + "_sum", {"stage": stage}, lat.sum_total_s)
        window.add_metric([stage], lat.count)
    yield summary
    yield window
    yield _gauge("series_per_hour", "Series completed per hour over the last window.", p.series_per_hour)
    yield _gauge("jobs_per_hour", "Jobs inferred per hour over the last window.", p.jobs_per_hour)
    yield _gauge("jobs_pending", "Inference jobs waiting or running.", p.queue_depth)
    yield _gauge("outbox_pending_messages", "Messages waiting for their PUBACK.", p.outbox_pending)
    yield _gauge("outbox_oldest_age_seconds", "Age of the oldest message waiting.", p.outbox_oldest_age_s)
    dropped = CounterMetricFamily(P + "outbox_dropped_messages", "Telemetry/drift messages dropped beyond "
                                  "their outbox cap.", labels=["kind"])
    for kind, n in p.outbox_dropped.items():
        dropped.add_metric([kind], n)
    yield dropped
    for name, c in p.counters.items():
        yield CounterMetricFamily(P + name, f"{name.replace('_', ' ').capitalize()} since the agent started.",
                                  value=c.total)


def metric_families(s: TelemetrySnapshot) -> Iterator[Metric]:
    """Every metric of snapshot ``s`` (see the module docstring for the naming); a family with no
    sample (no temperature sensors, no models) is left out."""
    return (m for m in _families(s) if m.samples)


def _families(s: TelemetrySnapshot) -> Iterator[Metric]:
    yield _gauge("telemetry_seq", "Seq of the telemetry message these figures were published in.", s.seq)
    yield _gauge("telemetry_timestamp_seconds", "When the snapshot was taken (Unix time).", s.created_at)
    yield _gauge("telemetry_window_seconds", "Time the last window covered.", s.window_s)
    yield _gauge("uptime_seconds", "Seconds since the agent started.", s.uptime_s)
    yield from _host(s)
    yield from _gpus(s)
    yield from _pipeline(s)
    if s.mqtt is not None:
        yield _gauge("mqtt_connected", "1 while connected to the broker.", 1.0 if s.mqtt.connected else 0.0)
        yield _gauge("mqtt_status_seq", "Seq of the current connection's status messages.", s.mqtt.status_seq)
        yield _gauge("mqtt_inflight_messages", "Messages sent and not yet acknowledged.", s.mqtt.inflight)
    yield _labelled("export_queued_objects", "Export objects waiting for a destination (retries included).",
                    ["destination"], (([e.destination], e.queued) for e in s.export))
    yield _labelled("export_oldest_age_seconds", "Age of the oldest export object waiting.", ["destination"],
                    (([e.destination], e.oldest_age_s) for e in s.export))
    yield _labelled("export_dead_lettered_objects", "Export objects given up after their tries.", ["destination"],
                    (([e.destination], e.dead_lettered) for e in s.export))
    yield _labelled("model_info", "The variant each model runs (always 1).", ["model", "version", "variant", "backend"],
                    (([m.name, m.version, m.variant, m.backend], 1.0) for m in s.models))
    yield _labelled("model_shadow_agreement_ratio", "Share of shadow runs that agreed with FP32.",
                    ["model", "version", "variant"],
                    (([m.name, m.version, m.variant], m.shadow_agreement) for m in s.models
                     if m.shadow_agreement is not None))


class SnapshotCollector(Collector):
    """A prometheus_client collector over the latest snapshot (nothing before the first)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: TelemetrySnapshot | None = None

    def update(self, snapshot: TelemetrySnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot

    @property
    def snapshot(self) -> TelemetrySnapshot | None:
        with self._lock:
            return self._snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot  # one object for the whole scrape, even if update() runs meanwhile
        return [] if snap is None else list(metric_families(snap))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        return None  # scrapes every few seconds would flood stderr


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up stop()


class _Server6(_Server):
    address_family = socket.AF_INET6


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9108"`` / ``"[::1]:9108"`` -> (host, port); ValueError when malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen {listen!r}: expected host:port, e.g. 127.0.0.1:9108")
    return host.strip("[]"), int(port)


class PrometheusExporter:
    """Serves the latest snapshot over HTTP (see the module docstring)."""

    def __init__(self, listen: str) -> None:
        self.host, self._want_port = parse_listen(listen)
        self.collector = SnapshotCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The bound port while serving, else None."""
        return None if self._server is None else int(self._server.server_address[1])

    def update(self, snapshot: TelemetrySnapshot) -> None:
        self.collector.update(snapshot)

    def render(self) -> bytes:
        """The page a scrape gets now (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry)

    def start(self) -> int:
        """Bind and serve on a daemon thread; returns the bound port. OSError when the address is
        taken or not ours."""
        if self._server is not None:
            raise RuntimeError("exporter already started")
        cls = _Server6 if ":" in self.host else _Server
        server = make_server(self.host, self._want_port, make_wsgi_app(self.registry), cls, handler_class=_QuietHandler)
        assert isinstance(server, _Server)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        return int(server.server_address[1])

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout)
