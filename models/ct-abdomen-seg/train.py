#!/usr/bin/env python
"""Train ct-abdomen-seg: 3D liver / spleen / kidney segmentation on synthetic abdominal CT.

Synthetic phantoms only (``deploy.synth``); NOT for clinical use. See MODEL_CARD.md.

Pipeline:

1. Training volumes: CT phantoms with raw seeds ``0 .. volumes-1`` (inside the reserved training
   range ``deploy.evaluate.TRAINING_SEEDS``; held-out sets use 63-bit derived seeds, so they never
   overlap), each with a small random ``noise`` / ``hu_offset`` knob for robustness, made into
   model input by the AGENT's own ``build_volume`` + ``prepare`` (3 mm, window [-160, 240] HU), with
   labels resampled onto the same grid (nearest neighbour at the model voxel centres,
   ``deploy.training.labels_to_model_space``).
2. Patches of ``[input].patch_size`` (two thirds centred near a random organ), batch of 2, small
   intensity jitter; no flips (left and right kidney are different labels).
3. MONAI BasicUNet, BatchNorm + ReLU + non-learned trilinear upsampling (quantizes well, see
   MODEL_CARD.md), Dice + cross-entropy loss, AdamW with warm-up and cosine decay.
4. Export to ONNX (opset 18, dynamic batch), check against torch with ONNX Runtime, and evaluate
   on a fresh held-out set through ``edge-deploy evaluate``'s code.

    python models/ct-abdomen-seg/train.py                 # full run, writes models/ct-abdomen-seg/model.onnx
    python models/ct-abdomen-seg/train.py --smoke         # CI: a few steps into a temp dir (< 60 s)
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

#: BasicUNet feature widths: levels 0-4 and the last decoder level. Small on purpose: the model
#: must train on 2 CPU cores and stay a few MB (FP32 ONNX ~5 MB).
FEATURES = (8, 16, 32, 64, 128, 8)
#: training patch (z, y, x): the inference patch's full in-plane field (both kidneys, the spine, liver
#: and spleen) but fewer slices, which makes a step ~35 % cheaper than the 64 x 96 x 96 inference
#: patch; the network is fully convolutional, so it runs on the bigger patch unchanged.
TRAIN_PATCH = (48, 96, 96)


def build_model(n_classes: int) -> Any:
    """MONAI BasicUNet configured to quantize well.

    BatchNorm (folds into the convolutions at export), plain ReLU (fuses into int8 Conv kernels)
    and ``upsample="nontrainable"`` (1x1 conv + trilinear Resize instead of ConvTranspose3d, which
    ONNX Runtime leaves in float and TensorRT runs in FP16). No InstanceNorm, PReLU or dropout.
    """
    from monai.networks.nets import BasicUNet

    return BasicUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=n_classes,
        features=FEATURES,
        act=("relu", {"inplace": True}),
        norm=("batch", {"affine": True}),
        bias=True,
        dropout=0.0,
        upsample="nontrainable",
    )


def case_knobs(seed: int) -> dict[str, Any]:
    """Per-volume phantom knobs: a little noise and HU calibration variation, drawn from the
    volume's own seed (deterministic, independent of the data order)."""
    rng = np.random.default_rng([seed, 7])
    return {"noise": float(rng.uniform(0.7, 1.3)), "hu_offset": float(rng.uniform(-15.0, 15.0))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_common_args(parser, epochs=36, budget_s=1500)
    T.add_precision_arg(parser)
    parser.add_argument("--volumes", type=int, default=48, help="training phantoms (default 48)")
    parser.add_argument("--train-patch", type=int, nargs=3, default=TRAIN_PATCH, metavar=("Z", "Y", "X"),
                        help=f"training patch (default {TRAIN_PATCH}; inference uses [input].patch_size)")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per step (default 2)")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="optimizer steps per epoch (default: volumes / batch size, i.e. one patch per volume)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    args = parser.parse_args(argv)

    spec = load_spec(MODEL_DIR)
    patch = tuple(int(p) for p in spec.input.patch_size or ())
    train_patch = tuple(args.train_patch)
    if any(p % 16 for p in train_patch):
        parser.error("--train-patch sizes must be multiples of 16 (four 2x poolings)")
    if args.smoke:
        # one tiny step: proves the loop, the loss and the export, not the accuracy
        args.volumes, args.epochs, args.workers, args.batch_size = 1, 1, 1, 1
        args.steps_per_epoch = 1
        args.eval_n = 0 if args.eval_n is None else args.eval_n
        train_patch = (32, 48, 48)
    eval_n = 10 if args.eval_n is None else args.eval_n
    out_dir = T.output_dir(args, MODEL_DIR)
    if args.volumes > len(TRAINING_SEEDS):
        parser.error(f"--volumes must be <= {len(TRAINING_SEEDS)}")

    import torch
    from monai.losses import DiceCELoss

    T.configure_torch(args.seed, args.threads)
    started = time.monotonic()

    # --- data: the agent's preprocessing, in worker processes ---
    seeds = list(TRAINING_SEEDS[: args.volumes])
    knobs = [case_knobs(s) for s in seeds]
    if args.smoke:  # small, thick-slice phantoms: seconds, not minutes
        knobs = [{**k, "size": 256, "slice_thickness": 5.0} for k in knobs]
    T.log(f"ct-abdomen-seg: generating {len(seeds)} training volumes with {args.workers} workers")
    cases = T.generate_cases(
        T.ct_case, [(s, spec.input, len(spec.labels), k) for s, k in zip(seeds, knobs, strict=True)],
        args.workers, "volumes",
    )
    data_s = time.monotonic() - started
    T.log(f"data ready in {data_s:.0f} s: shapes {sorted({c[0].shape[1:] for c in cases})[:3]}...")

    # --- model and optimisation ---
    model = build_model(len(spec.labels))
    n_params = T.count_parameters(model)
    # channels-last (NDHWC) is oneDNN's native 3D layout: ~2x faster training steps on CPU here;
    # bf16 autocast another ~1.5x (MODEL_CARD.md, "Training")
    model = model.to(memory_format=torch.channels_last_3d)
    amp_dtype = T.autocast_dtype(args.precision)
    # Dice over the organs only (background Dice is ~1 and says nothing), cross-entropy over all
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = args.steps_per_epoch or max(1, len(cases) // args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = min(30, total // 10)
    rng = np.random.default_rng([args.seed, 1])
    budget = T.Budget(args.budget_s)
    T.log(f"BasicUNet{FEATURES}: {n_params:,} parameters; {total} steps of {args.batch_size} x {train_patch} "
          f"({'bf16 autocast' if amp_dtype is not None else 'fp32'})")

    model.train()
    step = 0
    stopped_early = False
    running = 0.0
    loop_start = time.monotonic()
    for epoch in range(args.epochs):
        for _ in range(steps_per_epoch):
            if budget.exhausted():
                stopped_early = True
                break
            images, targets = [], []
            for _b in range(args.batch_size):
                image, labels = T.random_patch(*cases[int(rng.integers(len(cases)))], train_patch, rng)
                # intensity jitter (~ +-3 % contrast, +-12 HU) on top of the phantom's own variation
                image = image * np.float32(rng.uniform(0.97, 1.03)) + np.float32(rng.uniform(-0.03, 0.03))
                images.append(image)
                targets.append(labels[None].astype(np.int64))
            x = torch.from_numpy(np.stack(images).astype(np.float32))
            x = x.contiguous(memory_format=torch.channels_last_3d)
            y = torch.from_numpy(np.stack(targets))
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
            running = 0.9 * running + 0.1 * value if step > 1 else value
            if step % 10 == 0 or step == total:
                rate = (time.monotonic() - loop_start) / step
                T.log(f"  epoch {epoch + 1}/{args.epochs} step {step}/{total} loss {running:.4f} "
                      f"({rate:.2f} s/step, {budget.elapsed:.0f} s)")
        if stopped_early:
            T.log(f"budget of {args.budget_s:g} s reached after {step}/{total} steps: stopping early")
            break
    train_s = time.monotonic() - started
    model = model.to(memory_format=torch.contiguous_format)

    summary = {
        "model": spec.name,
        "architecture": f"monai.networks.nets.BasicUNet(features={FEATURES}, norm=batch, act=relu, "
        "upsample=nontrainable)",
        "parameters": n_params,
        "steps": step,
        "planned_steps": total,
        "stopped_early": stopped_early,
        "final_loss": round(running, 4),
        "training_precision": "bf16-autocast" if amp_dtype is not None else "fp32",
        "training_volumes": len(cases),
        "training_seeds": f"{seeds[0]}..{seeds[-1]}",
        "data_s": round(data_s, 1),
        "train_s": round(train_s, 1),
    }
    T.finish(model, (spec.input.channels, *patch), out_dir, eval_n=eval_n, eval_seed=args.eval_seed,
             summary=summary)
    T.log(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
