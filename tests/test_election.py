"""Leader election on a real etcd (dtsd/election.py).

Each contender is its own process (tests/etcd_helpers.py `Contender`) printing its state
every 100 ms with a CLOCK_MONOTONIC stamp, so the test can ask "who believed it led at time
t" across processes, kill -9 or SIGSTOP one of them, and check:

- at most one process believes it leads at any instant (over the whole test), tokens grow;
- a dead leader is replaced within lease_ttl + 2 s, by a larger token;
- a paused leader steps down by its own clock: its first report after SIGCONT says
  "not leader", before any etcd round trip could have told it so;
- a clean stop hands over within one poll interval, not a TTL;
- without an etcd quorum nobody leads (after at most the TTL), and with it back someone does.

The pytest process never imports etcd3 (PyPI's etcd3 needs the pure-Python protobuf): the
contenders run with PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python, on the interpreter that
runs pytest, so the same tests cover Debian's stack and PyPI's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.etcd_helpers import Contender, EtcdCluster, EtcdServer
from tests.helpers import REPO_ROOT, clean_env, tail, wait_for

TTL = 3


# --- fixtures and checks --------------------------------------------------------------------

class Contenders:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.all: list[Contender] = []

    def start(self, node_id: str, endpoints: str | list[str], **kwargs: Any) -> Contender:
        contender = Contender(node_id, endpoints, workdir=self.workdir, **kwargs)
        self.all.append(contender)
        return contender.start()

    def start_many(self, n: int, cluster: EtcdCluster, prefix: str = "n",
                   **kwargs: Any) -> list[Contender]:
        """n contenders, each listing the endpoints from a different member first."""
        endpoints = cluster.endpoint_list
        return [self.start(f"{prefix}{i}", endpoints[i % len(endpoints):] +
                           endpoints[:i % len(endpoints)], **kwargs) for i in range(n)]

    def cleanup(self) -> None:
        for contender in self.all:
            try:
                contender.cleanup()
            except Exception as exc:  # noqa: BLE001 - clean up the others regardless
                print(f"cleaning up {contender!r}: {exc!r}")


@pytest.fixture
def contenders(request: pytest.FixtureRequest) -> Iterator[Contenders]:
    group = Contenders(Path(tempfile.mkdtemp(prefix="dtsd-elect-")))
    try:
        yield group
    finally:
        failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False)
                     for w in ("setup", "call"))
        if failed:
            for contender in group.all:
                contender.dump_stacks()
        group.cleanup()
        if failed:
            for contender in group.all:
                print(f"\n----- contender {contender.node_id} log -----\n"
                      f"{tail(contender.logfile, 60)}")
        shutil.rmtree(group.workdir, ignore_errors=True)


def current_leader(group: list[Contender], timeout: float = 15,
                   after: float | None = None) -> tuple[Contender, dict[str, Any]]:
    """Wait until one of `group` reports leading (in a line stamped after `after`)."""
    def find():
        for contender in group:
            line = contender.last()
            if line and line.get("leader") and (after is None or line["t"] >= after):
                return contender, line
        return None
    return wait_for(find, timeout=timeout, interval=0.05,
                    message=lambda: "a leader among " + ", ".join(
                        f"{c.node_id}: {c.last()}" for c in group))


def leader_intervals(group: list[Contender]) -> list[tuple[float, float, str, int]]:
    """(first, last, node, token) of each run of "leader" lines, per contender."""
    intervals = []
    for contender in group:
        run: list[dict[str, Any]] = []
        for line in contender.snapshot() + [{"leader": False}]:
            if line.get("leader") and (not run or run[-1]["token"] == line["token"]):
                run.append(line)
                continue
            if run:
                intervals.append((run[0]["t"], run[-1]["t"], contender.node_id, run[0]["token"]))
            run = [line] if line.get("leader") else []
    return sorted(intervals)


def assert_single_leader_history(group: list[Contender]) -> list[tuple[float, float, str, int]]:
    """No two processes believed they led at the same time, and tokens only grew."""
    intervals = leader_intervals(group)
    for earlier, later in zip(intervals, intervals[1:]):
        assert later[0] > earlier[1], f"two leaders at once: {earlier} and {later}"
        assert later[3] >= earlier[3], f"token went down: {earlier} then {later}"
        if later[2] != earlier[2]:
            assert later[3] > earlier[3], f"new leader without a larger token: {earlier}, {later}"
    return intervals


# --- no etcd needed -------------------------------------------------------------------------

def test_single_node_and_create() -> None:
    from dtsd.config import parse
    from dtsd.election import (SINGLE_NODE_TOKEN, EtcdLeadership, SingleNode, create,
                               parse_endpoints)

    single = create(parse("[dtsd]\nnode_id = alpha\n", env={}))
    assert isinstance(single, SingleNode) and single.single_node
    single.start()
    assert single.is_leader() and single.token() == SINGLE_NODE_TOKEN and single.leader() == "alpha"
    assert [m["node_id"] for m in single.members()] == ["alpha"]
    single.stop()

    cfg = parse("[dtsd]\nnode_id = beta\ncluster = blue\n[etcd]\n"
                "endpoints = 127.0.0.1:2379, 127.0.0.1:2380\nlease_ttl = 2.2s\n", env={})
    elected = create(cfg)
    assert isinstance(elected, EtcdLeadership) and not elected.single_node
    assert elected.lease_ttl == 3 and elected.leader_key == "/dtsd/blue/leader"
    assert elected.node_key == "/dtsd/blue/nodes/beta"
    assert not elected.is_leader() and elected.token() is None     # not started
    assert elected.window <= elected.lease_ttl - 1
    assert parse_endpoints("http://a:1, b:2") == [("a", 1), ("b", 2)]
    assert EtcdLeadership("h:1", cluster="c", node_id="n", ttl=0.5).lease_ttl == 2


def test_election_module_imports_no_etcd3_or_protobuf() -> None:
    """Importing dtsd.election (and building an EtcdLeadership) must not load etcd3: with
    PyPI's packages, protobuf has to be configured before etcd3's stubs load."""
    code = ("import sys, dtsd.election as e\n"
            "e.EtcdLeadership('127.0.0.1:1', cluster='c', node_id='n', ttl=2)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('etcd3', 'google.protobuf'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, env=clean_env({"PYTHONPATH": str(REPO_ROOT)}),
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_protobuf_trap_gives_a_clear_error() -> None:
    """Without PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python, start() either works (Debian's
    regenerated etcd3) or fails with a message that says what to set (PyPI's etcd3)."""
    code = ("import logging; from dtsd.election import EtcdLeadership\n"
            "l = EtcdLeadership('127.0.0.1:1', cluster='c', node_id='n', ttl=2)\n"
            "try:\n    l.start()\nexcept RuntimeError as exc:\n    print('ERROR', exc)\n"
            "else:\n    l.stop(); print('OK')\n")
    env = clean_env({"PYTHONPATH": str(REPO_ROOT)})
    env.pop("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK") or (
        out.stdout.startswith("ERROR") and "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python"
        in out.stdout), out.stdout + out.stderr


# --- real etcd --------------------------------------------------------------------------------

def test_three_contenders_exactly_one_leader(etcd_cluster: EtcdCluster,
                                             contenders: Contenders) -> None:
    group = contenders.start_many(3, etcd_cluster, ttl=TTL)
    leader, line = current_leader(group)
    token = line["token"]
    # Everyone agrees on who leads, and with which token.
    for contender in group:
        contender.wait_line(lambda l: l["seen_leader"] == leader.node_id
                            and l["seen_token"] == token and len(l["members"]) == 3,
                            timeout=10, what="the leader and all members seen")
    start = time.monotonic()
    wait_for(lambda: time.monotonic() > start + 4.3, timeout=10)
    checked = 0
    t = start
    while t < start + 4:
        states = [c.state_at(t) for c in group]
        assert all(s is not None and t - s["t"] < 0.6 for s in states), states
        leading = [s for s in states if s["leader"]]
        assert len(leading) == 1, f"at {t}: {states}"
        assert leading[0]["token"] == token
        checked += 1
        t += 0.05
    assert checked >= 75
    for contender in group:
        lines = [l for l in contender.snapshot() if start <= l["t"] <= start + 4]
        assert all(l["seen_token"] == token and l["seen_leader"] == leader.node_id
                   for l in lines), contender.node_id
        # Every process keeps polling etcd (no thread stuck in a call).
        assert all(l["poll_age"] is not None and l["poll_age"] < 2 for l in lines), \
            (contender.node_id, max(l["poll_age"] or 99 for l in lines))
        assert contender.snapshot()[-1]["members"] == ["n0", "n1", "n2"]
    assert_single_leader_history(group)


def test_kill_leader_fails_over_with_larger_token(etcd_cluster: EtcdCluster,
                                                  contenders: Contenders) -> None:
    """kill -9 the leading process: another leads within lease_ttl + 2 s, larger token.
    DTSD_ELECTION_FAILOVER_TRIES (default 3) rounds, lease DTSD_ELECTION_TTL (default 3 s);
    the times are printed (pytest -s)."""
    tries = int(os.environ.get("DTSD_ELECTION_FAILOVER_TRIES", "3"))
    ttl = float(os.environ.get("DTSD_ELECTION_TTL", TTL))
    group = contenders.start_many(3, etcd_cluster, ttl=ttl)
    times = []
    for round_ in range(tries):
        alive = [c for c in group if c.running()]
        leader, line = current_leader(alive)
        old_token = line["token"]
        killed_at = time.monotonic()
        leader.kill()
        survivors = [c for c in alive if c is not leader]
        new_leader, new_line = current_leader(survivors, timeout=ttl + 5, after=killed_at)
        took = new_line["t"] - killed_at
        times.append(took)
        assert new_line["token"] > old_token
        assert took <= ttl + 2, f"failover took {took:.2f}s (lease {ttl:g}s)"
        # Keep three contenders: a replacement joins as follower.
        group.append(contenders.start(f"r{round_}", list(reversed(etcd_cluster.endpoint_list)),
                                      ttl=ttl))
        group[-1].wait_line(lambda l: l["seen_leader"] == new_leader.node_id, timeout=10,
                            what="the new leader seen")
    assert_single_leader_history(group)
    print(f"\nfailover after kill -9 (lease {ttl:g}s), {tries} tries: "
          + ", ".join(f"{t:.2f}" for t in times)
          + f" s; min {min(times):.2f} max {max(times):.2f} mean {sum(times) / len(times):.2f}")


def test_paused_leader_steps_down_by_its_own_clock(etcd_cluster: EtcdCluster,
                                                   contenders: Contenders) -> None:
    group = contenders.start_many(3, etcd_cluster, ttl=TTL)
    paused, line = current_leader(group)
    old_token = line["token"]
    others = [c for c in group if c is not paused]
    stopped_at = time.monotonic()
    paused.signal(signal.SIGSTOP)
    try:
        successor, new_line = current_leader(others, timeout=TTL + 5, after=stopped_at)
        assert new_line["token"] > old_token
        wait_for(lambda: time.monotonic() > stopped_at + TTL + 2, timeout=TTL + 10)
    finally:
        continued_at = time.monotonic()
        paused.signal(signal.SIGCONT)
    # Its very first report after waking says "not leader": computed from the clock, before
    # any etcd call could succeed.
    first = paused.wait_line(lambda l: True, timeout=5, after=continued_at,
                             what="a line after SIGCONT")
    assert first["leader"] is False and first["token"] is None, first
    # It rejoins as a follower of the new leader, and never claims to lead again.
    paused.wait_line(lambda l: not l["leader"] and l["seen_leader"] == successor.node_id
                     and l["seen_token"] == new_line["token"], timeout=10,
                     after=continued_at, what="the new leader seen")
    wait_for(lambda: time.monotonic() > continued_at + 1.5, timeout=5)
    assert not any(l["leader"] for l in paused.snapshot() if l["t"] >= continued_at)
    assert any(l["leader"] for l in successor.snapshot() if l["t"] >= continued_at)
    assert "lost leadership" in paused.logfile.read_text()
    assert_single_leader_history(group)


def test_clean_stop_hands_over_at_once(etcd_cluster: EtcdCluster,
                                       contenders: Contenders) -> None:
    group = contenders.start_many(3, etcd_cluster, ttl=TTL)
    leader, line = current_leader(group)
    for contender in group:
        contender.wait_line(lambda l: l["seen_leader"] == leader.node_id, timeout=5)
    asked = time.monotonic()
    leader.command("stop")
    others = [c for c in group if c is not leader]
    successor, new_line = current_leader(others, timeout=TTL + 5, after=asked)
    took = new_line["t"] - asked
    assert new_line["token"] > line["token"]
    assert took < TTL / 2, f"handover after a clean stop took {took:.2f}s (lease {TTL}s)"
    assert leader.proc.wait(timeout=20) == 0
    last = leader.snapshot()[-1]
    assert last["event"] == "stopped" and not last["leader"]
    assert "resigned leadership" in leader.logfile.read_text()
    assert_single_leader_history(group)
    print(f"\nhandover after a clean stop: {took:.2f}s")


def test_quorum_loss_means_no_leader(etcd_cluster: EtcdCluster,
                                     contenders: Contenders) -> None:
    group = contenders.start_many(3, etcd_cluster, ttl=TTL)
    leader, line = current_leader(group)
    etcd_cluster.stop_member(1)
    etcd_cluster.stop_member(2)
    lost_at = time.monotonic()          # the second member is gone: no quorum from here on
    # Nobody leads once a TTL has passed, and nobody starts leading while it is gone.
    wait_for(lambda: time.monotonic() > lost_at + TTL + 3, timeout=TTL + 20)
    for contender in group:
        lines = [l for l in contender.snapshot() if l["t"] >= lost_at + TTL]
        assert lines and not any(l["leader"] for l in lines), (contender.node_id, lines[:3])
    # Stopping a node while etcd has no quorum neither hangs nor crashes.
    asked = time.monotonic()
    assert group[0].stop(timeout=30) == 0
    stop_took = time.monotonic() - asked
    assert stop_took < 10, f"stop without an etcd quorum took {stop_took:.1f}s"
    group = group[1:]
    # Quorum back: someone leads again.
    restarted_at = time.monotonic()
    etcd_cluster.start_member(1)
    etcd_cluster.start_member(2)
    etcd_cluster.wait_healthy()
    new_leader, new_line = current_leader(group, timeout=TTL + 15, after=restarted_at)
    assert new_line["token"] > line["token"]
    assert_single_leader_history(group)
    print(f"\nleader again {new_line['t'] - restarted_at:.2f}s after restarting two members; "
          f"stop without quorum took {stop_took:.2f}s")


def test_members_lists_registered_nodes(etcd: EtcdServer, contenders: Contenders) -> None:
    group = [contenders.start(f"n{i}", etcd.endpoints, ttl=TTL, info={"zone": f"z{i}"})
             for i in range(3)]
    for contender in group:
        contender.wait_line(lambda l: l["members"] == ["n0", "n1", "n2"], timeout=10,
                            what="three members")
    leader, _ = current_leader(group)
    records = group[0].members()
    assert [r["node_id"] for r in records] == ["n0", "n1", "n2"]
    now = time.time()
    for record, contender in zip(records, group):
        assert record["zone"] == f"z{contender.node_id[1]}"
        assert record["pid"] == contender.pid
        assert now - 60 < record["since"] <= now
        assert record["leader"] == (contender is leader)
    # A clean stop deregisters at once; a killed node drops out when its lease expires.
    follower = next(c for c in group if c is not leader)
    stopped_at = time.monotonic()
    follower.stop()
    rest = [c for c in group if c is not follower]
    expected = sorted(c.node_id for c in rest)
    rest[0].wait_line(lambda l: l["members"] == expected, timeout=3, after=stopped_at,
                      what="the stopped node gone")
    killed = next(c for c in rest if c is not leader)
    killed_at = time.monotonic()
    killed.kill()
    leader.wait_line(lambda l: l["members"] == [leader.node_id], timeout=TTL + 3,
                     after=killed_at, what="the killed node gone")
