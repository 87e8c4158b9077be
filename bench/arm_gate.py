"""Accuracy-gate figures and self-test verdict of an INT8 variant on another CPU (issue #10).

``ort-int8-s8s8`` (ONNX Runtime Q/DQ, s8 activations, s8 per-channel weights) is meant for ARM
CPUs with the dot-product extension, and the x86 build machine cannot tell what ARM computes
with it. This script splits the gate in two halves so the second can run on an aarch64 Python
that has only numpy and onnxruntime (an arm64 Debian root under QEMU user emulation, see
``bench/arm_emulation.sh`` and ``docs/arm.md``):

``export`` (x86, project venv)
    generates the gate's held-out synthetic set (``deploy.evaluate.generate_heldout``, the
    gate's validation seed, 480 slices by default here 240) as DICOM, preprocesses every series
    with the agent's own code (``agent.imaging.load_series`` + ``prepare``) and writes one npz:
    ``inputs`` (float32, N,1,224,224), ``labels``, ``label_names``, the x86 reference logits of
    FP32 and of the variant (the agent's ONNX Runtime backend, 2 threads), the variant's exact
    Q/DQ arithmetic (ORT with graph optimizations off: DequantizeLinear -> float Conv ->
    QuantizeLinear, no integer kernel involved) and the self-test vector with its tolerances,
    built by ``deploy.gate_report.write_selftest`` exactly as the gate would on this machine.

``run`` (anywhere: numpy + onnxruntime ONLY, no project import)
    runs FP32 and the variant over the npz with the agent's ONNX Runtime session settings and
    prints/writes JSON: accuracy, per-class recall, argmax agreement with FP32 (same machine) and
    with x86 FP32, max |logit| differences, the gate verdict under model.toml's thresholds, the
    self-test verdict (same rule as ``agent.variants.selftest.judge``), the CPU features ONNX
    Runtime sees (AT_HWCAP/AT_HWCAP2 on aarch64) and the kernels in its profile.

Usage::

    .venv/bin/python bench/arm_gate.py export --build /tmp/arm/build --n 240 --out /tmp/arm/data/gate-data.npz
    .venv/bin/python bench/arm_gate.py run --data /tmp/arm/data/gate-data.npz --models /tmp/arm/build \\
        --where "x86 native" --json /tmp/arm/results/x86.json
    # inside the arm64 root (python3 = Debian's 3.11, wheels on PYTHONPATH):
    qemu-aarch64-static -cpu max /usr/bin/python3 arm_gate.py run --data ... --where "qemu -cpu max"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

VARIANT = "ort-int8-s8s8"
FILES = {"fp32": "model.fp32.onnx", VARIANT: "model.int8-s8s8.qdq.onnx"}
#: model.toml [gate] of mr-brain-cls (export copies the model's own values into the npz)
DEFAULT_GATE = {"max_accuracy_drop": 0.01, "max_recall_drop": 0.02, "min_argmax_agreement": 0.97}

# aarch64 Linux hwcap bits (arch/arm64/include/uapi/asm/hwcap.h), the ones ORT's cpuinfo reads
HWCAP_BITS = {0: "fp", 1: "asimd", 3: "aes", 4: "pmull", 7: "crc32", 8: "atomics", 9: "fphp",
              10: "asimdhp", 12: "asimdrdm", 20: "asimddp", 22: "sve", 23: "asimdfhm"}
HWCAP2_BITS = {1: "sve2", 9: "svei8mm", 13: "i8mm", 14: "bf16", 23: "sme"}
AT_HWCAP, AT_HWCAP2 = 16, 26


# ------------------------------------------------------------------------------------------------
# export (x86, project venv)
# ------------------------------------------------------------------------------------------------


def _agent_backend(path: Path, threads: int) -> Any:
    from agent.inference import catalog

    backend = catalog.create("onnxruntime")
    backend.load(path, precision="fp32", threads=threads, options={"warmup_shape": (1, 1, 224, 224)})
    return backend


def cmd_export(args: argparse.Namespace) -> int:
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    from agent.core.modelspec import load_spec
    from agent.imaging import load_series, prepare
    from deploy.calibrate import load_quant_config
    from deploy.evaluate import generate_heldout
    from deploy.gate_report import write_selftest
    from deploy.records import GateDoc, MeasuredVariant
    from deploy.variants import catalogue_by_id

    model_dir, build = Path(args.model), Path(args.build)
    spec = load_spec(model_dir)
    cfg = load_quant_config(model_dir)
    seed = cfg.validation_seed if args.seed is None else args.seed
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="arm-gate-") as tmp:
        folders = generate_heldout(spec.task, Path(tmp), args.n, seed)
        inputs, labels = [], []
        for folder in folders:
            volume = load_series(sorted(folder.glob("*.dcm")))
            inputs.append(np.asarray(prepare(volume, spec.input).array, dtype=np.float32))
            labels.append(int(json.loads((folder / "truth.json").read_text())["class_index"]))
    x = np.stack(inputs).astype(np.float32)
    print(f"export: {len(x)} slices of seed {seed} prepared in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    # x86 references through the agent's own backend (the gate's runtime), one slice per call
    refs = {}
    for vid, name in FILES.items():
        backend = _agent_backend(build / name, args.threads)
        refs[vid] = np.concatenate([backend.run(x[i:i + 1]) for i in range(len(x))]).astype(np.float32)
    qdq_exact = run_logits(build / FILES[VARIANT], x, args.threads, 8, optimize=False)

    # the self-test vector as the gate would write it for this variant on this machine: the
    # first 4 validation slices, the variant's x86 output, tolerances from write_selftest
    v = catalogue_by_id()[VARIANT]
    k = 4
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    st = write_selftest(out.with_name(f"selftest-{VARIANT}.npz"), v, spec.task, x[:k], refs[VARIANT][:k], refs["fp32"][:k])
    gate_json = build / "gate.json"
    gate_vector = build / "selftest" / f"{VARIANT}.npz"
    gated = GateDoc.read(gate_json).variants.get(VARIANT) if gate_json.exists() else None
    if gate_vector.exists() and isinstance(gated, MeasuredVariant) and gated.selftest is not None:
        st = gated.selftest  # the gate passed it here: use its own vector
        print(f"export: using the gate's own self-test vector {gate_vector}", file=sys.stderr)
        with np.load(gate_vector) as npz:
            st_in, st_exp = npz["input"], npz["expected"]
    else:
        print(f"export: no gate-written vector for {VARIANT} (the gate failed it on this CPU); "
              "built one with deploy.gate_report.write_selftest", file=sys.stderr)
        st_in, st_exp = x[:k], refs[VARIANT][:k]
    selftest = {"atol": st.atol, "rtol": st.rtol, "min_close_fraction": st.min_close_fraction,
                "min_argmax_agreement": st.min_argmax_agreement}
    np.savez_compressed(
        out, inputs=x, labels=np.asarray(labels, dtype=np.int64), label_names=np.asarray(spec.labels),
        ref_fp32_x86=refs["fp32"], ref_s8s8_x86=refs[VARIANT], ref_s8s8_qdq_exact=qdq_exact,
        selftest_input=st_in.astype(np.float32), selftest_expected=st_exp.astype(np.float32),
        meta=np.asarray(json.dumps({"model": spec.name, "version": spec.version, "seed": seed, "n": len(x),
                                    "gate": spec.gate.model_dump(), "selftest": selftest,
                                    "x86_cpu": _host_cpu(), "exported_with_ort": _ort_version()})))
    print(f"export: wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------
# run (numpy + onnxruntime only: this half runs inside the arm64 root)
# ------------------------------------------------------------------------------------------------


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def _host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def session(path: Path, threads: int, *, optimize: bool = True, profile: str | None = None) -> Any:
    """An InferenceSession with the agent's settings (agent/inference/backends/onnxruntime.py)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_logits(path: Path, x: np.ndarray, threads: int, batch: int, *, optimize: bool = True,
               progress: str = "") -> np.ndarray:
    sess = session(path, threads, optimize=optimize)
    name = sess.get_inputs()[0].name
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(x), batch):
        outs.append(np.asarray(sess.run(None, {name: np.ascontiguousarray(x[i:i + batch])})[0], dtype=np.float32))
        done = min(i + batch, len(x))
        if progress and (done % 40 < batch or done == len(x)):
            print(f"  {progress}: {done}/{len(x)} ({(time.perf_counter() - t0) / done:.2f} s/slice)",
                  file=sys.stderr, flush=True)
    return np.concatenate(outs)


