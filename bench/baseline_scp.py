"""Minimal pynetdicom C-STORE receiver: raw bytes to disk, no fsync, no database (the baseline).

It writes the same Part 10 file the agent stores (preamble, file meta, the data set as received),
encoded the same way (``agent.ingest.scp.part10_bytes``: pynetdicom's ``encoded_dataset`` with the
file meta written directly instead of through pydicom), so agent / baseline measures durability
and journaling, not how fast each side encodes a file meta header. Nothing else is done per
instance: one ``open``/``write``/``close``, the status returned at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from agent.ingest.scp import part10_bytes


def handle_store(event: evt.Event, out: Path) -> int:
    with open(out / f"{event.request.AffectedSOPInstanceUID}.dcm", "wb") as f:
        f.write(part10_bytes(event))
    return 0x0000


def main() -> None:
    port, out = int(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title="BASELINE")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = 0
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, handle_store, [out])])


if __name__ == "__main__":
    main()
