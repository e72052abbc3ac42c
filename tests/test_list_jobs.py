"""Store.list_jobs against real PostgreSQL: every filter, walked page by page with the
page token, gives exactly the matching jobs, newest first, each once (one status is a
plain query; several are merged branches, one per status: see store.list_jobs)."""

from __future__ import annotations

import itertools

import psycopg
import pytest

from dtsd.models import JobStatus, NewJob, new_job_id
from dtsd.store import Store

STATUSES = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PENDING]


@pytest.fixture
def store(pg_dsn: str):
    store = Store(pg_dsn).open()
    try:
        store.migrate()
        # Two batches: every job of a batch has the same created_at, so ties are the rule
        # and the id decides.
        for batch in range(2):
            jobs = [NewJob(id=new_job_id(), command="true", queue=("q1", "q2", "rare")[i % 3],
                           name=("", "a", "b", "a", "b")[i % 5], owner="user:t")
                    for i in range(60)]
            store.insert_jobs(jobs)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            ids = [row[0] for row in conn.execute("SELECT id FROM jobs ORDER BY id")]
            for index, job_id in enumerate(ids):
                status = STATUSES[(index * 7) % 4]
                conn.execute("UPDATE jobs SET status = %s, dead_lettered_at = CASE WHEN %s "
                             "THEN now() END WHERE id = %s",
                             (status.value, status is JobStatus.FAILED and index % 8 == 3, job_id))
        yield store
    finally:
        store.close()


def expected(pg_dsn: str, statuses=(), queue="", name="", dead_lettered=False) -> list[str]:
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT id, status, queue, name, dead_lettered_at, created_at "
                            "FROM jobs").fetchall()
    keep = [r for r in rows if (not statuses or r[1] in {s.value for s in statuses})
            and (not queue or r[2] == queue) and (not name or r[3] == name)
            and (not dead_lettered or r[4] is not None)]
    keep.sort(key=lambda r: (r[5], r[0]), reverse=True)
    return [r[0] for r in keep]


def walk(store: Store, size: int, **filters) -> list[str]:
    seen, token = [], ""
    for _ in range(1000):
        rows, token = store.list_jobs(limit=size, page_token=token, **filters)
        assert len(rows) <= size
        seen += [row["id"] for row in rows]
        if not token:
            return seen
    raise AssertionError("the pages never ended")


@pytest.mark.parametrize("filters", [
    {},
    {"statuses": [JobStatus.FAILED]},
    {"statuses": [JobStatus.FAILED, JobStatus.CANCELLED]},
    {"statuses": [JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.CANCELLED]},  # a repeat
    {"statuses": STATUSES + [JobStatus.RUNNING]},
    {"queue": "rare"},
    {"queue": "rare", "statuses": [JobStatus.SUCCEEDED]},
    {"queue": "q1", "statuses": [JobStatus.SUCCEEDED, JobStatus.PENDING]},
    {"name": "a", "statuses": [JobStatus.CANCELLED]},
    {"name": "b", "queue": "q2", "statuses": [JobStatus.FAILED, JobStatus.SUCCEEDED]},
    {"dead_lettered": True, "statuses": [JobStatus.FAILED, JobStatus.CANCELLED]},
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "none")
def test_pages_hold_every_match_once_newest_first(store: Store, pg_dsn: str, filters):
    want = expected(pg_dsn, **filters)
    assert want, "the fixture must give every case some jobs"
    for size in (1, 7, 100):
        assert walk(store, size, **filters) == want
