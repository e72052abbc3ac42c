#!/usr/bin/python3
"""Where dtsd's CPU goes per job: per-process CPU from /proc, PostgreSQL and Redis counters.

Starts the same dtsd as bench/pipeline.py (durable PostgreSQL, Redis, 2 servers, 2 workers x
concurrency 4) and runs phases against it, in this order:

  account  N jobs by single SubmitJob (4 client threads), then N in SubmitJobs of 500:
           CPU of each process (utime+stime; cutime+cstime: what a process reaped, the
           launcher's jobs, the postmaster's exited backends), pg_stat_database,
           pg_stat_wal and pg_stat_user_tables deltas, Redis INFO commandstats deltas,
           all per job; written to OUT/account.json
  spy      N jobs by single SubmitJob while `py-spy record --format raw` samples a worker,
           both servers and a launcher (PY_SPY: the py-spy binary; --gil: GIL holder only)
  explain  pg_class sizes and the plans of the hot updates, as planned now
  stmts    200 jobs with log_min_duration_statement = 0; the log goes to OUT/pglog.txt

    /usr/bin/python3 bench/profile.py [--jobs 5000] [--phases account,spy,explain,stmts]

Host CPU is printed too, but on a shared machine only the per-process numbers mean much.
bench/results/profile-2026-12-03.md reads the output.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402
import psycopg  # noqa: E402
import redis as redismod  # noqa: E402

import pipeline  # noqa: E402
from dtsd.dtsdpb import pb, pb_grpc  # noqa: E402
from tests.helpers import PostgresServer, RedisServer  # noqa: E402

TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_OUT = "/tmp/dtsd-profile"
OUT = Path(DEFAULT_OUT)
PYSPY = os.environ.get("PY_SPY", "py-spy")


def stat(pid: int) -> tuple[float, float, float, float] | None:
    try:
        raw = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    f = raw.rsplit(")", 1)[1].split()
    # f[0] = state (field 3); utime = field 14 -> f[11]
    return tuple(int(x) / TCK for x in f[11:15])  # utime, stime, cutime, cstime


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(x) for x in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


def cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def tree(master: int, postmaster: int, redis_pid: int) -> dict[str, list[int]]:
    roles: dict[str, list[int]] = defaultdict(list)
    roles["master"].append(master)
    for c in children(master):
        cl = cmdline(c)
        m = re.search(r"dtsd\.(server|worker|coordinator)\b", cl)
        role = m.group(1) if m else "other:" + cl[:80]
        roles[role].append(c)
        if role == "worker":
            for g in children(c):
                if "dtsd.launcher" in cmdline(g):
                    roles["launcher"].append(g)
    roles["postgres"] = [postmaster] + children(postmaster)
    roles["redis"].append(redis_pid)
    return dict(roles)


def snapshot(roles: dict[str, list[int]]) -> dict[str, dict[int, tuple]]:
    return {role: {pid: stat(pid) for pid in pids} for role, pids in roles.items()}


def pg_counters(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("""SELECT xact_commit, xact_rollback, tup_inserted, tup_updated,
            tup_deleted, tup_returned, tup_fetched FROM pg_stat_database
            WHERE datname = current_database()""").fetchone()
        wal = conn.execute("SELECT wal_records, wal_bytes, wal_sync FROM pg_stat_wal").fetchone()
        att = conn.execute("""SELECT seq_scan, seq_tup_read, coalesce(idx_scan, 0)
            FROM pg_stat_user_tables WHERE relname = 'job_attempts'""").fetchone()
        tabs = conn.execute("""SELECT sum(seq_scan) FILTER (WHERE relname = 'jobs'),
            sum(seq_tup_read) FILTER (WHERE relname = 'jobs'),
            sum(idx_scan) FILTER (WHERE relname = 'jobs'),
            sum(n_tup_hot_upd), sum(n_tup_upd), sum(autoanalyze_count), sum(autovacuum_count)
            FROM pg_stat_user_tables WHERE relname IN ('jobs', 'job_attempts')""").fetchone()
    return dict(zip(["xact_commit", "xact_rollback", "tup_inserted", "tup_updated",
                     "tup_deleted", "tup_returned", "tup_fetched", "wal_records", "wal_bytes",
                     "wal_sync", "jobs_seq_scan", "jobs_seq_tup_read", "jobs_idx_scan",
                     "hot_upd", "upd", "autoanalyze", "autovacuum",
                     "att_seq_scan", "att_seq_tup_read", "att_idx_scan"],
                    [int(x or 0) for x in (*row, *wal, *tabs, *att)]))


def redis_counters(r) -> dict[str, int]:
    stats = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}


def wait_done(dsn: str, total: int) -> None:
    # one connection for the whole wait (a new backend per poll would land in the
    # postmaster's cutime); one count every 0.5 s
    with psycopg.connect(dsn, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM jobs WHERE status IN "
                           "('SUCCEEDED', 'FAILED', 'CANCELLED')").fetchone()[0] < total:
            time.sleep(0.5)


def accounted_run(api, dsn, r, roles, jobs, batch, clients, label, analyze=False) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE jobs, job_attempts")
        if analyze:     # cached generic plans made on the empty tables are invalidated
            conn.execute("ANALYZE jobs, job_attempts")
    time.sleep(1.0)
    before = snapshot(roles)
    pg0, rd0 = pg_counters(dsn), redis_counters(r)
    host0 = pipeline.host_cpu()
    me0 = os.times()
    t0 = time.time()
    pipeline.submit(api, jobs, batch, clients)
    me1 = os.times()
    wait_done(dsn, jobs)
    wall = time.time() - t0
    host1 = pipeline.host_cpu()
    after = snapshot(roles)
    pg1, rd1 = pg_counters(dsn), redis_counters(r)
    res = {"label": label, "jobs": jobs, "wall": wall, "host_ms": (host1 - host0) / jobs * 1000,
           "client_ms": ((me1.user - me0.user) + (me1.system - me0.system)) / jobs * 1000,
           "procs": {}, "pg": {k: (pg1[k] - pg0[k]) / jobs for k in pg1},
           "redis": {k: (rd1.get(k, 0) - rd0.get(k, 0)) / jobs for k in rd1
                     if rd1.get(k, 0) != rd0.get(k, 0)}}
    for role, pids in roles.items():
        u = s = cu = cs = 0.0
        for pid in pids:
            a, b = before[role].get(pid), after[role].get(pid)
            if a is None or b is None:
                continue
            u += b[0] - a[0]; s += b[1] - a[1]; cu += b[2] - a[2]; cs += b[3] - a[3]
        res["procs"][role] = {"user_ms": u / jobs * 1000, "sys_ms": s / jobs * 1000,
                              "child_user_ms": cu / jobs * 1000, "child_sys_ms": cs / jobs * 1000}
    print(json.dumps(res, indent=1), flush=True)
    return res


def print_account(path: Path) -> None:
    """The per-process table of an account.json, in ms of CPU per job."""
    for r in json.loads(path.read_text()):
        print(f"== {r['label']}: {r['jobs']} jobs in {r['wall']:.1f}s, host {r['host_ms']:.2f} "
              f"ms/job, this client {r['client_ms']:.3f} ms/job")
        total = 0.0
        for role, p in r["procs"].items():
            own, kids = p["user_ms"] + p["sys_ms"], p["child_user_ms"] + p["child_sys_ms"]
            total += own + kids
            print(f"  {role:12s} self {own:6.3f} (sys {p['sys_ms']:.3f})  reaped {kids:6.3f}")
        print(f"  sum {total:.3f}")
        print("  pg:", {k: round(v, 3) for k, v in r["pg"].items()})
        print("  redis:", {k: round(v, 3) for k, v in sorted(r["redis"].items(),
                                                            key=lambda x: -x[1])})


def print_spy(path: Path, top: int = 25) -> None:
    """Self and total samples per frame (function, file:line) of a py-spy raw file."""
    own, total, threads, count = Counter(), Counter(), Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        threads[re.sub(r"^thread \(\d+\): ", "", frames[0])] += int(n)
        count += int(n)
        if len(frames) > 1:
            own[frames[-1]] += int(n)
        for frame in set(frames[1:]):
            total[frame] += int(n)
    print(f"{path}: {count} samples")
    for title, counter in (("threads", threads), ("self", own), ("total", total)):
        print(f"{title}:")
        for frame, n in counter.most_common(top):
            print(f"  {n:5d} {n / max(count, 1) * 100:5.1f}%  {frame}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--phases", default="account,spy,stmts")
    ap.add_argument("--spy-duration", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--gil", action="store_true")
    ap.add_argument("--single-only", action="store_true")
    ap.add_argument("--analyze", action="store_true",
                    help="ANALYZE after each TRUNCATE (bench/pipeline.py does not)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--custom-plans", action="store_true",
                    help="PostgreSQL with plan_cache_mode = force_custom_plan")
    ap.add_argument("--summarize", metavar="FILE", nargs="+",
                    help="print an account.json or py-spy raw file of an earlier run, and exit")
    args = ap.parse_args()
    if args.summarize:
        for name in args.summarize:
            (print_account if name.endswith(".json") else print_spy)(Path(name))
        return
    global OUT
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    print("machine:", pipeline.machine(), flush=True)
    settings = dict(pipeline.DURABLE)
    if args.custom_plans:   # what dtsd would get from prepare=False on its hot statements
        settings["plan_cache_mode"] = "force_custom_plan"
    pg = PostgresServer(settings=settings).start()
    rs = RedisServer().start()
    workdir = Path(tempfile.mkdtemp(prefix="dtsd-prof-"))
    master = None
    results = []
    try:
        master = pipeline.start_dtsd(pg.create_database("bench"), rs, workdir, 2, 2, 4)
        api = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))
        dsn = master.sections["postgres"]["dsn"]
        r = redismod.Redis.from_url(rs.url)
        postmaster = int(open(pg.data / "postmaster.pid").readline())
        roles = tree(master.pid, postmaster, rs.proc.pid)
        print("roles:", json.dumps(roles), flush=True)
        pipeline.throughput(api, dsn, 500, 500, 1)  # warm-up
        pipeline.throughput(api, dsn, 500, 1, 4)
        roles = tree(master.pid, postmaster, rs.proc.pid)   # postgres backends now open
        phases = args.phases.split(",")
        if "account" in phases:
            for _ in range(args.repeat):
                results.append(accounted_run(api, dsn, r, roles, args.jobs, 1, 4, "single",
                                             args.analyze))
                if not args.single_only:
                    results.append(accounted_run(api, dsn, r, roles, args.jobs, 500, 1, "batch",
                                                 args.analyze))
            (OUT / "account.json").write_text(json.dumps(results, indent=1))
        if "spy" in phases:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("TRUNCATE jobs, job_attempts")
            targets = {"worker": roles["worker"][0], "server0": roles["server"][0],
                       "server1": roles["server"][1], "launcher": roles["launcher"][0]}
            spies = []
            for name, pid in targets.items():
                spies.append(subprocess.Popen(
                    [PYSPY, "record", "--pid", str(pid), "--rate", "100",
                     "--duration", str(args.spy_duration), "--nonblocking", "--threads",
                     *(["--gil"] if args.gil and "launcher" not in name else []),
                     "--format", "raw", "-o", str(OUT / f"spy-{name}.txt")],
                    stdout=subprocess.DEVNULL, stderr=open(OUT / f"spy-{name}.err", "w")))
            time.sleep(1.0)
            t0 = time.time()
            jobs = args.jobs
            submitter = threading.Thread(target=pipeline.submit, args=(api, jobs, 1, 4))
            submitter.start()
            for s in spies:
                s.wait()
            print(f"spy done after {time.time() - t0:.1f}s; done so far "
                  f"{pipeline.count_done(dsn)}", flush=True)
            submitter.join()
            wait_done(dsn, jobs)
        if "explain" in phases:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for sql in ("SELECT relname, relpages, reltuples FROM pg_class WHERE relname IN ('jobs', 'job_attempts')",
                            "EXPLAIN UPDATE job_attempts a SET finished_at = now() FROM unnest(ARRAY['x','y']::text[], ARRAY[1,1]::int[]) AS u(job_id, attempt) WHERE a.job_id = u.job_id AND a.attempt = u.attempt AND a.finished_at IS NULL",
                            "EXPLAIN UPDATE jobs j SET status = 'RUNNING' FROM unnest(ARRAY['x']::text[]) AS u(id) WHERE j.id = u.id AND j.status = 'PENDING'"):
                    rows = conn.execute(sql).fetchall()
                    print(sql[:60], "\n   " + "\n   ".join(str(r) for r in rows), flush=True)
        if "stmts" in phases:
            with psycopg.connect(pg.admin_dsn, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET log_min_duration_statement = 0")
                conn.execute("ALTER SYSTEM SET log_line_prefix = '%m [%p] app=%a '")
                conn.execute("SELECT pg_reload_conf()")
            time.sleep(1.0)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("TRUNCATE jobs, job_attempts")
            start = pg.logfile.stat().st_size
            n = 200
            pipeline.submit(api, n, 1, 4)
            wait_done(dsn, n)
            time.sleep(1.5)
            with psycopg.connect(pg.admin_dsn, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM RESET log_min_duration_statement")
                conn.execute("SELECT pg_reload_conf()")
            with open(pg.logfile, "rb") as h:
                h.seek(start)
                text = h.read().decode("utf-8", "replace")
            (OUT / "pglog.txt").write_text(text)
            print(f"statement log: {len(text)} bytes for {n} jobs", flush=True)
    finally:
        if master is not None:
            master.stop()
        rs.cleanup()
        pg.cleanup()


if __name__ == "__main__":
    main()
