"""The transaction and evaluation log: rows, late evaluations, concurrency, failures."""
import multiprocessing as mp
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from zoolib import journal, translog
from zoolib.workspace import ZoolibError

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


def row(i: int = 0, generation: str = "gen-0001", predicted: str = "lion",
        confidence: float = 0.8, source: str = "test", when: datetime = T0) -> dict:
    return {"time": (when + timedelta(minutes=i)).isoformat(), "generation": generation,
            "image_hash": f"h{i:04d}", "source": source, "predicted": predicted,
            "confidence": confidence, "top5": [[predicted, confidence], ["zebra", 0.1]],
            "latency_ms": 5.0 + i, "image": None}


def test_append_and_read_back(demo_ws):
    writer = translog.Writer(demo_ws)
    ids = [writer.append(row(i)) for i in range(3)]
    writer.close()
    tx = translog.transactions(demo_ws)
    assert tx["id"].tolist() == ids
    assert tx["image_hash"].tolist() == ["h0000", "h0001", "h0002"]
    assert tx["top5"][0] == [["lion", 0.8], ["zebra", 0.1]]
    assert tx["time"][1] == T0 + timedelta(minutes=1)
    assert tx["latency_ms"].tolist() == [5.0, 6.0, 7.0]
    # Same database file as the journal, which keeps working beside the log.
    journal.record(demo_ws, "mark", "library/lion/x.jpg")
    assert len(journal.read(demo_ws)) == 1
    assert len(translog.transactions(demo_ws, since=T0 + timedelta(minutes=1))) == 2


def test_empty_log_reads_as_empty_tables(demo_ws):
    assert translog.transactions(demo_ws).empty
    joined = translog.joined(demo_ws)
    assert joined.empty
    assert set(translog.JOINED_EXTRA) <= set(joined.columns)


def test_later_evaluations_attach_to_the_original_transaction(demo_ws):
    writer = translog.Writer(demo_ws)
    a, b, c = (writer.append(row(i)) for i in range(3))
    later = T0 + timedelta(days=3)
    translog.record_evaluation(demo_ws, a, "anna", true_class="lion", time=later)
    translog.record_evaluation(demo_ws, b, "anna", correct=False, true_class="cheetah")
    # A second review of `a` is a new row; the newest one counts.
    translog.record_evaluation(demo_ws, a, "ben", correct=False, true_class="Unknown",
                               notes="blurred")
    joined = translog.joined(demo_ws).set_index("id")
    assert len(translog.evaluations(demo_ws)) == 3
    assert joined.loc[a, "reviewer"] == "ben" and joined.loc[a, "correct"] == False  # noqa: E712
    assert joined.loc[a, "true_class"] == "Unknown"
    assert joined.loc[b, "true_class"] == "cheetah" and not joined.loc[b, "correct"]
    assert not joined.loc[c, "evaluated"] and joined["evaluated"].sum() == 2
    ev = translog.evaluations(demo_ws)
    assert ev.loc[0, "time"] == later and bool(ev.loc[0, "correct"]) is True


def test_bad_evaluations_are_refused(demo_ws):
    tid = translog.Writer(demo_ws).append(row())
    with pytest.raises(translog.UnknownTransactionError, match="transaction 999"):
        translog.record_evaluation(demo_ws, 999, "anna", correct=True)
    with pytest.raises(ZoolibError, match="reviewer"):
        translog.record_evaluation(demo_ws, tid, " ", correct=True)
    with pytest.raises(ZoolibError, match="contradicts"):
        translog.record_evaluation(demo_ws, tid, "anna", correct=False, true_class="lion")
    with pytest.raises(ZoolibError, match="not a plain folder name"):
        translog.record_evaluation(demo_ws, tid, "anna", true_class="../etc")
    with pytest.raises(ZoolibError, match="`correct` or `true_class`"):
        translog.record_evaluation(demo_ws, tid, "anna")
    with pytest.raises(ZoolibError, match="time zone"):
        translog.record_evaluation(demo_ws, tid, "anna", correct=True, time="2026-03-02T10:00")
    assert translog.evaluations(demo_ws).empty


def test_a_log_that_cannot_be_written_raises(demo_ws):
    writer = translog.Writer(demo_ws, timeout=0.2)
    blocker = sqlite3.connect(demo_ws.journal_db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock too long
    try:
        with pytest.raises(translog.TransactionLogError, match="not logged"):
            writer.append(row())
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert writer.append(row(1)) == 1  # and works again once the lock is free


def _write_rows(args):
    root, worker, n = args
    from zoolib import translog
    from zoolib.workspace import Workspace

    writer = translog.Writer(Workspace(root))
    for i in range(n):
        writer.append(row(i, source=f"worker-{worker}"))
    writer.close()
    return worker


def test_concurrent_processes_lose_no_rows(demo_ws):
    workers, per_worker = 4, 60
    ctx = mp.get_context("spawn")  # fresh interpreters: separate connections, real contention
    with ctx.Pool(workers) as pool:
        done = pool.map(_write_rows, [(demo_ws.root, k, per_worker) for k in range(workers)])
    assert sorted(done) == list(range(workers))
    tx = translog.transactions(demo_ws)
    assert len(tx) == workers * per_worker
    assert tx["id"].is_unique
    assert tx["source"].value_counts().to_dict() == {f"worker-{k}": per_worker
                                                     for k in range(workers)}


def test_pick_for_review(demo_ws):
    writer = translog.Writer(demo_ws)
    ids = [writer.append(row(i)) for i in range(6)]
    translog.record_evaluation(demo_ws, ids[-1], "anna", correct=True)
    assert translog.pick_for_review(demo_ws, 3, "recent")["id"].tolist() == ids[::-1][:3]
    assert translog.pick_for_review(demo_ws, 3, "unreviewed")["id"].tolist() == ids[-2:-5:-1]
    sample = translog.pick_for_review(demo_ws, 4, "sample", seed=1)
    assert len(sample) == 4 and set(sample["id"]) <= set(ids)
    assert len(translog.pick_for_review(demo_ws, 50, "sample")) == 6
    with pytest.raises(ZoolibError, match="review mode"):
        translog.pick_for_review(demo_ws, 3, "oldest")
