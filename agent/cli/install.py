"""``edge-agent install``: put the agent on a device as a systemd service, idempotently.

``edge-agent install [--prefix /opt/edge-agent] [--root DIR] [--dry-run]`` creates the venv under
the prefix with the extras that fit the probed hardware (agent/cli/install_files.py), writes the
unit, the drop-ins that fit, the sysusers.d and tmpfiles.d files and a commented default
``/etc/edge-agent/agent.toml``, records what it wrote in ``<prefix>/install-manifest.json`` and
prints the next steps. Each file is reported ``created``, ``updated`` or ``unchanged``; a second run
changes nothing. An existing agent.toml is never overwritten (it is the operator's).

``--uninstall`` removes what the manifest lists (agent.toml only while it is as installed) and the
venv, and keeps the state (/var/lib/edge-agent, /var/cache/edge-agent, /etc/edge-agent) unless
``--purge``. ``--root DIR`` writes everything under DIR (for packaging and tests) while every path
inside the files still names the device's /opt and /etc: the venv's scripts are rewritten to say so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import __version__
from agent.cli.install_files import (
    CACHE_DIR,
    CONFIG_DIR,
    CONFIG_FILE,
    DEFAULT_PREFIX,
    STATE_DIR,
    SYSUSERS_FILE,
    TMPFILES_FILE,
    UNIT_NAME,
    HostFacts,
    InstallError,
    PlannedFile,
    plan_files,
    probe_host,
)
from agent.core.config import load_config

MANIFEST = "install-manifest.json"
MANIFEST_SCHEMA = "edge-agent/install/1"
NVIDIA_INDEX = "https://pypi.nvidia.com"  # docs/gpu.md: the tensorrt wheels come from NVIDIA's index
PIP_TIMEOUT_S = 3600.0
CHANGES = frozenset({"created", "updated", "removed"})


@dataclass
class Report:
    """What happened to each path, in order, for the person running the command."""

    root: Path
    dry_run: bool
    lines: list[tuple[str, Path]] = field(default_factory=list)

    def add(self, action: str, path: Path) -> None:
        self.lines.append((("would be " if self.dry_run and action != "unchanged" else "") + action, path))

    def changed(self) -> bool:
        return any(a.split()[-1] in CHANGES for a, _ in self.lines)

    def render(self) -> str:
        width = max((len(a) for a, _ in self.lines), default=0)
        return "\n".join(f"  {a.ljust(width)}  {p}" for a, p in self.lines)


def under(root: Path, path: Path) -> Path:
    """``path`` (absolute, as on the device) inside ``root``."""
    return root / path.relative_to("/")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_manifest(root: Path, prefix: Path) -> dict[str, Any] | None:
    p = under(root, prefix / MANIFEST)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InstallError(f"{p}: unreadable install manifest: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != MANIFEST_SCHEMA:
        raise InstallError(f"{p}: not an edge-agent install manifest ({MANIFEST_SCHEMA})")
    return doc


def _write_if_changed(report: Report, target: Path, shown: Path, content: bytes, mode: int) -> None:
    try:
        same = target.read_bytes() == content and (target.stat().st_mode & 0o7777) == mode
        action = "unchanged" if same else "updated"
    except FileNotFoundError:
        action = "created"
    report.add(action, shown)
    if action == "unchanged" or report.dry_run:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(content)
    tmp.chmod(mode)
    os.replace(tmp, target)


def install_files(report: Report, files: list[PlannedFile]) -> dict[str, str]:
    """Write each planned file under the root; the manifest entry is the installed content's hash."""
    recorded: dict[str, str] = {}
    for f in files:
        target = under(report.root, f.path)
        if f.keep_if_present and target.exists():
            report.add("unchanged" if target.read_bytes() == f.content else "kept (yours)", f.path)
            recorded[str(f.path)] = _sha256(f.content)
            continue
        _write_if_changed(report, target, f.path, f.content, f.mode)
        recorded[str(f.path)] = _sha256(f.content)
    return recorded


def default_source() -> str:
    """This checkout when running from one (pip builds it), else this version from the index."""
    here = Path(__file__).resolve().parents[2]
    pyproject = here / "pyproject.toml"
    if pyproject.is_file() and 'name = "edge-agent"' in pyproject.read_text():
        return str(here)
    return f"edge-agent=={__version__}"


def venv_request(facts: HostFacts, args: argparse.Namespace) -> dict[str, Any]:
    extras = list(facts.extras())
    pip_options = list(args.pip_option)
    if "gpu" in extras and not any(o.startswith(("--no-index", "--index-url", "--extra-index-url"))
                                   for o in pip_options):
        pip_options += ["--extra-index-url", NVIDIA_INDEX]
    return {"source": args.source or default_source(), "extras": extras, "packages": list(facts.extra_packages()),
            "version": __version__, "system_site_packages": bool(args.system_site_packages or facts.jetson),
            "pip_options": pip_options}


