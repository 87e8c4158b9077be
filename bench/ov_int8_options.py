"""OpenVINO INT8 compile options against ONNX Runtime FP32 as run by default, per MR slice.

Side by side in one process, interleaved rounds (best median kept): ONNX Runtime FP32 with its
defaults (2 threads, spinning on: the speed targets' baseline), ONNX Runtime INT8 with 7-bit
weights, and OpenVINO INT8 compiled with the agent's options (LATENCY hint, 2 threads, f32
precision hint) and with the alternatives tried for the x86-avx2 target (CPU pinning, a THROUGHPUT
hint with one stream, the 7-bit weight file). Needs a build folder of mr-brain-cls
(``edge-deploy build models/mr-brain-cls ... --build DIR``)::

    .venv/bin/python bench/ov_int8_options.py --build /tmp/mrb
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import machine_line


def _ort(path: Path, x: np.ndarray, spinning: bool) -> Callable[[], Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda: sess.run(None, {name: x})


def _ov(path: Path, x: np.ndarray, **extra: Any) -> Callable[[], Any]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape(list(x.shape))
    config = {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", **extra}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    return lambda: request.infer({0: x})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, required=True, help="mr-brain-cls build folder")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    b = args.build
    x = np.load(b / "calibration.npy")[:1].astype(np.float32)
    cases = {
        "ort-fp32-default (baseline)": _ort(b / "model.fp32.onnx", x, spinning=True),
        "ort-int8-u8s8-rr (spinning on)": _ort(b / "model.int8-u8s8-rr.qdq.onnx", x, spinning=True),
        "ov-int8 (the agent's options)": _ov(b / "model.int8-u8s8.qdq.onnx", x),
        "ov-int8 + ENABLE_CPU_PINNING": _ov(b / "model.int8-u8s8.qdq.onnx", x, ENABLE_CPU_PINNING=True),
        "ov-int8 on the 7-bit weight file": _ov(b / "model.int8-u8s8-rr.qdq.onnx", x),
        "ov-int8 THROUGHPUT, 1 stream": _ov(b / "model.int8-u8s8.qdq.onnx", x, PERFORMANCE_HINT="THROUGHPUT",
                                            NUM_STREAMS=1),
    }
    for run in cases.values():
        for _ in range(20):
            run()
    medians: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            medians[name].append(float(np.median(times)) * 1000)
    print(f"{machine_line()}; one 224x224 slice, batch 1, best median of {args.rounds} rounds x {args.runs}")
    base = min(medians["ort-fp32-default (baseline)"])
    print("| case | ms | x ORT default |\n|---|---|---|")
    for name, values in medians.items():
        print(f"| {name} | {min(values):.2f} | {base / min(values):.2f} |")


if __name__ == "__main__":
    main()
