"""Durable storage of received DICOM instances and their SQLite journal.

The listener hands the spool the bytes a peer sent (file meta and the data set exactly as encoded
on the wire); the spool makes them durable before anyone acknowledges them. The guarantee: when
``store_bytes`` returns, the instance survives a crash or power loss *and* will be processed (it is
journaled now, or re-journaled by ``reconcile()`` at the next start-up).

Fast path (``Spool.store_bytes``)
---------------------------------
1. check the free-space floor (counting the incoming size) -> ``OutOfSpaceError``, nothing written;
2. take a file from the *pool* ``<root>/.pool``: empty files created ahead of time in batches
   whose directory entries were made durable with one directory fsync per batch;
3. write the instance into it with a *commit mark* in the 128-byte preamble (magic, total length,
   CRC-32 of everything after the preamble) and ``fdatasync`` it. ``fdatasync`` persists the
   data and the file size; the file's name was already durable, so nothing else is needed: the
   instance is now durable, with one device flush instead of three (file, directory, journal).
   While this thread waits for the device, a helper thread parses the header from the bytes in
   memory (pydicom, stopping before the pixel data) and asks the journal about duplicates, so the
   parse costs no time of its own;
4. a data set that does not parse or lacks a required UID -> quarantine + ``MalformedDicomError``;
   an unaccepted SOP class -> ``UnsupportedDicomError`` (the pool file's mark is zeroed and
   flushed, so a crash cannot resurrect it); a SOP Instance UID already journaled -> duplicate,
   the first copy is kept (``created=False``); in all three cases the pool file is removed;
5. ``rename`` the pool file to ``<root>/<study_uid>/<series_uid>/<sop_instance_uid>.dcm`` without a
   directory fsync, and insert the ``instances`` row on a connection with ``synchronous=NORMAL``
   (a WAL commit without a flush).

Only then may the caller answer Success.

Why that is enough: the files are the source of truth and ``reconcile()`` rebuilds everything
else from them. After a crash an acknowledged instance is in exactly one of two places (a rename
is atomic on a journaling filesystem): still in the pool (the rename was not yet on disk) or in
place (its row possibly lost with the unsynced WAL tail). ``reconcile()`` moves pool files whose
commit mark verifies into place, journals spooled files that lack a row, and leaves empty pool
files for reuse. A pool file whose mark is missing or does not verify (a crash during the write or
before ``fdatasync`` returned) was never acknowledged and is dropped: the peer got no Success and
sends it again (why the mark is needed: ``pool``). The renames become durable in their final
directories soon after, by a background thread (``sync``).

Slow paths, unchanged in substance: ``store_file`` (pynetdicom's chunked receive) links or copies
the file into ``<root>/.tmp``, fsyncs it, renames it into place and fsyncs the directory;
quarantine fsyncs its file, sidecar and directory; retention deletes and quarantine rows commit
with ``synchronous=FULL`` (those rows are not reconstructible from the files).

Assumes a journaling filesystem whose metadata operations reach the disk in order and atomically
(ext4 with ``data=ordered``, XFS), as crash-safe renames always do.

Nothing here reads or logs patient fields; the journal holds UIDs and routing attributes only.

Modules: ``store`` (``Spool``: the store paths and the facade), ``pool`` (pre-created files, the
commit mark), ``sync`` (background directory fsyncs and pool refills), ``journal`` (the SQLite
tables), ``quarantine``, ``header`` (reading the header fields), ``recovery`` (``reconcile()``),
``files`` (layout and filesystem steps).
"""

from __future__ import annotations

from agent.ingest.spool.header import dataset_offset
from agent.ingest.spool.quarantine import QuarantinedError, QuarantineLimits
from agent.ingest.spool.store import Spool

__all__ = ["QuarantineLimits", "QuarantinedError", "Spool", "dataset_offset"]
