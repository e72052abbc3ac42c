"""`dtsctl status` shows each child's uptime as of the call, not as of the last rewrite of
node.json (every 5 s), which made it read 2-3 s low on average."""

from __future__ import annotations

import json
import os
import time

from tests.helpers import wait_for

_TICKS = os.sysconf("SC_CLK_TCK")


def process_age(pid: int) -> float:
    """Seconds since `pid` started, from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        started = int(handle.read().rpartition(")")[2].split()[19]) / _TICKS
    with open("/proc/uptime", encoding="ascii") as handle:
        return float(handle.read().split()[0]) - started


def test_status_uptime_is_current(dtsd_factory):
    master = dtsd_factory({"server": {"processes": 1, "startsecs": "0"},
                           "worker": {"processes": 1, "startsecs": "0"}})

    def children() -> list[dict]:
        shown = master.dtsctl("-o", "json", "status")
        assert shown.returncode == 0, shown.stderr
        return json.loads(shown.stdout)["nodes"][0]["children"]
    wait_for(lambda: all(c["state"] == "RUNNING" for c in children()) and len(children()) == 3,
             timeout=30, message="every child RUNNING")
    worst = 0.0
    end = time.monotonic() + 7        # longer than node.json's 5 s between rewrites
    while time.monotonic() < end:
        for child in children():
            # A child counts as RUNNING a little after its process started (it boots,
            # connects and says `ready`): its uptime is at most its process's age.
            age = process_age(child["pid"])
            assert child["uptime_seconds"] <= age + 0.2, (child, age)
            worst = max(worst, age - child["uptime_seconds"])
        time.sleep(0.5)
    # Boot to `ready` takes about a second here; the publishing interval (1 s) adds to it.
    assert worst < 2.5, f"an uptime read {worst:.1f}s below its process's age"
