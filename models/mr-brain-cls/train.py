#!/usr/bin/env python
"""Train mr-brain-cls: four-class brain tumour classifier on synthetic axial T1 post-contrast MR.

Synthetic phantoms only (``deploy.synth``); NOT for clinical use. See MODEL_CARD.md.

Pipeline:

1. Training slices: MR phantoms with raw seeds ``0 .. slices-1`` (inside the reserved training
   range ``deploy.evaluate.TRAINING_SEEDS``; held-out sets use 63-bit derived seeds), classes and
   difficulties round-robin (balanced: every 12 consecutive seeds hold each (class, difficulty)
   pair once), a small random ``noise`` knob, made into model input by the AGENT's own
   ``build_volume`` + ``prepare`` (224 x 224, z-score).
2. Augmentation: left-right flips (tumour side carries no class information) and shifts of up
   to 12 pixels. No rotation or rescaling: the phantoms already vary both.
3. A MONAI ResNet-10 (basic blocks, one per stage, widths 64-128-256-512 as in MONAI's
   resnet10/18, BatchNorm + ReLU, global average pooling): quantizes well, and is large enough
   that arithmetic, not per-layer overhead, sets its latency (see MODEL_CARD.md). Cross-entropy with light label
   smoothing, AdamW with warm-up and cosine decay; accuracy on a validation split (also training
   range seeds) is printed per epoch but never used to pick weights (the last epoch is kept).
4. Export to ONNX (opset 18, dynamic batch), check against torch with ONNX Runtime, and evaluate
   on a fresh held-out set through ``edge-deploy evaluate``'s code.

    python models/mr-brain-cls/train.py                  # full run, writes models/mr-brain-cls/model.onnx
    python models/mr-brain-cls/train.py --smoke          # CI: a few steps into a temp dir (< 60 s)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL_DIR = Path(__file__).resolve().parent
REPO = MODEL_DIR.parents[1]
if str(REPO) not in sys.path:  # runnable as a script from a source checkout without installing
    sys.path.insert(0, str(REPO))

from agent.core.modelspec import load_spec  # noqa: E402
from deploy import training as T  # noqa: E402
from deploy.evaluate import TRAINING_SEEDS  # noqa: E402
from deploy.synth import MR_CLASSES, MR_DIFFICULTIES  # noqa: E402

#: channels of the four ResNet stages, as MONAI's resnet10/resnet18 (which has two blocks each).
#: A 4x narrower model (16-32-64-128, 0.31 M parameters) is as accurate on these phantoms but so
#: small that per-layer fixed costs dominate a 0.5 ms call and INT8 gains little over FP32
#: (bench/int8_scaling.py); deployed classifiers are resnet-sized.
WIDTHS = (64, 128, 256, 512)
#: largest random shift (pixels) of the training augmentation
MAX_SHIFT = 12


def build_model(n_classes: int) -> Any:
    """A MONAI ResNet-10: Conv+BN+ReLU everywhere, max pool, global average pool, one Linear.

    Every op is one ONNX Runtime / OpenVINO / TensorRT quantize as int8 (BatchNorm folds into the
    convolutions at export; the residual Add and ReLU fuse); nothing exotic (no InstanceNorm,
    PReLU, GELU, attention).
    """
    from monai.networks.nets import ResNet

    return ResNet(
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=list(WIDTHS),
        spatial_dims=2,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        num_classes=n_classes,
        act=("relu", {"inplace": True}),
        norm="batch",
    )


def assignment(i: int) -> tuple[str, str]:
    """(class, difficulty) of training slice ``i``: every 12 consecutive slices hold each pair once."""
    return MR_CLASSES[i % len(MR_CLASSES)], MR_DIFFICULTIES[(i // len(MR_CLASSES)) % len(MR_DIFFICULTIES)]


def case_knobs(seed: int) -> dict[str, Any]:
    """Per-slice phantom knobs (noise level), drawn from the slice's own seed."""
    rng = np.random.default_rng([seed, 7])
    return {"noise": float(rng.uniform(0.75, 1.35))}


def make_set(spec_input: Any, seeds: list[int], workers: int, label: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N, C, H, W) float16, class indices (N,) and difficulties of the given seeds."""
    jobs = []
    difficulties = []
    for s in seeds:
        cls, diff = assignment(s)
        jobs.append((s, spec_input, cls, diff, case_knobs(s)))
        difficulties.append(diff)
    cases = T.generate_cases(T.mr_case, jobs, workers, label)
    # float16 halves the memory of a few thousand 224 x 224 slices; z-scored values are O(1-10)
    images = np.stack([c[0] for c in cases]).astype(np.float16)
    targets = np.array([c[1] for c in cases], dtype=np.int64)
    return images, targets, difficulties


def augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random left-right flip and integer shift (wrap-around: the border is background) per sample."""
    out = np.empty(batch.shape, dtype=np.float32)
    for i, image in enumerate(batch):
        image = image.astype(np.float32)
        if rng.random() < 0.5:
            image = image[..., ::-1]
        dy, dx = (int(v) for v in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2))
        out[i] = np.roll(image, (dy, dx), axis=(-2, -1))
    return out


