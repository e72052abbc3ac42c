"""The master KILLed outside systemd (no cgroup to sweep its tree), with PostgreSQL and
Redis stopped right after, while a worker runs a job.

Seen three times before this test: the orphaned worker (parent 1) drained, handed its job
back, then retried recording it forever, ignored further TERMs and needed KILL. Every
child of a master that is gone must exit within the bound the master itself would give it
(stopwaitsecs + kill_grace + the master's STOP_MARGIN), whatever the stores do, and leave
no job process behind.
"""

from __future__ import annotations

import os
import secrets
import signal
import time

import pytest

from dtsd.child import COORDINATOR_STOPWAIT
from dtsd.master import STOP_MARGIN
from tests.faults.common import (Tally, alive, all_running, children, descendants, measure,
                                 pids_running)
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(120)

STOPWAIT = 2.0
KILL_GRACE = 1.0
# What the master would give its slowest child (the coordinator) before a KILL.
BOUND = max(STOPWAIT + KILL_GRACE, COORDINATOR_STOPWAIT) + STOP_MARGIN
NODE = {"server": {"processes": 1, "startsecs": "0", "stopwaitsecs": f"{STOPWAIT}s"},
        "worker": {"processes": 1, "startsecs": "0", "concurrency": 2,
                   "stopwaitsecs": f"{STOPWAIT}s", "kill_grace": f"{KILL_GRACE}s"},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}


@pytest.mark.parametrize("stores", ["stopped", "up"])
def test_children_of_a_killed_master_exit_in_bounded_time_and_leave_no_job(rig, report,
                                                                          stores):
    master = rig.node(NODE)
    wait_for(lambda: all_running(master, 3), timeout=30, message="every child RUNNING")
    marker = f"{secrets.randbelow(10**6) + 10**6}.5"     # a unique `sleep` argument
    submitted = master.dtsctl("submit", "--", "sleep", marker)
    assert submitted.returncode == 0, submitted.stderr
    wait_for(lambda: pids_running(f"sleep {marker}"), timeout=20,
             message="the job to run")
    kids = [c["pid"] for c in children(master)]
    tree = descendants(master.pid)

    os.kill(master.pid, signal.SIGKILL)
    master.proc.wait(10)
    killed = time.monotonic()
    if stores == "stopped":
        rig.redis.stop()
        rig.pg.stop()

    took = measure(lambda: not any(alive(pid) for pid in tree), timeout=BOUND + 20)
    left = [pid for pid in tree if alive(pid)]
    job_left = pids_running(f"sleep {marker}")
    # Whatever is left dies now, so that a failure leaves nothing running.
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    report(Tally(submitted=1, detail={"processes left": len(left), "job left": len(job_left)}),
           gone_after=-1.0 if took is None else took, bound=BOUND)
    assert took is not None and took <= BOUND, (
        f"children {kids}: still alive {BOUND + 20:.0f}s after the master's KILL: {left}"
        f"\n{master.log()[-5000:]}")
    assert not job_left, "the job outlived its worker"
    assert time.monotonic() - killed <= BOUND + 21
