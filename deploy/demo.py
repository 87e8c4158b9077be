"""``make demo``: the whole agent end to end on its embedded defaults, in one process tree.

1. Builds a small signed registry of mr-brain-cls with the real toolkit (``edge-deploy build``:
   calibrate, quantize the INT8 variants for each instruction-set family, gate them against FP32,
   sign) into ``var/demo-registry``, about a minute on 2 cores; later runs reuse it while the model
   is unchanged (delete the folder, or pass ``--rebuild``, to regenerate it).
2. Pulls it as a device does: prints this machine's probe, then every variant tried here with its
   self-test verdict, measured latency and how its accuracy on this CPU is known (the publisher's
   gate, or the device's own gate on the signed validation set), the chosen variant and why, and
   its speed-up over FP32 measured here.
3. Generates a synthetic CT series and a synthetic brain MR slice, starts the agent (DICOM
   listener, assembler, inference worker, MQTT publisher) on loopback ports, pushes both series over
   DICOM C-STORE, prints both result messages as received from the broker (the MR one from the
   chosen variant, the CT one from the FP32 model in ``models/``), compares them with the
   phantoms' truth, and exits. Uses the broker on 127.0.0.1:1883 when one answers, else an
   embedded pure-Python broker (amqtt, MQTT 3.1.1) on a free loopback port.

This lives in ``deploy`` (which may import ``agent``) because it needs the phantom generator.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the agent is imported by the demo's steps, not when the module loads
    from agent.core.status import ModelStatus

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


#: the registry's model and what the demo builds of it: FP32, INT8 for VNNI CPUs (u8s8), INT8 for
#: AVX2 CPUs without VNNI (7-bit weights), OpenVINO INT8 and FP32; ARM/GPU variants need other hardware
DEMO_MODEL = "mr-brain-cls"
DEMO_VARIANTS = "fp32,ort-int8-u8s8,ort-int8-u8s8-rr,ov-int8,ov-fp32"
DEMO_BUILD = ["--samples", "64", "--val-n", "240", "--skip-bench", "--variants", DEMO_VARIANTS]


def demo_registry(root: Path, models_dir: Path, rebuild: bool = False) -> tuple[Path, Path]:
    """A signed registry of :data:`DEMO_MODEL` under ``root`` (registry folder, public key), built
    with ``edge-deploy build`` unless one built from the same model files and settings is there."""
    from agent.core.util import sha256_file
    from deploy.cli import main as deploy_main

    model = models_dir / DEMO_MODEL
    stamp = " ".join([sha256_file(model / "model.onnx"), sha256_file(model / "model.toml"), *DEMO_BUILD])
    registry, pub = root / "registry", root / "keys" / "signing.pub"
    if not rebuild and (root / "stamp").is_file() and (root / "stamp").read_text() == stamp:
        _say(f"reusing the demo registry in {root} (built earlier from the same model; --rebuild to redo it)")
        return registry, pub
    shutil.rmtree(root, ignore_errors=True)
    _say(f"building a signed registry of {DEMO_MODEL} with edge-deploy (calibrate, quantize, gate, sign) "
         f"into {root}: about a minute")
    t0 = time.monotonic()
    if deploy_main(["keygen", "--out", str(root / "keys")]) != 0:
        raise RuntimeError("edge-deploy keygen failed")
    rc = deploy_main(["build", str(model), "--key", str(root / "keys" / "signing.key"), "--out", str(registry),
                      "--build", str(root / "build"), *DEMO_BUILD])
    if rc != 0:
        raise RuntimeError(f"edge-deploy build exited {rc}")
    (root / "stamp").write_text(stamp)
    _say(f"registry built in {time.monotonic() - t0:.0f}s")
    return registry, pub


def pull_and_explain(cfg: Any) -> None:
    """Pull the registry as a device does and print what was chosen here and why."""
    from agent.cli import render_models
    from agent.core.isa import describe_family
    from agent.updates.store import ModelStore
    from agent.updates.updater import updater_from_config
    from agent.variants import VariantManager

    engines = VariantManager(cfg, ModelStore(cfg.storage.dir), cfg.db_path, on_event=lambda ev: None)
    try:
        p = engines.probe
        backends = ", ".join(f"{b.name} {b.version}" for b in p.backends if b.installed and not b.error)
        _say(f"this device: {p.cpu.model}, {p.cpu.usable_cores} cores, {p.cpu.arch}, "
             f"features [{' '.join(p.cpu.features) or '-'}]")
        _say(f"  instruction-set family {p.cpu.isa_family}: {describe_family(p.cpu.isa_family)}")
        _say(f"  GPU: {', '.join(g.name for g in p.nvidia.gpus) or 'none'}; backends: {backends}")
        _say("pulling: verify signatures and digests, self-test and time every variant this CPU can run, "
             "gate the ones not proven on this family")
        t0 = time.monotonic()
        updater = updater_from_config(cfg, engines.activate, on_event=lambda ev: None, probe=engines.probe)
        outcomes = updater.pull_now([DEMO_MODEL])
        for o in outcomes:
            if not o.ok:
                raise RuntimeError(f"{o.model}: not activated ({o.stage}): {o.error}")
        _say(f"pulled and activated in {time.monotonic() - t0:.0f}s\n")
        models = [m for m in engines.describe() if m.name == DEMO_MODEL]
        print(render_models(models))
        print(_speedup(models[0]) + "\n", flush=True)
    finally:
        engines.close()


def _speedup(model: ModelStatus) -> str:
    rows = {v.id: v for v in model.variants}
    active = model.active.variant if model.active is not None else None
    chosen, fp32 = rows.get(active or ""), rows.get("fp32")
    chosen_ms = chosen.trial.latency_ms if chosen is not None and chosen.trial is not None else None
    fp32_ms = fp32.trial.latency_ms if fp32 is not None and fp32.trial is not None else None
    if chosen is None or not chosen_ms or not fp32_ms:
        return f"chosen: {active or 'none'} (no FP32 timing to compare with)"
    return (f"chosen: {active} ({chosen.backend} {chosen.precision}), {chosen_ms:.3g} ms per slice "
            f"vs FP32 {fp32_ms:.3g} ms: {fp32_ms / chosen_ms:.2f}x faster "
            "on this machine")


def run_demo(state_dir: Path, timeout_s: float = 600.0, seed: int = 2026,
             models_dir: Path = REPO / "models", registry_dir: Path = REPO / "var" / "demo-registry",
             rebuild: bool = False) -> int:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.cli.follow import format_result
    from agent.core.config import Config
    from agent.core.log import setup_logging
    from agent.ingest.scu import send_files
    from agent.mqtt.payloads import parse_drift, parse_result
    from agent.service import Service
    from deploy.demo_broker import EmbeddedBroker, broker_reachable
    from deploy.synth import make_ct_phantom, make_mr_slice, write_ct_series, write_mr_series

    setup_logging("WARNING")
    shutil.rmtree(state_dir, ignore_errors=True)
    inputs = state_dir / "input"

    broker: EmbeddedBroker | None = None
    port, protocol = 1883, "5"
    if broker_reachable("127.0.0.1", 1883, timeout=1.0):
        _say("using the MQTT broker on 127.0.0.1:1883")
    else:
        port, protocol = _free_port(), "3.1.1"  # amqtt speaks MQTT 3.1.1 only
        broker = EmbeddedBroker("127.0.0.1", port)
        broker.start()
        _say(f"no broker on 127.0.0.1:1883; started an embedded one on 127.0.0.1:{port}")

    registry, pub = demo_registry(registry_dir, models_dir, rebuild)
    device_id = f"demo-{int(time.time())}"
    cfg = Config.model_validate({
        "device_id": device_id,
        "dicom": {"port": 0, "bind": "127.0.0.1"},
        "mqtt": {"port": port, "protocol": protocol},
        "storage": {"dir": str(state_dir / "state"), "min_free_mb": 100},
        "pipeline": {"stable_age_s": 1.0},
        "models": {"dir": str(models_dir)},
        "registry": {"url": registry.resolve().as_uri(), "public_key": [str(pub)], "models": [DEMO_MODEL],
                     "poll_interval_s": 0},
        # a short window so the demo reaches a verdict in a few dozen slices (default 50 / 20)
        "drift": {"window": 20, "min_series": 10, "min_publish_interval_s": 0},
    })
    pull_and_explain(cfg)

    _say("generating a synthetic abdominal CT series and a brain MR slice")
    ct = make_ct_phantom(seed, size=256)
    ct_dir = write_ct_series(ct, inputs / "ct")
    mr = make_mr_slice(seed, difficulty="obvious")
    mr_dir = write_mr_series(mr, inputs / "mr")
    truth = {ct.truth["series_uid"]: ct.truth, mr.truth["series_uid"]: mr.truth}

    received: list[dict[str, Any]] = []
    got_all = threading.Event()
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2,
                         protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)

    drift: list[dict[str, Any]] = []

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.topic.endswith("/drift"):
            drift.append(parse_drift(msg.payload))
            return
        received.append(parse_result(msg.payload))
        if len(received) >= 2:
            got_all.set()

    client.on_message = on_message
    client.on_subscribe = lambda *a, **k: subscribed.set()
    client.on_connect = lambda c, *a, **k: c.subscribe([(f"edge/{device_id}/results", 1),
                                                        (f"edge/{device_id}/drift", 1)])
    client.connect("127.0.0.1", port)
    client.loop_start()

    service = Service(cfg)
    rc = 1
    try:
        if not subscribed.wait(10):
            raise RuntimeError("could not subscribe to the results topic")
        service.start()
        _say(f"agent listening for DICOM on 127.0.0.1:{service.dicom_port} (AE EDGE_AGENT)")
        dicom_files = sorted(ct_dir.glob("*.dcm")) + sorted(mr_dir.glob("*.dcm"))  # not truth.json etc.
        report = send_files(dicom_files, "127.0.0.1", service.dicom_port,
                            calling_aet="DEMO_SCU", called_aet="EDGE_AGENT")
        _say(f"sent {report.sent} instance(s) over C-STORE ({report.failed} failed); waiting for results")
        t0 = time.monotonic()
        if not got_all.wait(timeout_s):
            _say(f"timed out after {timeout_s:.0f}s with {len(received)} of 2 results")
            return 1
        _say(f"both results received over MQTT in {time.monotonic() - t0:.1f}s\n")
        for doc in received:
            print(format_result(doc))
            print(_compare(doc, truth.get(doc["series_uid"], {})))
            print()
        rc = 0 if _drift_demo(service.dicom_port, inputs, drift, seed, send_files) else 1
    finally:
        service.stop()
        client.loop_stop()
        client.disconnect()
        if broker is not None:
            broker.stop()
    return rc


def _drift_demo(port: int, inputs: Path, drift: list[dict[str, Any]], seed: int, send: Any) -> bool:
    """Drift on the MR model: slices like its reference, then slices with three times the noise."""
    from deploy.synth import make_mr_slice, write_mr_series

    def batch(name: str, seeds: range, **knobs: Any) -> dict[str, Any] | None:
        folders = [write_mr_series(make_mr_slice(s, **knobs), inputs / f"{name}-{s}") for s in seeds]
        want = len([d for d in drift if d["model"] == DEMO_MODEL]) + len(folders)
        send([f for d in folders for f in sorted(d.glob("*.dcm"))], "127.0.0.1", port,
             calling_aet="DEMO_SCU", called_aet="EDGE_AGENT")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len([d for d in drift if d["model"] == DEMO_MODEL]) < want:
            time.sleep(0.2)
        mine = [d for d in drift if d["model"] == DEMO_MODEL]
        return mine[-1] if mine else None

    def show(doc: dict[str, Any] | None) -> None:
        if doc is None:
            print("  drift: no message received")
            return
        why = f" ({', '.join(doc['responsible'])})" if doc.get("responsible") else ""
        print(f"  drift of {doc['model']} {doc['version']}: {doc['state']}{why}, phase {doc['phase']}, "
              f"{doc['window']['series']} series in the window")

    _say("drift: 15 more MR slices like the model's reference (window 20, verdict from 10)")
    calm = batch("mr-calm", range(seed + 1000, seed + 1015))
    show(calm)
    _say("drift: 6 MR slices with three times the noise (a failing coil, a different protocol)")
    noisy = batch("mr-noisy", range(seed + 2000, seed + 2006), noise=3.0)
    show(noisy)
    print()
    return calm is not None and noisy is not None


def _compare(doc: dict[str, Any], truth: dict[str, Any]) -> str:
    if not truth:
        return "  (no truth for this series)"
    if doc["task"] == "classification":
        ok = "correct" if doc["outputs"]["label"] == truth["class"] else "WRONG"
        return f"  truth: {truth['class']} ({truth['difficulty']}) -> prediction {ok}"
    lines = ["  truth vs prediction (mL):"]
    for name, t in truth["labels"].items():
        pred = doc["outputs"]["labels"].get(name, {}).get("volume_ml", 0.0)
        err = 100.0 * (pred - t["volume_ml"]) / t["volume_ml"]
        lines.append(f"    {name:<13} truth {t['volume_ml']:8.1f}  predicted {pred:8.1f}  ({err:+.1f}%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", type=Path, default=REPO / "var" / "demo")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--registry-dir", type=Path, default=REPO / "var" / "demo-registry",
                    help="where the demo registry is built and kept between runs")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the demo registry even if one is there")
    args = ap.parse_args(argv)
    return run_demo(args.state_dir, args.timeout, args.seed, args.models_dir, args.registry_dir, args.rebuild)


if __name__ == "__main__":
    sys.exit(main())
