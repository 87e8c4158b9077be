"""Results back to the PACS: DICOM SEG and TID 1500 SR built with highdicom, a durable export
queue in the state database, and a C-STORE sender (docs/export.md).

    request.py   ExportRequest (what the job thread records with the result), derived UIDs
    sources.py   the source headers, sorted as the volume builder sorts them; refusals
    seg.py       the Segmentation (BINARY, SNOMED CT codes, algorithm identification)
    sr.py        the Measurement Report (Comprehensive 3D SR, TID 1500)
    build.py     both objects of a result, from the worker's label map (agent/core/labelmap.py)
    plan.py      which destinations get which objects of which model ([[export]])
    queue.py     the export tables: one row per (result, destination, object), retries, dead letters
    sender.py    C-STORE (pynetdicom) to one destination; only success and storage warnings count

A stage: it imports the foundation only; the service wires it (job_loop.py enqueues in the
result's transaction, export_loop.py builds and sends).
"""

from agent.export.build import build_objects, load_label_map, write_object
from agent.export.request import ExportRequest, object_uids
from agent.export.sources import ObjectRefusedError

__all__ = ["ExportRequest", "ObjectRefusedError", "build_objects", "load_label_map", "object_uids",
           "write_object"]
