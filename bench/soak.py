"""Soak: MR studies and CT series pushed over DICOM into the real agent process while the MQTT
broker goes away and comes back; every result must arrive, and the agent's and the inference
worker's RSS must stay flat after warm-up (issue 13).

    .venv/bin/python bench/soak.py [--mr 1000] [--ct 50] [--outages 2] [--outage-s 20] \\
        [--out out/soak] [--timeout 10800] [--window 10] [--rate 0]

Everything runs on loopback, on ephemeral ports, from a temp dir: a Mosquitto broker, the agent
(``python -m agent run``), a pynetdicom SCU that pushes synthetic series (``deploy.synth``, one
seed per series, so every series is distinct; nothing is downloaded) and a paho subscriber.

* **Series.** ``--mr`` MR studies (one single-slice series each, what mr-brain-cls reads) and
  ``--ct`` CT series (``--ct-size`` matrix, ``--ct-thickness`` mm), interleaved evenly with a CT
  first, so both models are loaded during warm-up. One association per series. At most
  ``--window`` series are pushed and still without a result (``--rate`` caps series per second;
  0: as fast as the window allows), so the agent runs in steady state instead of buffering the
  whole run on disk.
* **Broker outages.** ``--outages`` times, evenly spread over the pushes, the broker is stopped
  (``--broker-stop kill``: SIGKILL, the default; ``term``: SIGTERM) for ``--outage-s`` seconds and
  started again on the same port. Pushing goes on meanwhile (up to the window); results wait in the
  agent's durable outbox. The broker persists its sessions (``autosave_interval 1``) and the
  subscriber has a persistent session (MQTT 3.1.1, ``clean_session=False``), so what the broker
  acknowledged to the agent reaches the subscriber after the restart. A SIGKILL can still lose a
  message the broker acknowledged less than a second before it died and had not yet passed on:
  that loss is the broker's, and would show here as missing; ``--broker-stop term`` rules it out.
* **Delivery.** Expected: one result per series from the model that reads its modality. Reported:
  distinct (series, model) results, missing ones, unexpected ones, and duplicates (the same
  ``(result_id, revision)`` more than once: QoS 1 is at least once, so a message in flight when the
  broker died may arrive twice; counted, not failed). Delivered once = every series has its result.
* **RSS.** Sampled every ``--sample-s`` with psutil: the agent process and its inference worker
  (its ``multiprocessing`` spawn child; the resource tracker excluded). Warm-up ends when
  ``--warmup-frac`` of the expected results have arrived; the measured span runs from there to the
  last result (at least 30 samples, else not measured). The last window of that span (10 % of its
  samples, at least 10) is compared with the first by floor (10th percentile: the footprint between
  jobs) and ceiling (90th: while a CT job runs; the worker's RSS is bimodal, so a median would
  follow the share of CT time in a window); growth = the larger. The limit is
  ``--max-growth-pct`` (10).
* **Also sampled** from the agent's ``/metrics`` (``telemetry.interval_s`` 2 s): jobs pending,
  outbox depth, broker connection.

Writes ``summary.json``, ``samples.csv``, ``rss.png`` (RSS over time, outages shaded) and
``summary.md`` (the table for docs/benchmarks.md) under ``--out``; prints the table. Exit status 1
when a result is missing or unexpected, a push failed, the agent died, or RSS grew by the limit
or more.

Kept whole: one script that a person runs and reads top to bottom; its parts (peers, sampling,
analysis) share one run's state.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, free_port, machine_line, start_agent, stop, wait_port  # noqa: E402

MODEL_FOR = {"MR": "mr-brain-cls", "CT": "ct-abdomen-seg"}
DEVICE_ID = "soak"
CALLING_AE = "SOAK"


# ------------------------------------------------------------------------------------------------
# peers: broker, subscriber, pusher
# ------------------------------------------------------------------------------------------------


class Broker:
    """Mosquitto on a fixed loopback port, sessions persisted, stoppable and restartable."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        data = tmp / "mosquitto-data"
        data.mkdir()
        data.chmod(0o777)  # mosquitto drops to its own user when started as root
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence true",
                 f"persistence_location {data}/", "autosave_interval 1"]
        if hasattr(os, "getuid") and os.getuid() == 0:
            lines.append("user root")
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = tmp / "mosquitto.log"
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port, timeout=30, proc=self.proc)

    def stop(self, how: str = "term") -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@dataclass(frozen=True)
