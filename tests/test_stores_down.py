"""A backing store going away under a running node, as an administrator sees it.

Redis is killed (and started again on its port) under a real dtsd; PostgreSQL is stopped
and started again in a cluster of the test's own (the session's cluster serves every other
test). Each test checks what a person would look at: the master's status line (the STATUS=
it sends systemd, also in node.json), the log (one line per process when a store goes, not
one per retry; one when it is back), `dtsctl status`, what a client is told, and the
server's gRPC health.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import time

import pytest

from tests.conftest import DtsdFactory
from tests.helpers import PostgresServer, health_status, wait_for

from dtsd.health import health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Few processes (the machine is shared); fast housekeeping, so loops retry often.
SMALL = {"server": {"processes": 2, "startsecs": "0"},
         "worker": {"processes": 1, "startsecs": "0", "concurrency": 2},
         "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}
OUTAGE = 5.0     # seconds a store stays away while the log is watched


def all_running(master) -> bool:
    with open(master.workdir / "run" / "node.json", encoding="utf-8") as handle:
        children = json.load(handle)["children"]
    return len(children) >= 4 and all(c["state"] == "RUNNING" for c in children)


def status_line(master) -> str:
    with open(master.workdir / "run" / "node.json", encoding="utf-8") as handle:
        return json.load(handle)["status"]


def log_lines(master, pattern: str) -> list[str]:
    return [line for line in master.log().splitlines() if re.search(pattern, line)]


def per_process(lines: list[str]) -> dict[str, int]:
    """How many of `lines` each process wrote (`[worker-0 1234]` in the line)."""
    counts: dict[str, int] = {}
    for line in lines:
        found = re.search(r"\[([a-z]+-\d+ \d+)\]", line)
        key = found.group(1) if found else "?"
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_redis_down_is_named_once_per_process_shown_and_cleared(dtsd_factory, redis):
    master = dtsd_factory(SMALL)
    wait_for(lambda: all_running(master), timeout=30, message="every child RUNNING")
    assert "unreachable" not in status_line(master)
    assert health_status(master.address) == SERVING

    redis.stop()
    stopped = time.monotonic()
    wait_for(lambda: "redis unreachable for" in status_line(master), timeout=10,
             message=lambda: f"the status line to name redis: {status_line(master)!r}")
    named_after = time.monotonic() - stopped
    assert named_after < 6, f"the status line named redis only after {named_after:.1f}s"
    wait_for(lambda: health_status(master.address) == NOT_SERVING, timeout=5,
             message="health NOT_SERVING while Redis is down")

    # PostgreSQL is the record: a submit is still accepted, and runs once Redis is back.
    submitted = master.dtsctl("submit", "--", "echo", "held")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[-1]

    shown = master.dtsctl("status")
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"{master.node_id}: redis unreachable for \d+", shown.stdout), shown.stdout

    # Every loop of every process retries meanwhile: the log says it once per process.
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - stopped)))
    down = log_lines(master, r"dtsd\.stores: redis unreachable: ")
    processes = per_process(down)
    assert {name.split()[0] for name in processes} == {   # each once, see below
        "coordinator-0", "server-0", "server-1", "worker-0"}, down
    assert all(count == 1 for count in processes.values()), down
    warnings = [line for line in log_lines(master, r" WARNING ")
                if "redis unreachable" not in line]
    assert len(warnings) <= 3, "\n".join(warnings)      # no warning per retry either

    redis.start()
    wait_for(lambda: "unreachable" not in status_line(master), timeout=10,
             message=lambda: f"the status line to clear: {status_line(master)!r}")
    wait_for(lambda: health_status(master.address) == SERVING, timeout=5,
             message="health SERVING again")
    back = log_lines(master, r"dtsd\.stores: redis reachable again after \d+ s, \d+ attempts? "
                             r"failed")
    assert set(per_process(back)) == set(processes), (back, down)

    def succeeded() -> bool:
        result = master.dtsctl("-o", "json", "status", job_id)
        return json.loads(result.stdout)["jobs"][0]["status"] == "SUCCEEDED"
    wait_for(succeeded, timeout=30, interval=0.5, message="the job submitted meanwhile to run")
    assert "unreachable" not in master.dtsctl("status").stdout


@pytest.fixture
def own_postgres():
    """A PostgreSQL cluster of this test's own, which it may stop and start again."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def test_postgres_down_is_named_to_the_client_quickly_and_cleared(request, own_postgres, redis):
    dsn = own_postgres.create_database(f"t_{secrets.token_hex(6)}")
    factory = DtsdFactory(request, dsn, redis)
    try:
        master = factory(SMALL)
        wait_for(lambda: all_running(master), timeout=30, message="every child RUNNING")
        assert health_status(master.address) == SERVING

        own_postgres.stop()
        started = time.monotonic()
        refused = master.dtsctl("--timeout", "10", "submit", "--", "true")
        took = time.monotonic() - started
        assert refused.returncode == 3, (refused.stdout, refused.stderr)
        assert "PostgreSQL is unreachable from this server" in refused.stderr, refused.stderr
        assert "cannot reach any server" not in refused.stderr
        assert took < 8, f"the client waited {took:.1f}s for its answer"

        wait_for(lambda: "postgres unreachable for" in status_line(master), timeout=10,
                 message=lambda: f"the status line to name postgres: {status_line(master)!r}")
        wait_for(lambda: health_status(master.address) == NOT_SERVING, timeout=5,
                 message="health NOT_SERVING while PostgreSQL is down")
        # A second refusal is as quick: no call waits for the client's deadline.
        started = time.monotonic()
        again = master.dtsctl("--timeout", "10", "list")
        assert again.returncode == 3 and "PostgreSQL" in again.stderr, again.stderr
        assert time.monotonic() - started < 8

        time.sleep(max(0.0, OUTAGE - (time.monotonic() - started)))
        down = log_lines(master, r"dtsd\.stores: postgres unreachable: ")
        assert down and all(n == 1 for n in per_process(down).values()), down

        # A child started meanwhile says why it cannot connect, at once (not "the pool
        # waited 30 s"), and its predecessor's report went with it.
        with open(master.workdir / "run" / "node.json", encoding="utf-8") as handle:
            worker = next(c for c in json.load(handle)["children"] if c["role"] == "worker")
        os.kill(worker["pid"], signal.SIGKILL)
        wait_for(lambda: [line for line in log_lines(master, r"\[worker-0 \d+\] dtsd\.stores: "
                                                             r"postgres unreachable: .*refused")
                          if f" {worker['pid']}]" not in line],
                 timeout=15, message="the new worker to say PostgreSQL refuses it")
        assert "postgres unreachable for" in status_line(master)

        own_postgres.resume()
        wait_for(lambda: "unreachable" not in status_line(master), timeout=30,
                 message=lambda: f"the status line to clear: {status_line(master)!r}")
        wait_for(lambda: health_status(master.address) == SERVING, timeout=10,
                 message="health SERVING again")
        assert log_lines(master, r"dtsd\.stores: postgres reachable again after \d+ s")
        done = wait_for(lambda: master.dtsctl("submit", "--wait", "--", "true").returncode == 0,
                        timeout=30, interval=0.5, message="a submit after PostgreSQL is back")
        assert done
    finally:
        factory.stop_all()
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            for master in factory.masters:
                print(master.log()[-6000:])


def test_etcd_down_is_named_in_the_status_line_once_in_the_log_and_cleared(dtsd_factory, etcd):
    master = dtsd_factory(SMALL, etcd={"endpoints": etcd.endpoints, "lease_ttl": "3s"})
    wait_for(lambda: all_running(master) and status_line(master).startswith("leader"),
             timeout=30, message=lambda: f"a leader: {status_line(master)!r}")

    etcd.stop_member(0)
    stopped = time.monotonic()
    wait_for(lambda: "etcd unreachable for" in status_line(master), timeout=10,
             message=lambda: f"the status line to name etcd: {status_line(master)!r}")
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - stopped)))
    down = log_lines(master, r"dtsd\.stores: etcd unreachable: ")
    assert list(per_process(down).values()) == [1], down     # the coordinator, once
    assert not log_lines(master, r"WARNING .*dtsd\.election: etcd: "), "per-try warnings"

    etcd.start_member(0, wait=True)
    wait_for(lambda: "unreachable" not in status_line(master), timeout=30,
             message=lambda: f"the status line to clear: {status_line(master)!r}")
    assert log_lines(master, r"dtsd\.stores: etcd reachable again after \d+ s")
