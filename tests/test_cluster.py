"""A cluster: three etcd members and three dtsd masters (distinct node ids) on loopback,
sharing one PostgreSQL database and one Redis. Leaders are killed, frozen and starved of
quorum; cron slots are counted."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc
import psycopg
import pytest

from dtsd.dtsdpb import pb, pb_grpc
from tests.helpers import wait_for

TTL = 3.0
CLUSTER = {"worker": {"processes": 1, "retry_backoff": "50ms", "kill_grace": "1s",
                      "startsecs": "0", "heartbeat_ttl": "3s"},
           "server": {"processes": 1, "startsecs": "0"},
           "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}


@pytest.fixture
def nodes(dtsd_factory, etcd_cluster):
    settings = {**CLUSTER, "etcd": {"endpoints": etcd_cluster.endpoints, "lease_ttl": f"{TTL}s"}}
    return [dtsd_factory(settings) for _ in range(3)]


def records(master) -> list[dict]:
    """Node records published within the last second (a dead node's record lingers)."""
    result = master.dtsctl("-o", "json", "status", timeout=20)
    if result.returncode:
        return []
    now = time.time()
    fresh = []
    for node in json.loads(result.stdout)["nodes"]:
        seen = node["seen_at"]
        if seen and now - _epoch(seen) < 1.0:
            fresh.append(node)
    return fresh


def _epoch(iso: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def leaders(master) -> list[str]:
    return [n["node_id"] for n in records(master) if n["leader"]]


def one_leader(master, among: int = 3) -> str | None:
    fresh = records(master)
    found = [n["node_id"] for n in fresh if n["leader"]]
    return found[0] if len(fresh) == among and len(found) == 1 else None


def fence(dsn: str) -> tuple[int, str] | None:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT token, holder FROM leader_fence").fetchone()


def by_id(nodes, node_id):
    return next(m for m in nodes if m.node_id == node_id)


def coordinator_pid(master) -> int:
    with open(master.workdir / "run" / "node.json") as handle:
        return next(c["pid"] for c in json.load(handle)["children"] if c["role"] == "coordinator")


def kill_host(master) -> None:
    """The host dies: the master and every child (one process group) get KILL at once."""
    os.killpg(master.proc.pid, signal.SIGKILL)
    master.proc.wait(10)


def test_exactly_one_leader_and_a_new_one_within_ttl_after_kill_9(nodes):
    first = nodes[0]
    leader = wait_for(lambda: one_leader(first), timeout=30, message="exactly one leader")
    for _ in range(10):                       # and it stays exactly one
        assert len(leaders(first)) == 1
        time.sleep(0.1)
    dsn = first.sections["postgres"]["dsn"]
    token, holder = wait_for(lambda: fence(dsn), message="the leader's first fenced write")
    assert holder == leader
    survivor = next(m for m in nodes if m.node_id != leader)
    killed_at = time.monotonic()
    kill_host(by_id(nodes, leader))
    new = wait_for(lambda: one_leader(survivor, among=2), timeout=TTL + 10,
                   message="a new leader")
    took = time.monotonic() - killed_at
    assert new != leader
    assert took <= TTL + 2, f"failover took {took:.1f}s"
    new_token, new_holder = wait_for(lambda: (f := fence(dsn)) and f[1] == new and f)
    assert new_token > token


def test_a_frozen_leader_steps_down_and_cannot_write(nodes):
    first = nodes[0]
    leader = wait_for(lambda: one_leader(first), timeout=30, message="exactly one leader")
    frozen = by_id(nodes, leader)
    dsn = first.sections["postgres"]["dsn"]
    old_token = wait_for(lambda: fence(dsn))[0]
    os.killpg(frozen.proc.pid, signal.SIGSTOP)       # the whole node stops, as in a long GC
    try:
        other = next(m for m in nodes if m is not frozen)
        new = wait_for(lambda: (f := fence(dsn)) and f[1] != leader and f[1], timeout=TTL + 10,
                       message="another node to take over")
    finally:
        os.killpg(frozen.proc.pid, signal.SIGCONT)
    # Woken up, it knows at once that its lease may be gone: it leads no more, and the
    # fence stays with the new leader (its token is older: any write it tried was refused).
    wait_for(lambda: leader not in leaders(other) and one_leader(other) == new, timeout=10,
             message="the woken node to be a follower")
    time.sleep(1)
    token, holder = fence(dsn)
    assert holder == new and token > old_token
    assert "refused, a newer leader exists" in frozen.log() or \
        "leader loops stop" in frozen.log()


def test_without_quorum_nobody_leads_queued_jobs_still_run_and_cron_waits(nodes, etcd_cluster):
    first = nodes[0]
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(first.address))
    wait_for(lambda: one_leader(first), timeout=30, message="a leader")
    api.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(
        name="tick", expression="* * * * * *", misfire=pb.RUN_ONCE,
        job=pb.JobSpec(command="true"))))
    dsn = first.sections["postgres"]["dsn"]

    def fired() -> list:
        with psycopg.connect(dsn) as conn:
            return [r[0] for r in conn.execute(
                "SELECT fire_time FROM jobs WHERE schedule_id IS NOT NULL ORDER BY fire_time")]
    wait_for(lambda: len(fired()) >= 2, timeout=20)
    etcd_cluster.stop_member(1)
    etcd_cluster.stop_member(2)
    wait_for(lambda: not leaders(first) and len(records(first)) == 3, timeout=TTL + 10,
             message="no leader without quorum")
    before = len(fired())
    job_id = api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="echo still"))).id
    job = wait_for(lambda: (j := api.GetJob(pb.GetJobRequest(id=job_id))).status == pb.SUCCEEDED
                   and j, timeout=20, message="a job to run without a leader")
    assert job.output == b"still\n"
    time.sleep(3)
    assert len(fired()) == before, "cron fired without a leader"
    etcd_cluster.start_member(1)
    etcd_cluster.start_member(2)
    wait_for(lambda: one_leader(first), timeout=30, message="a leader again")
    wait_for(lambda: len(fired()) > before + 1, timeout=20, message="firing to resume")
    slots = fired()
    assert len(slots) == len(set(slots))