class Arrival:
    t: float
    series_uid: str
    model: str
    result_id: str
    revision: int
    dup_flag: bool
    timings_ms: dict[str, float]


class Subscriber:
    """paho, MQTT 3.1.1 persistent session: QoS 1 results queued by the broker while we are away
    (and kept over the broker's restart by its persistence) arrive when we are back."""

    def __init__(self, port: int, t0: float) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.t0 = t0
        self.arrivals: list[Arrival] = []
        self.done: set[str] = set()  # series with at least one result
        self.connects = 0
        self.cv = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-{os.getpid()}",
                                  clean_session=False, protocol=mqtt.MQTTv311)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)

        def on_connect(c: Any, *_: Any) -> None:
            self.connects += 1
            c.subscribe(f"edge/{DEVICE_ID}/results", qos=1)

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        if not subscribed.wait(15):
            raise TimeoutError("results subscription not acknowledged")

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        doc = json.loads(msg.payload)
        a = Arrival(time.monotonic() - self.t0, str(doc.get("series_uid")), str(doc.get("model", {}).get("name")),
                    str(doc.get("result_id")), int(doc.get("revision", 1)), bool(msg.dup),
                    {k: float(v) for k, v in (doc.get("timings_ms") or {}).items()})
        with self.cv:
            self.arrivals.append(a)
            self.done.add(a.series_uid)
            self.cv.notify_all()

    def wait_for(self, pred: Callable[[], bool], timeout: float) -> bool:
        with self.cv:
            return self.cv.wait_for(pred, max(0.0, timeout))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def make_series(modality: str, seed: int, ct_size: int, ct_thickness: float) -> list[Any]:
    """The datasets of one synthetic series (in memory; distinct UIDs per seed)."""
    from deploy.synth import make_ct_phantom, make_mr_slice

    if modality == "MR":
        return [make_mr_slice(seed).dataset]
    return list(make_ct_phantom(seed, size=ct_size, slice_thickness=ct_thickness).datasets)


def push(port: int, datasets: list[Any]) -> str | None:
    """One association, every instance C-STOREd; None on success, else why not."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title=CALLING_AE)
    for sop_class in (MRImageStorage, CTImageStorage):
        ae.add_requested_context(sop_class, [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_AGENT")
    if not assoc.is_established:
        return "association not established"
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code != 0x0000:
                return f"C-STORE status {code if code is None else hex(code)}"
        return None
    finally:
        assoc.release()


def interleave(n_mr: int, n_ct: int) -> list[str]:
    """Modalities in push order: CTs spread evenly, the first one first."""
    total = n_mr + n_ct
    ct_at = {math.floor(k * total / n_ct) for k in range(n_ct)} if n_ct else set()
    return ["CT" if i in ct_at else "MR" for i in range(total)]


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t: float
    agent_rss_mb: float
    worker_rss_mb: float | None
    worker_pids: str
    broker_up: bool
    pushed: int
    results: int
    jobs_pending: float | None
    outbox_pending: float | None
    mqtt_connected: float | None


def scrape(port: int) -> dict[str, float]:
    """The unlabelled gauges of the agent's /metrics (empty when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1.0) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


