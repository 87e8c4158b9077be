"""How long a device takes to pull and activate a model version, the device accuracy gate included.

Pulls ``--model`` from a registry built by ``edge-deploy build`` into a fresh state folder, the way
``edge-agent pull`` does (signature and digests checked, every compatible variant self-tested and
timed round robin in the inference worker, variants not proven on this CPU's instruction-set
family gated on the manifest's validation set), and reports the wall time of the whole pull and of
each device-gate run, with this machine's CPU and family.

``--unproven KEY`` first copies the registry and removes every per-family verdict from the chosen
version's manifest (re-signed with KEY, the registry's signing key), so that every quantized variant
is gated on this device: the worst case, as for a device of a family the build host could not
prove. Example (figures in docs/benchmarks.md)::

    .venv/bin/edge-deploy build models/mr-brain-cls --key keys/signing.key --out /tmp/reg --skip-bench
    .venv/bin/python bench/activation.py --registry /tmp/reg --pub keys/signing.pub --model mr-brain-cls
    .venv/bin/python bench/activation.py --registry /tmp/reg --pub keys/signing.pub --model mr-brain-cls \
        --unproven keys/signing.key
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def strip_verdicts(registry: Path, model: str, key: Path) -> None:
    """Remove every variant's ``isa_gates`` from the latest version of ``model`` and re-sign."""
    from agent.core.manifest import canonical_json
    from agent.core.util import sha256_bytes
    from deploy.publish import update_index
    from deploy.sign import load_private_key, public_pem, sign

    index = json.loads((registry / "index.json").read_text())
    version = index["models"][model]["latest"]
    vdir = registry / model / version
    doc = json.loads((vdir / "manifest.json").read_text())
    for v in doc["variants"]:
        v["isa_gates"] = {}
    private = load_private_key(key)
    raw = canonical_json(doc)
    (vdir / "manifest.json").write_bytes(raw)
    (vdir / "manifest.json.sig").write_bytes(sign(private, raw))
    update_index(registry, private, public_pem(private), model, version, sha256_bytes(raw), doc["created_at"],
                 [v["id"] for v in doc["variants"]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", type=Path, required=True)
    ap.add_argument("--pub", type=Path, required=True, help="the registry's public key")
    ap.add_argument("--model", default="mr-brain-cls")
    ap.add_argument("--unproven", type=Path, default=None, metavar="KEY",
                    help="strip the per-family verdicts (re-signed with KEY) so every variant is gated here")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from agent.core.config import Config
    from agent.core.types import Event
    from agent.updates.store import ModelStore
    from agent.updates.updater import updater_from_config
    from agent.variants import VariantManager

    with tempfile.TemporaryDirectory(prefix="activation-bench-") as tmp:
        registry = args.registry
        if args.unproven is not None:
            registry = Path(tmp) / "registry"
            shutil.copytree(args.registry, registry)
            strip_verdicts(registry, args.model, args.unproven)
        state = Path(tmp) / "state"
        cfg = Config.model_validate({
            "storage": {"dir": str(state)}, "models": {"dir": str(Path(tmp) / "none")},
            "pipeline": {"threads": args.threads},
            "registry": {"url": registry.resolve().as_uri(), "public_key": [str(args.pub)],
                         "models": [args.model], "poll_interval_s": 0}})
        events: list[Event] = []
        engines = VariantManager(cfg, ModelStore(state), cfg.db_path, on_event=events.append)
        probe = engines.probe
        try:
            t0 = time.perf_counter()
            updater = updater_from_config(cfg, engines.activate, on_event=events.append, probe=probe)
            outcomes = updater.pull_now([args.model])
            total = time.perf_counter() - t0
            models = engines.describe()
        finally:
            engines.close()
    print(f"host: {probe.cpu.model}, {probe.cpu.usable_cores} cores, family {probe.cpu.isa_family}, "
          f"features [{' '.join(probe.cpu.features)}]")
    for o in outcomes:
        print(f"{o.model} {o.version}: {'activated ' + o.variant if o.ok else 'FAILED ' + o.error}")
    print(f"pull + activation: {total:.1f} s wall ({'every variant gated here' if args.unproven else 'as published'})")
    gates: list[dict[str, Any]] = [e.fields for e in events if e.kind == "engine.device_gate"]
    for g in gates:
        print(f"  device gate {g['variant']}: {'passed' if g['passed'] else 'REFUSED'} in {g['seconds']:.1f} s: "
              f"{g['result']}")
    if not gates:
        print("  no variant needed the device gate")
    for m in models:
        active = m.get("active") or {}
        print(f"chosen: {active.get('variant')} ({active.get('reason')})")
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
