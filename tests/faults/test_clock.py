"""Clock skew between two nodes: one node's wall clock runs 2 s ahead (tests/faults/skew:
every dtsd process of that node reads the time of day 2 s ahead), the leadership moves
from it to the other node and back, under an every-second schedule and a stream of jobs.

What must hold: no cron slot fires twice, none is missed, and a lease is judged by
PostgreSQL's clock alone, so no worker is declared dead because a node's clock is off.
"""

from __future__ import annotations

import os
import signal
import time

from pathlib import Path

import psycopg
import pytest

from tests.faults.common import all_ended, all_running, api, ledger_command, submit, tally
from tests.helpers import REPO_ROOT, wait_for

SKEWED = Path(__file__).resolve().parent / "skew"     # its sitecustomize shifts the clock

pytestmark = pytest.mark.timeout(240)

SKEW = 2.0
TTL = 3.0
NODE = {"server": {"processes": 1, "startsecs": "0"},
        "worker": {"processes": 1, "startsecs": "0", "concurrency": 2,
                   "heartbeat_ttl": "4s"},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}


def leader(dsn: str) -> str | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT holder FROM leader_fence").fetchone()
    return row[0] if row else None


def slots(dsn: str) -> list[tuple]:
    """(fire time, count, the earliest creation minus the fire time, in seconds)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            """SELECT fire_time, count(*),
                      extract(epoch FROM min(created_at) - fire_time)::float8
               FROM jobs WHERE schedule_id IS NOT NULL
               GROUP BY fire_time ORDER BY fire_time""").fetchall()


def test_a_node_two_seconds_ahead_fires_no_slot_twice_misses_none_keeps_leases(
        rig, etcd, report):
    preload = {"DTSD_TEST_CLOCK_SKEW": f"{SKEW:g}",
               "PYTHONPATH": f"{SKEWED}{os.pathsep}{REPO_ROOT}"}
    settings = {**NODE, "etcd": {"endpoints": etcd.endpoints, "lease_ttl": f"{TTL:g}s"}}
    ahead = rig.node(settings, env=preload)
    wait_for(lambda: all_running(ahead, 3) and leader(rig.dsn) == ahead.node_id,
             timeout=30, message="the node ahead to lead")
    behind = rig.node(settings)
    wait_for(lambda: all_running(behind, 3), timeout=30, message="the second node")
    skewed = ahead.dtsctl("status")
    from dtsd.dtsdpb import pb
    stub = api(behind)
    stub.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(
        name="tick", expression="* * * * * *", misfire=pb.RUN_ALL,
        catchup_window_seconds=120,
        # Slots are counted, not run: a queue no worker serves.
        job=pb.JobSpec(command="true", queue="counted"))))
    ids = []

    def some_jobs(n: int, tag: str) -> None:
        """Jobs that run on both nodes while one leads; ended before a node is killed (a
        killed host's jobs are recovered as lost, which is not what this test is about)."""
        ids.extend(submit(stub, ledger_command(rig.ledger, 1), f"{tag}{i}")[0]
                   for i in range(n))
        wait_for(lambda: all_ended(rig.dsn, ids), timeout=30, interval=0.2,
                 message="the jobs to end")

    some_jobs(6, "a")
    time.sleep(4)
    os.killpg(ahead.proc.pid, signal.SIGKILL)     # leadership moves to the node behind
    ahead.proc.wait(10)
    wait_for(lambda: leader(rig.dsn) == behind.node_id, timeout=TTL + 10,
             message="the node behind to lead")
    some_jobs(6, "b")
    time.sleep(3)
    again = rig.node(settings, env=preload)       # and back to a node ahead
    wait_for(lambda: all_running(again, 3), timeout=30, message="the node ahead, again")
    os.killpg(behind.proc.pid, signal.SIGKILL)
    behind.proc.wait(10)
    wait_for(lambda: leader(rig.dsn) == again.node_id, timeout=TTL + 10,
             message="the node ahead to lead again")
    stub = api(again)
    some_jobs(6, "c")
    time.sleep(3)
    stub.PauseSchedule(pb.ScheduleRef(name="tick"))
    time.sleep(1)

    fired = slots(rig.dsn)
    twice = [row for row in fired if row[1] != 1]
    seconds = [int(row[0].timestamp()) for row in fired]
    missing = sorted(set(range(seconds[0], seconds[-1] + 1)) - set(seconds))
    earliest = min(row[2] for row in fired)
    wait_for(lambda: all_ended(rig.dsn, ids), timeout=60, interval=0.5,
             message="every job to end")
    with psycopg.connect(rig.dsn) as conn:
        lost = conn.execute("SELECT count(*) FROM job_attempts WHERE error LIKE 'lost%'"
                            ).fetchone()[0]
    counts = tally(rig.dsn, ids, rig.ledger)
    counts.detail = {"slots": len(fired), "slots twice": len(twice),
                     "slots missed": len(missing), "attempts lost": lost}
    report(counts, earliest_fire=earliest)
    assert skewed.returncode == 0
    assert not twice, twice
    assert not missing, missing
    assert len(fired) >= 20
    # Fired by PostgreSQL's clock: never before the slot, however far ahead a leader is.
    assert earliest > -0.5, f"a slot fired {-earliest:.1f}s early"
    assert lost == 0, "a worker was declared dead while it ran"
    assert counts.lost == 0 and counts.run_twice == 0