class Sampler(threading.Thread):
    def __init__(self, run: Run, agent_pid: int, metrics_port: int, every: float) -> None:
        super().__init__(daemon=True)
        import psutil

        self.run_ = run
        self.agent = psutil.Process(agent_pid)
        self.metrics_port = metrics_port
        self.every = every
        self.samples: list[Sample] = []
        self.worker_pids_seen: set[int] = set()
        self.halt = threading.Event()

    def workers(self) -> list[Any]:
        import psutil

        found = []
        for child in self.agent.children():
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if "spawn_main" in cmd and "resource_tracker" not in cmd:
                found.append(child)
        return found

    def sample(self) -> None:
        import psutil

        try:
            agent_rss = self.agent.memory_info().rss
        except psutil.Error:
            return  # the agent is gone: the main loop notices
        worker_rss, pids = 0, []
        for w in self.workers():
            try:
                worker_rss += w.memory_info().rss
                pids.append(w.pid)
            except psutil.Error:
                continue
        self.worker_pids_seen.update(pids)
        m = scrape(self.metrics_port)
        r = self.run_
        self.samples.append(Sample(
            round(time.monotonic() - r.t0, 2), agent_rss / 2**20, worker_rss / 2**20 if pids else None,
            " ".join(map(str, pids)), r.broker_up, r.pushed, len(r.sub.arrivals) if r.sub else 0,
            m.get("edge_agent_jobs_pending"), m.get("edge_agent_outbox_pending_messages"),
            m.get("edge_agent_mqtt_connected")))

    def run(self) -> None:
        while not self.halt.wait(self.every):
            self.sample()


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    t0: float = field(default_factory=time.monotonic)
    pushed: int = 0
    broker_up: bool = True
    sub: Subscriber | None = None
    expected: dict[str, str] = field(default_factory=dict)  # series_uid -> model
    modality_of: dict[str, str] = field(default_factory=dict)
    push_failures: list[str] = field(default_factory=list)
    outages: list[tuple[float, float]] = field(default_factory=list)
    pushes_done_t: float | None = None
    agent_died: str | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0


def write_config(tmp: Path, args: argparse.Namespace, broker_port: int, dicom_port: int, metrics_port: int) -> Path:
    cfg = tmp / "agent.toml"
    cfg.write_text(
        f'device_id = "{DEVICE_ID}"\n'
        f'[dicom]\nport = {dicom_port}\nbind = "127.0.0.1"\nallowed_callers = ["{CALLING_AE}"]\n'
        f"[mqtt]\nport = {broker_port}\nreconnect_max_s = {args.reconnect_max_s}\n"
        f'[storage]\ndir = "{tmp / "state"}"\nmin_free_mb = 100\n'
        f"retention_days = {args.retention_s / 86400:.8f}\njanitor_interval_s = 30\n"
        f"[pipeline]\nstable_age_s = {args.stable_age_s}\nthreads = {args.threads}\n"
        f'[models]\ndir = "{REPO / "models"}"\nenabled = {json.dumps(sorted(MODEL_FOR.values()))}\n'
        f"[telemetry]\ninterval_s = 2\n"
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    )
    return cfg


def outage(run: Run, broker: Broker) -> None:
    broker.stop(run.args.broker_stop)
    run.broker_up = False
    start = run.now()
    time.sleep(run.args.outage_s)
    broker.start()
    run.broker_up = True
    run.outages.append((start, run.now()))
    print(f"[{run.now():7.1f}s] broker back after {run.args.outage_s:g} s", file=sys.stderr)


