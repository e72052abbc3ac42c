"""What the fault scenarios share: a node on a PostgreSQL cluster of the scenario's own (so
that it may be stopped), the job ledger every scenario counts with, and process lookups.

Every scenario reports a `Tally`: jobs submitted, completed, lost (never recorded as ended:
must be 0) and run twice (more than one attempt wrote its mark, only where the README's
fault table says it may happen). Jobs write `<id> <attempt>` lines into a ledger file, so
"run twice" is counted from what ran, not from what was recorded.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass
class Tally:
    """The counts a fault scenario reports and asserts."""

    submitted: int = 0
    completed: int = 0
    lost: int = 0
    run_twice: int = 0
    detail: dict = field(default_factory=dict)

    def line(self, name: str) -> str:
        return (f"{name}: submitted {self.submitted}, completed {self.completed}, "
                f"lost {self.lost}, run twice {self.run_twice} {self.detail or ''}")


def ledger_command(ledger: Path, seconds: float = 0.0) -> str:
    """A job that marks its attempt in `ledger` (after `seconds` of work)."""
    work = f"sleep {seconds}; " if seconds else ""
    return f'{work}echo "$DTSD_JOB_ID $DTSD_ATTEMPT" >> {ledger}'


def ledger_runs(ledger: Path) -> dict[str, int]:
    """How many attempts of each job wrote their mark."""
    runs: dict[str, int] = {}
    if ledger.exists():
        for line in ledger.read_text().splitlines():
            job_id = line.split()[0]
            runs[job_id] = runs.get(job_id, 0) + 1
    return runs


def statuses(dsn: str, ids: list[str]) -> dict[str, str]:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        rows = conn.execute("SELECT id::text, status FROM jobs WHERE id::text = ANY(%s)",
                            (ids,)).fetchall()
    return dict(rows)


def tally(dsn: str, ids: list[str], ledger: Path) -> Tally:
    """The counts once every job should have ended: a job not ended in PostgreSQL, or
    ended without its mark in the ledger, is lost."""
    states = statuses(dsn, ids)
    runs = ledger_runs(ledger)
    done = [i for i in ids if states.get(i) == "SUCCEEDED" and runs.get(i, 0) >= 1]
    lost = {i: (states.get(i), runs.get(i, 0)) for i in ids if i not in done}
    return Tally(submitted=len(ids), completed=len(done), lost=len(lost),
                 run_twice=sum(1 for i in ids if runs.get(i, 0) > 1),
                 detail={"lost (state, runs)": lost} if lost else {})


def all_ended(dsn: str, ids: list[str]) -> bool:
    states = statuses(dsn, ids)
    return len(states) == len(ids) and all(s in TERMINAL for s in states.values())


def children(master) -> list[dict]:
    with open(master.workdir / "run" / "node.json", encoding="utf-8") as handle:
        return json.load(handle)["children"]


def all_running(master, count: int) -> bool:
    found = children(master)
    return len(found) >= count and all(c["state"] == "RUNNING" for c in found)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def pids_running(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (a job's unique argument)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and alive(int(entry)):
            found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (read from /proc/*/stat)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                ppid = int(handle.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for kid in parents.get(todo.pop(), []):
            found.append(kid)
            todo.append(kid)
    return [p for p in found if alive(p)]


def measure(predicate, timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until `predicate()` holds, or None after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception:  # noqa: BLE001 - "not yet"
            pass
        time.sleep(interval)
    return None


def api(master):
    """The gRPC stub of `master`'s server."""
    import grpc
    from dtsd.dtsdpb import pb_grpc
    return pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))


def submit(stub, command: str, key: str, deadline: float = 60.0, **spec) -> tuple[str, int]:
    """Submit like a careful client: retry UNAVAILABLE with the same idempotency key (so a
    retried submit whose first try committed gives the same job). (job id, tries)."""
    import grpc
    from dtsd.dtsdpb import pb
    end = time.monotonic() + deadline
    tries = 0
    while True:
        tries += 1
        try:
            reply = stub.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(
                command=command, idempotency_key=key, **spec)), timeout=10)
            return reply.id, tries
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED) or time.monotonic() > end:
                raise
            time.sleep(0.2)


def submit_stream(stub, ledger: Path, count: int, pause: float = 0.0
                  ) -> tuple[list[str], int, float]:
    """`count` ledger jobs submitted one after another like a careful client (see `submit`):
    (their ids, how many tries were retries, the slowest submit in seconds)."""
    ids, tries, slowest = [], 0, 0.0
    for n in range(count):
        started = time.monotonic()
        job_id, took = submit(stub, ledger_command(ledger), f"k{n}")
        slowest = max(slowest, time.monotonic() - started)
        ids.append(job_id)
        tries += took
        time.sleep(pause)
    return ids, tries - count, slowest


def settle(dsn: str, ids: list[str], ledger: Path, timeout: float = 60) -> Tally:
    """Wait for every job to end, then count."""
    from tests.helpers import wait_for
    wait_for(lambda: all_ended(dsn, ids), timeout=timeout, interval=0.5,
             message=lambda: f"every job to end: {statuses(dsn, ids)}")
    return tally(dsn, ids, ledger)
