"""Redis away for 30 s while submits go on, Redis restarted with its append-only file, and a
slow, lossy link to Redis. PostgreSQL is the record: jobs are accepted while Redis is away
and run once it is back (the leader's reconciler pushes what Redis lacks)."""

from __future__ import annotations

import time

import pytest

from tests.faults.common import (all_ended, all_running, api, ledger_command, settle,
                                 statuses, submit, submit_stream, tally)
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(240)

NODE = {"server": {"processes": 1, "startsecs": "0"},
        "worker": {"processes": 1, "startsecs": "0", "concurrency": 4},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}
OUTAGE = 30.0


def test_redis_down_30s_while_submits_continue(rig, report):
    master = rig.node(NODE)
    wait_for(lambda: all_running(master, 3), timeout=30, message="every child RUNNING")
    stub = api(master)
    ids = [submit(stub, ledger_command(rig.ledger), f"before{n}")[0] for n in range(5)]
    wait_for(lambda: all_ended(rig.dsn, ids), timeout=20, message="the first jobs to end")

    rig.redis.stop()                                 # KILL: as a crash
    down = time.monotonic()
    slowest, n = 0.0, 0
    while time.monotonic() - down < OUTAGE:
        started = time.monotonic()
        # No retry here: each submit must be accepted at its first try.
        reply = stub.SubmitJob(_spec(rig, f"during{n}"), timeout=10)
        slowest = max(slowest, time.monotonic() - started)
        ids.append(reply.id)
        n += 1
        time.sleep(0.5)
    waiting = statuses(rig.dsn, ids[5:])
    assert set(waiting.values()) == {"PENDING"}, waiting      # accepted, not run yet
    rig.redis.start()                                         # empty: no persistence
    back = time.monotonic()
    wait_for(lambda: all_ended(rig.dsn, ids), timeout=60, interval=0.5,
             message="the jobs submitted meanwhile to run")
    drained = time.monotonic() - back
    counts = tally(rig.dsn, ids, rig.ledger)
    counts.detail["accepted while down"] = n
    report(counts, outage=back - down, slowest_submit=slowest, all_run_after=drained)
    assert counts.lost == 0 and counts.completed == len(ids)
    assert counts.run_twice == 0
    assert slowest < 3, f"a submit took {slowest:.1f}s while Redis was down"


def _spec(rig, key: str):
    from dtsd.dtsdpb import pb
    return pb.SubmitJobRequest(job=pb.JobSpec(command=ledger_command(rig.ledger),
                                              idempotency_key=key))


@pytest.mark.redis_appendonly
def test_redis_killed_and_restarted_with_its_aof(rig, report):
    # No worker at first: the jobs wait in Redis's lists when it is killed.
    master = rig.node(NODE, worker={"processes": 0})
    wait_for(lambda: all_running(master, 2), timeout=30, message="server and coordinator")
    stub = api(master)
    ids = [submit(stub, ledger_command(rig.ledger), f"k{n}")[0] for n in range(20)]
    client = rig.redis.client()
    wait_for(lambda: sum(client.llen(k) for k in client.scan_iter("*") if
                         client.type(k) == b"list") >= 20 or
             sum(client.zcard(k) for k in client.scan_iter("*") if
                 client.type(k) == b"zset") >= 20,
             timeout=10, message="the ids in Redis")
    time.sleep(1.5)                        # appendfsync everysec: let the AOF take them
    rig.redis.stop()
    killed = time.monotonic()
    rig.redis.start()
    restarted = time.monotonic() - killed
    held = sum(client.llen(k) for k in client.scan_iter("*") if client.type(k) == b"list")
    held += sum(client.zcard(k) for k in client.scan_iter("*") if client.type(k) == b"zset")
    # A worker comes up (on a second node) after the restart: what it runs came back.
    worker_node = rig.node(NODE)
    wait_for(lambda: all_ended(rig.dsn, ids), timeout=60, interval=0.5,
             message="every job to run")
    drained = time.monotonic() - killed
    counts = tally(rig.dsn, ids, rig.ledger)
    counts.detail["ids held after restart"] = held
    report(counts, restart=restarted, all_run_after=drained)
    assert held >= 20, "the AOF did not bring the queued ids back"
    assert counts.lost == 0 and counts.completed == len(ids)
    assert counts.run_twice == 0
    assert worker_node.running()


def test_redis_slow_and_lossy_link(rig, report):
    master = rig.node(NODE)
    wait_for(lambda: all_running(master, 3), timeout=30, message="every child RUNNING")
    stub = api(master)
    rig.redis_link.delay(0.05)
    rig.redis_link.drop_every(1.0)      # every connection is cut (RST) after 1 s
    ids, retried, slowest = submit_stream(stub, rig.ledger, 30, pause=0.1)
    counts = settle(rig.dsn, ids, rig.ledger, timeout=120)
    counts.detail = {"retried submits": retried, "connections cut": rig.redis_link.cut,
                     "fetches whose reply was lost": master.log().count(
                         "a failed fetch left in this worker's list")}
    report(counts, slowest_submit=slowest)
    assert counts.lost == 0 and counts.completed == len(ids)
    assert counts.run_twice == 0
    assert rig.redis_link.cut > 0, "the link never dropped a connection"