def push_all(run: Run, broker: Broker, agent: subprocess.Popen[bytes], dicom_port: int, deadline: float) -> None:
    a, sub = run.args, run.sub
    assert sub is not None
    order = interleave(a.mr, a.ct)
    outage_at = {round(len(order) * (k + 1) / (a.outages + 1)) for k in range(a.outages)}
    outage_thread: threading.Thread | None = None
    for i, modality in enumerate(order):
        if agent.poll() is not None:
            run.agent_died = f"agent exited with {agent.returncode} after {run.pushed} pushes"
            return
        if i in outage_at:
            if outage_thread is not None:
                outage_thread.join()
            print(f"[{run.now():7.1f}s] broker down ({a.broker_stop}) at push {i}", file=sys.stderr)
            outage_thread = threading.Thread(target=outage, args=(run, broker), daemon=True)
            outage_thread.start()
        if not sub.wait_for(lambda: run.pushed - len(sub.done & run.expected.keys()) < a.window,
                            deadline - time.monotonic()):
            run.push_failures.append(f"timed out waiting for the window before push {i}")
            return
        if a.rate > 0:
            time.sleep(max(0.0, run.t0 + i / a.rate - time.monotonic()))
        datasets = make_series(modality, a.seed + i, a.ct_size, a.ct_thickness)
        uid = str(datasets[0].SeriesInstanceUID)
        why = push(dicom_port, datasets)
        with sub.cv:
            run.pushed += 1
            if why is None:
                run.expected[uid] = MODEL_FOR[modality]
                run.modality_of[uid] = modality
            else:
                run.push_failures.append(f"push {i} ({modality}): {why}")
        if (i + 1) % 50 == 0 or i + 1 == len(order):
            print(f"[{run.now():7.1f}s] pushed {i + 1}/{len(order)}, results {len(sub.arrivals)}", file=sys.stderr)
    if outage_thread is not None:
        outage_thread.join()
    run.pushes_done_t = run.now()


def wait_results(run: Run, agent: subprocess.Popen[bytes], deadline: float) -> None:
    sub = run.sub
    assert sub is not None
    while time.monotonic() < deadline and agent.poll() is None:
        if sub.wait_for(lambda: run.expected.keys() <= sub.done, min(5.0, deadline - time.monotonic())):
            break
    if agent.poll() is not None and run.agent_died is None:
        run.agent_died = f"agent exited with {agent.returncode}"
    time.sleep(run.args.quiet_s)  # a duplicate would arrive now


# ------------------------------------------------------------------------------------------------
# analysis and output
# ------------------------------------------------------------------------------------------------


def delivery(run: Run) -> dict[str, Any]:
    assert run.sub is not None
    arrivals = list(run.sub.arrivals)
    got = {(a.series_uid, a.model) for a in arrivals}
    want = set(run.expected.items())
    keys = [(a.result_id, a.revision) for a in arrivals]
    per_model: dict[str, dict[str, float]] = {}
    for model in sorted(set(MODEL_FOR.values())):
        totals = [sum(a.timings_ms.values()) for a in arrivals if a.model == model]
        per_model[model] = {"results": len(totals),
                            "median_timings_ms_sum": round(statistics.median(totals), 1) if totals else 0.0}
    return {
        "expected": len(want), "delivered_distinct": len(want & got), "missing": len(want - got),
        "unexpected": len(got - want), "messages": len(arrivals),
        "duplicates": len(keys) - len(set(keys)), "dup_flagged": sum(a.dup_flag for a in arrivals),
        "revisions_above_1": sum(a.revision > 1 for a in arrivals),
        "missing_series": sorted(f"{run.modality_of[s]} {s}" for s, _ in want - got)[:20],
        "per_model": per_model,
    }


MIN_SPAN_SAMPLES = 30


