"""Durable outbox: order, ack, idempotent re-enqueue, durability across reopening."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.core.db import connect, transaction
from agent.core.errors import StorageError
from agent.mqtt.outbox import Outbox


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def outbox(db_path: Path):
    conn = connect(db_path)
    yield Outbox(conn)
    conn.close()


def test_pending_in_seq_order_and_limit(outbox: Outbox) -> None:
    seqs = [outbox.put("edge/d/results", f"m{i}".encode()) for i in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    rows = outbox.pending(3)
    assert [r.payload for r in rows] == [b"m0", b"m1", b"m2"]
    assert [r.seq for r in rows] == seqs[:3]
    assert [r.payload for r in outbox.pending(10, after=seqs[2])] == [b"m3", b"m4"]
    assert outbox.pending(0) == []
    r = rows[0]
    assert (r.topic, r.qos, r.retain, r.kind, r.attempts) == ("edge/d/results", 1, False, "result", 0)


def test_ack_deletes_only_that_row(outbox: Outbox) -> None:
    a = outbox.put("t", b"a")
    b = outbox.put("t", b"b", kind="event")
    assert outbox.count() == 2
    assert outbox.ack(a) is True
    assert outbox.ack(a) is False  # a second PUBACK for the same row is harmless
    assert [r.seq for r in outbox.pending(10)] == [b]
    assert outbox.count() == 1


def test_dedup_key_is_idempotent(outbox: Outbox) -> None:
    first = outbox.put("t", b"rev1", dedup_key="rid:1")
    again = outbox.put("t", b"rev1-again", dedup_key="rid:1")
    other = outbox.put("t", b"rev2", dedup_key="rid:2")
    assert again == first and other != first
    assert [r.payload for r in outbox.pending(10)] == [b"rev1", b"rev2"]
    # rows without a key never collide
    outbox.put("t", b"x")
    outbox.put("t", b"x")
    assert outbox.count() == 4


def test_survives_reopening(db_path: Path) -> None:
    conn = connect(db_path)
    box = Outbox(conn)
    seqs = [box.put("t", bytes([i]) * 10, dedup_key=f"k{i}") for i in range(3)]
    box.ack(seqs[0])
    conn.close()

    conn2 = connect(db_path)
    try:
        box2 = Outbox(conn2)
        assert [r.seq for r in box2.pending(10)] == seqs[1:]
        assert box2.put("t", b"dup", dedup_key="k1") == seqs[1]
        # AUTOINCREMENT: a new row never reuses the seq of an acknowledged one
        assert box2.put("t", b"new") > seqs[-1]
    finally:
        conn2.close()


def test_put_inside_caller_transaction_rolls_back_with_it(outbox: Outbox) -> None:
    with pytest.raises(RuntimeError):
        with transaction(outbox.conn):
            outbox.put("t", b"x", in_transaction=True)
            raise RuntimeError("job update failed")
    assert outbox.count() == 0
    with transaction(outbox.conn):
        outbox.put("t", b"y", in_transaction=True)
    assert outbox.count() == 1
    with pytest.raises(StorageError):  # the caller believes in a transaction that is not there
        outbox.put("t", b"z", in_transaction=True)
    assert outbox.count() == 1


def test_has_tracks_pending_dedup_keys(outbox: Outbox) -> None:
    assert not outbox.has("rid:1")
    seq = outbox.put("t", b"x", dedup_key="rid:1")
    assert outbox.has("rid:1") and not outbox.has("rid:2")
    outbox.ack(seq)
    assert not outbox.has("rid:1")


def test_oldest_age_and_attempts_and_status_seq(outbox: Outbox) -> None:
    assert outbox.oldest_age_s() == 0.0
    seq = outbox.put("t", b"x")
    time.sleep(0.05)
    assert 0.04 < outbox.oldest_age_s() < 5
    outbox.mark_attempt(seq)
    outbox.mark_attempt(seq)
    assert outbox.pending(1)[0].attempts == 2
    assert [outbox.next_status_seq() for _ in range(3)] == [1, 2, 3]


def test_status_seq_persists(db_path: Path) -> None:
    conn = connect(db_path)
    assert Outbox(conn).next_status_seq() == 1
    conn.close()
    conn = connect(db_path)
    try:
        assert Outbox(conn).next_status_seq() == 2
    finally:
        conn.close()


def test_rejects_bad_arguments(outbox: Outbox) -> None:
    with pytest.raises(ValueError):
        outbox.put("t", b"x", qos=3)
    with pytest.raises(ValueError):
        outbox.put("t", b"x", kind="other")  # type: ignore[arg-type]


# ----------------------------------------------------------------- bounded kinds (telemetry, drift)


def test_bounded_share_drops_only_the_oldest_telemetry(outbox: Outbox) -> None:
    results, events, telemetry = [], [], []
    for i in range(500):
        telemetry.append(outbox.put("edge/d/telemetry", f"t{i}".encode(), kind="telemetry", max_queued=120))
        if i % 10 == 0:
            results.append(outbox.put("edge/d/results", f"r{i}".encode(), dedup_key=f"rid{i}:1"))
            events.append(outbox.put("edge/d/events", f"e{i}".encode(), kind="event"))
    rows = outbox.pending(10_000)
    by_kind = {k: [r.seq for r in rows if r.kind == k] for k in ("result", "event", "telemetry")}
    assert by_kind["result"] == results and by_kind["event"] == events  # never dropped
    assert by_kind["telemetry"] == telemetry[-120:]  # the newest 120, in order
    assert outbox.count("telemetry") == 120 and outbox.count() == 120 + 50 + 50
    assert outbox.dropped() == {"telemetry": 380, "drift": 0, "refusal": 0}
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)


def test_caps_configured_on_the_outbox_and_per_put(db_path: Path) -> None:
    conn = connect(db_path)
    try:
        box = Outbox(conn, caps={"telemetry": 3})
        for _ in range(5):
            box.put("t", b"x", kind="telemetry")
            box.put("d", b"y", kind="drift", max_queued=2)
        assert (box.count("telemetry"), box.count("drift")) == (3, 2)
        for _ in range(300):  # drift's default cap (DEFAULT_CAPS) applies without max_queued
            box.put("d", b"y", kind="drift")
        assert box.count("drift") == 200
        assert box.dropped() == {"telemetry": 2, "drift": 3 + 102, "refusal": 0}
        with pytest.raises(ValueError):
            Outbox(conn, caps={"result": 10})  # results and events are never dropped
        with pytest.raises(ValueError):
            box.put("t", b"x", kind="event", max_queued=5)
        with pytest.raises(ValueError):
            box.put("t", b"x", kind="telemetry", max_queued=0)
    finally:
        conn.close()


def test_bounded_put_inside_caller_transaction_rolls_back_whole(outbox: Outbox) -> None:
    for _ in range(3):
        outbox.put("t", b"old", kind="telemetry", max_queued=3)
    with pytest.raises(RuntimeError):
        with transaction(outbox.conn):
            outbox.put("t", b"new", kind="telemetry", max_queued=3, in_transaction=True)
            raise RuntimeError("caller failed")
    assert [r.payload for r in outbox.pending(10)] == [b"old"] * 3  # neither the insert nor the trim
    assert outbox.dropped()["telemetry"] == 0


def test_message_seqs_are_separate_and_persistent(db_path: Path) -> None:
    conn = connect(db_path)
    box = Outbox(conn)
    assert [box.next_seq("telemetry") for _ in range(3)] == [1, 2, 3]
    assert box.next_seq("drift") == 1 and box.next_status_seq() == 1
    conn.close()
    conn = connect(db_path)
    try:
        box = Outbox(conn)
        assert (box.next_seq("telemetry"), box.next_seq("drift"), box.next_seq("status")) == (4, 2, 2)
        with pytest.raises(ValueError):
            box.next_seq("result")  # type: ignore[arg-type]
    finally:
        conn.close()


def test_an_older_agents_outbox_is_migrated_with_rows_and_seq(db_path: Path) -> None:
    conn = connect(db_path)
    conn.executescript("""
        CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
            qos INTEGER NOT NULL DEFAULT 1, retain INTEGER NOT NULL DEFAULT 0,
            kind TEXT NOT NULL CHECK (kind IN ('result', 'event')), dedup_key TEXT UNIQUE,
            created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO outbox_meta VALUES ('status_seq', 41);
        INSERT INTO outbox (topic, payload, kind, dedup_key, created_at, attempts)
            VALUES ('r', x'01', 'result', 'rid:1', 1.0, 2), ('e', x'02', 'event', NULL, 2.0, 0),
                   ('r', x'03', 'result', 'rid:2', 3.0, 0);
        DELETE FROM outbox WHERE seq = 3;
    """)
    conn.close()
    conn = connect(db_path)
    try:
        box = Outbox(conn)
        rows = box.pending(10)
        assert [(r.seq, r.payload, r.kind, r.dedup_key, r.attempts) for r in rows] == [
            (1, b"\x01", "result", "rid:1", 2), (2, b"\x02", "event", None, 0)]
        assert box.put("t", b"x", kind="telemetry") == 4  # seq 3 was acknowledged: never reused
        assert box.put("r", b"again", dedup_key="rid:1") == 1  # the dedup index survived
        assert box.next_status_seq() == 42
        Outbox(conn)  # opening again is a no-op
        assert box.count() == 3
    finally:
        conn.close()
