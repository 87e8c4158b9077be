"""Crash recovery: rebuild the spool's state from its files (``Spool.reconcile()``, at start-up).

Takes the spool's layout, pool and journal; moves recoverable pool files into place, journals
spooled files the journal lacks, and returns how many rows it added.

After a crash an acknowledged instance is in exactly one of two places (a rename is atomic on a
journaling filesystem): still in the pool (the rename was not yet on disk), or in place with its
row possibly lost with the unsynced WAL tail. So:

(a) a pool file whose commit mark verifies was acknowledged, or about to be: it is moved into
    place; one whose mark is missing or does not match was never acknowledged and is dropped
    (the peer got no Success and sends it again);
(b) a spooled file without a row is journaled: it is the peer's data, so it is indexed, not deleted;
(c) empty pool files stay for reuse;
(d) the directories changed are fsynced once at the end.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agent.core import util
from agent.core.errors import MalformedDicomError
from agent.core.log import log_event
from agent.ingest.spool.files import SpoolLayout, makedirs_durable, remove_quietly
from agent.ingest.spool.header import Header, read_header
from agent.ingest.spool.journal import Journal
from agent.ingest.spool.pool import Pool, verify_mark_file

__all__ = ["reconcile"]

logger = logging.getLogger("agent.ingest.spool")


def reconcile(layout: SpoolLayout, pool: Pool, journal: Journal) -> int:
    """Steps (a) to (d) of the module docstring; returns how many rows were added."""
    touched: set[Path] = set()
    moved, dropped = _recover_pool(layout, pool, journal, touched)
    added = _journal_orphans(layout, journal)
    if touched:
        for d in sorted(touched):
            util.fsync_dir(d)
        util.fsync_dir(layout.pool_dir)
    pool.try_refill()
    if moved or dropped:
        log_event(logger, "spool.pool_recovered", logging.WARNING, moved=moved, dropped=dropped)
    if added:
        log_event(logger, "spool.reconciled", logging.WARNING, added=added)
    return added


def _recover_pool(layout: SpoolLayout, pool: Pool, journal: Journal, touched: set[Path]) -> tuple[int, int]:
    """Steps (a) and (c): returns (moved into place, dropped); adds the directories changed to ``touched``."""
    moved = dropped = 0
    skip = pool.known()
    for p in sorted(layout.pool_dir.iterdir()):
        if p in skip or not p.is_file():
            continue
        header: Header | None = None
        try:
            if p.stat().st_size == 0:
                pool.adopt(p)  # (c) empty: reuse it
                continue
            if verify_mark_file(p):
                header = read_header(p)
        except OSError as exc:
            log_event(logger, "reconcile.skipped", logging.WARNING, file=p.name, reason=exc.strerror)
            continue
        except MalformedDicomError as exc:
            # a malformed instance: answered 0xC210 and quarantined (or never answered)
            log_event(logger, "reconcile.pool_dropped", logging.WARNING, file=p.name, reason=str(exc))
        if header is None:
            # torn or unfinished write: never acknowledged, the peer sends it again
            remove_quietly(p)
            dropped += 1
            continue
        final = layout.final_path(header)
        with journal.lock:  # directory changes are serialised with retention's rmdir
            if final.exists():
                # a complete copy of the same instance is already in place (a duplicate's)
                remove_quietly(p)
                dropped += 1
                continue
            makedirs_durable(final.parent, stop_at=layout.root)
            os.replace(p, final)
        touched.add(final.parent)
        moved += 1
    return moved, dropped


def _journal_orphans(layout: SpoolLayout, journal: Journal) -> int:
    """Step (b): journal every spooled file without a row; returns how many were added."""
    added = 0
    known = journal.known_paths()
    for path in layout.iter_spooled():
        if str(path) in known:
            continue
        try:
            if verify_mark_file(path) is False:
                # only verified pool files are ever placed: this one changed on disk since
                log_event(logger, "reconcile.skipped", logging.WARNING, file=path.name,
                          reason="commit mark does not match")
                continue
            header = read_header(path)
            st = path.stat()
        except OSError as exc:
            log_event(logger, "reconcile.skipped", logging.WARNING, file=path.name, reason=exc.strerror)
            continue
        except MalformedDicomError as exc:
            log_event(logger, "reconcile.skipped", logging.WARNING, file=path.name, reason=str(exc))
            continue
        instance = header.instance(path, st.st_size, "", st.st_mtime)
        with journal.lock:  # check and insert as one step: a store may journal the same UID meanwhile
            if journal.get(instance.sop_instance_uid) is None:
                journal.insert(instance)
                added += 1
    return added