def hidden_interpreter(python: str) -> str | None:
    """The base interpreter a venv made with ``python`` runs, when ProtectHome=yes will hide it from
    the service (a pyenv or conda Python under /root or /home: the unit fails with 203/EXEC)."""
    try:
        out = subprocess.run([python, "-c", "import sys; print(getattr(sys, '_base_executable', sys.executable))"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    real = Path(out).resolve()
    return str(real) if real.parts[1:2] in (("root",), ("home",)) else None


def _run(argv: list[str], what: str) -> None:
    # the installer's own import path must not leak into the new venv's pip (it would see this
    # checkout's metadata as "already installed")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{what} failed: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise InstallError(f"{what} failed (exit {proc.returncode}):\n    " + "\n    ".join(tail))


def _relocate_scripts(bin_dir: Path, built_at: Path, runs_at: Path) -> None:
    """Scripts pip wrote (shebangs) and the activate scripts name the folder the venv was built in
    (under --root): make them name the device path instead."""
    old, new = str(built_at).encode(), str(runs_at).encode()
    for script in bin_dir.iterdir():
        if script.is_symlink() or not script.is_file() or script.stat().st_size > 1 << 20:
            continue
        data = script.read_bytes()
        if old in data:
            script.write_bytes(data.replace(old, new))


def install_venv(report: Report, prefix: Path, request: dict[str, Any], previous: dict[str, Any] | None,
                 python: str) -> None:
    venv = prefix / "venv"
    built = under(report.root, venv)
    entry = built / "bin" / "edge-agent"
    if previous == request and entry.is_file():
        report.add("unchanged", venv)
        return
    report.add("updated" if (built / "bin" / "python").exists() else "created", venv)
    if report.dry_run:
        return
    if not (built / "bin" / "python").exists():
        cmd = [python, "-m", "venv", *(["--system-site-packages"] if request["system_site_packages"] else [])]
        _run([*cmd, str(built)], f"creating the venv {venv}")
    spec = request["source"] + (f"[{','.join(request['extras'])}]" if request["extras"] else "")
    _run([str(built / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
          *request["pip_options"], spec, *request["packages"]], f"pip install {spec} into {venv}")
    if report.root != Path("/"):
        _relocate_scripts(built / "bin", built, venv)
    if not entry.is_file():
        raise InstallError(f"pip finished but {venv}/bin/edge-agent is missing")


def _dicom_port(root: Path) -> int:
    """The DICOM port of the device's configuration (agent.toml as installed or edited; else the default)."""
    path = under(root, CONFIG_FILE)
    return load_config(path if path.exists() else None, environ={}).dicom.port


def do_install(args: argparse.Namespace, facts: HostFacts) -> Report:
    root, prefix = args.root, args.prefix
    report = Report(root, args.dry_run)
    manifest = _read_manifest(root, prefix)
    request = venv_request(facts, args)
    if args.no_venv:
        report.add("skipped (--no-venv)", prefix / "venv")
    else:
        install_venv(report, prefix, request, (manifest or {}).get("venv"), args.python or sys.executable)
    files = plan_files(facts, prefix=prefix, dicom_port=_dicom_port(root))
    recorded = install_files(report, files)
    # a drop-in a previous install wrote that no longer fits (no GPU now, port moved above 1023)
    for old in sorted(set((manifest or {}).get("files", {})) - set(recorded)):
        _remove(report, Path(old))
    doc = {"schema": MANIFEST_SCHEMA, "prefix": str(prefix), "files": recorded,
           "venv": None if args.no_venv else request,
           "host": {"arch": facts.arch, "nvidia_driver": facts.nvidia_driver, "jetson": facts.jetson}}
    if args.no_venv and manifest is not None and manifest.get("venv") is not None:
        doc["venv"] = manifest["venv"]  # --no-venv leaves an existing venv (and its record) alone
    body = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    _write_if_changed(report, under(root, prefix / MANIFEST), prefix / MANIFEST, body, 0o644)
    return report


def _remove(report: Report, path: Path) -> None:
    target = under(report.root, path)
    if not target.exists() and not target.is_symlink():
        report.add("absent", path)
        return
    report.add("removed", path)
    if report.dry_run:
        return
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink()
    parent = target.parent
    if parent.name.endswith(".service.d") and not any(parent.iterdir()):
        parent.rmdir()  # the drop-in folder, unless it holds the operator's own (systemctl edit)


def do_uninstall(args: argparse.Namespace) -> Report:
    root, prefix = args.root, args.prefix
    report = Report(root, args.dry_run)
    manifest = _read_manifest(root, prefix)
    if manifest is None:
        raise InstallError(f"nothing to uninstall: no {prefix / MANIFEST} under {root}")
    for name, digest in sorted(manifest.get("files", {}).items()):
        path = Path(name)
        target = under(root, path)
        if path == CONFIG_FILE and not args.purge and target.is_file() \
                and _sha256(target.read_bytes()) != digest:
            report.add("kept (edited; --purge removes it)", path)
            continue
        _remove(report, path)
    _remove(report, prefix / "venv")
    _remove(report, prefix / MANIFEST)
    if not report.dry_run and under(root, prefix).is_dir() and not any(under(root, prefix).iterdir()):
        under(root, prefix).rmdir()
    for kept in (STATE_DIR, CACHE_DIR, CONFIG_DIR):
        if args.purge:
            _remove(report, kept)
        elif under(root, kept).exists():
            report.add("kept (--purge removes it)", kept)
    return report


def next_steps(report: Report, facts: HostFacts) -> list[str]:
    steps = [f"systemd-sysusers {SYSUSERS_FILE}", f"systemd-tmpfiles --create {TMPFILES_FILE}",
             f"edit {CONFIG_FILE} (device_id, [mqtt], dicom.allowed_callers), then: edge-agent config check "
             f"--config {CONFIG_FILE}",
             "systemctl daemon-reload", f"systemctl enable --now {UNIT_NAME}",
             f"systemctl status {UNIT_NAME}   # STATUS= line: listener, models, queue, broker",
             "journalctl -u edge-agent -f"]
    if facts.gpu:
        steps.append("edge-agent probe   # the GPU line and backend tensorrt without error")
    steps.append(f"a dicom.port below 1024 (104): set it in {CONFIG_FILE}, then run edge-agent install again")
    return steps


def cmd_install(args: argparse.Namespace) -> int:
    args.root = Path(args.root).resolve()
    args.prefix = Path(args.prefix)
    if not args.prefix.is_absolute():
        print("edge-agent install: error: --prefix must be an absolute path", file=sys.stderr)
        return 2
    if args.purge and not args.uninstall:
        print("edge-agent install: error: --purge goes with --uninstall", file=sys.stderr)
        return 2
    probed = probe_host()
    gpu = args.gpu if args.gpu != "auto" else "jetson" if probed.jetson else "nvidia" if probed.nvidia_driver else "none"
    facts = HostFacts(arch=args.arch or probed.arch, nvidia_driver=gpu == "nvidia", jetson=gpu == "jetson")
    try:
        report = do_uninstall(args) if args.uninstall else do_install(args, facts)
    except (InstallError, OSError) as exc:
        print(f"edge-agent install: error: {exc}", file=sys.stderr)
        return 1
    where = "" if args.root == Path("/") else f" under {args.root}"
    verb = "uninstall" if args.uninstall else "install"
    print(f"edge-agent {verb}{where} ({'dry run, nothing written' if args.dry_run else 'done'}):")
    print(report.render())
    if args.uninstall:
        print("the service user edge-agent stays (systemd never removes sysusers.d users); then: "
              "systemctl daemon-reload")
    elif not args.dry_run:
        hidden = None if args.no_venv else hidden_interpreter(args.python or sys.executable)
        if hidden:
            print(f"warning: the venv runs {hidden}, which ProtectHome=yes hides from the service "
                  "(203/EXEC): install with --python /usr/bin/python3", file=sys.stderr)
        print(f"host: {facts.arch}, NVIDIA driver {'yes' if facts.nvidia_driver else 'no'}, "
              f"Jetson {'yes' if facts.jetson else 'no'}; extras: {', '.join(facts.extras()) or 'none'}")
        print("next steps (as root):" if report.changed() else "nothing changed; if the service runs, nothing to do")
        if report.changed():
            print("\n".join(f"  {s}" for s in next_steps(report, facts)))
    return 0


def add_install_parser(sub: Any) -> None:
    p = sub.add_parser("install", help="install (or --uninstall) the agent as a systemd service")
    p.add_argument("--prefix", default=str(DEFAULT_PREFIX), help="where the venv goes (default: %(default)s)")
    p.add_argument("--root", default="/", help="write everything under this folder (packaging, tests)")
    p.add_argument("--uninstall", action="store_true", help="remove what install put there; state is kept")
    p.add_argument("--purge", action="store_true",
                   help="with --uninstall: also remove /var/lib/edge-agent, /var/cache/edge-agent, /etc/edge-agent")
    p.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    p.add_argument("--no-venv", action="store_true", help="leave the venv alone (files only)")
    p.add_argument("--source", help="what pip installs (default: this checkout, else edge-agent==VERSION)")
    p.add_argument("--pip-option", action="append", default=[], metavar="OPT",
                   help="passed to pip install (repeatable), e.g. --pip-option=--no-index "
                        "--pip-option=--find-links=/media/wheels")
    p.add_argument("--system-site-packages", action="store_true",
                   help="let the venv see the system's packages (always on a Jetson: JetPack's TensorRT)")
    p.add_argument("--python", help="interpreter the venv is made from (default: this one); it must not "
                   "live under /root or /home, which the unit hides (ProtectHome=yes)")
    p.add_argument("--arch", help="CPU architecture to install for (default: this machine's, e.g. x86_64)")
    p.add_argument("--gpu", choices=["auto", "nvidia", "jetson", "none"], default="auto",
                   help="GPU to install for (default auto: /proc/driver/nvidia/version, Jetson release files)")
    p.set_defaults(func=cmd_install)