def kernels(path: Path, x: np.ndarray, threads: int, prefix: str) -> dict[str, int]:
    """Op types ORT executed (its profiler's node events) after graph optimization, counted."""
    sess = session(path, threads, profile=prefix)
    sess.run(None, {sess.get_inputs()[0].name: x[:1]})
    prof = Path(sess.end_profiling())
    counts: dict[str, int] = {}
    for ev in json.loads(prof.read_text()):
        args = ev.get("args", {})
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and "op_name" in args:
            counts[args["op_name"]] = counts.get(args["op_name"], 0) + 1
    prof.unlink(missing_ok=True)
    return dict(sorted(counts.items()))


def cpu_features() -> dict[str, Any]:
    """What the CPU reports to user space: on aarch64 the AT_HWCAP/AT_HWCAP2 bits that ONNX
    Runtime's cpuinfo (and its getauxval fallback) use to pick MLAS kernels; under QEMU these
    are the emulated CPU's, while /proc/cpuinfo shows the host's."""
    info: dict[str, Any] = {"machine": platform.machine()}
    if platform.machine() == "aarch64":
        import ctypes

        libc = ctypes.CDLL(None)
        libc.getauxval.restype = ctypes.c_ulong
        hw, hw2 = int(libc.getauxval(AT_HWCAP)), int(libc.getauxval(AT_HWCAP2))
        info["hwcap"] = hex(hw)
        info["hwcap2"] = hex(hw2)
        info["features"] = ([n for b, n in HWCAP_BITS.items() if hw >> b & 1]
                            + [n for b, n in HWCAP2_BITS.items() if hw2 >> b & 1])
    else:
        flags: list[str] = []
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
        except OSError:
            pass
        info["model"] = _host_cpu()
        info["features"] = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    return info


