"""Judging a variant's outputs: the manifest's self-test vector, and agreement with FP32.

Pure numpy, so the service process can judge what the inference worker computed without importing
any inference library. The worker returns raw outputs (self-test) or a per-job agreement figure
(shadow validation); the rules for what counts as "passed" and "agrees" live here.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.core.errors import ActivationError
from agent.core.manifest import SelfTest


@dataclass(frozen=True)
class SelfTestVector:
    """The ``input`` and ``expected`` arrays of a self-test ``.npz`` (expected as float32)."""

    input: np.ndarray
    expected: np.ndarray


@dataclass(frozen=True)
class SelfTestVerdict:
    """How a variant's output compares with its self-test vector.

    ``max_abs_err``: largest absolute difference; ``close_fraction``: share of elements within
    (atol, rtol); ``argmax_agreement``: share of argmax (class axis 1) equal to the expected one.
    ``reason`` says which tolerance was missed ("" when passed).
    """

    passed: bool
    max_abs_err: float
    close_fraction: float
    argmax_agreement: float
    reason: str = ""


def load_vector(path: Path) -> SelfTestVector:
    """Read a self-test ``.npz``; ActivationError when it is unreadable or lacks its arrays."""
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            x = np.asarray(npz["input"], dtype=np.float32)
            expected = np.asarray(npz["expected"], dtype=np.float32)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ActivationError(f"self-test vector {path} is unreadable: {exc}") from exc
    if x.ndim < 2 or expected.ndim < 2 or x.shape[0] != expected.shape[0]:
        raise ActivationError(f"self-test vector {path}: input {x.shape} and expected {expected.shape} "
                              "do not describe the same batch")
    return SelfTestVector(x, expected)


def judge(output: np.ndarray, expected: np.ndarray, test: SelfTest) -> SelfTestVerdict:
    """Compare a variant's ``output`` on the self-test input with ``expected`` under the manifest's
    tolerances. Non-finite outputs and a wrong shape fail outright."""
    out = np.asarray(output, dtype=np.float32)
    if out.shape != expected.shape:
        return SelfTestVerdict(False, float("inf"), 0.0, 0.0,
                               f"output shape {out.shape}, expected {expected.shape}")
    if not np.isfinite(out).all():
        return SelfTestVerdict(False, float("inf"), 0.0, 0.0,
                               f"{int((~np.isfinite(out)).sum())} non-finite output values")
    diff = np.abs(out - expected)
    max_abs = float(diff.max()) if diff.size else 0.0
    close = float(np.mean(diff <= test.atol + test.rtol * np.abs(expected))) if diff.size else 1.0
    agree = float(np.mean(np.argmax(out, axis=1) == np.argmax(expected, axis=1)))
    reasons = []
    if close < test.min_close_fraction:
        reasons.append(f"{close:.4f} of values within atol={test.atol:.3g}/rtol={test.rtol:.3g}, "
                       f"needs {test.min_close_fraction}")
    if agree < test.min_argmax_agreement:
        reasons.append(f"argmax agreement {agree:.4f}, needs {test.min_argmax_agreement}")
    return SelfTestVerdict(not reasons, round(max_abs, 6), round(close, 6), round(agree, 6), "; ".join(reasons))


def agrees(task: str, value: float, min_dice: float) -> bool:
    """Does one shadow comparison count as agreement? ``value`` is what the worker measured:
    classification 1.0/0.0 (same label or not); segmentation the mean foreground Dice."""
    if task == "classification":
        return value >= 1.0
    return value >= min_dice
