#!/usr/bin/python3
"""Scale benchmark: the read API and the leader's prune with a million stored jobs.

Runs a real dtsd (2 server children, 1 worker) over a private, durable PostgreSQL and
Redis, loads `--jobs` finished jobs with their attempts straight into PostgreSQL
(server-side `INSERT ... SELECT generate_series`, then ANALYZE), and times over gRPC,
one call after another, `--calls` calls per measure: GetJob (with and without the attempt
history), a ListJobs page of 100 and of 20 for each filter ListJobs offers (none, one
status, two statuses, queue, a rare queue, name, status + queue, status + the rare queue,
dead-lettered, a creation-time window), walking on with `page_token`, and ClusterStatus.
Then it runs the leader's prune query under EXPLAIN (ANALYZE, BUFFERS). Last, the web UI
over HTTP with a logged-in session: the overview, a job's page, the job list with and
without filters (each the whole answer, HTML included), and how long a line a running job
writes takes to reach the job page's live stream (/jobs/ID/events).

    /usr/bin/python3 bench/scale.py [--jobs 1000000] [--calls 300]

The mix: 86 % SUCCEEDED, 7 % FAILED, 3 % FAILED and dead-lettered, 4 % CANCELLED; queues
`default` 60 %, `batch` 25 %, `reports` 14 % and `rare` 1 %; 50 names for 80 % of the
jobs; created and finished over the last 7 days (within `[dtsd] retention`, 30 days, so
the prune finds nothing: the case that runs every 5 minutes). It is a benchmark, not a
test: it prints what it measures and asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psycopg  # noqa: E402

import pipeline  # noqa: E402  (bench/ is this script's own directory)

from dtsd import store  # noqa: E402
from dtsd.dtsdpb import pb, pb_grpc  # noqa: E402
from tests.helpers import DtsdMaster, PostgresServer, RedisServer, free_port  # noqa: E402

CHUNK = 100_000
DAYS = 7

# One statement per chunk of ids [lo, hi): the job rows and their attempts. The id is
# md5('job' || i) as a uuid, so the client can name any job without asking.
LOAD = """
WITH j AS (
INSERT INTO jobs (id, name, command, queue, priority, max_retries, submitted_by, owner,
                  status, attempts, failures, worker, exit_code, output, error,
                  dead_lettered_at, created_at, updated_at, started_at, finished_at)
SELECT md5('job' || i)::uuid::text,
       CASE WHEN h.n %% 5 = 0 THEN '' ELSE 'job-' || (h.n %% 50) END,
       'run-step --part ' || i,
       CASE WHEN h.q = 99 THEN 'rare' WHEN h.q < 60 THEN 'default'
            WHEN h.q < 85 THEN 'batch' ELSE 'reports' END,
       (i %% 10)::smallint, 3, 'token:bench@ipv4:127.0.0.1:1', 'token:bench',
       s.status, s.attempts, CASE WHEN s.status = 'FAILED' THEN 4 ELSE 0 END,
       'bench-worker', s.exit_code, decode('6f6b0a', 'hex'),
       CASE WHEN s.status = 'FAILED' THEN 'exit status 1' WHEN s.status = 'CANCELLED'
            THEN 'cancelled' ELSE '' END,
       CASE WHEN s.dead THEN t.created + interval '1 minute' END,
       t.created, t.created + interval '1 minute', t.created + interval '1 second',
       t.created + interval '1 minute'
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint - 1) AS i,
     LATERAL (SELECT abs(hashint8(i) %% 100) AS s, abs(hashint8(i + 1000003) %% 100) AS q,
                     abs(hashint8(i + 2000003) %% 250) AS n) h,
     LATERAL (SELECT now() - make_interval(days => %(days)s)
                     + make_interval(secs => %(days)s * 86400.0 * i / %(total)s)
                     + make_interval(secs => (i * 7919 %% 1000) / 1000.0) AS created) t,
     LATERAL (SELECT CASE WHEN h.s < 86 THEN 'SUCCEEDED' WHEN h.s < 96 THEN 'FAILED'
                          ELSE 'CANCELLED' END AS status,
                     CASE WHEN h.s BETWEEN 86 AND 95 THEN 4 ELSE 1 END AS attempts,
                     CASE WHEN h.s < 86 THEN 0 WHEN h.s < 96 THEN 1 END AS exit_code,
                     h.s BETWEEN 93 AND 95 AS dead) s
RETURNING id, attempts, started_at, finished_at, exit_code, output, error)
INSERT INTO job_attempts (job_id, attempt, worker, started_at, finished_at, exit_code, output,
                          error)
