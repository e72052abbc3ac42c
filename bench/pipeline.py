#!/usr/bin/python3
"""Pipeline benchmark: throughput of `true` jobs and submit->start latency at a steady rate.

Runs a real dtsd (2 servers, 2 workers x concurrency 4 unless told otherwise) over a
private PostgreSQL with durable settings (fsync, synchronous_commit on: as production,
and as the peers in the performance research, outside this repository, were measured) and a private Redis.

    /usr/bin/python3 bench/pipeline.py [--jobs 5000] [--runs 3] [--rate 50] [--latency-jobs 200]

Prints each run and the medians. It is a benchmark, not a test: it asserts nothing
about speed, only that every job ran exactly once.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psycopg  # noqa: E402

from dtsd.dtsdpb import pb, pb_grpc  # noqa: E402
from tests.helpers import DtsdMaster, PostgresServer, RedisServer, free_port  # noqa: E402

DURABLE = {"fsync": os.environ.get("BENCH_FSYNC", "on"), "synchronous_commit": os.environ.get("BENCH_FSYNC", "on"), "full_page_writes": "on"}


def machine() -> str:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def host_cpu() -> float:
    """Seconds of CPU the whole host has spent busy (all cores: user, nice, system, irq, softirq)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def count_done(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM jobs WHERE status IN "
                            "('SUCCEEDED', 'FAILED', 'CANCELLED')").fetchone()[0]


def wait_done(dsn: str, total: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while count_done(dsn) < total:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {count_done(dsn)} of {total} done")
        time.sleep(0.2)


def submit(api, jobs: int, batch: int, clients: int) -> None:
    """`jobs` `true` jobs: in SubmitJobs of `batch`, or (batch 1) one SubmitJob each from
    `clients` threads."""
    if batch > 1:
        for i in range(0, jobs, batch):
            api.SubmitJobs(pb.SubmitJobsRequest(
                jobs=[pb.JobSpec(command="true") for _ in range(min(batch, jobs - i))]))
        return

    def submitter(n: int) -> None:
        for _ in range(n):
            api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true")))
    share = [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]
    threads = [threading.Thread(target=submitter, args=(n,)) for n in share]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def throughput(api, dsn: str, jobs: int, batch: int, clients: int) -> tuple[float, float]:
    """(jobs/s from the first submit to the last finish, by PostgreSQL's own timestamps;
    host CPU per job in ms, every process of the machine included)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE jobs, job_attempts")
    cpu = host_cpu()
    started = time.time()
    submit(api, jobs, batch, clients)
    wait_done(dsn, jobs)
    cpu = host_cpu() - cpu
    with psycopg.connect(dsn) as conn:
        last, once = conn.execute(
            """SELECT extract(epoch FROM max(finished_at)),
                      bool_and(attempts = 1 AND status = 'SUCCEEDED') FROM jobs""").fetchone()
        attempts = conn.execute("SELECT count(*) FROM job_attempts").fetchone()[0]
    if not once or attempts != jobs:
        raise SystemExit(f"not exactly once: {attempts} attempts for {jobs} jobs")
    return jobs / (float(last) - started), cpu / jobs * 1000


def latency(api, dsn: str, jobs: int, rate: float) -> tuple[float, float]:
    """Submit one job every 1/rate s; submit->start = claim time - client send time (ms)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE jobs, job_attempts")
    sent: dict[str, float] = {}
    period = 1.0 / rate
    next_at = time.monotonic()
    for _ in range(jobs):
        next_at += period
        time.sleep(max(0.0, next_at - time.monotonic()))
        t = time.time()
        sent[api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true"))).id] = t
    wait_done(dsn, jobs)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id, extract(epoch FROM started_at) FROM jobs").fetchall()
    return p50_p99([(float(start) - sent[job_id]) * 1000 for job_id, start in rows])


def p50_p99(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return values[len(values) // 2], values[min(len(values) - 1, int(len(values) * 0.99))]


def start_dtsd(dsn: str, redis: RedisServer, workdir: Path, servers: int, workers: int,
               concurrency: int, limits: str | None = None) -> DtsdMaster:
    """A dtsd master over the database `dsn` and `redis`, once it serves.

    `workdir` must not be under the PostgreSQL server's directory: that is the postgres
    user's, and dtsd's children hold no capability to read past its mode even when the
    master runs as root.
    """
    (workdir / "run").mkdir(parents=True, exist_ok=True)
    master = DtsdMaster(workdir, "bench", {
        "dtsd": {"node_id": "bench", "runtime_dir": str(workdir / "run"), "log_level": os.environ.get("BENCH_LOG", "warning")},
        "server": {"listen": f"127.0.0.1:{free_port()}", "processes": servers},
        "worker": {"processes": workers, "concurrency": concurrency,
                   **({"limits": limits} if limits is not None else {})},
        "postgres": {"dsn": dsn},
        "redis": {"url": redis.url},
    })
    try:
        master.start()
    except BaseException:
        master.stop()
        raise
    return master


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--limits", default=None, metavar="TEXT",
                        help="[worker] limits for the run (\"\": none, so no prlimit per job); "
                             "default: dtsd's default")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    print(f"dtsd: {args.servers} servers, {args.workers} workers x concurrency "
          f"{args.concurrency}; PostgreSQL with fsync and synchronous_commit on")
    pg = PostgresServer(settings=DURABLE).start()
    redis = RedisServer().start()
    workdir = Path(tempfile.mkdtemp(prefix="dtsd-bench-"))
    master = None
    try:
        master = start_dtsd(pg.create_database("bench"), redis, workdir, args.servers,
                            args.workers, args.concurrency, args.limits)
        api = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))
        dsn = master.sections["postgres"]["dsn"]
        throughput(api, dsn, 500, 500, 1)  # warm up: connections, plans, page cache
        results: dict[str, list[float]] = {"batch": [], "single": []}
        cpu: dict[str, list[float]] = {"batch": [], "single": []}
        for run in range(args.runs):
            rate, ms = throughput(api, dsn, args.jobs, 500, 1)
            results["batch"].append(rate)
            cpu["batch"].append(ms)
            print(f"run {run + 1}: {args.jobs} jobs submitted in batches of 500: {rate:7.0f} jobs/s, "
                  f"host CPU {ms:.2f} ms/job")
            rate, ms = throughput(api, dsn, args.jobs, 1, 4)
            results["single"].append(rate)
            cpu["single"].append(ms)
            print(f"run {run + 1}: {args.jobs} jobs, one SubmitJob each (4 clients): "
                  f"{rate:7.0f} jobs/s, host CPU {ms:.2f} ms/job")
        p50s, p99s = [], []
        for run in range(args.runs):
            p50, p99 = latency(api, dsn, args.latency_jobs, args.rate)
            p50s.append(p50)
            p99s.append(p99)
            print(f"run {run + 1}: submit->start at {args.rate:.0f} jobs/s: "
                  f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        print(f"median throughput, batch submit:  {statistics.median(results['batch']):.0f} jobs/s, "
              f"host CPU {statistics.median(cpu['batch']):.2f} ms/job")
        print(f"median throughput, single submit: {statistics.median(results['single']):.0f} jobs/s, "
              f"host CPU {statistics.median(cpu['single']):.2f} ms/job")
        print(f"median submit->start latency at {args.rate:.0f} jobs/s: "
              f"p50 {statistics.median(p50s):.1f} ms, p99 {statistics.median(p99s):.1f} ms")
    finally:
        if master is not None:
            master.stop()
        redis.cleanup()
        pg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
