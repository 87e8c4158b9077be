"""``make demo``: the whole agent end to end on its embedded defaults, in one process tree.

Generates a synthetic CT series and a synthetic brain MR slice, starts the agent (DICOM listener,
assembler, inference worker, MQTT publisher) on loopback ports, pushes both series over DICOM
C-STORE, prints both result messages as received from the broker, compares them with the
phantoms' truth, and exits. Uses the broker on 127.0.0.1:1883 when one answers, else an embedded
pure-Python broker (amqtt, MQTT 3.1.1) on a free loopback port.

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
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


def run_demo(state_dir: Path, timeout_s: float = 600.0, seed: int = 2026,
             models_dir: Path = REPO / "models") -> int:
    import paho.mqtt.client as mqtt

    from agent.config import Config
    from agent.ingest.scu import send_files
    from agent.log import setup_logging
    from agent.publish.broker import EmbeddedBroker, broker_reachable
    from agent.publish.follow import format_result
    from agent.publish.payloads import parse_result
    from agent.service import Service
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

    device_id = f"demo-{int(time.time())}"
    cfg = Config.model_validate({
        "device_id": device_id,
        "dicom": {"port": 0, "bind": "127.0.0.1"},
        "mqtt": {"port": port, "protocol": protocol},
        "storage": {"dir": str(state_dir / "state"), "min_free_mb": 100},
        "pipeline": {"stable_age_s": 1.0},
        "models": {"dir": str(models_dir)},
    })

    _say("generating a synthetic abdominal CT series and a brain MR slice")
    ct = make_ct_phantom(seed, size=256)
    ct_dir = write_ct_series(ct, inputs / "ct")
    mr = make_mr_slice(seed, difficulty="obvious")
    mr_dir = write_mr_series(mr, inputs / "mr")
    truth = {ct.truth["series_uid"]: ct.truth, mr.truth["series_uid"]: mr.truth}

    received: list[dict[str, Any]] = []
    got_all = threading.Event()
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        received.append(parse_result(msg.payload))
        if len(received) >= 2:
            got_all.set()

    client.on_message = on_message
    client.on_subscribe = lambda *a, **k: subscribed.set()
    client.on_connect = lambda c, *a, **k: c.subscribe(f"edge/{device_id}/results", qos=1)
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
        rc = 0
    finally:
        service.stop()
        client.loop_stop()
        client.disconnect()
        if broker is not None:
            broker.stop()
    return rc


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
    args = ap.parse_args(argv)
    return run_demo(args.state_dir, args.timeout, args.seed, args.models_dir)


if __name__ == "__main__":
    sys.exit(main())
