"""The job counts ClusterStatus reads (0006_scale.sql): always equal to a real count.

Real PostgreSQL; every write path of dtsd/store.py that changes a job's status or its
dead-letter mark is taken, and after each step the counter is compared with count(*).
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from dtsd.models import JobStatus, NewJob, new_job_id
from dtsd.store import Fence, Outcome, Store


def real_counts(dsn: str) -> tuple[dict[str, int], int]:
    with psycopg.connect(dsn) as conn:
        by_status = dict(conn.execute("SELECT status, count(*) FROM jobs GROUP BY status"))
        dead = conn.execute(
            "SELECT count(*) FROM jobs WHERE dead_lettered_at IS NOT NULL").fetchone()[0]
    return by_status, dead


def assert_counts_true(store: Store, dsn: str) -> dict[str, int]:
    by_status, dead, _ = store.counts()
    nonzero = {key: n for key, n in by_status.items() if n}
    assert (nonzero, dead) == real_counts(dsn)
    return nonzero


@pytest.fixture
def store(pg_dsn: str):
    store = Store(pg_dsn).open()
    try:
        store.migrate()
        store.register_worker("w1", "node", 60)
        yield store
    finally:
        store.close()


def submit(store: Store, count: int, **fields) -> list[str]:
    jobs = [NewJob(id=new_job_id(), command="true", owner="user:t", **fields)
            for _ in range(count)]
    store.insert_jobs(jobs)
    return [job.id for job in jobs]


def outcome(claimed, status: JobStatus, *, dead: bool = False) -> Outcome:
    return Outcome(claimed.id, claimed.attempt, status, 1 if status is not JobStatus.SUCCEEDED
                   else 0, b"out", False, "", status is not JobStatus.SUCCEEDED, dead=dead)


def test_counts_follow_every_state_change(store: Store, pg_dsn: str):
    fence = Fence("c", 1, "node")
    ids = submit(store, 10)
    assert assert_counts_true(store, pg_dsn) == {"PENDING": 10}

    claimed = store.claim(ids[:8], "w1")
    assert assert_counts_true(store, pg_dsn) == {"PENDING": 2, "RUNNING": 8}

    store.finish([outcome(claimed[0], JobStatus.SUCCEEDED), outcome(claimed[1], JobStatus.SUCCEEDED),
                  outcome(claimed[2], JobStatus.FAILED),
                  outcome(claimed[3], JobStatus.FAILED, dead=True),
                  outcome(claimed[4], JobStatus.PENDING)])            # a retry
    assert assert_counts_true(store, pg_dsn) == {
        "PENDING": 3, "RUNNING": 3, "SUCCEEDED": 2, "FAILED": 2}
    assert store.counts()[1] == 1

    store.cancel(ids[9])                                             # PENDING -> CANCELLED
    store.cancel(claimed[5].id)                                      # RUNNING -> CANCELLED
    assert_counts_true(store, pg_dsn)

    store.retry(claimed[2].id)                                       # FAILED -> PENDING
    store.requeue_dead([claimed[3].id])                              # dead-lettered -> PENDING
    assert store.counts()[1] == 0
    assert_counts_true(store, pg_dsn)

    # A dead worker's jobs: out of retries, FAILED and dead-lettered; else PENDING again.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE jobs SET failures = max_retries WHERE id = %s", (claimed[6].id,))
        conn.execute("UPDATE workers SET lease_until = now() - interval '1 s'")
    store.recover_lost(fence, "w1", backoff=1, backoff_max=1)
    assert_counts_true(store, pg_dsn)
    assert store.counts()[1] == 1
    assert store.purge_dead() == 1
    assert store.counts()[1] == 0

    assert store.fold_counts() > 0
    assert store.fold_counts() == 0                                  # nothing left to fold
    before = assert_counts_true(store, pg_dsn)

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE jobs SET finished_at = now() - interval '2 days' "
                     "WHERE status = 'SUCCEEDED'")
    assert store.prune(fence, 86400) == 2
    after = assert_counts_true(store, pg_dsn)
    assert after.get("SUCCEEDED", 0) == 0 and before["SUCCEEDED"] == 2

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE jobs")
    assert_counts_true(store, pg_dsn)
    submit(store, 3)
    assert assert_counts_true(store, pg_dsn) == {"PENDING": 3}


def test_a_rolled_back_change_leaves_the_counts(store: Store, pg_dsn: str):
    ids = submit(store, 2)
    with pytest.raises(RuntimeError):
        with psycopg.connect(pg_dsn) as conn, conn.transaction():
            conn.execute("UPDATE jobs SET status = 'CANCELLED' WHERE id = %s", (ids[0],))
            raise RuntimeError("roll back")
    assert assert_counts_true(store, pg_dsn) == {"PENDING": 2}


def test_counts_stay_exact_under_concurrent_writers_and_folds(store: Store, pg_dsn: str):
    """Four submit-claim-finish loops and a folding loop at once: no lost update, no
    deadlock, and the sum equals count(*) at the end."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(15):
                ids = submit(store, 5)
                claimed = store.claim(ids, "w1")
                store.finish([outcome(c, JobStatus.SUCCEEDED) for c in claimed[:3]])
                store.cancel(claimed[4].id)
        except BaseException as exc:      # noqa: BLE001  (reported below)
            errors.append(exc)

    def folder() -> None:
        while not stop.is_set():
            try:
                store.fold_counts()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    threads = [threading.Thread(target=writer) for _ in range(4)]
    folding = threading.Thread(target=folder)
    folding.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    stop.set()
    folding.join(timeout=30)
    assert not errors
    assert assert_counts_true(store, pg_dsn) == {"SUCCEEDED": 180, "RUNNING": 60, "CANCELLED": 60}