def test_an_every_second_schedule_fires_each_slot_exactly_once_across_two_failovers(
        nodes, dtsd_factory):
    first = nodes[0]
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(first.address))
    wait_for(lambda: one_leader(first), timeout=30, message="a leader")
    api.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(
        name="tick", expression="* * * * * *", misfire=pb.RUN_ALL, catchup_window_seconds=120,
        job=pb.JobSpec(command="true"))))
    dsn = first.sections["postgres"]["dsn"]
    started = time.monotonic()
    alive = list(nodes)
    for _ in range(2):
        time.sleep(15)
        leader = wait_for(lambda: one_leader(alive[0], among=len(alive)), timeout=30)
        victim = by_id(alive, leader)
        kill_host(victim)
        alive.remove(victim)
        wait_for(lambda: one_leader(alive[0], among=len(alive)), timeout=TTL + 10,
                 message="a new leader after the kill")
    time.sleep(max(0.0, 60 - (time.monotonic() - started)))
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(alive[0].address))
    api.PauseSchedule(pb.ScheduleRef(name="tick"))
    time.sleep(1)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("""SELECT fire_time, count(*) FROM jobs
                               WHERE schedule_id IS NOT NULL GROUP BY fire_time
                               ORDER BY fire_time""").fetchall()
    assert all(count == 1 for _, count in rows), [r for r in rows if r[1] != 1]
    seconds = [int(r[0].timestamp()) for r in rows]
    assert seconds == list(range(seconds[0], seconds[-1] + 1)), "a slot in the window never fired"
    assert len(seconds) >= 55


def test_a_redis_flush_during_a_steady_stream_loses_no_job(nodes, redis):
    first = nodes[0]
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(first.address))
    ids: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.wait(0.02):
            ids.append(api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true"))).id)
    thread = threading.Thread(target=stream)
    thread.start()
    try:
        time.sleep(2)
        redis.client().flushall()
        time.sleep(2)
    finally:
        stop.set()
        thread.join()
    dsn = first.sections["postgres"]["dsn"]

    def done() -> bool:
        with psycopg.connect(dsn) as conn:
            return conn.execute("SELECT count(*) FROM jobs WHERE status = 'SUCCEEDED'"
                                ).fetchone()[0] == len(ids)
    wait_for(done, timeout=60, message=f"all {len(ids)} jobs to succeed after the flush")
