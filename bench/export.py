"""Time to build and send a result's SEG + SR (issue 15): the real model's label map on a 100-slice
CT series, highdicom building both objects, pynetdicom C-STORE to a real Orthanc on loopback.

    .venv/bin/python bench/export.py [--slices 100] [--size 512] [--rounds 5]

Prints one JSON line per phase (median of ``rounds``): read the source headers + build SEG + SR
(``build``), write both files (``write``), C-STORE both to Orthanc (``send``). Needs Debian's
``orthanc``. Not a test: it times things.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, free_port, machine_line, wait_port  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import pydicom

    from agent.core.export_config import ExportDestination
    from agent.core.labelmap import save_label_map
    from agent.core.modelspec import load_spec
    from agent.core.types import ModelRef
    from agent.export import ExportRequest, build_objects, write_object
    from agent.export.request import figures_of, not_for_diagnostic_use
    from agent.export.sender import store
    from agent.inference import catalog, pipeline
    from deploy.synth.ct import make_ct_phantom, write_ct_series

    orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = sorted(write_ct_series(make_ct_phantom(777_001, size=args.size, slices=args.slices,
                                                       slice_thickness=3.0), tmp / "ct").glob("*.dcm"))
        spec = load_spec(REPO / "models" / "ct-abdomen-seg")
        backend = catalog.create("onnxruntime")
        backend.load(REPO / "models" / "ct-abdomen-seg" / "model.onnx", precision="fp32", threads=2, options={})
        t0 = time.perf_counter()
        run = pipeline.run_model_detailed(paths, spec, backend, ModelRef(spec.name, spec.version))
        infer_s = time.perf_counter() - t0
        assert run.label_map is not None
        t0 = time.perf_counter()
        save_label_map(tmp / "lm.npz", run.label_map)
        keep_s = time.perf_counter() - t0
        figures, _, _ = figures_of(run.prediction.outputs)
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        req = ExportRequest(
            result_id="bench", revision=1, device_id="bench", model=spec.name, version=spec.version, variant="fp32",
            backend="onnxruntime", precision="fp32", task="segmentation", labels=spec.labels,
            study_uid=str(first.StudyInstanceUID), series_uid=str(first.SeriesInstanceUID),
            sources=tuple(map(str, paths)), created_at="", label_map=str(tmp / "lm.npz"), figures=figures,
            not_for_diagnostic_use=not_for_diagnostic_use(spec.description))
        http, dicom = free_port(), free_port()
        (tmp / "o.json").write_text(json.dumps({
            "StorageDirectory": str(tmp / "odb"), "IndexDirectory": str(tmp / "odb"), "HttpPort": http,
            "DicomPort": dicom, "DicomAet": "PACS", "RemoteAccessAllowed": False, "OverwriteInstances": True,
            "Plugins": []}))
        proc = subprocess.Popen([orthanc, str(tmp / "o.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(dicom, proc=proc)
            dest = ExportDestination(name="bench", host="127.0.0.1", port=dicom, called_ae="PACS")
            phases: dict[str, list[float]] = {"build": [], "write": [], "send": []}
            sizes = {}
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                objs = build_objects(req, ["seg", "sr"])
                t1 = time.perf_counter()
                files = {k: write_object(ds, tmp / f"{k}.dcm") for k, ds in objs.items()}
                t2 = time.perf_counter()
                statuses = [store(dest, "EDGE_AGENT", f) for f in files.values()]
                t3 = time.perf_counter()
                assert statuses == [0, 0], statuses
                phases["build"].append(t1 - t0)
                phases["write"].append(t2 - t1)
                phases["send"].append(t3 - t2)
                sizes = {k: f.stat().st_size for k, f in files.items()}
        finally:
            proc.terminate()
            proc.wait(20)
    med = {k: round(statistics.median(v) * 1000, 1) for k, v in phases.items()}
    print(json.dumps({"bench": "export", "slices": len(paths), "matrix": args.size, "rounds": args.rounds,
                      "inference_s": round(infer_s, 2), "label_map_write_ms": round(keep_s * 1000, 1),
                      "median_ms": med, "total_ms": round(sum(med.values()), 1), "bytes": sizes,
                      "seg_frames": int(objs["seg"].NumberOfFrames), "machine": machine_line()}))


if __name__ == "__main__":
    main()
