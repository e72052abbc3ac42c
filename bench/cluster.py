#!/usr/bin/python3
"""Cluster benchmark: leader failover time, and how late cron slots start.

    /usr/bin/python3 bench/cluster.py [--kills 10] [--ttl 10] [--cron-seconds 60]

Failover: 3 etcd members and 3 dtsd masters on loopback; the leader's whole host (master
and children) is killed with SIGKILL, and the time until another node's fresh record in
Redis says it leads is measured; the killed node is then started again. Lateness: a
per-second schedule on a single node; lateness = the job's claim time (just before its
process is spawned) minus the slot, from PostgreSQL's own clock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psycopg  # noqa: E402

from dtsd.dtsdpb import pb, pb_grpc  # noqa: E402
from tests.etcd_helpers import EtcdCluster  # noqa: E402
from tests.helpers import DtsdMaster, PostgresServer, RedisServer, free_port  # noqa: E402

DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


def master(base: Path, name: str, sections: dict) -> DtsdMaster:
    workdir = base / name
    (workdir / "run").mkdir(parents=True, exist_ok=True)
    return DtsdMaster(workdir, name, {
        **sections,
        "dtsd": {**sections.get("dtsd", {}), "node_id": name, "runtime_dir": str(workdir / "run"),
                 "log_level": "warning"},
        "server": {"listen": f"127.0.0.1:{free_port()}", "processes": 1}})


def fresh_leaders(redis_client, window: float = 0.6) -> list[str]:
    now = time.time()
    found = []
    for key in redis_client.scan_iter("dtsd:default:node:*"):
        raw = redis_client.get(key)
        if raw:
            record = json.loads(raw)
            if record.get("leader") and now - record.get("seen_at", 0) < window:
                found.append(record["node_id"])
    return found


def wait(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit("timed out")


def failover(args, pg: PostgresServer, redis: RedisServer, base: Path) -> list[float]:
    etcd = EtcdCluster(3).start()
    dsn = pg.create_database("failover")
    sections = {"postgres": {"dsn": dsn}, "redis": {"url": redis.url},
                "etcd": {"endpoints": etcd.endpoints, "lease_ttl": f"{args.ttl}s"},
                "worker": {"processes": 1},
                "dtsd": {"housekeeping_interval": "200ms"}}
    nodes = {name: master(base, name, sections) for name in ("n1", "n2", "n3")}
    client = redis.client()
    times = []
    try:
        for node in nodes.values():
            node.start()
        for attempt in range(args.kills):
            leader = wait(lambda: (found := fresh_leaders(client)) and len(found) == 1
                          and found[0], timeout=60)
            victim = nodes[leader]
            killed = time.monotonic()
            os.killpg(victim.proc.pid, signal.SIGKILL)
            new = wait(lambda: (found := fresh_leaders(client, 0.3)) and found[0] != leader
                       and found[0], timeout=args.ttl * 4)
            took = time.monotonic() - killed
            times.append(took)
            print(f"kill {attempt + 1}: {leader} -> {new} in {took:.2f} s", flush=True)
            victim.proc.wait(10)
            victim.start()
    finally:
        for node in nodes.values():
            node.stop()
        etcd.cleanup()
    return times


def lateness(args, pg: PostgresServer, redis: RedisServer, base: Path) -> list[float]:
    dsn = pg.create_database("lateness")
    node = master(base, "cron", {"postgres": {"dsn": dsn}, "redis": {"url": redis.url},
                                 "worker": {"processes": 2}})
    try:
        node.start()
        api = pb_grpc.SchedulerStub(grpc.insecure_channel(node.address))
        api.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(
            name="tick", expression="* * * * * *", job=pb.JobSpec(command="true"))))
        time.sleep(args.cron_seconds)
        api.PauseSchedule(pb.ScheduleRef(name="tick"))
        time.sleep(2)
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("""SELECT extract(epoch FROM started_at - fire_time) * 1000
                                   FROM jobs WHERE fire_time IS NOT NULL
                                     AND started_at IS NOT NULL""").fetchall()
        return sorted(float(r[0]) for r in rows)
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--ttl", type=float, default=10.0, help="[etcd] lease_ttl, seconds")
    parser.add_argument("--cron-seconds", type=float, default=60.0)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores")
    pg = PostgresServer(settings=DURABLE).start()
    redis = RedisServer().start()
    # Not under pg.dir: that is the postgres user's, and dtsd's children hold no capability
    # to read past its mode even when the master runs as root.
    base = Path(tempfile.mkdtemp(prefix="dtsd-bench-"))
    try:
        delays = lateness(args, pg, redis, base)
        p50 = delays[len(delays) // 2]
        p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
        print(f"cron lateness over {len(delays)} slots: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
              f"max {delays[-1]:.1f} ms; slowest: {', '.join(f'{d:.0f}' for d in delays[-5:])}")
        if args.kills:
            times = failover(args, pg, redis, base)
            print(f"failover with lease_ttl {args.ttl:g}s over {len(times)} kills: median "
                  f"{statistics.median(times):.2f} s, min {min(times):.2f}, max {max(times):.2f}")
    finally:
        redis.cleanup()
        pg.cleanup()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
