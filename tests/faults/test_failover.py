"""A leader killed exactly on a minute boundary, with twenty every-minute schedules: the
slot of that minute fires once per schedule (by the old leader if it committed before it
died, else by the new one), never twice, and none is missed."""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest

from tests.faults.common import Tally, all_running, api
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(240)

TTL = 3.0
SCHEDULES = 20
NODE = {"server": {"processes": 1, "startsecs": "0"},
        "worker": {"processes": 0},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}


def leader(dsn: str) -> str | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT holder FROM leader_fence").fetchone()
    return row[0] if row else None


def fired(dsn: str) -> dict[float, int]:
    """Jobs per slot (unix time of the slot)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("""SELECT fire_time, count(*) FROM jobs
                               WHERE schedule_id IS NOT NULL GROUP BY fire_time""").fetchall()
    return {row[0].timestamp(): row[1] for row in rows}


def test_a_leader_killed_on_a_minute_boundary_fires_each_slot_once(rig, etcd, report):
    from dtsd.dtsdpb import pb
    settings = {**NODE, "etcd": {"endpoints": etcd.endpoints, "lease_ttl": f"{TTL:g}s"}}
    nodes = [rig.node(settings) for _ in range(2)]
    for master in nodes:
        wait_for(lambda: all_running(master, 2), timeout=30, message="both nodes")
    first = wait_for(lambda: leader(rig.dsn), timeout=30, message="a leader")
    old = next(m for m in nodes if m.node_id == first)
    new = next(m for m in nodes if m is not old)
    stub = api(new)
    for n in range(SCHEDULES):
        stub.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(
            name=f"minute-{n}", expression="* * * * *", misfire=pb.RUN_ONCE,
            catchup_window_seconds=60, job=pb.JobSpec(command="true", queue="counted"))))
    boundary = (int(time.time()) // 60 + 1) * 60
    if boundary - time.time() < 3:           # the schedules must be in place before it
        boundary += 60
    time.sleep(max(0.0, boundary - time.time()))
    os.killpg(old.proc.pid, signal.SIGKILL)  # the host dies on the boundary
    killed = time.time()
    old.proc.wait(10)
    wait_for(lambda: leader(rig.dsn) == new.node_id, timeout=TTL + 10,
             message="the other node to lead")
    took = wait_for(lambda: fired(rig.dsn).get(float(boundary)) == SCHEDULES and
                    time.time() - killed, timeout=TTL + 15, interval=0.2,
                    message=lambda: f"the boundary's slots: {fired(rig.dsn)}")
    time.sleep(1)
    slots = fired(rig.dsn)
    counts = Tally(submitted=SCHEDULES, completed=slots.get(float(boundary), 0),
                   lost=SCHEDULES - min(SCHEDULES, slots.get(float(boundary), 0)),
                   run_twice=max(0, slots.get(float(boundary), 0) - SCHEDULES),
                   detail={"killed after the boundary": f"{killed - boundary:.3f}s",
                           "slots": slots})
    report(counts, all_fired_after=took)
    assert slots == {float(boundary): SCHEDULES}, slots
    assert took <= TTL + 3
