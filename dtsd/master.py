"""The dtsd master: starts and supervises the children of one node.

The master holds no PostgreSQL, Redis, etcd or gRPC connection. It starts each child
as a fresh interpreter (`python3 -m dtsd.<role>`), so nothing crosses a fork, and a
crashed child is replaced cleanly. Children die with the master (PR_SET_PDEATHSIG).

Each child goes through supervisord's states:

    STOPPED -> STARTING -> RUNNING -> STOPPING -> STOPPED
                  |           |
                  v           v
               BACKOFF     EXITED -> STARTING (restarted at once)
                  |
                  v
                FATAL  (after `startretries` failed starts in a row)

A child is RUNNING once it says `ready` on its pipe (it serves, or is connected to
PostgreSQL and Redis). A child that exits with EXIT_CONFIG stops the whole master: a
configuration error does not get better by restarting.

Signal handlers only record the signal and wake the loop (a self-pipe through
`signal.set_wakeup_fd`); reaping, logging and spawning happen in the loop.
TERM / INT: graceful stop; a second one escalates to a fast stop. QUIT: fast stop.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from . import __version__, child
from .config import Config

log = logging.getLogger("dtsd.master")

ROLES = {"server": "dtsd.server", "worker": "dtsd.worker", "coordinator": "dtsd.coordinator"}
START_RETRIES = 5          # failed starts in a row before a child is FATAL
BACKOFF_MAX = 30.0
STOP_MARGIN = 5.0          # beyond the role's stopwaitsecs (+ kill_grace for workers)
_PR_SET_PDEATHSIG = 1


class ChildState(str, enum.Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


@dataclass
class Child:
    role: str
    index: int
    state: ChildState = ChildState.STOPPED
    proc: subprocess.Popen | None = None
    pipe: int | None = None             # read end of the child's report pipe
    buffer: bytes = b""
    started: float = 0.0                # time.monotonic() of the last spawn
    running_since: float = 0.0
    restarts: int = 0
    failed_starts: int = 0
    retry_at: float = 0.0
    stop_deadline: float = 0.0
    removed: bool = False               # scaled away: do not restart

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    def transition(self, new: ChildState, why: str = "", pid: int | None = None) -> None:
        if new is not self.state:
            log.info("%s (pid %s): %s -> %s%s", self.name, pid or self.pid, self.state.value,
                     new.value, f": {why}" if why else "")
            self.state = new
            Child.changed = True

    changed = True  # class-wide: some child changed state since the node record was written


def _set_pdeathsig() -> None:
    """Runs in the child between fork and exec: die (gracefully) with the master."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Master:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.children: list[Child] = []
        self.signals: list[int] = []
        self.stopping = False
        self.fast_stop = False
        self.exit_code = 0
        self.started = time.time()
        self.node_file = os.path.join(cfg.get("dtsd", "runtime_dir"), "node.json")
        self._wake_r, self._wake_w = os.pipe()
        self._last_record = 0.0

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        self.init_signals()
        os.makedirs(os.path.dirname(self.node_file), exist_ok=True)
        log.info("dtsd %s master starting (pid %d, node %s, config %s)",
                 __version__, os.getpid(), self.cfg.node_id, self.cfg.path)
        if not self.address_is_free() or not self.migrate():
            return 1
        while True:
            self.handle_signals()
            self.reap_children()
            if self.stopping:
                self.stop_children()
                if not self.children:
                    break
            else:
                self.manage_children()
            self.write_node_record()
            self.sleep(0.5 if self.stopping else 1.0)
        self.remove_node_record()
        log.info("master stopped")
        return self.exit_code

    def sleep(self, timeout: float) -> None:
        """Wait for a signal, a child's report, or the timeout."""
        fds = [self._wake_r] + [c.pipe for c in self.children if c.pipe is not None]
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        for fd in readable:
            if fd == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            else:
                self.read_report(fd)

    # --- signals --------------------------------------------------------------------------

    def init_signals(self) -> None:
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, self._record_signal)

    def _record_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.handle_term(signum)
            elif signum == signal.SIGQUIT:
                self.handle_quit()

    def handle_term(self, signum: int) -> None:
        if self.stopping:
            log.warning("second %s: stopping fast", signal.Signals(signum).name)
            self.handle_quit()
            return
        log.info("%s: graceful stop", signal.Signals(signum).name)
        self.stopping = True

    def handle_quit(self) -> None:
        log.info("stopping fast: running jobs are handed back now")
        self.stopping = True
        self.fast_stop = True
        for item in self.children:
            if item.proc and item.state is ChildState.STOPPING:
                self.kill_child(item, signal.SIGQUIT)
                item.stop_deadline = min(item.stop_deadline, time.monotonic() + self._fast_wait(item))

    # --- children -------------------------------------------------------------------------

    def wanted(self) -> dict[str, int]:
        return {"coordinator": 1,
                "server": self.cfg.get("server", "processes"),
                "worker": self.cfg.get("worker", "processes")}

    def manage_children(self) -> None:
        """Start what is missing, restart what died (after its back-off)."""
        now = time.monotonic()
        for role, count in self.wanted().items():
            present = {c.index for c in self.children if c.role == role}
            for index in range(count):
                if index not in present:
                    self.children.append(Child(role, index))
        for item in self.children:
            if item.state in (ChildState.STOPPED, ChildState.EXITED):
                self.spawn_child(item)
            elif item.state is ChildState.BACKOFF and now >= item.retry_at:
                self.spawn_child(item)

    def spawn_child(self, item: Child) -> None:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        argv = [sys.executable, "-m", ROLES[item.role], "-c", self.cfg.path,
                "--index", str(item.index), "--notify-fd", str(write_end)]
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                            "LISTEN_PID", "LISTEN_FDNAMES")}
        try:
            item.proc = subprocess.Popen(argv, env=env, pass_fds=(write_end,),
                                         preexec_fn=_set_pdeathsig, stdin=subprocess.DEVNULL)
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            log.error("cannot start %s: %s", item.name, exc)
            self._failed_start(item, str(exc))
            return
        os.close(write_end)
        item.pipe, item.buffer = read_end, b""
        item.started = time.monotonic()
        item.transition(ChildState.STARTING, f"pid {item.proc.pid}")

    def read_report(self, fd: int) -> None:
        item = next((c for c in self.children if c.pipe == fd), None)
        if item is None:
            return
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not data:               # the child closed its end (it is exiting)
            self._close_pipe(item)
            return
        item.buffer += data
        *lines, item.buffer = item.buffer.split(b"\n")
        for line in lines:
            if line == b"ready" and item.state is ChildState.STARTING:
                item.failed_starts = 0
                item.running_since = time.monotonic()
                item.transition(ChildState.RUNNING, "ready")

    def _close_pipe(self, item: Child) -> None:
        if item.pipe is not None:
            os.close(item.pipe)
            item.pipe = None

    def reap_children(self) -> None:
        """Collect every exited child (WNOHANG until none is left) and decide what follows."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            item = next((c for c in self.children if c.pid == pid), None)
            if item is None:
                continue
            item.proc.returncode = os.waitstatus_to_exitcode(status)
            self.handle_exit(item, item.proc.returncode)

    def handle_exit(self, item: Child, code: int) -> None:
        self._close_pipe(item)
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        pid, item.proc = item.pid, None
        if item.state is ChildState.STOPPING or self.stopping:
            item.transition(ChildState.STOPPED, how, pid)
            self.children.remove(item)
            return
        if item.removed:
            self.children.remove(item)
            return
        if code == child.EXIT_CONFIG:
            log.error("%s cannot use the configuration (%s): stopping the master", item.name, how)
            self.exit_code = 1
            self.stopping = True
            item.transition(ChildState.FATAL, how, pid)
            self.children.remove(item)
            return
        if item.state is ChildState.STARTING:
            self._failed_start(item, how, pid)
            return
        item.restarts += 1
        item.transition(ChildState.EXITED, f"{how}; restarting", pid)

    def _failed_start(self, item: Child, why: str, pid: int | None = None) -> None:
        item.failed_starts += 1
        if item.failed_starts >= START_RETRIES:
            item.transition(ChildState.FATAL, f"{why}; gave up after {item.failed_starts} "
                                              "failed starts", pid)
            return
        delay = min(BACKOFF_MAX, 2.0 ** (item.failed_starts - 1))
        item.retry_at = time.monotonic() + delay
        item.restarts += 1
        item.transition(ChildState.BACKOFF, f"{why}; next start in {delay:.0f}s", pid)

    def kill_child(self, item: Child, sig: int) -> None:
        if item.proc is None:
            return
        try:
            os.kill(item.proc.pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    def _stop_wait(self, item: Child) -> float:
        if item.role == "worker":
            return (self.cfg.get("worker", "stopwaitsecs") + self.cfg.get("worker", "kill_grace")
                    + STOP_MARGIN)
        if item.role == "server":
            return self.cfg.get("server", "stopwaitsecs") + STOP_MARGIN
        return STOP_MARGIN

    def _fast_wait(self, item: Child) -> float:
        return (self.cfg.get("worker", "kill_grace") if item.role == "worker" else 0) + STOP_MARGIN

    def stop_children(self) -> None:
        """Ask every child to stop once; KILL those that overstay their deadline."""
        now = time.monotonic()
        for item in list(self.children):
            if item.proc is None:
                self.children.remove(item)
                continue
            if item.state is not ChildState.STOPPING:
                wait = self._fast_wait(item) if self.fast_stop else self._stop_wait(item)
                item.stop_deadline = now + wait
                item.transition(ChildState.STOPPING)
                self.kill_child(item, signal.SIGQUIT if self.fast_stop else signal.SIGTERM)
            elif now > item.stop_deadline:
                log.warning("%s (pid %s) did not stop in time: KILL", item.name, item.pid)
                self.kill_child(item, signal.SIGKILL)
                item.stop_deadline = now + 3600

    # --- the node record ------------------------------------------------------------------

    def node_record(self) -> dict:
        now = time.monotonic()
        return {
            "node_id": self.cfg.node_id, "version": __version__, "pid": os.getpid(),
            "started_at": self.started,
            "state": "stopping" if self.stopping else "running",
            "children": [{"role": c.role, "index": c.index, "pid": c.pid, "state": c.state.value,
                          "uptime": round(now - c.running_since, 1)
                          if c.state is ChildState.RUNNING else 0.0,
                          "restarts": c.restarts} for c in self.children],
        }

    def write_node_record(self) -> None:
        """For the coordinator to publish: what this master supervises. Written at once when
        a child changes state, else every few seconds (for the uptimes)."""
        now = time.monotonic()
        if not Child.changed and now - self._last_record < 5.0:
            return
        self._last_record = now
        Child.changed = False
        temporary = self.node_file + ".tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(self.node_record(), handle)
            os.replace(temporary, self.node_file)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.node_file, exc)

    def remove_node_record(self) -> None:
        try:
            os.unlink(self.node_file)
        except OSError:
            pass

    # --- one-shot work before the children start ------------------------------------------

    def address_is_free(self) -> bool:
        """Refuse to start when something already listens on our address.

        The servers bind with SO_REUSEPORT, so without this check a second dtsd (or a
        stale one) would silently share the port and split the clients between them.
        """
        if not self.cfg.get("server", "processes"):
            return True
        host, port = self.cfg.get("server", "listen")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                log.error("cannot listen on %s:%d: %s (is another dtsd running?)",
                          host, port, exc.strerror)
                return False
        return True

    def migrate(self) -> bool:
        """Bring the schema up to date in a child process (the master opens no connection)."""
        result = subprocess.run([sys.executable, "-m", "dtsd", "migrate", "-c", self.cfg.path],
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            log.error("schema migration failed (exit code %d); not starting", result.returncode)
            return False
        return True
