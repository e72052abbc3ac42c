"""What the labels index (migration 0011) costs a job's writes: WAL bytes and time per job
for its life's three writes (insert, claim, result), with each index design.

    /usr/bin/python3 -m bench.labels [--jobs 20000]

A private PostgreSQL (tests/helpers.py), the real schema (Store.migrate), the real
statements' shape: an INSERT of a batch, then two batched status UPDATEs, as the worker's
claim and finish write. Each design is measured on a fresh database, unlabelled and with
3 labels per job. Index sizes are after the run, before any vacuum.
"""

from __future__ import annotations

import argparse
import json
import time

import psycopg

from dtsd.store import Store
from tests.helpers import PostgresServer

DESIGNS = {
    "no index": "DROP INDEX jobs_labels",
    "partial gin jsonb_path_ops, fastupdate (0011)": "",
    "partial gin jsonb_path_ops, no fastupdate":
        "ALTER INDEX jobs_labels SET (fastupdate = off)",
    "full gin jsonb_ops, fastupdate, '{}' for none":
        "DROP INDEX jobs_labels; CREATE INDEX jobs_labels ON jobs USING gin (labels)",
}
BATCH = 500


def run(dsn: str, jobs: int, labelled: bool, empty_as_object: bool) -> dict[str, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        def wal() -> int:
            return conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
        none = "{}" if empty_as_object else None
        start_wal, started = wal(), time.perf_counter()
        for first in range(0, jobs, BATCH):
            ids = [f"j{n}" for n in range(first, min(jobs, first + BATCH))]
            labels = [json.dumps({"team": f"t{n % 7}", "env": "prod", "app": f"a{n % 31}"})
                      if labelled else none for n in range(len(ids))]
            conn.execute("""INSERT INTO jobs (id, command, queue, labels)
                            SELECT id, 'true', 'default', l::jsonb
                            FROM unnest(%s::text[], %s::text[]) AS u(id, l)""", (ids, labels))
            conn.execute("""UPDATE jobs SET status = 'RUNNING', attempts = 1, worker = 'w',
                                   started_at = now(), updated_at = now()
                            WHERE id = ANY(%s)""", (ids,))
            conn.execute("""UPDATE jobs SET status = 'SUCCEEDED', exit_code = 0,
                                   finished_at = now(), updated_at = now()
                            WHERE id = ANY(%s)""", (ids,))
        seconds, wal_bytes = time.perf_counter() - started, wal() - start_wal
        size = conn.execute("SELECT coalesce(pg_relation_size('jobs_labels'), 0)").fetchone()[0] \
            if conn.execute("SELECT to_regclass('jobs_labels')").fetchone()[0] else 0
    return {"wal_bytes_per_job": wal_bytes / jobs, "us_per_job": seconds / jobs * 1e6,
            "index_kb": size / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20000)
    args = parser.parse_args()
    server = PostgresServer().start()
    try:
        print(f"{args.jobs} jobs, 3 writes each; WAL bytes and microseconds per job")
        for name, change in DESIGNS.items():
            for labelled in (False, True):
                dsn = server.create_database(f"b_{abs(hash((name, labelled))) % 10**8}")
                Store(dsn).migrate()
                with psycopg.connect(dsn, autocommit=True) as conn:
                    for statement in filter(None, change.split(";")):
                        conn.execute(statement)
                    conn.execute("ALTER TABLE jobs DISABLE TRIGGER USER")   # counts: not ours
                result = run(dsn, args.jobs, labelled, "'{}'" in name)
                print(f"{name:48} {'3 labels' if labelled else 'none':8} "
                      f"WAL {result['wal_bytes_per_job']:7.0f} B  "
                      f"{result['us_per_job']:6.1f} us  index {result['index_kb']:7.0f} KB")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
