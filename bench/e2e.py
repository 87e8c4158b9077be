"""End-to-end latency: last instance acknowledged -> result on the broker, minus stable_age_s,
versus bare ONNX Runtime inference of the same volume (the same sliding window over the same
preprocessed array, in this process), in one run, interleaved round by round so both sides see
the same machine load. Target: agent overhead <= 25% of bare inference for the CT model.

    .venv/bin/python bench/e2e.py [--rounds 3] [--size 512] [--slice-thickness 2.0] [--json out.json]

Agent latency is measured with a warm worker (a first series is pushed and discarded), as a
device that has been running serves its second and later studies.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, free_port, machine_line, start_agent, stop, storescu_binary, wait_port  # noqa: E402

STABLE_AGE_S = 1.0


def make_series(out: Path, seed: int, size: int, thickness: float) -> Path:
    from deploy.synth.ct import make_ct_phantom, write_ct_series

    return write_ct_series(make_ct_phantom(seed, size=size, slice_thickness=thickness), out)


class BareInference:
    """ONNX Runtime sliding-window inference of one preprocessed volume in this process: the
    same window, overlap and thread count the agent uses, nothing else (no DICOM, no queue)."""

    def __init__(self, folder: Path, threads: int) -> None:
        import numpy as np
        import onnxruntime as ort

        from agent.core.modelspec import load_spec
        from agent.imaging.preprocess import prepare
        from agent.imaging.volume import load_series

        model_dir = REPO / "models" / "ct-abdomen-seg"
        self.spec = load_spec(model_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(model_dir / self.spec.onnx), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        self.files = sorted(folder.glob("*.dcm"))
        self.array = prepare(load_series(self.files), self.spec.input).array

        def predict(batch: np.ndarray) -> np.ndarray:
            return sess.run(None, {name: batch})[0]

        self.predict = predict
        self.run()  # warm-up

    def run(self) -> float:
        from agent.imaging.sliding_window import sliding_window_inference

        assert self.spec.input.patch_size is not None
        t0 = time.perf_counter()
        sliding_window_inference(self.array, self.spec.input.patch_size, self.spec.input.overlap, self.predict)
        return time.perf_counter() - t0


class Subscriber:
    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.arrivals: list[tuple[float, dict]] = []
        self.cv = threading.Condition()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *a, **k: c.subscribe("edge/+/results", qos=1)
        self.client.on_subscribe = lambda *a, **k: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise TimeoutError("no subscription")

    def _on_message(self, _c, _u, msg) -> None:  # noqa: ANN001
        with self.cv:
            self.arrivals.append((time.perf_counter(), json.loads(msg.payload)))
            self.cv.notify_all()

    def wait(self, n: int, timeout: float) -> float:
        with self.cv:
            if not self.cv.wait_for(lambda: len(self.arrivals) >= n, timeout):
                raise TimeoutError(f"result {n} did not arrive in {timeout}s")
            return self.arrivals[n - 1][0]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slice-thickness", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-e2e-"))
    broker_port, dicom_port = free_port(), free_port()
    (tmp / "mosquitto.conf").write_text(f"listener {broker_port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen([mosquitto, "-c", str(tmp / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    agent = None
    try:
        wait_port(broker_port, proc=broker)
        series = [make_series(tmp / f"ct{i}", 880_000 + i, args.size, args.slice_thickness)
                  for i in range(args.rounds + 1)]
        cfg = tmp / "agent.toml"
        cfg.write_text(
            f'device_id = "bench"\n[dicom]\nport = {dicom_port}\nbind = "127.0.0.1"\n'
            f'[mqtt]\nport = {broker_port}\n[storage]\ndir = "{tmp / "state"}"\nmin_free_mb = 100\n'
            f'[pipeline]\nstable_age_s = {STABLE_AGE_S}\nthreads = {args.threads}\n'
            f'[models]\ndir = "{REPO / "models"}"\nenabled = ["ct-abdomen-seg"]\n'
        )
        agent = start_agent(cfg, tmp / "agent.log")
        wait_port(dicom_port, proc=agent)
        sub = Subscriber(broker_port)
        bare_runner: BareInference | None = None
        bare: list[float] = []
        latencies: list[float] = []
        stage_ms: list[dict] = []
        for i, folder in enumerate(series):
            files = sorted(folder.glob("*.dcm"))
            proc = subprocess.run([storescu_binary(), "-aet", "BENCH", "-aec", "EDGE_AGENT", "127.0.0.1",
                                   str(dicom_port), *map(str, files)], capture_output=True, text=True)
            acked = time.perf_counter()  # storescu exits after the last C-STORE response
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            arrived = sub.wait(i + 1, timeout=600)
            if i == 0:
                bare_runner = BareInference(series[1], args.threads)  # warm, like the agent's worker
                continue  # warm-up: the worker loads the model on its first job
            latencies.append(arrived - acked - STABLE_AGE_S)
            stage_ms.append(sub.arrivals[i][1].get("timings_ms", {}))
            assert bare_runner is not None
            bare.append(bare_runner.run())  # interleaved: both sides see the same machine load
            print(f"round {i}: ack->result minus stable_age {latencies[-1]:.2f}s, bare {bare[-1]:.2f}s",
                  file=sys.stderr)
        sub.close()
        stop(agent)
        agent = None
        n_slices = len(sorted(series[1].glob("*.dcm")))
        agent_s = statistics.median(latencies)
        bare_s = statistics.median(bare)
        overhead = agent_s - bare_s
        result = {
            "bench": "e2e", "model": "ct-abdomen-seg", "slices": n_slices, "matrix": args.size,
            "stable_age_s": STABLE_AGE_S, "rounds": args.rounds,
            "agent_ack_to_result_minus_stable_s": round(agent_s, 3),
            "bare_inference_s": round(bare_s, 3), "overhead_s": round(overhead, 3),
            "overhead_pct_of_bare": round(100 * overhead / bare_s, 1), "target_pct": 25.0,
            "bare_s": [round(x, 3) for x in bare],
            "agent_latencies_s": [round(x, 3) for x in latencies],
            "agent_timings_ms": stage_ms, "machine": machine_line(),
        }
        print(json.dumps(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        if agent is not None:
            stop(agent)
        stop(broker)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
