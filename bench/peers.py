#!/usr/bin/python3
"""Peers benchmark: dtsd, Celery, Dramatiq and a bare Redis loop on one workload, interleaved.

    make bench-peers BENCH_ARGS='--jobs 500 --runs 1'
    /usr/bin/python3 bench/peers.py [--jobs 5000] [--runs 3] [--rate 50] [--latency-jobs 200]
                                    [--only redis-loop,dramatiq,celery,dtsd-batch,dtsd-single]

The workload is the performance research's (research/performance.md of the project's
design notes, which are not in this repository): `--jobs` jobs of `/bin/sh -c true` with
output captured, 4 executors per system, one message per job (dtsd-batch: 500 jobs per
SubmitJobs); throughput is jobs / (last finish - first submit). Then `--latency-jobs` jobs
at `--rate` jobs/s, one at a time: submit->start p50 and p99 (a peer's start is its task
body's first line; dtsd's is the claim, just before the job's process is spawned).

This script and dtsd run on Debian's Python; the peers' workers and submitter run on the
venv's (`--venv`, made by `make bench-peers`), as subprocesses. Each repetition starts
every system afresh, warms it up with 500 jobs that are not counted, measures it and stops
it before the next system starts, so no system's idle processes are in another's CPU
figure. PostgreSQL (durable, as in bench/pipeline.py) and the Redis servers stay up for the
whole invocation. Every run is checked to have run each job exactly once, or the script
fails. It prints one table and writes it, the raw runs and a chart to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import redis  # noqa: E402

import pipeline  # noqa: E402  (bench/ is this script's own directory)
from dtsd.dtsdpb import pb_grpc  # noqa: E402
from peer_systems import job  # noqa: E402
from tests.helpers import PostgresServer, RedisServer, clean_env, tail  # noqa: E402

RESULTS = BENCH / "results"
WARM_UP_JOBS = 500
EXECUTORS = 4
TIMEOUT = 600  # seconds a run may take before the script gives up on it


@dataclass(frozen=True)
class System:
    name: str
    label: str
    service: str  # systems with the same service share one start (dtsd-batch, dtsd-single)
    durable: bool
    batch: int = 1
    clients: int = 1


SYSTEMS = [
    System("redis-loop", "bare redis-py BLMOVE loop, 4 processes", "redis-loop", False),
    System("dramatiq", "Dramatiq, 4 processes × 1 thread, Redis broker", "dramatiq", False),
    System("celery", "Celery, prefork 4, Redis broker, no result backend", "celery", False),
    System("dtsd-batch", "dtsd, SubmitJobs of 500, 2 servers + 1 worker × 4", "dtsd", True,
           batch=500),
    System("dtsd-single", "dtsd, one SubmitJob per job from 4 threads, same", "dtsd", True,
           clients=4),
]


class Peer:
    """One peer's worker processes (venv Python, each in a session of its own) and its
    submitter, over the shared broker and record Redis servers."""

    def __init__(self, name: str, python: Path, broker: RedisServer, record: RedisServer,
                 logdir: Path):
        self.name = name
        self.python = python
        self.broker = broker
        self.record = record.client()
        self.env = clean_env({"PYTHONPATH": str(BENCH), job.BROKER_URL_ENV: broker.url,
                              job.RECORD_URL_ENV: record.url})
        self.logfile = logdir / f"{name}.log"
        self.procs: list[subprocess.Popen[bytes]] = []

    def commands(self) -> list[list[str]]:
        python = str(self.python)
        if self.name == "redis-loop":
            return [[python, str(BENCH / "peer_systems" / "redis_loop.py")]] * EXECUTORS
        if self.name == "dramatiq":
            return [[python, "-m", "dramatiq", "peer_systems.dramatiq_tasks",
                     "--processes", str(EXECUTORS), "--threads", "1"]]
        if self.name == "celery":
            return [[python, "-m", "celery", "-A", "peer_systems.celery_tasks", "worker",
                     "--pool", "prefork", "--concurrency", str(EXECUTORS),
                     "--loglevel", "WARNING"]]
        raise ValueError(self.name)

    def start(self) -> None:
        self.broker.client().flushall()
        self.record.flushall()
        with open(self.logfile, "ab") as log:
            for command in self.commands():
                self.procs.append(subprocess.Popen(
                    command, cwd=BENCH, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True))
        self.run(WARM_UP_JOBS, rate=0)  # also proves that the workers consume

    def stop(self) -> None:
        """TERM each session (a warm shutdown), then KILL whatever is left of it."""
        for proc in self.procs:
            kill_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs = []

    def throughput(self, jobs: int, system: System) -> tuple[float, float]:
        cpu, first, records = self.run(jobs, rate=0)
        return jobs / (max(r.finished for r in records) - first), cpu / jobs * 1000

    def latency(self, jobs: int, rate: float) -> tuple[float, float]:
        _, _, records = self.run(jobs, rate)
        return pipeline.p50_p99([(r.started - r.submitted) * 1000 for r in records])

    def run(self, jobs: int, rate: float) -> tuple[float, float, list[job.Record]]:
        """Submit `jobs` (at `rate` jobs/s, 0: at once) and wait for their records:
        (host CPU seconds from the first submit until all were recorded, the wall time of
        the first submit, one record per job: anything else exits)."""
        self.record.delete(job.DONE_KEY)
        submitter = subprocess.Popen(
            [str(self.python), str(BENCH / "peer_systems" / "submit.py"), self.name,
             str(jobs), "--rate", str(rate)],
            cwd=BENCH, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True)
        try:
            if submitter.stdout.readline().strip() != "ready":
                raise SystemExit(f"{self.name}: the submitter did not start "
                                 f"(exit {submitter.wait()})")
            cpu = pipeline.host_cpu()
            submitter.stdin.write("go\n")
            submitter.stdin.flush()
            deadline = time.monotonic() + TIMEOUT
            while self.record.llen(job.DONE_KEY) < jobs:
                for proc in self.procs:
                    if proc.poll() is not None:
                        raise SystemExit(f"{self.name}: a worker exited with {proc.returncode}:"
                                         f"\n{tail(self.logfile, 40)}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"{self.name}: timed out: {self.record.llen(job.DONE_KEY)}"
                                     f" of {jobs} jobs done\n{tail(self.logfile, 40)}")
                time.sleep(0.02)
            cpu = pipeline.host_cpu() - cpu
            line = submitter.stdout.readline().split()
            if submitter.wait(timeout=60) != 0 or line[:1] != ["first"]:
                raise SystemExit(f"{self.name}: the submitter failed ({submitter.returncode})")
        finally:
            kill_group(submitter.pid, signal.SIGKILL)
            submitter.wait()
        records = [job.parse(raw) for raw in self.record.lrange(job.DONE_KEY, 0, -1)]
        check_once(self.name, jobs, [r.job_id for r in records])
        return cpu, float(line[1]), records


class Dtsd:
    """dtsd as bench/pipeline.py runs it, with one worker: a master per start, over the
    PostgreSQL and Redis of the whole invocation."""

    def __init__(self, dsn: str, redis_server: RedisServer):
        self.dsn = dsn
        self.redis = redis_server
        self.master = None
        self.channel: grpc.Channel | None = None
        self.workdir: Path | None = None

    def start(self) -> None:
        # Not under the temporary directory of the peers' logs: see pipeline.start_dtsd.
        self.workdir = Path(tempfile.mkdtemp(prefix="dtsd-bench-peers-"))
        self.master = pipeline.start_dtsd(self.dsn, self.redis, self.workdir, servers=2,
                                          workers=1, concurrency=EXECUTORS)
        self.channel = grpc.insecure_channel(self.master.address)
        self.api = pb_grpc.SchedulerStub(self.channel)
        pipeline.throughput(self.api, self.dsn, WARM_UP_JOBS, 500, 1)

    def stop(self) -> None:
        if self.master is not None:
            self.channel.close()
            self.master.stop()
            self.master = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def throughput(self, jobs: int, system: System) -> tuple[float, float]:
        # pipeline.throughput checks exactly-once itself (attempts = 1, SUCCEEDED, one
        # job_attempts row per job) and exits if not.
        return pipeline.throughput(self.api, self.dsn, jobs, system.batch, system.clients)

    def latency(self, jobs: int, rate: float) -> tuple[float, float]:
        return pipeline.latency(self.api, self.dsn, jobs, rate)


def check_once(name: str, jobs: int, job_ids: list[int]) -> None:
    if len(job_ids) != jobs or set(job_ids) != set(range(jobs)):
        missing = jobs - len(set(job_ids) & set(range(jobs)))
        raise SystemExit(f"{name}: not exactly once: {len(job_ids)} runs recorded for {jobs} "
                         f"jobs, {missing} jobs never ran, "
                         f"{len(job_ids) - len(set(job_ids))} ran twice or more")


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def versions(python: Path, pg: PostgresServer) -> dict[str, str]:
    def output(*command: str) -> str:
        return subprocess.run(command, capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    venv = json.loads(output(str(python), "-c", (
        "import json, platform; from importlib.metadata import version; "
        "print(json.dumps({'python': platform.python_version(), "
        "**{name: version(name) for name in ('celery', 'kombu', 'dramatiq', 'redis')}}))")))
    return {
        "python": sys.version.split()[0],
        "venv python": venv["python"],
        "celery": f"{venv['celery']} (kombu {venv['kombu']})",
        "dramatiq": venv["dramatiq"],
        "redis-py (peers)": venv["redis"],
        "redis-py (dtsd, Debian)": redis.__version__,
        "grpcio (dtsd, Debian)": grpc.__version__,
        "postgresql": output(str(pg.bindir / "postgres"), "--version").split()[2],
        "redis-server": output("redis-server", "--version").split()[2].removeprefix("v="),
        "dtsd": output("git", "describe", "--always", "--dirty", "--tags"),
    }


def summarize(runs: list[dict], systems: list[System]) -> list[dict]:
    rows = []
    for system in systems:
        mine = [run for run in runs if run["system"] == system.name]

        def spread(key: str) -> dict[str, float]:
            values = [run[key] for run in mine]
            return {"median": statistics.median(values), "min": min(values), "max": max(values)}
        rows.append({"system": system.name, "label": system.label, "durable": system.durable,
                     "jobs_per_s": spread("jobs_per_s"),
                     "cpu_ms_per_job": spread("cpu_ms_per_job"),
                     "p50_ms": spread("p50_ms"), "p99_ms": spread("p99_ms")})
    return rows


def table(rows: list[dict], runs: int, rate: float) -> str:
    lines = [f"| system | jobs/s, median (min–max) of {runs} | host CPU per job, median "
             f"| submit→start p50 / p99 at {rate:g} jobs/s, medians | durable record |",
             "|---|---|---|---|---|"]
    for row in rows:
        rate_ = row["jobs_per_s"]
        lines.append(f"| {row['label']} | {rate_['median']:,.0f} ({rate_['min']:,.0f}–"
                     f"{rate_['max']:,.0f}) | {row['cpu_ms_per_job']['median']:.2f} ms | "
                     f"{row['p50_ms']['median']:.1f} / {row['p99_ms']['median']:.1f} ms | "
                     f"{'yes' if row['durable'] else 'no'} |")
    return "\n".join(lines)


def write_results(results: dict, text: str, python: Path) -> list[Path]:
    RESULTS.mkdir(exist_ok=True)
    # Named by day and commit: one day may hold runs of several commits.
    stem = RESULTS / f"peers-{results['date']}-{results['versions']['dtsd']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text + "\n")
    chart = subprocess.run([str(python), str(BENCH / "peer_systems" / "chart.py"),
                            str(stem.with_suffix(".json")), str(stem.with_suffix(".png"))],
                           capture_output=True, text=True)
    if chart.returncode != 0:
        print(f"the chart failed:\n{chart.stderr}", file=sys.stderr)
        return [stem.with_suffix(".md"), stem.with_suffix(".json")]
    return [stem.with_suffix(".md"), stem.with_suffix(".json"), stem.with_suffix(".png")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument("--only", default=",".join(s.name for s in SYSTEMS),
                        metavar="SYSTEM[,SYSTEM]",
                        help=f"systems to run, in this order: {', '.join(s.name for s in SYSTEMS)}")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-peers",
                        help="the venv with celery, dramatiq[redis], redis and matplotlib")
    args = parser.parse_args()
    chosen = [s for s in SYSTEMS if s.name in args.only.split(",")]
    unknown = set(args.only.split(",")) - {s.name for s in SYSTEMS}
    if unknown or not chosen:
        parser.error(f"--only: unknown system(s) {', '.join(sorted(unknown))}")
    python = args.venv.resolve() / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} not found: `make bench-peers` creates the venv")

    # TERM (a CI timeout, say) stops every process as Ctrl-C does; INT is restored for a
    # run started in the background, where the shell leaves it ignored.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logdir = Path(tempfile.mkdtemp(prefix="dtsd-bench-peers-logs-"))
    servers: list = []
    services: dict = {}
    try:
        pg = PostgresServer(settings=pipeline.DURABLE)
        servers.append(pg)
        pg.start()
        for _ in range(3):  # dtsd's, the peers' broker, the peers' record
            servers.append(RedisServer().start())
        dtsd_redis, broker, record = servers[1:]
        services["dtsd"] = Dtsd(pg.create_database("bench"), dtsd_redis)
        for name in ("redis-loop", "dramatiq", "celery"):
            services[name] = Peer(name, python, broker, record, logdir)

        info = versions(python, pg)
        print(f"machine: {pipeline.machine()}")
        print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
        print(f"workload: {args.jobs} jobs of `sh -c true` per run, {EXECUTORS} executors; "
              f"latency: {args.latency_jobs} jobs at {args.rate:g} jobs/s; {args.runs} runs, "
              f"interleaved, after a warm-up of {WARM_UP_JOBS} jobs per start")
        runs = []
        for rep in range(1, args.runs + 1):
            for name, group in itertools.groupby(chosen, key=lambda system: system.service):
                service = services[name]
                service.start()
                try:
                    for system in group:
                        rate, cpu_ms = service.throughput(args.jobs, system)
                        p50, p99 = service.latency(args.latency_jobs, args.rate)
                        runs.append({"system": system.name, "run": rep, "jobs": args.jobs,
                                     "jobs_per_s": rate, "cpu_ms_per_job": cpu_ms,
                                     "latency_jobs": args.latency_jobs, "p50_ms": p50,
                                     "p99_ms": p99, "exactly_once": True})
                        print(f"run {rep}: {system.name:<11} {rate:7.0f} jobs/s, host CPU "
                              f"{cpu_ms:.2f} ms/job, submit->start p50 {p50:.1f} ms, p99 "
                              f"{p99:.1f} ms; each of the {args.jobs} + {args.latency_jobs} "
                              "jobs ran exactly once", flush=True)
                finally:
                    service.stop()
    finally:
        for service in services.values():
            service.stop()
        for server in reversed(servers):
            server.cleanup()
        shutil.rmtree(logdir, ignore_errors=True)

    rows = summarize(runs, chosen)
    command = "/usr/bin/python3 bench/peers.py " + shlex.join(sys.argv[1:])
    results = {"date": datetime.date.today().isoformat(), "machine": pipeline.machine(),
               "versions": info, "command": command.strip(),
               "settings": {"jobs": args.jobs, "runs": args.runs, "rate": args.rate,
                            "latency_jobs": args.latency_jobs, "executors": EXECUTORS,
                            "warm_up_jobs": WARM_UP_JOBS,
                            "postgresql": "fsync, synchronous_commit, full_page_writes on"},
               "summary": rows, "runs": runs}
    text = "\n".join([
        f"# Peers benchmark, {results['date']}", "",
        f"Machine: {results['machine']}", "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
        f"Command: `{results['command']}`", "",
        f"Workload: {args.jobs:,} jobs of `/bin/sh -c true` with output captured, "
        f"{EXECUTORS} executors, one message per job (dtsd-batch: 500 per SubmitJobs); "
        f"throughput = jobs / (last finish − first submit). Latency: {args.latency_jobs} "
        f"jobs at {args.rate:g} jobs/s. Systems interleaved, {args.runs} runs, each after "
        f"a fresh start and a warm-up of {WARM_UP_JOBS} jobs; host CPU from /proc/stat, "
        "every process of the machine included. Every job of every run ran exactly once.",
        "", table(rows, args.runs, args.rate)])
    print()
    print(table(rows, args.runs, args.rate))
    for path in write_results(results, text, python):
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
