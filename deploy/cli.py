"""``edge-deploy``: one command, one subcommand per toolkit stage.

Each stage module exposes ``add_parser(subparsers)`` registering its subcommand with ``func=``;
this module only collects them, so a stage is found by its file name.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from agent.core.errors import EdgeAgentError

#: stage modules, in the order they appear in ``--help``
STAGES = (
    "deploy.synth.cli",
    "deploy.evaluate",
    "deploy.calibrate",
    "deploy.drift_cmd",
    "deploy.quantize",
    "deploy.gate",
    "deploy.bench",
    "deploy.sign",
    "deploy.publish",
    "deploy.verify",
    "deploy.build",
    "deploy.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-deploy",
        description="Model toolkit: synthesize phantoms, evaluate, calibrate, quantize, gate, "
        "benchmark, sign and publish model variants.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except EdgeAgentError as exc:
        print(f"edge-deploy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edge-deploy {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