def growth(samples: list[Sample], key: str, t_from: float, t_to: float) -> dict[str, Any]:
    """RSS growth over the measured span: its first and last windows (10 % of the span's samples,
    at least 10 each) compared by their floor (10th percentile: the resting footprint between jobs)
    and their ceiling (90th percentile: the footprint while a job runs). The worker's RSS is bimodal
    (a CT job adds ~150 MiB while it runs), so a median would jump with the share of CT time in a
    window; a leak raises the floor or the ceiling. Growth is the larger of the two."""
    values = [(s.t, getattr(s, key)) for s in samples if t_from <= s.t <= t_to and getattr(s, key) is not None]
    if len(values) < MIN_SPAN_SAMPLES:
        return {"samples": len(values), "growth_pct": None,
                "note": f"span after warm-up too short ({len(values)} samples < {MIN_SPAN_SAMPLES})"}
    n = max(10, len(values) // 10)
    head, tail = [v for _, v in values[:n]], [v for _, v in values[-n:]]

    def pct(xs: list[float], decile: int) -> float:
        return statistics.quantiles(xs, n=10, method="inclusive")[decile - 1]

    def rise(a: float, b: float) -> float:
        return round(100 * (b - a) / a, 2)

    floor, ceiling = (pct(head, 1), pct(tail, 1)), (pct(head, 9), pct(tail, 9))
    ts, vs = [t for t, _ in values], [v for _, v in values]
    slope = statistics.linear_regression(ts, vs).slope * 3600 if len(set(ts)) > 1 else 0.0
    return {"samples": len(values), "window_samples": n,
            "floor_mb": [round(floor[0], 1), round(floor[1], 1)], "floor_growth_pct": rise(*floor),
            "ceiling_mb": [round(ceiling[0], 1), round(ceiling[1], 1)], "ceiling_growth_pct": rise(*ceiling),
            "median_mb": [round(statistics.median(head), 1), round(statistics.median(tail), 1)],
            "growth_pct": max(rise(*floor), rise(*ceiling)), "peak_mb": round(max(vs), 1),
            "slope_mb_per_h": round(slope, 2)}


def plot(path: Path, samples: list[Sample], run: Run, t_warm: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [s.t for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, height_ratios=[3, 2])
    top.plot(ts, [s.agent_rss_mb for s in samples], label="agent RSS")
    top.plot(ts, [s.worker_rss_mb if s.worker_rss_mb is not None else math.nan for s in samples],
             label="inference worker RSS")
    bottom.plot(ts, [s.results for s in samples], label="results received")
    bottom.plot(ts, [s.pushed for s in samples], label="series pushed")
    bottom.plot(ts, [s.outbox_pending if s.outbox_pending is not None else math.nan for s in samples],
                label="outbox pending (/metrics)")
    for ax in (top, bottom):
        for k, (a, b) in enumerate(run.outages):
            ax.axvspan(a, b, color="grey", alpha=0.25, label="broker down" if k == 0 else None)
        if t_warm is not None:
            ax.axvline(t_warm, color="k", linestyle=":", label="end of warm-up")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    top.set_ylabel("RSS (MiB)")
    top.set_ylim(bottom=0)
    bottom.set_ylabel("count")
    bottom.set_xlabel("seconds since the agent started listening")
    cli = run.args
    top.set_title(f"soak: {cli.mr} MR studies + {cli.ct} CT series, {cli.outages} broker outages of {cli.outage_s:g} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict[str, Any]) -> str:
    a, d, r = summary["args"], summary["delivery"], summary["rss"]

    def rss_row(name: str, g: dict[str, Any]) -> str:
        if g.get("growth_pct") is None:
            return f"| {name} RSS | n/a ({g.get('note')}) |"
        (f0, f1), (c0, c1) = g["floor_mb"], g["ceiling_mb"]
        return (f"| {name} RSS after warm-up (first -> last window) | floor {f0} -> {f1} MiB "
                f"({g['floor_growth_pct']:+.1f} %), ceiling {c0} -> {c1} MiB ({g['ceiling_growth_pct']:+.1f} %): "
                f"**{g['growth_pct']:+.1f} %** (peak {g['peak_mb']} MiB) |")

    lines = [
        "| soak (bench/soak.py) | |", "|---|---|",
        f"| series pushed over DICOM | {a['mr']} MR studies + {a['ct']} CT series ({a['ct_size']} matrix, "
        f"{a['ct_thickness']:g} mm), interleaved, window {a['window']} |",
        f"| broker outages | {len(summary['outages'])} x {a['outage_s']:g} s (SIG{a['broker_stop'].upper()}, "
        f"restarted on the same port) |",
        f"| results | {d['expected']} expected, **{d['delivered_distinct']} delivered**, {d['missing']} missing, "
        f"{d['unexpected']} unexpected, {d['duplicates']} duplicates (QoS 1 redelivery) |",
        "| wall time per series (gap between results) | "
        + ", ".join(f"{m} {v:.2f} s" for m, v in sorted(summary["wall_per_series_s"].items())) + " |",
        rss_row("agent", r["agent"]), rss_row("worker", r["worker"]),
        f"| worker processes seen | {summary['worker_pids_seen']} |",
        f"| wall time | {summary['wall_s']:.0f} s ({summary['s_per_series']:.2f} s per series incl. outages) |",
        f"| machine | {summary['machine']} |",
        f"| verdict | {'PASS' if summary['ok'] else 'FAIL: ' + '; '.join(summary['failures'])} |",
    ]
    return "\n".join(lines)


def wall_per_series(run: Run) -> dict[str, float]:
    """Seconds of wall time each modality's series cost in this run: the gap between consecutive
    results (the pipeline is kept full by the window), charged to the later result's modality,
    minus any broker outage inside the gap; the first result (agent start, model load) is left out."""
    assert run.sub is not None
    firsts: dict[str, float] = {}
    for a in run.sub.arrivals:
        firsts.setdefault(a.series_uid, a.t)
    ordered = sorted((t, run.modality_of.get(uid, "?")) for uid, t in firsts.items())
    spent: dict[str, list[float]] = {}
    for (t_prev, _), (t, modality) in zip(ordered, ordered[1:], strict=False):
        away = sum(max(0.0, min(t, b) - max(t_prev, a)) for a, b in run.outages)
        spent.setdefault(modality, []).append(t - t_prev - away)
    return {m: round(sum(v) / len(v), 3) for m, v in spent.items()}


def estimate_full(summary: dict[str, Any], n_mr: int = 1000, n_ct: int = 50, outages: int = 2,
                  outage_s: float = 20.0) -> float | None:
    """Seconds a full-size run would take, from this run's wall time per series and modality, plus
    each outage and the reconnect after it."""
    per: dict[str, float] = summary["wall_per_series_s"]
    if "MR" not in per or (n_ct and "CT" not in per):
        return None
    reconnect = float(summary["args"]["reconnect_max_s"])
    return n_mr * per["MR"] + n_ct * per.get("CT", 0.0) + outages * (outage_s + reconnect)


def analyse(run: Run, sampler: Sampler, wall: float) -> dict[str, Any]:
    d = delivery(run)
    assert run.sub is not None
    times = sorted(a.t for a in run.sub.arrivals)
    n_warm = max(1, math.ceil(run.args.warmup_frac * d["expected"]))
    t_warm = times[n_warm - 1] if len(times) >= n_warm else None
    t_end = times[-1] if times else wall
    rss = {name: (growth(sampler.samples, key, t_warm, t_end) if t_warm is not None else
                  {"growth_pct": None, "note": "warm-up never ended"})
           for name, key in (("agent", "agent_rss_mb"), ("worker", "worker_rss_mb"))}
    failures = []
    if run.agent_died:
        failures.append(run.agent_died)
    if run.push_failures:
        failures.append(f"{len(run.push_failures)} push failures (first: {run.push_failures[0]})")
    if d["missing"] or d["unexpected"]:
        failures.append(f"{d['missing']} missing, {d['unexpected']} unexpected results")
    for name, g in rss.items():
        if g.get("growth_pct") is None:
            failures.append(f"{name} RSS growth not measured ({g.get('note')})")
        elif g["growth_pct"] >= run.args.max_growth_pct:
            failures.append(f"{name} RSS grew {g['growth_pct']} % >= {run.args.max_growth_pct} %")
    summary: dict[str, Any] = {
        "bench": "soak", "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run.args).items()},
        "machine": machine_line(), "wall_s": round(wall, 1), "s_per_series": wall / max(1, run.pushed),
        "pushes_done_s": run.pushes_done_t, "warmup_end_s": t_warm, "measured_until_s": t_end,
        "rss_definition": ("over the span from the moment " f"{run.args.warmup_frac:.0%} of the expected results "
                           "had arrived to the last result: the last window (10 % of the span's samples, at "
                           "least 10) against the first, by floor (10th percentile) and ceiling (90th); "
                           "growth = the larger"),
        "outages": [[round(a, 1), round(b, 1)] for a, b in run.outages],
        "delivery": d, "rss": rss, "worker_pids_seen": len(sampler.worker_pids_seen),
        "push_failures": run.push_failures[:20], "agent_died": run.agent_died,
        "ok": not failures, "failures": failures, "wall_per_series_s": wall_per_series(run),
    }
    est = estimate_full(summary)
    summary["estimated_full_run_s"] = round(est) if est is not None else None
    return summary


def write_outputs(out: Path, summary: dict[str, Any], sampler: Sampler, run: Run) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "samples.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(Sample.__dataclass_fields__))
        w.writeheader()
        w.writerows(asdict(s) for s in sampler.samples)
    plot(out / "rss.png", sampler.samples, run, summary["warmup_end_s"])
    md = table(summary)
    (out / "summary.md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {out}/summary.json, samples.csv, rss.png, summary.md; estimated full-size run "
          f"(1000 MR + 50 CT, 2 x 20 s outages): {summary['estimated_full_run_s']} s")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mr", type=int, default=1000, help="MR studies (one single-slice series each)")
    ap.add_argument("--ct", type=int, default=50, help="CT series")
    ap.add_argument("--outages", type=int, default=2, help="broker outages, evenly spread over the pushes")
    ap.add_argument("--outage-s", type=float, default=20.0, help="seconds the broker stays away")
    ap.add_argument("--broker-stop", choices=("kill", "term"), default="kill", help="signal that stops the broker")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "soak")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="whole-run limit, seconds")
    ap.add_argument("--window", type=int, default=10, help="series pushed and still without a result, at most")
    ap.add_argument("--rate", type=float, default=0.0, help="series per second at most (0: window only)")
    ap.add_argument("--ct-size", type=int, default=512, choices=(256, 512))
    ap.add_argument("--ct-thickness", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=13_000_000, help="phantom seed of the first series")
    ap.add_argument("--threads", type=int, default=2, help="the agent's pipeline.threads")
    ap.add_argument("--stable-age-s", type=float, default=1.0, help="the agent's pipeline.stable_age_s")
    ap.add_argument("--reconnect-max-s", type=float, default=5.0, help="the agent's mqtt.reconnect_max_s")
    ap.add_argument("--retention-s", type=float, default=120.0, help="the agent's storage.retention_days, in s")
    ap.add_argument("--sample-s", type=float, default=1.0)
    ap.add_argument("--warmup-frac", type=float, default=0.10)
    ap.add_argument("--max-growth-pct", type=float, default=10.0)
    ap.add_argument("--quiet-s", type=float, default=5.0, help="wait after the last result for duplicates")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (agent log, state)")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edge-soak-"))
    broker = Broker(tmp)
    dicom_port, metrics_port = free_port(), free_port()
    agent: subprocess.Popen[bytes] | None = None
    run = Run(args)
    sampler: Sampler | None = None
    try:
        broker.start()
        agent = start_agent(write_config(tmp, args, broker.port, dicom_port, metrics_port), tmp / "agent.log")
        wait_port(dicom_port, timeout=120, proc=agent)
        run.t0 = time.monotonic()
        deadline = run.t0 + args.timeout
        run.sub = Subscriber(broker.port, run.t0)
        sampler = Sampler(run, agent.pid, metrics_port, args.sample_s)
        sampler.start()
        push_all(run, broker, agent, dicom_port, deadline)
        wait_results(run, agent, deadline)
        wall = run.now()
        sampler.halt.set()
        sampler.join()
        rc = agent.poll()
        if rc is None:
            stop(agent)
            rc = agent.returncode
        agent = None
        run.sub.close()
        summary = analyse(run, sampler, wall)
        summary["agent_exit_code"] = rc
        write_outputs(args.out, summary, sampler, run)
        if not summary["ok"]:
            print(f"agent log tail ({tmp / 'agent.log'}):\n" + (tmp / "agent.log").read_text(errors="replace")[-3000:],
                  file=sys.stderr)
        return 0 if summary["ok"] else 1
    finally:
        if sampler is not None:
            sampler.halt.set()
        if agent is not None:
            stop(agent)
        broker.stop("term")
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
