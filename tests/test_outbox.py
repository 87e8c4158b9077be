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
