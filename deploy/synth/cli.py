"""``edge-deploy synth ct|mr``: write synthetic DICOM phantom sets.

``deploy/cli.py`` calls :func:`add_parser` on its subparsers and dispatches with
``args.func(args)`` (returns the exit code). ``python -m deploy.synth`` runs the same commands
on their own (:func:`main`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import generate_ct, generate_mr
from ._common import MR_DIFFICULTIES
from .ct import IOP_BY_POSITION


def _count(text: str) -> int:
    """argparse type: integer >= 0."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: integer >= 1."""
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type: float >= 0."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _thickness(text: str) -> float:
    """argparse type: slice thickness in mm, 0.1-20."""
    value = _non_negative_float(text)
    if not 0.1 <= value <= 20:
        raise argparse.ArgumentTypeError(f"must be within 0.1-20 mm, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register ``synth`` (with ``ct`` and ``mr``) on ``subparsers``; return the synth parser.

    Each leaf sets ``func`` (``args.func(args) -> int`` exit code).
    """
    synth = subparsers.add_parser(
        "synth",
        help="write synthetic DICOM phantoms (CT abdomen series, MR brain slices)",
        description="Write synthetic DICOM phantoms with ground truth. Same seed -> same files.",
    )
    kinds = synth.add_subparsers(dest="synth_kind", metavar="{ct,mr}", required=True)

    ct = kinds.add_parser(
        "ct",
        help="abdominal CT series with liver/spleen/kidney labels",
        description="N abdominal CT series (DIR/ct-0000/IM0001.dcm..., truth.json, labels.npy).",
    )
    _common_args(ct)
    ct.add_argument("--size", type=int, choices=(256, 512), help="matrix size (default: random per series)")
    ct.add_argument("--slices", type=_positive_int, help="slice count (default: cover all organs)")
    ct.add_argument("--hu-offset", type=float, default=0.0, help="add this to every HU (drift tests)")
    ct.add_argument(
        "--slice-thickness", type=_thickness, help="mm, also the slice spacing (default: 1-5 random)"
    )
    ct.add_argument("--patient-position", choices=sorted(IOP_BY_POSITION), help="default: random per series")
    ct.set_defaults(func=run_ct)

    mr = kinds.add_parser(
        "mr",
        help="brain MR slices: no_tumour / glioma / meningioma / pituitary",
        description="N single-slice brain MR series (DIR/mr-0000/IM0001.dcm, truth.json), classes balanced.",
    )
    _common_args(mr)
    mr.add_argument("--difficulty", choices=(*MR_DIFFICULTIES, "mixed"), default="mixed")
    mr.set_defaults(func=run_mr)
    return synth


def _common_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``synth ct`` and ``synth mr``."""
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--n", type=_count, default=1, help="number of series (default 1)")
    parser.add_argument("--seed", type=_count, default=0, help="set seed (default 0)")
    parser.add_argument("--noise", type=_non_negative_float, default=1.0, help="noise scale (default 1)")
    parser.add_argument("--manufacturer", help="Manufacturer to write (default: varies per series)")


def _report(folder: Path, instances: int) -> None:
    """Progress line per series written."""
    print(f"{folder}  {instances} instance{'s' if instances != 1 else ''}", flush=True)


def run_ct(args: argparse.Namespace) -> int:
    """``synth ct``: generate, print one line per series and a summary; returns 0."""
    start = time.perf_counter()
    folders = generate_ct(
        args.out,
        args.n,
        args.seed,
        progress=_report,
        size=args.size,
        slices=args.slices,
        hu_offset=args.hu_offset,
        noise=args.noise,
        slice_thickness=args.slice_thickness,
        manufacturer=args.manufacturer,
        patient_position=args.patient_position,
    )
    print(
        f"wrote {len(folders)} CT series to {args.out} in {time.perf_counter() - start:.1f} s "
        f"(seed {args.seed}; manifest {Path(args.out) / 'manifest.json'})"
    )
    return 0


def run_mr(args: argparse.Namespace) -> int:
    """``synth mr``: generate, print one line per series and a summary; returns 0."""
    start = time.perf_counter()
    folders = generate_mr(
        args.out,
        args.n,
        args.seed,
        difficulty=args.difficulty,
        progress=_report,
        noise=args.noise,
        manufacturer=args.manufacturer,
    )
    print(
        f"wrote {len(folders)} MR series to {args.out} in {time.perf_counter() - start:.1f} s "
        f"(seed {args.seed}, difficulty {args.difficulty}; manifest {Path(args.out) / 'manifest.json'})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m deploy.synth ct|mr ...``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m deploy.synth")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    # Accept both "synth ct ..." (as under edge-deploy) and the shorter "ct ...".
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] != ["synth"]:
        args_list = ["synth", *args_list]
    args = parser.parse_args(args_list)
    return int(args.func(args))
