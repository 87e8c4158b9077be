"""The export thread: results back to the PACS as DICOM SEG and SR (agent/export, docs/export.md).

Runs after results are committed and never holds up the job thread: the job thread only writes the
export rows in the result's transaction (``ExportQueue.enqueue``) and wakes this loop. Each step
takes the next due item of the queue (``state.db``), builds the result's objects once (highdicom,
from the spooled source headers and the worker's label map; written under
``{storage.dir}/export/objects/``, so retries and a restart send the same bytes), sends one object
to its destination (C-STORE) and records the outcome:

* success or a storage warning -> ``delivered``, ``export.delivered`` with the object's UIDs;
* a failure status or no association -> back in the queue with exponential backoff and jitter;
  after the destination's ``max_attempts`` -> ``dead``, ``export.dead_lettered``;
* an object that cannot be built -> ``refused``, ``export.refused`` (never silent);
* a destination no longer configured -> ``dead`` at once.

When no item of a result is queued any more, its built files and label map are deleted. The
service runs ``step`` supervised (supervisor.py, not critical: exports wait, the data path goes on);
a database fault raises and is retried, and an item whose outcome was not recorded is sent again
(the same SOP Instance UID: the PACS stores it once).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

from agent.core.config import Config
from agent.core.errors import STORED_STATUSES
from agent.core.events import ExportDeadLettered, ExportDelivered, ExportRefused
from agent.core.export_config import ExportDestination
from agent.core.log import log_event
from agent.core.types import Event
from agent.core.util import unlink_quietly
from agent.export import ExportRequest, ObjectRefusedError, build_objects, write_object
from agent.export.queue import QUEUED, ExportItem, ExportQueue
from agent.export.sender import SendError, store
from agent.service.export_hook import export_dir

log = logging.getLogger(__name__)

Store = Callable[[ExportDestination, str, Path], int]


class ExportLoop:
    def __init__(self, cfg: Config, queue: ExportQueue, on_event: Callable[[Event], None],
                 send: Store = store) -> None:
        self.cfg = cfg
        self.queue = queue
        self.on_event = on_event
        self.send = send
        self.destinations = {d.name: d for d in cfg.export}
        self.objects_dir = export_dir(cfg) / "objects"
        self.wake = threading.Event()  # set by the job thread after it committed a result with exports
        self._swept = False

    def step(self) -> float:
        if not self._swept:
            self._sweep()
            self._swept = True
        item = self.queue.next_due()
        if item is None:
            wait = self.queue.seconds_to_next()
            self.wake.wait(1.0 if wait is None else min(max(wait, 0.05), 1.0))
            self.wake.clear()
            return 0.0
        self._export(item)
        return 0.0

    def _export(self, item: ExportItem) -> None:
        dest = self.destinations.get(item.destination)
        req = self.queue.request(item.result_key)
        if dest is None or req is None:
            why = "destination no longer configured" if dest is None else "result record missing"
            self.queue.failed(item, why, max_attempts=1, initial_s=1, max_s=1)
            self._dead(item, item.attempts + 1, why)
            return
        path = self._built(item, req)
        if path is None:
            return
        header = pydicom.dcmread(path, stop_before_pixels=True)
        t0 = time.monotonic()
        try:
            status: int | None = self.send(dest, dest.calling_ae or self.cfg.dicom.ae_title, path)
            error = "" if status in STORED_STATUSES else f"C-STORE status 0x{status:04X}"
        except (SendError, OSError) as exc:
            status, error = None, str(exc)
        ms = round((time.monotonic() - t0) * 1000, 1)
        if not error:
            assert status is not None
            self.queue.delivered(item, status)
            log_event(log, "export.delivered", result_id=item.result_id, revision=item.revision,
                      destination=item.destination, object=item.object, status=status, ms=ms)
            self.on_event(ExportDelivered(
                result_id=item.result_id, revision=item.revision, destination=item.destination, object=item.object,
                study_uid=str(header.StudyInstanceUID), series_uid=str(header.SeriesInstanceUID),
                sop_instance_uid=str(header.SOPInstanceUID), sop_class_uid=str(header.SOPClassUID), status=status,
                attempts=item.attempts + 1).to_event())
        else:
            state = self.queue.failed(item, error, max_attempts=dest.max_attempts, initial_s=dest.retry_initial_s,
                                      max_s=dest.retry_max_s, status=status)
            log_event(log, "export.attempt_failed", logging.WARNING, result_id=item.result_id,
                      destination=item.destination, object=item.object, attempts=item.attempts + 1, error=error,
                      next_state=state)
            if state != QUEUED:
                self._dead(item, item.attempts + 1, error)
        self._cleanup(item.result_key, req)

    def _dead(self, item: ExportItem, attempts: int, error: str) -> None:
        log_event(log, "export.dead_lettered", logging.ERROR, result_id=item.result_id, destination=item.destination,
                  object=item.object, attempts=attempts, error=error)
        self.on_event(ExportDeadLettered(result_id=item.result_id, revision=item.revision,
                                         destination=item.destination, object=item.object, attempts=attempts,
                                         error=error).to_event())

    def object_path(self, item: ExportItem, kind: str) -> Path:
        return self.objects_dir / f"{item.result_id}-{item.revision}-{kind}.dcm"

    def _built(self, item: ExportItem, req: ExportRequest) -> Path | None:
        """The item's object file, building every queued object of its result when it is missing;
        None when the result's objects cannot be built (refused, announced)."""
        path = self.object_path(item, item.object)
        if path.exists():
            return path
        pending = self.queue.items_of(item.result_key)
        kinds = sorted({i.object for i in pending} | {item.object})
        t0 = time.monotonic()
        try:
            objects = build_objects(req, kinds)
        except ObjectRefusedError as exc:
            self._refuse(item, pending, req, str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - a bug in building must be announced, not retried forever
            log.exception("export.build_crashed")
            self._refuse(item, pending, req, f"internal error: {type(exc).__name__}: {exc}")
            return None
        for kind, ds in objects.items():
            write_object(ds, self.object_path(item, kind))
        log_event(log, "export.built", result_id=item.result_id, revision=item.revision, objects=",".join(objects),
                  ms=round((time.monotonic() - t0) * 1000, 1))
        return path

    def _refuse(self, item: ExportItem, pending: list[ExportItem], req: ExportRequest, reason: str) -> None:
        items = pending or [item]
        self.queue.refused(items, reason)
        log_event(log, "export.refused", logging.ERROR, result_id=item.result_id, revision=item.revision,
                  reason=reason)
        for kind in sorted({i.object for i in items}):
            self.on_event(ExportRefused(result_id=item.result_id, revision=item.revision, object=kind,
                                        reason=reason).to_event())
        self._cleanup(item.result_key, req)

    def _cleanup(self, key: str, req: ExportRequest) -> None:
        """Delete a result's files once none of its items is queued any more."""
        if self.queue.items_of(key):
            return
        for kind in ("seg", "sr"):
            unlink_quietly(self.objects_dir / f"{req.result_id}-{req.revision}-{kind}.dcm")
        if req.label_map and req.label_map not in self.queue.label_maps_in_use():
            unlink_quietly(Path(req.label_map))

    def _sweep(self) -> None:
        """At start: delete label maps and objects no queued item needs (a job that failed after
        its worker wrote the map, files of results finished before a crash)."""
        keep_maps = self.queue.label_maps_in_use()
        keep = {f"{k.replace(':', '-')}-" for k in self.queue.open_results()}
        maps = export_dir(self.cfg) / "labelmaps"
        removed = 0
        for p in maps.glob("*.npz") if maps.is_dir() else ():
            if str(p) not in keep_maps and time.time() - p.stat().st_mtime > 3600:
                unlink_quietly(p)
                removed += 1
        for p in self.objects_dir.glob("*.dcm") if self.objects_dir.is_dir() else ():
            if not any(p.name.startswith(k) for k in keep):
                unlink_quietly(p)
                removed += 1
        if removed:
            log_event(log, "export.swept", files=removed)
