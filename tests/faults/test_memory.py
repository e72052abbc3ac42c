"""Memory pressure: a job past its own memory limit, and a job the kernel's OOM killer
ends (the node runs in a memory cgroup of the test's own, a little above what dtsd uses).
Each is recorded as what ended it, and the node goes on running jobs."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.faults.common import (Tally, all_ended, all_running, api, children, descendants,
                                 submit)
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)

NODE = {"server": {"processes": 1, "startsecs": "0"},
        "worker": {"processes": 1, "startsecs": "0", "concurrency": 2},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}
# Touches every page (bytes of 'x', not calloc'ed zeros, which take no memory).
HOG = "exec python3 -c \"import time; b = b'x' * ({mib} << 20); time.sleep(5)\""


def job(master, job_id: str) -> dict:
    shown = master.dtsctl("-o", "json", "status", job_id)
    return json.loads(shown.stdout)["jobs"][0]


def ended(master, job_id: str) -> dict | None:
    found = job(master, job_id)
    return found if found["status"] in ("SUCCEEDED", "FAILED") else None


def test_a_job_past_its_memory_limit_is_recorded_as_such(rig, report):
    from dtsd.dtsdpb import pb
    master = rig.node(NODE, worker={**NODE["worker"], "limits_max": "memory=1GiB"})
    wait_for(lambda: all_running(master, 3), timeout=30, message="every child RUNNING")
    stub = api(master)
    job_id, _ = submit(stub, HOG.format(mib=512), "hog", max_retries=0,
                       limits=pb.ResourceLimits(memory_bytes=256 << 20))
    record = wait_for(lambda: ended(master, job_id), timeout=30, message="the hog to end")
    after, _ = submit(stub, "true", "after")
    wait_for(lambda: all_ended(rig.dsn, [after]), timeout=20, message="a job after it")
    assert record["status"] == "FAILED"
    assert record["error"] == "exit code 1: memory limit reached (memory=256MiB)", record
    report(Tally(submitted=2, completed=2, lost=0, run_twice=0,
                 detail={"recorded": record["error"]}))


def _memory_cgroup() -> Path | None:
    """A fresh memory cgroup under this process's own (v1 or v2), or None."""
    try:
        lines = [line.rstrip("\n").split(":", 2) for line in open("/proc/self/cgroup")]
    except OSError:
        return None
    for hierarchy, controllers, path in lines:
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            break
    else:
        v2 = [p for h, _, p in lines if h == "0"]
        if not v2 or not Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return None
        base = Path("/sys/fs/cgroup") / v2[0].lstrip("/")
    target = base / f"dtsd-oom-{os.getpid()}"
    try:
        target.mkdir()
    except OSError:
        return None
    return target


@pytest.fixture
def memory_cgroup():
    group = _memory_cgroup()
    if group is None:
        message = "no memory cgroup can be made here (needs root and a memory controller)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    yield group
    for _ in range(50):          # the node is stopped by then; its processes leave slowly
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def _limit(group: Path, bytes_: int) -> None:
    v1 = group / "memory.limit_in_bytes"
    if v1.exists():
        v1.write_text(str(bytes_))
    else:
        (group / "memory.max").write_text(str(bytes_))
        (group / "memory.swap.max").write_text("0")


def _usage(group: Path) -> int:
    v1 = group / "memory.usage_in_bytes"
    return int((v1 if v1.exists() else group / "memory.current").read_text())


def test_a_job_the_oom_killer_ends_is_recorded_as_such(memory_cgroup, rig, report):
    # memory_cgroup first: it is removed after the rig has stopped the node.
    master = rig.node(NODE)
    wait_for(lambda: all_running(master, 3), timeout=30, message="every child RUNNING")
    # The whole node moves into the cgroup: jobs started from now on are born there.
    for pid in [master.pid, *descendants(master.pid)]:
        try:
            (memory_cgroup / "cgroup.procs").write_text(str(pid))
        except OSError:
            pass                 # gone meanwhile
    # A worker reads its cgroup when it starts (as under systemd, where the unit's cgroup is
    # there first): replace it with one born in the cgroup.
    worker = next(c["pid"] for c in children(master) if c["role"] == "worker")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: all_running(master, 3) and worker not in
             {c["pid"] for c in children(master)}, timeout=30, message="a new worker")
    _limit(memory_cgroup, _usage(memory_cgroup) + (160 << 20))
    workers = {c["pid"] for c in children(master)}
    stub = api(master)
    job_id, _ = submit(stub, HOG.format(mib=400), "hog", max_retries=0)
    record = wait_for(lambda: ended(master, job_id), timeout=30, message="the hog to end")
    after, _ = submit(stub, "true", "after")
    wait_for(lambda: all_ended(rig.dsn, [after]), timeout=20, message="a job after it")
    still = {c["pid"] for c in children(master)}
    assert record["status"] == "FAILED"
    assert record["error"] == ("killed by signal 9 (SIGKILL): ended by the kernel's OOM "
                               "killer (out of memory)"), record
    report(Tally(submitted=2, completed=2, lost=0, run_twice=0,
                 detail={"recorded": record["error"]}))
    assert still == workers, "the OOM killer took a dtsd process, not the job"
    assert master.running()
