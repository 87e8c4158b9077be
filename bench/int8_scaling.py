"""How the batch-1 INT8 speed-up over ONNX Runtime FP32 grows with the size of a 2D classifier.

The mr-brain-cls target (fastest INT8 variant >= 3.5x ORT FP32 at batch 1) is a statement about
the hardware as much as about the model: a VNNI core does at most 4x the int8 multiply-accumulates
of its fp32 FMAs, and a model this small spends much of each call in per-layer fixed costs that
quantization does not shrink. This script measures the ratio across MONAI ResNets from the
first reference model's size (mr-brain-cls 1.0.0: widths 16-32-64-128, one block per stage,
0.31 M parameters) through the current one (1.1.0: resnet10 widths 64-128-256-512) to
resnet18 size, all on one 224x224 single-channel slice, so the question "how large would the
model have to be" has measured answers on this machine.

Weights are random (timing does not depend on them; accuracy is the gate's business, not this
script's). Each model is exported to ONNX (opset 18, dynamic batch), quantized the way
``edge-deploy`` builds ``ort-int8-u8s8`` (QDQ, u8 activations, per-channel symmetric s8 weights),
and run through the agent's own backends (``agent.inference.catalog``: ONNX Runtime with the
agent's settings, spinning off; OpenVINO with its explicit precision hint) with 2 threads.
Configurations are timed in interleaved rounds and keep their best round, so load drift hits all
of them alike. Needs the deploy and openvino extras (torch, monai)::

    .venv/bin/python bench/int8_scaling.py [--rounds 3] [--runs 40] [--size 224]

Also reports each model's torch training step (batch 32, fp32, 2 threads): the cost side of a
larger reference model, which ``models/*/train.py`` must train on 2 cores in under 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_line  # noqa: E402

sys.path.insert(0, str(REPO))

#: (label, stage widths, blocks per stage, stem stride, max pool after the stem)
MODELS = [
    ("mr-brain-cls 1.0.0", (16, 32, 64, 128), (1, 1, 1, 1), 2, True),
    ("2x wider", (32, 64, 128, 256), (1, 1, 1, 1), 2, True),
    ("resnet10 = mr-brain-cls 1.1.0", (64, 128, 256, 512), (1, 1, 1, 1), 2, True),
    ("resnet18", (64, 128, 256, 512), (2, 2, 2, 2), 2, True),
    ("resnet10 widths, no max pool", (64, 128, 256, 512), (1, 1, 1, 1), 2, False),
]


def build(widths: tuple[int, ...], layers: tuple[int, ...], stride: int, max_pool: bool):
    from monai.networks.nets import ResNet

    return ResNet(block="basic", layers=list(layers), block_inplanes=list(widths), spatial_dims=2,
                  n_input_channels=1, conv1_t_size=7, conv1_t_stride=stride, no_max_pool=not max_pool,
                  num_classes=4, act=("relu", {"inplace": True}), norm="batch")


def train_step_s(model, size: int) -> float:
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(32, 1, size, size), torch.randint(0, 4, (32,))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    model.eval()
    return min(times[1:])


def export_and_quantize(model, size: int, folder: Path) -> tuple[Path, Path]:
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre, q = folder / "fp32.onnx", folder / "pre.onnx", folder / "u8s8.onnx"
    torch.onnx.export(model, torch.zeros(1, 1, size, size), str(fp32), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
                      opset_version=18, dynamo=False)
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self._it = iter([{"input": rng.standard_normal((1, 1, size, size)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"WeightSymmetric": True})
    return fp32, q


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, best kept (default 3)")
    parser.add_argument("--runs", type=int, default=40, help="timed calls per configuration and round")
    parser.add_argument("--size", type=int, default=224, help="slice size (default 224, as mr-brain-cls)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args()

    import torch

    from agent.inference import catalog

    torch.set_num_threads(2)
    print(f"# {machine_line()}", file=sys.stderr)
    x = np.random.default_rng(1).standard_normal((1, 1, args.size, args.size)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, widths, layers, stride, max_pool in MODELS:
            model = build(widths, layers, stride, max_pool)
            params = sum(p.numel() for p in model.parameters())
            step_s = train_step_s(model, args.size)
            folder = Path(tmp) / f"m{len(rows)}"
            folder.mkdir()
            fp32, q = export_and_quantize(model, args.size, folder)
            runs = {}
            for name, backend, path, precision in [("ort_fp32", "onnxruntime", fp32, "fp32"),
                                                   ("ort_u8s8", "onnxruntime", q, "int8"),
                                                   ("ov_int8", "openvino", q, "int8")]:
                b = catalog.create(backend)
                b.load(path, precision=precision, threads=2, options={})
                runs[name] = b.run
            best = {k: float("inf") for k in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    for _ in range(5):
                        run(x)
                    times = []
                    for _ in range(args.runs):
                        t = time.perf_counter()
                        run(x)
                        times.append(time.perf_counter() - t)
                    best[name] = min(best[name], float(np.median(times)) * 1000.0)
            rows.append({"model": label, "widths": list(widths), "layers": list(layers), "stem_stride": stride,
                         "max_pool": max_pool, "params_m": round(params / 1e6, 2),
                         "train_step_s_batch32": round(step_s, 2),
                         **{f"{k}_ms": round(v, 3) for k, v in best.items()},
                         "ort_u8s8_x": round(best["ort_fp32"] / best["ort_u8s8"], 2),
                         "ov_int8_x": round(best["ort_fp32"] / best["ov_int8"], 2)})
            print(f"# done: {label}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"machine": machine_line(), "size": args.size, "rows": rows}, indent=1))
        return 0
    print(f"{machine_line()}; {args.size}x{args.size} slice, batch 1, 2 threads, best of {args.rounds} "
          f"interleaved rounds x {args.runs} runs (median)\n")
    print("| model | params | fp32 train step (32) s | ORT FP32 ms | ORT u8s8 ms (x) | OpenVINO INT8 ms (x) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} ({'-'.join(map(str, r['widths']))}, blocks {r['layers']}) | {r['params_m']} M | "
              f"{r['train_step_s_batch32']} | {r['ort_fp32_ms']:.2f} | {r['ort_u8s8_ms']:.2f} ({r['ort_u8s8_x']}x) | "
              f"{r['ov_int8_ms']:.2f} ({r['ov_int8_x']}x) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