SELECT j.id, a, 'bench-worker', j.started_at, j.finished_at, j.exit_code, j.output, j.error
FROM j, generate_series(1, j.attempts) AS a
"""


def job_id(i: int) -> str:
    return str(uuid.UUID(hashlib.md5(f"job{i}".encode()).hexdigest()))


def load(dsn: str, total: int) -> None:
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for lo in range(0, total, CHUNK):
            hi = min(total, lo + CHUNK)
            args = {"lo": lo, "hi": hi, "total": total, "days": DAYS}
            conn.execute(LOAD, args)
            print(f"  loaded {hi:,} jobs ({time.monotonic() - started:.0f} s)", flush=True)
        conn.execute("ANALYZE jobs")
        conn.execute("ANALYZE job_attempts")
        size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))"
                            ).fetchone()[0]
    print(f"load: {total:,} jobs and their attempts in {time.monotonic() - started:.0f} s, "
          f"ANALYZE included; database {size}")


def timed(call, calls: int) -> tuple[float, float]:
    """(p50 ms, p99 ms) of `calls` calls of `call(i)`, one after another."""
    latencies = []
    for i in range(calls):
        started = time.perf_counter()
        call(i)
        latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    return latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]


def report(name: str, call, calls: int) -> None:
    for i in range(min(20, calls)):       # warm up: connections, plans, caches
        call(i)
    p50, p99 = timed(call, calls)
    print(f"  {name:<46} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms", flush=True)


def web_pages(master: DtsdMaster, ids: list[str], calls: int) -> None:
    """The web UI's pages, whole answers over HTTP with a session, and live output."""
    import http.cookiejar
    import re
    import subprocess
    import urllib.parse
    import urllib.request
    secret = subprocess.run([sys.executable, "-m", "dtsd", "token", "add", "bench", "--role",
                             "admin", "-c", str(master.ini_path)], capture_output=True,
                            text=True, check=True, cwd=ROOT).stdout.strip()
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(path: str) -> str:
        with opener.open(master.web_url + path, timeout=30) as reply:
            return reply.read().decode()
    for _ in range(50):                      # the web child rereads the tokens file each second
        csrf = re.search(r'name="csrf" value="(\w+)"', get("/login")).group(1)
        form = urllib.parse.urlencode({"csrf": csrf, "token": secret}).encode()
        with opener.open(master.web_url + "/login", data=form, timeout=30) as reply:
            if "/login" not in reply.url:
                break
        time.sleep(0.2)
    else:
        raise RuntimeError("the web UI refused the bench's token")
    print("web UI (a whole page over HTTP, logged in):")
    report("overview /", lambda i: get("/"), calls)
    report("job page /jobs/ID", lambda i: get(f"/jobs/{ids[i]}"), calls)
    report("jobs /jobs (50 a page)", lambda i: get("/jobs"), calls)
    report("jobs /jobs?status=FAILED&queue=rare", lambda i: get(
        "/jobs?status=FAILED&queue=rare"), calls)

    # Live output: a running job writes the time it writes each line; the page's stream
    # (what the job page's EventSource reads) is read here as the line arrives.
    import json
    command = "for i in $(seq 40); do date +%s.%N; sleep 0.1; done"
    csrf = re.search(r'name="csrf" value="(\w+)"', get("/submit")).group(1)
    form = urllib.parse.urlencode({"csrf": csrf, "command": command}).encode()
    with opener.open(master.web_url + "/submit", data=form, timeout=30) as reply:
        job = reply.url.rsplit("/", 1)[1]
    delays = []
    with opener.open(master.web_url + f"/jobs/{job}/events", timeout=60) as stream:
        for raw in stream:
            line = raw.decode().strip()
            if line.startswith("event: end"):
                break
            if not line.startswith("data: "):
                continue
            arrived = time.time()
            event = json.loads(line[6:])
            for written in event.get("text", "").split():
                delays.append((arrived - float(written)) * 1000)
    delays.sort()
    if delays:
        print(f"  live output, write -> event stream ({len(delays)} lines)  "
              f"p50 {delays[len(delays) // 2]:7.2f} ms   "
              f"p99 {delays[min(len(delays) - 1, int(len(delays) * 0.99))]:7.2f} ms")
    else:
        print("  live output: no line arrived")


def list_filters() -> list[tuple[str, dict]]:
    S = pb.JobStatus
    week_ago = datetime.now(timezone.utc) - timedelta(days=DAYS)
    window = {}
    after, before = pb.ListJobsRequest().created_after, pb.ListJobsRequest().created_before
    after.FromDatetime((week_ago + timedelta(days=2)).replace(tzinfo=None))
    before.FromDatetime((week_ago + timedelta(days=3)).replace(tzinfo=None))
    window = {"created_after": after, "created_before": before}
    return [
        ("none", {}),
        ("status SUCCEEDED", {"statuses": [S.SUCCEEDED]}),
        ("status CANCELLED", {"statuses": [S.CANCELLED]}),
        ("statuses FAILED+CANCELLED", {"statuses": [S.FAILED, S.CANCELLED]}),
        ("queue default", {"queue": "default"}),
        ("queue rare", {"queue": "rare"}),
        ("name job-7", {"name": "job-7"}),
        ("status SUCCEEDED + queue batch", {"statuses": [S.SUCCEEDED], "queue": "batch"}),
        ("status FAILED + queue rare", {"statuses": [S.FAILED], "queue": "rare"}),
        ("status CANCELLED + name job-3", {"statuses": [S.CANCELLED], "name": "job-3"}),
        ("dead-lettered", {"dead_lettered": True}),
        ("created in a 1-day window", window),
    ]


