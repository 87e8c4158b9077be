"""Backend settings the agent does not use, measured side by side against the ones it does.

* ONNX Runtime FP32 with spinning intra-op threads (ORT's default) versus without (the agent's
  choice, so idle inference threads do not compete with the DICOM listener): the MR classifier on
  one 224x224 slice, and the CT model's sliding window over one 88x159x159 volume.
* OpenVINO INT8 on one CT patch: the output copied out of the request (what the agent's backend
  does, because the next ``infer`` overwrites it) versus shared with the caller
  (``share_inputs``/``share_outputs``); and one LATENCY stream with 2 threads versus a
  THROUGHPUT compile with 2 streams (2 patches in flight).
* The agent's OpenVINO backend with its static compilation for the expected input shape (the
  default) versus one dynamic-batch compilation (``static_shape=False``, what it did before):
  OpenVINO INT8 on one MR slice, and on one CT patch and a full CT volume.
* OpenVINO INT8 with its float parts (the CT model's trilinear resizes, output reorder) in bf16
  instead of f32 (``inference_precision="bf16"``, execution precision ``int8+bf16``), on CPUs
  with AVX512_BF16: not a published variant yet; argmax agreement with the f32 one is reported.

Every configuration is timed in interleaved rounds and keeps its best round, so load drift on a
shared machine hits all of them alike. Needs the OpenVINO extra and a CT build folder
(``edge-deploy build models/ct-abdomen-seg ...``, default ``build/deploy/ct-abdomen-seg``) for
the INT8 model (and an MR build for the MR INT8 model)::

    .venv/bin/python bench/backend_options.py [--rounds 8] [--ct-build build/deploy/ct-abdomen-seg] \
        [--mr-build build/deploy/mr-brain-cls]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_line  # noqa: E402

sys.path.insert(0, str(REPO))
from agent.imaging.sliding_window import sliding_window_inference  # noqa: E402


def ort_session(path: Path, spinning: bool) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def best_ms(configs: dict[str, Callable[[], object]], rounds: int, repeat: int) -> dict[str, float]:
    """Best-of-``rounds`` milliseconds per call of each config, rounds interleaved."""
    for f in configs.values():
        f()  # warm-up
    best = {k: float("inf") for k in configs}
    for _ in range(rounds):
        for k, f in configs.items():
            t0 = time.perf_counter()
            for _ in range(repeat):
                f()
            best[k] = min(best[k], (time.perf_counter() - t0) / repeat * 1000)
    return {k: round(v, 3) for k, v in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--ct-build", type=Path, default=REPO / "build" / "deploy" / "ct-abdomen-seg")
    ap.add_argument("--mr-build", type=Path, default=REPO / "build" / "deploy" / "mr-brain-cls")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    out: dict[str, object] = {"machine": machine_line()}

    mr = rng.random((1, 1, 224, 224), dtype=np.float32)
    mr_model = REPO / "models" / "mr-brain-cls" / "model.onnx"
    mr_runs = {f"spinning={s}": ort_session(mr_model, s) for s in (False, True)}
    out["mr_fp32_slice_ms"] = best_ms({k: (lambda f=f: f(mr)) for k, f in mr_runs.items()}, args.rounds, 50)

    ct = rng.random((1, 88, 159, 159), dtype=np.float32)
    ct_model = REPO / "models" / "ct-abdomen-seg" / "model.onnx"
    ct_runs = {f"spinning={s}": ort_session(ct_model, s) for s in (False, True)}
    out["ct_fp32_volume_ms"] = best_ms(
        {k: (lambda f=f: sliding_window_inference(ct, (64, 96, 96), 0.25, f)) for k, f in ct_runs.items()},
        max(2, args.rounds // 2), 1)

    int8 = args.ct_build / "model.int8-u8s8.qdq.onnx"
    if int8.is_file():
        import openvino as ov

        core = ov.Core()
        patch = rng.random((1, 1, 64, 96, 96), dtype=np.float32)
        base = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}
        lat = core.compile_model(core.read_model(str(int8)), "CPU", {**base, "PERFORMANCE_HINT": "LATENCY"})
        tput = core.compile_model(core.read_model(str(int8)), "CPU",
                                  {**base, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2})
        req = lat.create_infer_request()
        pair = [tput.create_infer_request() for _ in range(2)]

        def copied() -> object:
            req.infer({0: patch})
            return np.array(req.get_output_tensor(0).data, copy=True)

        def shared() -> object:
            return req.infer({0: patch}, share_inputs=True, share_outputs=True)

        def two_streams() -> object:  # two patches in flight; reported per patch
            for r in pair:
                r.start_async({0: patch}, share_inputs=True)
            for r in pair:
                r.wait()
            return [np.array(r.get_output_tensor(0).data, copy=True) for r in pair]

        per_call = best_ms({"latency, output copied": copied, "latency, output shared": shared,
                            "throughput 2 streams (2 patches)": two_streams}, args.rounds, 3)
        per_call["throughput 2 streams (2 patches)"] = round(per_call["throughput 2 streams (2 patches)"] / 2, 3)
        out["ct_ov_int8_patch_ms"] = per_call
    else:
        out["ct_ov_int8_patch_ms"] = f"skipped: {int8} not found (run edge-deploy build first)"

    mr_int8 = args.mr_build / "model.int8-u8s8.qdq.onnx"
    if mr_int8.is_file() and int8.is_file():
        from agent.inference import catalog

        def agent_ov(path: Path, shape: tuple[int, ...], static: bool) -> Callable[[np.ndarray], np.ndarray]:
            backend = catalog.create("openvino")
            backend.load(path, precision="int8", threads=2, options={"warmup_shape": shape, "static_shape": static})
            return backend.run

        mr_ov = {f"static_shape={s}": agent_ov(mr_int8, mr.shape, s) for s in (True, False)}
        out["mr_ov_int8_slice_ms"] = best_ms({k: (lambda f=f: f(mr)) for k, f in mr_ov.items()}, args.rounds, 200)
        ct_ov = {f"static_shape={s}": agent_ov(int8, (1, 1, 64, 96, 96), s) for s in (True, False)}
        out["ct_ov_int8_patch_agent_ms"] = best_ms(
            {k: (lambda f=f: f(patch)) for k, f in ct_ov.items()}, args.rounds, 5)
        out["ct_ov_int8_volume_ms"] = best_ms(
            {k: (lambda f=f: sliding_window_inference(ct, (64, 96, 96), 0.25, f)) for k, f in ct_ov.items()},
            args.rounds, 1)
        f32_parts = ct_ov["static_shape=True"]
        bf16_backend = catalog.create("openvino")
        bf16_backend.load(int8, precision="int8", threads=2,
                          options={"warmup_shape": (1, 1, 64, 96, 96), "inference_precision": "bf16"})
        floats = {"float parts f32 (ov-int8)": f32_parts, f"float parts {bf16_backend.describe().precision}": bf16_backend.run}
        out["ct_ov_int8_float_parts_patch_ms"] = best_ms({k: (lambda f=f: f(patch)) for k, f in floats.items()},
                                                         args.rounds, 5)
        out["ct_ov_int8_float_parts_volume_ms"] = best_ms(
            {k: (lambda f=f: sliding_window_inference(ct, (64, 96, 96), 0.25, f)) for k, f in floats.items()},
            args.rounds, 1)
        a = sliding_window_inference(ct, (64, 96, 96), 0.25, f32_parts).argmax(0)
        b = sliding_window_inference(ct, (64, 96, 96), 0.25, bf16_backend.run).argmax(0)
        out["ct_ov_int8_bf16_parts_voxel_agreement"] = round(float((a == b).mean()), 5)
    else:
        out["ov_static_shape"] = f"skipped: {mr_int8} or {int8} not found (run edge-deploy build first)"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