def test_migration_counts_the_jobs_stored_before(pg_dsn: str, monkeypatch: pytest.MonkeyPatch):
    """A database at 0005 with jobs in it gets the indexes and counts that match."""
    shipped = Store.migrations()
    store = Store(pg_dsn).open()
    try:
        monkeypatch.setattr(Store, "migrations", staticmethod(
            lambda: [m for m in shipped if m[0] < 6]))
        store.migrate()
        # Inserted as a dtsd of that schema did (today's insert names later columns).
        ids = [new_job_id() for _ in range(5)]
        old = datetime.now(timezone.utc) - timedelta(days=40)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO jobs (id, command, owner) "
                         "SELECT unnest(%s::text[]), 'true', 'user:t'", (ids,))
            conn.execute("""UPDATE jobs SET status = 'FAILED', finished_at = %s,
                                dead_lettered_at = now() WHERE id = %s""", (old, ids[0]))
            conn.execute("UPDATE jobs SET status = 'SUCCEEDED', finished_at = %s WHERE id = %s",
                         (old, ids[1]))
        monkeypatch.setattr(Store, "migrations", staticmethod(lambda: shipped))
        assert store.migrate() == [m[1] for m in shipped if m[0] >= 6]
        assert assert_counts_true(store, pg_dsn) == {"PENDING": 3, "FAILED": 1, "SUCCEEDED": 1}
        assert store.counts()[1] == 1
        assert store.prune(Fence("c", 1, "n"), 30 * 86400) == 1    # not the dead-lettered one
        assert assert_counts_true(store, pg_dsn) == {"PENDING": 3, "FAILED": 1}
        with psycopg.connect(pg_dsn) as conn:
            indexes = {row[0] for row in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'jobs'")}
        assert {"jobs_queue_status_created", "jobs_name_status_created",
                "jobs_prunable"} <= indexes
        assert not {"jobs_created", "jobs_queue_created", "jobs_name_created"} & indexes
    finally:
        store.close()


def real_activity(dsn: str) -> dict[tuple[int, str], int]:
    """Final jobs by (minute of finished_at, status), counted from the rows."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            """SELECT floor(extract(epoch FROM finished_at) / 60)::bigint * 60, status, count(*)
               FROM jobs WHERE status IN ('SUCCEEDED', 'FAILED', 'CANCELLED')
               AND finished_at IS NOT NULL GROUP BY 1, 2""").fetchall()
    return {(minute, status): n for minute, status, n in rows}


def stored_activity(store: Store) -> dict[tuple[int, str], int]:
    return {(minute, status): n for minute, counts in store.activity(120)
            for status, n in counts.items() if n}


def test_activity_counts_jobs_as_they_end_per_minute(store: Store, pg_dsn: str):
    """JobActivity's per-minute keys (0009_job_activity.sql) equal a count of the final
    rows by minute through ends, a retry, a dead-letter mark, a fold, and a prune (which
    does not take an ended job back out of its minute); they never count as a status."""
    fence = Fence("c", 1, "node")
    ids = submit(store, 8)
    claimed = store.claim(ids[:6], "w1")
    store.finish([outcome(claimed[0], JobStatus.SUCCEEDED), outcome(claimed[1], JobStatus.SUCCEEDED),
                  outcome(claimed[2], JobStatus.FAILED),
                  outcome(claimed[3], JobStatus.FAILED, dead=True),
                  outcome(claimed[4], JobStatus.PENDING)])            # a retry: not final
    store.cancel(ids[7])
    assert sum(stored_activity(store).values()) == 5
    assert stored_activity(store) == real_activity(pg_dsn)
    assert {s for _, s in stored_activity(store)} == {"SUCCEEDED", "FAILED", "CANCELLED"}

    store.retry(claimed[2].id)                    # FAILED -> PENDING: no longer ended
    store.purge_dead([claimed[3].id])             # the dead-letter mark changes, not the end
    assert store.fold_counts() > 0
    assert stored_activity(store) == real_activity(pg_dsn)
    assert sum(stored_activity(store).values()) == 4
    assert assert_counts_true(store, pg_dsn)      # the minute keys are no status

    # An hour back: it lands in its own minute, oldest first, every minute listed.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE jobs SET finished_at = now() - interval '61 minutes' "
                     "WHERE id = %s", (claimed[1].id,))
    assert stored_activity(store) == real_activity(pg_dsn)
    minutes = [minute for minute, _ in store.activity(60)]
    assert len(minutes) == 60 and minutes == sorted(minutes)
    assert all(b - a == 60 for a, b in zip(minutes, minutes[1:]))
    assert sum(c.get("SUCCEEDED", 0) for _, c in store.activity(60)) == 1
    assert sum(c.get("SUCCEEDED", 0) for _, c in store.activity(62)) == 2

    # The prune deletes rows, not what ended; the leader forgets keys past two hours.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE jobs SET finished_at = now() - interval '3 hours' "
                     "WHERE id = %s", (claimed[0].id,))
    store.fold_counts()
    assert store.prune(fence, 7200) == 1
    assert sum(stored_activity(store).values()) == 3
    assert store.forget_activity() == 1
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM job_counts WHERE key LIKE 'm:%' AND "
                            "split_part(key, ':', 2)::bigint < extract(epoch FROM now()) - 7200"
                            ).fetchone()[0] == 0