def judge(out: np.ndarray, expected: np.ndarray, t: dict[str, float]) -> dict[str, Any]:
    """Copied from agent/variants/selftest.py::judge (numbers and rule unchanged), with the
    agent.core.manifest.SelfTest fields (atol, rtol, min_close_fraction, min_argmax_agreement) as a dict."""
    out = np.asarray(out, dtype=np.float32)
    if out.shape != expected.shape:
        return {"passed": False, "reason": f"output shape {out.shape}, expected {expected.shape}"}
    if not np.isfinite(out).all():
        return {"passed": False, "reason": f"{int((~np.isfinite(out)).sum())} non-finite output values"}
    diff = np.abs(out - expected)
    max_abs = float(diff.max()) if diff.size else 0.0
    close = float(np.mean(diff <= t["atol"] + t["rtol"] * np.abs(expected))) if diff.size else 1.0
    agree = float(np.mean(np.argmax(out, axis=1) == np.argmax(expected, axis=1)))
    reasons = []
    if close < t["min_close_fraction"]:
        reasons.append(f"{close:.4f} of values within atol={t['atol']:.3g}/rtol={t['rtol']:.3g}, "
                       f"needs {t['min_close_fraction']}")
    if agree < t["min_argmax_agreement"]:
        reasons.append(f"argmax agreement {agree:.4f}, needs {t['min_argmax_agreement']}")
    return {"passed": not reasons, "max_abs_err": round(max_abs, 6), "close_fraction": round(close, 6),
            "argmax_agreement": round(agree, 6), "reason": "; ".join(reasons)}


