#!/usr/bin/env python3
"""What starting a job costs, box included: jobs/s and host CPU per job, no database.

Four threads each start `/bin/sh -c true` with its output captured, one job after another,
in three ways, interleaved run by run:

  plain     subprocess.run as the current user: the fork/exec ceiling, no box at all
  setpriv   the box of dtsd up to e3c624a: subprocess.run of `setpriv --reuid ... prlimit
            ... -- /bin/sh -c true` (two more programs per job, the job's env read by both)
  launcher  the box of today: the worker's launcher (dtsd/launcher.py) forks, switches to
            the slot's uid in-process, sets the limits and execs the shell

Needs root (the boxed ways switch users). A benchmark, not a test: it prints what it
measures and asserts nothing about speed.

    sudo /usr/bin/python3 bench/launch.py [--jobs 2000] [--runs 3] [--threads 4]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline import host_cpu, machine  # noqa: E402
from dtsd import config as configmod  # noqa: E402
from dtsd.executor import Execution  # noqa: E402
from dtsd.jobbox import JobBox, Launcher  # noqa: E402

ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
NOBODY = 65534
# Slot uids of this benchmark only, far from the packaged range (70000-70999).
UIDS = (5_000_000, 5_000_063)
# [worker] limits' default; the setpriv way below spells the same in prlimit's words.
DEFAULT_LIMITS = configmod.limit_list("processes=4096 open_files=1024")


def plain() -> None:
    done = subprocess.run(["/bin/sh", "-c", "true"], capture_output=True, env=ENV)
    assert done.returncode == 0, done


def setpriv_chain() -> Callable[[], None]:
    """e3c624a's wrapper, rebuilt from its jobbox.wrapper() for the default limits."""
    setpriv = shutil.which("setpriv")
    prlimit = shutil.which("prlimit")
    argv = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={NOBODY}",
            "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
            "--no-new-privs", "--", prlimit, "--nproc=4096:4096", "--nofile=1024:1024", "--",
            "/bin/sh", "-c", "true"]

    def run() -> None:
        done = subprocess.run(argv, capture_output=True, env=ENV)
        assert done.returncode == 0, done
    return run


class LauncherWay:
    """The worker's launcher with `threads` slots, each thread driving its own slot."""

    def __init__(self, threads: int):
        self.dir = tempfile.mkdtemp(prefix="dtsd-bench-launch-")
        self.launcher = Launcher(runtime_dir=self.dir, concurrency=threads, uids=UIDS,
                                 groups=[NOBODY])
        self.limits = JobBox.rlimits(DEFAULT_LIMITS)

    def for_slot(self, slot: int) -> Callable[[], None]:
        def run() -> None:
            result = Execution("true", env=ENV, cwd="/", launcher=self.launcher, slot=slot,
                               limits=self.limits).run()
            assert result.ok, result
        return run

    def close(self) -> None:
        self.launcher.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def own_cpu(launcher_pid: int) -> float:
    """Seconds of CPU spent by this process, its reaped children, and the launcher with its
    reaped children (the boxed jobs are the launcher's): the cost of starting jobs, whatever
    else the machine runs meanwhile."""
    mine = resource.getrusage(resource.RUSAGE_SELF)
    theirs = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(f"/proc/{launcher_pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    launcher = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime..cstime
    return mine.ru_utime + mine.ru_stime + theirs.ru_utime + theirs.ru_stime + launcher


def measure(jobs: int, starters: list[Callable[[], None]],
            launcher_pid: int) -> tuple[float, float, float]:
    """(jobs/s, host CPU ms per job, own CPU ms per job) of `jobs` jobs split among one
    thread per starter."""
    share = jobs // len(starters)

    def loop(start: Callable[[], None]) -> None:
        for _ in range(share):
            start()
    threads = [threading.Thread(target=loop, args=(start,)) for start in starters]
    cpu, own, wall = host_cpu(), own_cpu(launcher_pid), time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.monotonic() - wall, host_cpu() - cpu
    own = own_cpu(launcher_pid) - own
    total = share * len(starters)
    return total / wall, cpu / total * 1000, own / total * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/launch.py needs root: the boxed ways switch users")
    print(machine())
    way = LauncherWay(args.threads)
    try:
        ways = {
            "plain": [plain] * args.threads,
            "setpriv": [setpriv_chain()] * args.threads,
            "launcher": [way.for_slot(slot) for slot in range(args.threads)],
        }
        pid = way.launcher.pid
        for starters in ways.values():        # warm up: page cache, the launcher's slots
            measure(args.threads * 25, starters, pid)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ways}
        for run in range(args.runs):
            for name, starters in ways.items():
                rate, host, own = measure(args.jobs, starters, pid)
                results[name].append((rate, host, own))
                print(f"run {run + 1}: {name:9} {rate:6.0f} jobs/s, CPU {own:.2f} ms/job "
                      f"(host {host:.2f})", flush=True)
    finally:
        way.close()
    print(f"{args.jobs} jobs of `sh -c true`, output captured, {args.threads} threads; "
          f"medians of {args.runs} (min-max). CPU: this process, the launcher and every job; "
          "host: the whole machine")
    for name, runs in results.items():
        rates, hosts, owns = zip(*runs)
        print(f"  {name:9} {statistics.median(rates):6.0f} jobs/s ({min(rates):.0f}-"
              f"{max(rates):.0f}), CPU {statistics.median(owns):.2f} ms/job "
              f"({min(owns):.2f}-{max(owns):.2f}), host {statistics.median(hosts):.2f}")


if __name__ == "__main__":
    main()
