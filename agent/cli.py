"""``edge-agent``: run the daemon, check configuration, send DICOM, follow results.

The CLI is the outermost edge: it turns domain errors into one clear line on stderr and an exit
code (2 for bad input/config, 1 for a failed operation), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import Config, load_config
from agent.errors import EdgeAgentError


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.log import setup_logging
    from agent.service import Service

    cfg = load_config(args.config)
    setup_logging(cfg.logging.level, cfg.logging.format)
    service = Service(cfg)
    return service.run_forever()


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    problems = _check_paths(cfg)
    if args.show:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    print(f"configuration OK ({args.config or 'embedded defaults'})")
    return 0


def _check_paths(cfg: Config) -> list[str]:
    out = []
    if not cfg.models.dir.is_dir():
        out.append(f"models.dir: {cfg.models.dir} is not a directory")
    if not cfg.dicom.allowed_callers:
        out.append("dicom.allowed_callers is empty: any calling AE title will be accepted")
    for section in (cfg.dicom.tls, cfg.mqtt.tls):
        for f in (section.certfile, section.keyfile, section.cafile):
            if section.enabled and f is not None and not Path(f).is_file():
                out.append(f"tls file {f} does not exist")
    return out


def cmd_send(args: argparse.Namespace) -> int:
    from agent.ingest.scu import send_files

    host, port = args.to
    report = send_files([Path(p) for p in args.paths], host, port,
                        calling_aet=args.aet, called_aet=args.aec, timeout=args.timeout)
    for path, reason in report.errors.items():
        print(f"  failed {path}: {reason}", file=sys.stderr)
    skipped = f", skipped {len(report.skipped)} non-DICOM file(s)" if report.skipped else ""
    print(f"sent {report.sent} instance(s), failed {report.failed}{skipped}, in {report.elapsed_s:.2f}s")
    return 0 if report.failed == 0 else 1


def cmd_results(args: argparse.Namespace) -> int:
    from agent.publish.follow import follow_results

    cfg = load_config(args.config)
    host = args.host or cfg.mqtt.host
    port = args.port or cfg.mqtt.port
    follow_results(host, port, cfg.mqtt.topic_prefix, args.device or "+",
                   protocol=args.protocol or cfg.mqtt.protocol,
                   count=None if args.follow and not args.count else (args.count or 1),
                   timeout=args.timeout, raw=args.raw)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Pull, self-test and activate the registry's latest versions now; 1 when one could not be."""
    from agent.engines import EngineManager  # imported here: it loads inference backends
    from agent.log import setup_logging
    from agent.registry.store import ModelStore
    from agent.registry.updater import updater_from_config

    cfg = load_config(args.config)
    setup_logging(cfg.logging.level, cfg.logging.format)
    cfg.storage.dir.mkdir(parents=True, exist_ok=True)
    engines = EngineManager(cfg, ModelStore(cfg.storage.dir), cfg.db_path, on_event=lambda ev: None)
    try:
        updater = updater_from_config(cfg, engines.activate, on_event=lambda ev: None, probe=engines.probe)
        outcomes = updater.pull_now(args.model or None)
    finally:
        engines.close()  # stops the inference worker the self-tests ran in
    for o in outcomes:
        if o.ok:
            detail = {"installed": f"{o.version} active, variant {o.variant} ({o.reason})" if o.reason
                      else f"{o.version} active, variant {o.variant}",
                      "up-to-date": f"{o.version} is the latest", "skipped": f"{o.target} skipped: {o.reason}"}
            print(f"{o.model}: {detail[o.action]}")
        else:
            print(f"{o.model}: not updated ({o.stage}): {o.error}; current stays {o.version or 'none'}",
                  file=sys.stderr)
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


