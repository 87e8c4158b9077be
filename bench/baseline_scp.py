"""Minimal pynetdicom C-STORE receiver: raw bytes to disk, no fsync, no database (the baseline)."""

from __future__ import annotations

import sys
from pathlib import Path

from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification


def handle_store(event: evt.Event, out: Path) -> int:
    path = out / f"{event.request.AffectedSOPInstanceUID}.dcm"
    with open(path, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, event.file_meta, enforce_standard=False)
        f.write(event.request.DataSet.getvalue())
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