def classification(logits: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    pred = np.argmax(logits, axis=1)
    recall = {n: float(np.mean(pred[labels == k] == k)) if np.any(labels == k) else float("nan")
              for k, n in enumerate(names)}
    return {"accuracy": float(np.mean(pred == labels)), "recall": recall}


def gate_verdict(ref: dict[str, Any], var: dict[str, Any], agreement: float, g: dict[str, float]) -> list[str]:
    """agent.core.accuracy.compare_classification's three tests (accuracy drop, recall drops, agreement)."""
    fails = []
    if ref["accuracy"] - var["accuracy"] > g["max_accuracy_drop"] + 1e-12:
        fails.append(f"accuracy drop {100 * (ref['accuracy'] - var['accuracy']):.2f} points")
    for n, r in var["recall"].items():
        if ref["recall"][n] - r > g["max_recall_drop"] + 1e-12:
            fails.append(f"recall drop {n} {100 * (ref['recall'][n] - r):.2f} points")
    if agreement < g["min_argmax_agreement"]:
        fails.append(f"argmax agreement {agreement:.4f} < {g['min_argmax_agreement']}")
    return fails


def cmd_run(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    t_all = time.perf_counter()
    with np.load(args.data, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    meta = json.loads(str(data["meta"]))
    n = len(data["inputs"]) if args.limit is None else min(args.limit, len(data["inputs"]))
    x, y = data["inputs"][:n], data["labels"][:n]
    names = [str(s) for s in data["label_names"]]
    g = meta.get("gate", DEFAULT_GATE)
    models = Path(args.models)
    doc: dict[str, Any] = {
        "where": args.where, "python": platform.python_version(), "onnxruntime": ort.__version__,
        "numpy": np.__version__, "cpu": cpu_features(), "qemu_cpu": os.environ.get("QEMU_CPU"),
        "n": int(n), "seed": meta["seed"], "threads": args.threads, "batch": args.batch, "variants": {},
    }
    print(f"run [{args.where}]: {n} slices, ORT {ort.__version__}, cpu {doc['cpu']}", file=sys.stderr)
    logits: dict[str, np.ndarray] = {}
    for vid in args.variants.split(","):
        t0 = time.perf_counter()
        logits[vid] = run_logits(models / FILES[vid], x, args.threads, args.batch, progress=vid)
        m = classification(logits[vid], y, names)
        m["seconds"] = round(time.perf_counter() - t0, 1)
        m["s_per_slice"] = round(m["seconds"] / n, 3)
        fp32 = logits.get("fp32")
        if fp32 is not None:
            m["agreement_fp32_same_cpu"] = float(np.mean(np.argmax(logits[vid], 1) == np.argmax(fp32, 1)))
            m["max_abs_diff_fp32_same_cpu"] = float(np.max(np.abs(logits[vid] - fp32)))
        ref86 = data["ref_fp32_x86"][:n]
        m["agreement_fp32_x86"] = float(np.mean(np.argmax(logits[vid], 1) == np.argmax(ref86, 1)))
        m["max_abs_diff_fp32_x86"] = float(np.max(np.abs(logits[vid] - ref86)))
        if vid == VARIANT:
            exact = data["ref_s8s8_qdq_exact"][:n]
            m["agreement_qdq_exact"] = float(np.mean(np.argmax(logits[vid], 1) == np.argmax(exact, 1)))
            m["max_abs_diff_qdq_exact"] = float(np.max(np.abs(logits[vid] - exact)))
            s86 = data["ref_s8s8_x86"][:n]
            m["agreement_s8s8_x86"] = float(np.mean(np.argmax(logits[vid], 1) == np.argmax(s86, 1)))
            m["max_abs_diff_s8s8_x86"] = float(np.max(np.abs(logits[vid] - s86)))
            # the gate judges against FP32 on the same CPU; fall back to x86 FP32 when FP32 was skipped
            ref_logits = fp32 if fp32 is not None else ref86
            ref = classification(ref_logits, y, names)
            agree = float(np.mean(np.argmax(logits[vid], 1) == np.argmax(ref_logits, 1)))
            m["gate_failures"] = gate_verdict(ref, m, agree, g)
            m["gate_passed"] = not m["gate_failures"]
            st_out = run_logits(models / FILES[vid], data["selftest_input"], args.threads,
                                len(data["selftest_input"]))  # the agent's trial runs the vector as one batch
            m["selftest"] = judge(st_out, data["selftest_expected"], meta["selftest"])
            m["selftest"]["tolerances"] = meta["selftest"]
            # the same rule against a vector whose `expected` is the exact Q/DQ arithmetic (what a
            # build CPU that computes the graph faithfully would write), with the tolerances that
            # deploy.gate_report.write_selftest derives for a non-simulated int8 classification variant
            exact = data["ref_s8s8_qdq_exact"][:len(st_out)]
            fp32_st = data["ref_fp32_x86"][:len(st_out)]
            tol = {"atol": max(float(np.percentile(np.abs(exact - fp32_st), 99)), 2e-3 * float(np.max(np.abs(exact)))),
                   "rtol": 0.01, "min_close_fraction": 0.99, "min_argmax_agreement": 1.0}
            m["selftest_vs_qdq_exact"] = judge(st_out, exact, tol)
            m["selftest_vs_qdq_exact"]["tolerances"] = tol
        if args.kernels:
            m["ort_ops"] = kernels(models / FILES[vid], x, args.threads, str(Path(args.json or "/tmp/x").parent / f"prof-{vid}"))
        doc["variants"][vid] = m
        print(f"  {vid}: accuracy {m['accuracy']:.4f} in {m['seconds']} s", file=sys.stderr)
    if args.save_logits:
        np.savez_compressed(args.save_logits, **{k.replace("-", "_"): v for k, v in logits.items()})
    doc["seconds"] = round(time.perf_counter() - t_all, 1)
    text = json.dumps(doc, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    """Markdown table of several ``run`` JSON files (for docs/arm.md)."""
    print("| variant | where | int8 CPU features | n | accuracy | recall no_tumour/glioma/meningioma/pituitary "
          "| agreement with x86 FP32 | max abs diff vs x86 FP32 | max abs diff vs exact Q/DQ | gate "
          "| self-test, x86-written vector | self-test, exact-Q/DQ vector | s/slice |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def verdict(st: dict[str, Any] | None) -> str:
        if not st:
            return "-"
        return (f"{'pass' if st['passed'] else 'FAIL'} (max err {st['max_abs_err']:.3g}, "
                f"close {st['close_fraction']:.3f}, argmax {st['argmax_agreement']:.2f})")

    for f in args.files:
        d = json.loads(Path(f).read_text())
        feats = [x for x in d["cpu"].get("features", []) if x in ("asimddp", "i8mm", "avx2", "avx512_vnni", "avx_vnni")]
        for vid, m in d["variants"].items():
            rec = "/".join(f"{v:.3f}" for v in m["recall"].values())
            exact = m.get("max_abs_diff_qdq_exact")
            gate = ("pass" if m["gate_passed"] else "FAIL") if "gate_passed" in m else "(reference)"
            print(f"| {vid} | {d['where']} | {' '.join(feats) or 'none'} | {d['n']} | {m['accuracy']:.4f} | {rec} "
                  f"| {m['agreement_fp32_x86']:.4f} | {m['max_abs_diff_fp32_x86']:.3g} "
                  f"| {'-' if exact is None else f'{exact:.3g}'} | {gate} | {verdict(m.get('selftest'))} "
                  f"| {verdict(m.get('selftest_vs_qdq_exact'))} | {m['s_per_slice']} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="x86: held-out tensors, x86 references, self-test vector -> npz")
    e.add_argument("--model", default="models/mr-brain-cls")
    e.add_argument("--build", required=True, help="build folder with model.fp32.onnx and model.int8-s8s8.qdq.onnx")
    e.add_argument("--n", type=int, default=240, help="validation slices (the gate uses 480)")
    e.add_argument("--seed", type=int, default=None, help="validation seed (default: the gate's, 300001)")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--out", required=True)
    r = sub.add_parser("run", help="any CPU, numpy + onnxruntime only: figures as JSON")
    r.add_argument("--data", required=True)
    r.add_argument("--models", required=True, help="folder with the two ONNX files")
    r.add_argument("--where", default=platform.machine())
    r.add_argument("--variants", default=f"fp32,{VARIANT}")
    r.add_argument("--limit", type=int, default=None, help="first N slices only")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--batch", type=int, default=1, help="slices per call (the gate runs 1)")
    r.add_argument("--kernels", action="store_true", help="also count the op types ORT's profiler reports")
    r.add_argument("--json", default=None)
    r.add_argument("--save-logits", default=None, help="npz of the logits per variant (to compare CPUs)")
    t = sub.add_parser("table", help="markdown table of run JSON files")
    t.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    return {"export": cmd_export, "run": cmd_run, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