def prune_plan(dsn: str, retention: float) -> str:
    """The leader's prune query under EXPLAIN (ANALYZE, BUFFERS): top node, time, buffers."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        lines = [row[0] for row in conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS) " + store.PRUNE_SELECT,
            {"older_than": retention, "limit": 5000})]
    scans = [line.strip().removeprefix("->").strip().split("  (")[0] for line in lines
             if "Scan" in line]
    buffers = next((line.strip() for line in lines if line.strip().startswith("Buffers")), "")
    total = next(line for line in lines if line.startswith("Execution Time"))
    return f"{'; '.join(scans)}; {buffers}; {total}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--servers", type=int, default=2)
    args = parser.parse_args()

    print(f"machine: {pipeline.machine()}, grpcio {grpc.__version__}")
    pg = PostgresServer().start()
    redis = RedisServer().start()
    workdir = Path(tempfile.mkdtemp(prefix="dtsd-bench-"))
    (workdir / "run").mkdir(parents=True)
    dsn = pg.create_database("bench")
    tokens = workdir / "tokens"
    tokens.write_text("")
    master = DtsdMaster(workdir, "bench", {
        "dtsd": {"node_id": "bench", "runtime_dir": str(workdir / "run"),
                 "log_level": os.environ.get("BENCH_LOG", "warning")},
        "server": {"listen": f"127.0.0.1:{free_port()}", "processes": args.servers,
                   "tokens_file": str(tokens), "anonymous_role": "admin"},
        "worker": {"processes": 1},
        "web": {"processes": 1, "listen": f"127.0.0.1:{free_port()}"},
        "postgres": {"dsn": dsn},
        "redis": {"url": redis.url},
    })
    print(f"dtsd: {args.servers} servers, 1 worker; {args.jobs:,} jobs; {args.calls} calls "
          f"per measure")
    channel = grpc.insecure_channel(master.address)
    try:
        master.start()
        load(dsn, args.jobs)
        api = pb_grpc.SchedulerStub(channel)
        rng = random.Random(13)
        ids = [job_id(rng.randrange(args.jobs)) for _ in range(args.calls + 20)]

        print("GetJob:")
        report("GetJob", lambda i: api.GetJob(pb.GetJobRequest(id=ids[i]), timeout=10),
               args.calls)
        report("GetJob with attempts", lambda i: api.GetJob(
            pb.GetJobRequest(id=ids[i], include_attempts=True), timeout=10), args.calls)

        for size in (100, 20):
            print(f"ListJobs, {size} per page:")
            for name, fields in list_filters():
                request = pb.ListJobsRequest(page_size=size, **fields)
                first = api.ListJobs(request, timeout=10)
                if len(first.jobs) < size:
                    print(f"  ({name}: only {len(first.jobs)} jobs match)")
                report(name, lambda i, r=request: api.ListJobs(r, timeout=10), args.calls)

            token = [api.ListJobs(pb.ListJobsRequest(page_size=size), timeout=10).next_page_token]

            def next_page(i: int, size: int = size, token: list[str] = token) -> None:
                reply = api.ListJobs(pb.ListJobsRequest(page_size=size, page_token=token[0]),
                                     timeout=10)
                token[0] = reply.next_page_token
            report("next pages (page_token), no filter", next_page, args.calls)

            token = [api.ListJobs(pb.ListJobsRequest(
                page_size=size, queue="rare", statuses=[pb.JobStatus.FAILED]),
                timeout=10).next_page_token]

            def next_rare(i: int, size: int = size, token: list[str] = token) -> None:
                reply = api.ListJobs(pb.ListJobsRequest(
                    page_size=size, queue="rare", statuses=[pb.JobStatus.FAILED],
                    page_token=token[0]), timeout=10)
                token[0] = reply.next_page_token
            report("next pages, FAILED + queue rare", next_rare, args.calls)

        print("ClusterStatus:")
        report("ClusterStatus", lambda i: api.ClusterStatus(pb.ClusterStatusRequest(),
                                                            timeout=10), args.calls)
        print("prune (the leader's query, retention 30 days; nothing is that old):")
        print(f"  {prune_plan(dsn, 30 * 86400.0)}")
        print("prune, retention 6 days (a day of jobs is that old; up to 5,000 per statement):")
        print(f"  {prune_plan(dsn, 6 * 86400.0)}")
        web_pages(master, ids, args.calls)
    finally:
        channel.close()
        master.stop()
        if os.environ.get("BENCH_LOG"):
            print(master.log()[-20000:])
        redis.cleanup()
        pg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
