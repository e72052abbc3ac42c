"""PostgreSQL restarted, blackholed, slow and lossy under a running node.

Each scenario counts jobs submitted, completed, lost (must be 0) and run twice, and
measures how long the node takes to serve again once PostgreSQL is back.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.common import (all_running, api, ledger_command, ledger_runs, measure,
                                 settle, statuses, submit, submit_stream)
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(240)

NODE = {"server": {"processes": 1, "startsecs": "0"},
        "worker": {"processes": 1, "startsecs": "0", "concurrency": 4,
                   "retry_backoff": "100ms"},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}
# store.ANSWER_WITHIN (5 s), dtsctl's start and a margin: below the client's 10 s deadline.
ANSWER_BOUND = 8.0


def running(dsn: str, ids: list[str]) -> int:
    return sum(1 for s in statuses(dsn, ids).values() if s == "RUNNING")


def serving_again(master) -> float:
    """Seconds until a submit is accepted again (at most 30)."""
    took = measure(lambda: master.dtsctl("--timeout", "5", "submit", "--", "true")
                   .returncode == 0, timeout=30)
    assert took is not None, "no submit accepted 30 s after PostgreSQL came back"
    return took


def test_postgres_restart_while_jobs_run_and_finish(rig, report):
    master = rig.node(NODE)
    wait_for(lambda: all_running(master, 3), timeout=30, message="every child RUNNING")
    stub = api(master)
    ids = [submit(stub, ledger_command(rig.ledger, 1.5), f"k{n}")[0] for n in range(12)]
    wait_for(lambda: running(rig.dsn, ids) == 4, timeout=20, message="four jobs running")

    rig.pg.stop()                               # pg_ctl -m fast: every session is ended
    down = time.monotonic()
    ended_before = len(ledger_runs(rig.ledger))
    started = time.monotonic()
    refused = master.dtsctl("--timeout", "10", "submit", "--", "true")
    answered = time.monotonic() - started
    assert refused.returncode == 3, (refused.stdout, refused.stderr)
    assert "PostgreSQL is unreachable" in refused.stderr, refused.stderr
    assert answered < 5, f"the refusal took {answered:.1f}s"
    time.sleep(max(0.0, 4.0 - (time.monotonic() - down)))   # the running jobs end meanwhile
    ended_meanwhile = len(ledger_runs(rig.ledger)) - ended_before
    rig.pg.resume()
    back = time.monotonic()
    recovery = serving_again(master)
    counts = settle(rig.dsn, ids, rig.ledger)
    counts.detail["ended during the outage"] = ended_meanwhile
    report(counts, outage=back - down, refused_in=answered, recovery=recovery)
    assert counts.lost == 0 and counts.completed == len(ids)
    assert counts.run_twice == 0
    assert ended_meanwhile >= 1, "no job ended while PostgreSQL was down: nothing was retried"


def test_postgres_blackholed_nothing_hangs(rig, report):
    master = rig.node(NODE)
    wait_for(lambda: all_running(master, 3), timeout=30, message="every child RUNNING")
    stub = api(master)
    ids = [submit(stub, ledger_command(rig.ledger, 2), f"k{n}")[0] for n in range(8)]
    wait_for(lambda: running(rig.dsn, ids) >= 2, timeout=20, message="jobs running")

    rig.pg_link.blackhole()              # no reset: the bytes just stop, both ways
    cut = time.monotonic()
    answers = []
    while time.monotonic() - cut < 15:
        started = time.monotonic()
        refused = master.dtsctl("--timeout", "10", "submit", "--", "true")
        answers.append(time.monotonic() - started)
        assert refused.returncode == 3, (refused.stdout, refused.stderr)
        assert "PostgreSQL is unreachable" in refused.stderr, refused.stderr
    rig.pg_link.heal()
    healed = time.monotonic()
    recovery = serving_again(master)
    counts = settle(rig.dsn, ids, rig.ledger)
    report(counts, outage=healed - cut, slowest_refusal=max(answers), recovery=recovery)
    assert max(answers) < ANSWER_BOUND, f"refusals took {answers}"
    assert "silent for" not in master.log(), "a child hung until the master killed it"
    assert counts.lost == 0
    # A job whose end could not be recorded before its worker's lease ran out may run
    # again (README, Guarantees); one blackhole can do that at most once per running job.
    assert counts.run_twice <= 4


def test_postgres_slow_and_lossy_link(rig, report):
    master = rig.node(NODE)
    wait_for(lambda: all_running(master, 3), timeout=30, message="every child RUNNING")
    stub = api(master)
    rig.pg_link.delay(0.05)              # 50 ms each way, per chunk
    rig.pg_link.drop_every(3.0)          # and every connection is cut (RST) after 3 s
    ids, retried, slowest = submit_stream(stub, rig.ledger, 30)
    counts = settle(rig.dsn, ids, rig.ledger, timeout=120)
    counts.detail = {"retried submits": retried, "connections cut": rig.pg_link.cut,
                     "claims whose answer was lost": master.log().count(
                         "claimed by a round whose answer was lost")}
    report(counts, slowest_submit=slowest)
    assert len(set(ids)) == len(ids)
    assert counts.lost == 0 and counts.completed == len(ids)
    assert counts.run_twice == 0
    assert rig.pg_link.cut > 0, "the link never dropped a connection"