def cmd_models(args: argparse.Namespace) -> int:
    """``edge-agent models [--json]``: installed models, their variants as measured here, the active one."""
    from agent.engines import EngineManager
    from agent.registry.store import ModelStore

    cfg = load_config(args.config)
    engines = EngineManager(cfg, ModelStore(cfg.storage.dir), cfg.db_path, on_event=lambda _event: None)
    try:
        models = engines.describe()
    finally:
        engines.close()
    if args.json:
        print(json.dumps({"schema": "edge-agent/models/1", "models": models}, indent=2, sort_keys=True))
        return 0
    print(render_models(models))
    return 0


def render_models(models: list[dict[str, Any]]) -> str:
    """``EngineManager.describe()`` for people: each model's active variant and why, then every
    variant with its self-test, latency and how its accuracy on this CPU is known."""
    if not models:
        return "no models: nothing installed from the registry and nothing in models.dir"
    lines: list[str] = []
    for m in models:
        active = m.get("active") or {}
        lines.append(f"{m['name']} {m['version']} ({m['source']}): {active.get('variant') or 'not active'}"
                     f" [{active.get('backend') or '-'} {active.get('precision') or '-'}]")
        lines.append(f"  why: {active.get('reason', m.get('error', '-'))}")
        if m.get("previous"):
            lines.append(f"  previous (rollback): {m['previous']}")
        for v in m.get("variants", []):
            if v.get("passed"):
                state = f"passed, {v['latency_ms']:.3g} ms, max |err| {v['max_abs_err']:.3g}"
            else:
                state = ("FAILED: " if v.get("tried") else "not tried: ") + str(v.get("error", "not measured"))
            if v.get("demoted"):
                state += f"; DEMOTED: {v['demoted']}"
            lines.append(f"  {v['id']:<16} {v['backend']:<12} {v['precision']:<5} {state}")
            if v.get("passed") and v.get("proof"):
                lines.append(f"  {'':<16} accuracy: {v['proof']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="Exam-room inference agent.")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", type=Path, help="TOML file (default: embedded defaults)")
    run.set_defaults(func=cmd_run)

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = cfg_sub.add_parser("check", help="validate a configuration; names the offending key")
    check.add_argument("--config", type=Path)
    check.add_argument("--show", action="store_true", help="print the effective configuration")
    check.set_defaults(func=cmd_config_check)

    send = sub.add_parser("send", help="send DICOM files/folders with C-STORE")
    send.add_argument("paths", nargs="+")
    send.add_argument("--to", type=_host_port, required=True, metavar="HOST:PORT")
    send.add_argument("--aet", default="EDGE_SCU", help="our (calling) AE title")
    send.add_argument("--aec", default="EDGE_AGENT", help="their (called) AE title")
    send.add_argument("--timeout", type=float, default=30.0)
    send.set_defaults(func=cmd_send)

    res = sub.add_parser("results", help="subscribe to result messages and pretty-print them")
    res.add_argument("--config", type=Path)
    res.add_argument("--follow", "-f", action="store_true", help="keep printing until interrupted")
    res.add_argument("--count", type=int, default=0, help="exit after this many results")
    res.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    res.add_argument("--host")
    res.add_argument("--port", type=int)
    res.add_argument("--device", help="device id (default: all devices)")
    res.add_argument("--protocol", choices=["5", "3.1.1"])
    res.add_argument("--raw", action="store_true", help="print the JSON payloads as received")
    res.set_defaults(func=cmd_results)

    pull = sub.add_parser("pull", help="pull, self-test and activate the latest models from the registry now")
    pull.add_argument("--config", type=Path, help="TOML file with a [registry] section")
    pull.add_argument("--model", action="append", default=[],
                      help="model to update (repeatable; default: registry.models, or all in the index)")
    pull.set_defaults(func=cmd_pull)

    models = sub.add_parser("models", help="installed models, every variant's self-test and timing here, "
                            "the active one and why")
    models.add_argument("--config", type=Path)
    models.add_argument("--json", action="store_true", help="print JSON (docs/engines.md)")
    models.set_defaults(func=cmd_models)

    from agent.registry.probe import add_parser as add_probe_parser

    add_probe_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgeAgentError as exc:
        print(f"edge-agent {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