def predict(model: Any, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Argmax class of each image (eval mode, no augmentation)."""
    import torch

    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i : i + batch_size].astype(np.float32))
            preds.append(model(x).argmax(1).numpy())
    model.train()
    return np.concatenate(preds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_common_args(parser, epochs=10, budget_s=900)
    T.add_precision_arg(parser)
    parser.add_argument("--slices", type=int, default=6000, help="training slices (default 6000)")
    parser.add_argument("--val-slices", type=int, default=360, help="validation slices (default 360)")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per step (default 32)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    args = parser.parse_args(argv)

    spec = load_spec(MODEL_DIR)
    size = tuple(int(v) for v in spec.input.target_size or ())
    max_steps = None
    if args.smoke:
        args.slices, args.val_slices, args.epochs, args.workers = 48, 12, 1, 1
        max_steps = 3
        args.eval_n = 0 if args.eval_n is None else args.eval_n
    eval_n = 400 if args.eval_n is None else args.eval_n
    out_dir = T.output_dir(args, MODEL_DIR)
    if args.slices + args.val_slices > len(TRAINING_SEEDS):
        parser.error(f"--slices + --val-slices must be <= {len(TRAINING_SEEDS)}")

    import torch

    T.configure_torch(args.seed, args.threads)
    started = time.monotonic()

    # --- data: the agent's preprocessing, in worker processes ---
    train_seeds = list(TRAINING_SEEDS[: args.slices])
    # validation from the far end of the training range: disjoint from the training slices
    val_seeds = list(TRAINING_SEEDS[len(TRAINING_SEEDS) - args.val_slices :])
    T.log(f"mr-brain-cls: generating {len(train_seeds)} training + {len(val_seeds)} validation slices "
          f"with {args.workers} workers")
    x_train, y_train, _ = make_set(spec.input, train_seeds, args.workers, "training slices")
    x_val, y_val, val_diff = make_set(spec.input, val_seeds, args.workers, "validation slices")
    data_s = time.monotonic() - started
    T.log(f"data ready in {data_s:.0f} s: {x_train.shape} train, {x_val.shape} val")

    # --- model and optimisation ---
    model = build_model(len(spec.labels))
    n_params = T.count_parameters(model)
    # channels-last (NHWC) is oneDNN's native layout, and bf16 autocast uses the CPU's bf16 units
    model = model.to(memory_format=torch.channels_last)
    amp_dtype = T.autocast_dtype(args.precision)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng([args.seed, 1])
    steps_per_epoch = len(x_train) // args.batch_size
    total = args.epochs * steps_per_epoch if max_steps is None else min(max_steps, args.epochs * steps_per_epoch)
    warmup = min(100, total // 10)
    budget = T.Budget(args.budget_s)
    T.log(f"ResNet(basic, [1, 1, 1, 1], {list(WIDTHS)}): {n_params:,} parameters; {total} steps of "
          f"{args.batch_size} x {(spec.input.channels, *size)} ({'bf16 autocast' if amp_dtype is not None else 'fp32'})")

    model.train()
    step = 0
    stopped_early = False
    running = 0.0
    val_acc = float("nan")
    loop_start = time.monotonic()
    for epoch in range(args.epochs):
        for idx in T.iterate_batches(len(x_train), args.batch_size, rng):
            if step >= total:
                break
            if budget.exhausted():
                stopped_early = True
                break
            x = torch.from_numpy(augment(x_train[idx], rng)).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(y_train[idx])
            for group in opt.param_groups:
                group["lr"] = T.cosine_lr(step, total, args.lr, warmup)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            loss.backward()
            opt.step()
            step += 1
            value = loss.item()
            running = 0.95 * running + 0.05 * value if step > 1 else value
            if step % 50 == 0:
                rate = (time.monotonic() - loop_start) / step
                T.log(f"  epoch {epoch + 1}/{args.epochs} step {step}/{total} loss {running:.4f} "
                      f"({rate:.3f} s/step, {budget.elapsed:.0f} s)")
        pred = predict(model, x_val)
        val_acc = float(np.mean(pred == y_val))
        by_diff = {d: float(np.mean([p == t for p, t, dd in zip(pred, y_val, val_diff, strict=True) if dd == d]))
                   for d in MR_DIFFICULTIES}
        T.log(f"epoch {epoch + 1}: loss {running:.4f}, validation accuracy {val_acc:.4f} "
              + " ".join(f"{d} {a:.3f}" for d, a in by_diff.items()))
        if stopped_early:
            T.log(f"budget of {args.budget_s:g} s reached after {step}/{total} steps: stopping early")
            break
        if step >= total:
            break
    train_s = time.monotonic() - started
    model = model.to(memory_format=torch.contiguous_format)

    summary = {
        "model": spec.name,
        "architecture": f"monai.networks.nets.ResNet(block=basic, layers=[1, 1, 1, 1], "
        f"block_inplanes={list(WIDTHS)}, spatial_dims=2, conv1 7x7/2, norm=batch, act=relu)",
        "parameters": n_params,
        "steps": step,
        "planned_steps": total,
        "stopped_early": stopped_early,
        "final_loss": round(running, 4),
        "training_precision": "bf16-autocast" if amp_dtype is not None else "fp32",
        "validation_accuracy": round(val_acc, 4),
        "training_slices": len(train_seeds),
        "training_seeds": f"{train_seeds[0]}..{train_seeds[-1]}",
        "validation_seeds": f"{val_seeds[0]}..{val_seeds[-1]}",
        "data_s": round(data_s, 1),
        "train_s": round(train_s, 1),
    }
    T.finish(model, (spec.input.channels, *size), out_dir, eval_n=eval_n, eval_seed=args.eval_seed,
             summary=summary)
    T.log(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
