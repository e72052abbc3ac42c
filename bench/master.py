#!/usr/bin/python3
"""The master's own footprint: RSS and CPU while idle and while its children work.

    /usr/bin/python3 bench/master.py [--seconds 30]

Starts a real dtsd with 2 servers and 4 workers over a private PostgreSQL and Redis,
then samples /proc/<master>/status and /proc/<master>/stat over each phase.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from dtsd.dtsdpb import pb, pb_grpc  # noqa: E402
from tests.helpers import DtsdMaster, PostgresServer, RedisServer, free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS     # utime + stime, the master alone


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def phase(name: str, pid: int, seconds: float) -> None:
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    peak = 0.0
    while time.monotonic() - t0 < seconds:
        peak = max(peak, rss_mb(pid))
        time.sleep(0.5)
    used = cpu_seconds(pid) - cpu0
    print(f"{name}: master RSS {rss_mb(pid):.1f} MB (peak {peak:.1f}), "
          f"CPU {100 * used / (time.monotonic() - t0):.2f} % of one core")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    pg = PostgresServer().start()
    redis = RedisServer().start()
    # Not under pg.dir: that is the postgres user's, and dtsd's children hold no capability
    # to read past its mode even when the master runs as root.
    workdir = Path(tempfile.mkdtemp(prefix="dtsd-bench-"))
    (workdir / "run").mkdir(parents=True)
    master = DtsdMaster(workdir, "bench", {
        "dtsd": {"node_id": "bench", "runtime_dir": str(workdir / "run"), "log_level": "warning"},
        "server": {"listen": f"127.0.0.1:{free_port()}", "processes": 2},
        "worker": {"processes": 4},
        "postgres": {"dsn": pg.create_database("bench")},
        "redis": {"url": redis.url},
    })
    try:
        master.start()
        time.sleep(3)
        print(f"machine: {os.cpu_count()} cores; dtsd master pid {master.pid}, "
              "2 servers + 4 workers + coordinator")
        phase("idle", master.pid, args.seconds)
        api = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                api.SubmitJobs(pb.SubmitJobsRequest(jobs=[pb.JobSpec(command="true")] * 50))
                time.sleep(0.1)
        thread = threading.Thread(target=load)
        thread.start()
        phase("busy (about 500 jobs/s submitted)", master.pid, args.seconds)
        stop.set()
        thread.join()
    finally:
        master.stop()
        redis.cleanup()
        pg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
