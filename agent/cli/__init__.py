"""``edge-agent``: run the daemon, check configuration, send DICOM, follow results, pull models now,
list the models with every variant as measured here (``models``), show what this device can run
(``probe``), watch the whole fleet (``fleet``, agent/cli/fleet.py), install the agent as a systemd
service (``install``, agent/cli/install.py).

``main(argv)`` takes the command line and returns the exit code. The CLI is the outermost edge: it
turns domain errors into one clear line on stderr and an exit code (2 for bad input/config, 1 for a
failed operation), never a traceback. ``render_models`` (agent.core.status.ModelStatus records) and
``render_probe`` (agent.device.probe.Probe) are the text for people; ``--json`` prints the documented
JSON forms (``ModelStatus.to_json()``, ``Probe.to_json()``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent import __version__
from agent.core.config import Config, load_config
from agent.core.errors import EdgeAgentError
from agent.core.isa import describe_family
from agent.core.status import ModelStatus

if TYPE_CHECKING:
    from agent.device.probe import Probe


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.core.log import setup_logging
    from agent.core.util import set_private_umask
    from agent.service import Service

    set_private_umask()  # spool, quarantine, database, outbox, models: the agent's user's only
    cfg = load_config(args.config)
    setup_logging(cfg.logging.level, cfg.logging.format)
    service = Service(cfg, config_path=args.config)  # re-read on SIGHUP (docs/lifecycle.md)
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
    from agent.cli.follow import follow_results

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
    from agent.core.log import setup_logging
    from agent.core.util import set_private_umask
    from agent.updates.store import ModelStore
    from agent.updates.updater import updater_from_config
    from agent.variants import VariantManager  # imported here: it loads inference backends

    set_private_umask()  # writes the agent's state (models, database) like the daemon does
    cfg = load_config(args.config)
    setup_logging(cfg.logging.level, cfg.logging.format)
    cfg.storage.dir.mkdir(parents=True, exist_ok=True)
    engines = VariantManager(cfg, ModelStore(cfg.storage.dir), cfg.db_path, on_event=lambda ev: None)
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
    from agent.updates.store import ModelStore
    from agent.variants import VariantManager

    cfg = load_config(args.config)
    engines = VariantManager(cfg, ModelStore(cfg.storage.dir), cfg.db_path, on_event=lambda _event: None)
    try:
        models = engines.describe()
    finally:
        engines.close()
    if args.json:
        doc = {"schema": "edge-agent/models/1", "models": [m.to_json() for m in models]}
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(render_models(models))
    return 0


def render_models(models: Sequence[ModelStatus]) -> str:
    """``VariantManager.describe()`` for people: each model's active variant and why, then every
    variant with its self-test, latency and how its accuracy on this CPU is known."""
    if not models:
        return "no models: nothing installed from the registry and nothing in models.dir"
    lines: list[str] = []
    for m in models:
        a = m.active
        variant, backend, precision = (a.variant, a.backend, a.precision) if a is not None else (None, None, None)
        lines.append(f"{m.name} {m.version} ({m.source}): {variant or 'not active'}"
                     f" [{backend or '-'} {precision or '-'}]")
        # an unreadable registry version has no active variant, only the error
        lines.append(f"  why: {a.reason if a is not None else m.error if m.error is not None else '-'}")
        if m.previous:
            lines.append(f"  previous (rollback): {m.previous}")
        for v in m.variants:
            t = v.trial
            if t is not None and t.passed:
                state = f"passed, {t.latency_ms:.3g} ms, max |err| {t.max_abs_err:.3g}"
            else:
                state = ("FAILED: " if t is not None and t.tried else "not tried: ") + \
                    (t.error if t is not None else "not measured")
            if v.demoted:
                state += f"; DEMOTED: {v.demoted}"
            lines.append(f"  {v.id:<16} {v.backend:<12} {v.precision:<5} {state}")
            if t is not None and t.passed and t.proof:
                lines.append(f"  {'':<16} accuracy: {t.proof}")
    return "\n".join(lines)


def cmd_probe(args: argparse.Namespace) -> int:
    """``edge-agent probe [--json] [--quick]``: print the probe; exit 0."""
    from agent.device.probe import probe

    cfg = load_config(getattr(args, "config", None))
    result = probe(cfg.storage.dir, backend_details=not getattr(args, "quick", False))
    if getattr(args, "json", False):
        print(result.to_json(indent=2))
    else:
        print(render_probe(result))
    return 0


def render_probe(p: Probe) -> str:
    """The probe for people (``edge-agent probe``), one fact per line."""
    rows: list[tuple[str, str]] = [
        ("arch", p.cpu.arch),
        ("cpu", f"{p.cpu.model} ({p.cpu.logical_cores} logical, "
                f"{p.cpu.physical_cores if p.cpu.physical_cores is not None else '?'} physical, "
                f"{p.cpu.usable_cores} usable)"),
        ("cpu features", " ".join(p.cpu.features) or "-"),
        ("int8 path", p.cpu.int8_path),
        ("isa family", f"{p.cpu.isa_family} ({describe_family(p.cpu.isa_family)})"),
        ("bf16", "yes" if p.cpu.bf16 else "no"),
        ("memory", f"{p.memory.total_mb} MB total, {p.memory.available_mb} MB available"),
        ("disk", f"{p.disk.free_mb} MB free of {p.disk.total_mb} MB at {p.disk.path}"),
        ("os", f"{p.os.distro or p.os.system} {p.os.release}, Python {p.os.python}"),
    ]
    nv = p.nvidia
    if nv.jetson:
        rows.append(("jetson", f"{nv.jetson.model} ({nv.jetson.module}, L4T {nv.jetson.l4t or '?'})"))
    if nv.gpus:
        for g in nv.gpus:
            rows.append((f"gpu {g.index}", f"{g.name}, CC {g.compute_capability or '?'}, "
                         f"{g.memory_mb if g.memory_mb is not None else '?'} MB, "
                         f"int8 {'yes' if g.int8 else 'no'}, fp8 {'yes' if g.fp8 else 'no'}"))
        rows.append(("nvidia", f"driver {nv.driver_version or '?'}, CUDA {nv.cuda_version or '?'} "
                     f"(via {nv.source})"))
    else:
        rows.append(("gpu", f"none{f' ({nv.error})' if nv.error else ''}"))
    rows.append(("tensorrt", nv.tensorrt_version or "not installed"))
    for b in p.backends:
        if not b.installed:
            state = "not installed"
        else:
            state = b.version or "?"
            if b.devices:
                state += f" [{', '.join(b.devices)}]"
            if b.error:
                state += f" (unusable: {b.error})"
        rows.append((f"backend {b.name}", state))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


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

    probe = sub.add_parser("probe", help="show what this device can run (CPU features, GPUs, backends)")
    probe.add_argument("--config", type=Path, help="TOML file (its storage.dir is probed for free space)")
    probe.add_argument("--json", action="store_true", help="print the full probe as JSON (docs/probe.md)")
    probe.add_argument("--quick", action="store_true",
                       help="do not start a child interpreter to list backend providers/devices")
    probe.set_defaults(func=cmd_probe)

    from agent.cli.fleet import add_fleet_parser  # light: the MQTT client and rich load when it runs

    add_fleet_parser(sub)
    from agent.cli.install import add_install_parser

    add_install_parser(sub)
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
