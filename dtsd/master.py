"""The dtsd master: starts and supervises the children of one node.

The master holds no PostgreSQL, Redis, etcd or gRPC connection. It starts each child
as a fresh interpreter (`python3 -m dtsd.<role>`), so nothing crosses a fork, and a
crashed child is replaced cleanly. Children die with the master (PR_SET_PDEATHSIG).

Each child goes through supervisord's states:

    STOPPED -> STARTING -> RUNNING -> STOPPING -> STOPPED
                  |           |
                  v           v
               BACKOFF     EXITED -> STARTING (autorestart)
                  |
                  v
                FATAL  (after `startretries` failed starts in a row)

A child is RUNNING once it has said `ready` on its pipe (it serves, or is connected to
PostgreSQL and Redis) and has been up `startsecs`. A child that stops saying `alive`
for `[dtsd] child_timeout` is killed and replaced. Before the node was first ready, a
child exiting with EXIT_CONFIG or EXIT_BOOT stops the whole master: a configuration
error or an address in use does not get better by restarting.

Signal handlers only record the signal and wake the loop (a self-pipe through
`signal.set_wakeup_fd`); reaping, logging and spawning happen in the loop:

    TERM, INT   graceful stop (a second one escalates to a fast stop)
    QUIT        fast stop: running jobs are handed back at once
    HUP         reload: the start checks first (a refused file changes nothing), then scale
                and restart changed roles one at a time (changed settings, or the API's TLS
                files renewed in place: servers and web)
    TTIN, TTOU  one worker child more, one less
    USR1        reopen log files (the master's and the children's)

systemd's notify protocol is spoken by the master alone (children never see
NOTIFY_SOCKET): READY=1 once every child is RUNNING, a one-line STATUS=, RELOADING=1
with MONOTONIC_USEC= then READY=1 around a reload, STOPPING=1, and WATCHDOG=1 from
the loop while WATCHDOG_USEC is set.

The loop also answers local callers' "who am I?" on `<runtime_dir>/ident.sock`: the
peer-credential broker of dtsd/identity.py, which reads the caller's uid from the kernel
and hands back a short-lived signed local token (or a refusal). It runs here because the
master is the one process that outlives every child and holds no client of anything; it
never blocks the loop (non-blocking accept, a bounded number of answers per turn).

Each reload's verdict is written to `<runtime_dir>/reload.json` (a sequence number, the
state RELOADING, DONE, REFUSED or FAILED, and why), where `dtsd reload` (the unit's
ExecReload=) waits for it: systemd 252 has no Type=notify-reload, and a plain `kill -HUP`
would report a refused reload as a success.
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
import subprocess
import sys
import time
from dataclasses import dataclass, field

from . import __version__, backing, checks, child, identity, metrics, tls
from . import config as configmod
from .config import Config
from .jobbox import job_uids_in_use, privilege_argv

log = logging.getLogger("dtsd.master")

ROLES = {"server": "dtsd.server", "worker": "dtsd.worker", "coordinator": "dtsd.coordinator",
         "web": "dtsd.web"}
# The sections each role's children read, whole or as "section.key" (the servers read only
# the job limits of [worker], for their ceiling): a reload restarts a role whose part changed.
ROLE_SECTIONS = {"server": ("dtsd", "server", "worker.limits", "worker.limits_max", "postgres",
                            "redis", "notify"),
                 "worker": ("dtsd", "worker", "postgres", "redis"),
                 "coordinator": ("dtsd", "worker", "postgres", "redis", "etcd", "notify"),
                 "web": ("dtsd", "web", "server", "postgres", "redis", "etcd")}
# Files read at boot whose contents a reload compares too, not only their names: the API's
# certificate, key and client CA (dtsd/tls.py), replaced in place when renewed.
ROLE_FILES = {role: tls.digests for role in tls.ROLES}
# How the coordinator is supervised (it has no section of its own).
COORDINATOR = {"startsecs": 0.0, "startretries": 5, "stopsignal": signal.SIGTERM,
               "stopwaitsecs": child.COORDINATOR_STOPWAIT, "autorestart": "true"}
BACKOFF_MAX = 30.0
# Beyond the role's stopwaitsecs (+ kill_grace for workers): the child's own FINISH_GRACE,
# and two seconds more before the master KILLs it.
STOP_MARGIN = child.FINISH_GRACE + 2.0
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
    generation: int = 0                 # bumped when a reload replaces the child
    state: ChildState = ChildState.STOPPED
    proc: subprocess.Popen | None = None
    pipe: int | None = None             # read end of the child's report pipe
    buffer: bytes = b""
    started: float = 0.0                # time.monotonic() of the last spawn
    ready: bool = False
    running_since: float = 0.0
    last_alive: float = 0.0
    restarts: int = 0
    failed_starts: int = 0
    retry_at: float = 0.0
    stop_deadline: float = 0.0
    retiring: bool = False              # being stopped on purpose: never restarted
    outdated: bool = False              # a reload changed its settings: to be replaced
    # Backing stores this child reports unreachable (`store NAME down T`), each since T
    # (unix time); forgotten when the child exits, so a dead child leaves no outage behind.
    stores_down: dict[backing.BackingStore, float] = field(default_factory=dict)

    changed = True                      # class-wide: a state changed since the last record

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}" + (f".{self.generation}" if self.generation else "")

    def transition(self, new: ChildState, why: str = "", pid: int | None = None) -> None:
        if new is not self.state:
            log.info("%s (pid %s): %s -> %s%s", self.name, pid or self.pid, self.state.value,
                     new.value, f": {why}" if why else "")
            self.state = new
            Child.changed = True


class Notifier:
    """systemd's notify protocol, from the master only; silent without NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = None
        if self.enabled:
            import sdnotify
            self._notifier = sdnotify.SystemdNotifier()
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_interval = (int(usec) / 2e6 if usec and usec.isdigit() and
                                  (not pid or pid == str(os.getpid())) else 0.0)
        self._last_watchdog = 0.0
        self._last_status = ""

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def reloading(self) -> None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def next_watchdog(self) -> float:
        return self._last_watchdog + self.watchdog_interval

    def watchdog(self) -> None:
        now = time.monotonic()
        if self.watchdog_interval and now - self._last_watchdog >= self.watchdog_interval:
            self._last_watchdog = now
            self.send("WATCHDOG=1")


class ReloadState(str, enum.Enum):
    RELOADING = "reloading"     # checks passed; children being scaled and replaced
    DONE = "done"               # every child of the new configuration RUNNING
    REFUSED = "refused"         # a check failed: the running configuration stays
    FAILED = "failed"           # applied, but cannot complete (a child FATAL, a stop)


VERDICT_FILE = "reload.json"
FINAL_STATES = (ReloadState.DONE, ReloadState.REFUSED, ReloadState.FAILED)


def read_verdict(runtime_dir: str) -> dict | None:
    """The master's latest reload verdict: {"pid", "seq", "state", "message", "time"}."""
    try:
        with open(os.path.join(runtime_dir, VERDICT_FILE), encoding="utf-8") as handle:
            verdict = json.load(handle)
        verdict["state"] = ReloadState(verdict["state"])
        return verdict
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _set_pdeathsig() -> None:
    """Runs in the child between fork and exec: die (gracefully) with the master."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Master:
    def __init__(self, cfg: Config, preflight: checks.Report | None = None):
        self.cfg = cfg
        self.preflight = preflight or checks.Report()
        self.counts = self.wanted(cfg)
        self.file_digests = self.digests(cfg)
        self.children: list[Child] = []
        self.signals: list[int] = []
        self.stopping = False
        self.fast_stop = False
        self.reloading = False
        self.was_ready = False
        self.exit_code = 0
        self.started = time.time()
        self.leader: bool | None = None
        self.pending: int | None = None
        # Serving off-loopback without auth and TLS, by choice ([server] insecure = true).
        self.insecure = bool(configmod.server_exposure(cfg)[1])
        self.notifier = Notifier()
        # Fixed at start: a reload that changes [dtsd] runtime_dir is refused.
        self.runtime_dir = cfg.get("dtsd", "runtime_dir")
        self.node_file = os.path.join(self.runtime_dir, "node.json")
        self.verdict_file = os.path.join(self.runtime_dir, VERDICT_FILE)
        self.broker = identity.Broker(self.runtime_dir, cfg.node_id)
        self.reload_seq = 0          # HUPs received
        self.applied_seq = 0         # the HUP whose configuration is being applied
        self.verdict = ReloadState.DONE
        self._wake_r, self._wake_w = os.pipe()
        self._last_record = 0.0
        self._counted: dict[tuple[str, ChildState], int] = {}
        # Servers and the coordinator give up every capability the master holds; workers
        # keep only what switching to [worker] job_user takes (see dtsd/jobbox.py).
        self.privileges = {role: privilege_argv(role) for role in ROLES}

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        self.init_signals()
        if not os.path.isdir(self.runtime_dir):
            # Made here (no systemd RuntimeDirectory=): traversable whatever the umask, so
            # that local users reach the API sockets and the identity broker in it.
            os.makedirs(self.runtime_dir, exist_ok=True)
            os.chmod(self.runtime_dir, 0o755)
        try:
            metrics.prepare(os.path.join(self.runtime_dir, metrics.DIRECTORY))
        except OSError as exc:
            log.error("cannot prepare the metrics directory in %s: %s", self.runtime_dir, exc)
            return 1
        log.info("dtsd %s master starting (pid %d, node %s, config %s)",
                 __version__, os.getpid(), self.cfg.node_id, self.cfg.path)
        self.notifier.status("starting")
        for warning in self.preflight.warnings:
            log.warning("%s", warning)
        if not self.address_is_free() or not self.open_broker():
            self.broker.close()
            return 1
        migrated = self.migrate()
        if migrated:
            self.broker.close()
            return migrated
        self.sweep_job_slots()       # what a master that died before us may have left
        if not self.job_slots_usable():
            self.broker.close()
            return 1
        self.write_verdict(ReloadState.DONE, "started")
        while True:
            self.handle_signals()
            self.reap_children()
            self.check_children()
            if self.stopping:
                self.stop_children()
                if not self.children:
                    break
            else:
                self.manage_children()
                self.advance_reload()
            self.report()
            self.write_node_record()
            self.sleep(0.25 if self.stopping or self.reloading or not self.was_ready else 1.0)
        self.remove_node_record()
        self.remove_verdict()
        self.broker.close()
        log.info("master stopped")
        return self.exit_code

    def sleep(self, timeout: float) -> None:
        """Wait for a signal, a child's report, a local caller at the broker, or the timeout."""
        if self.notifier.watchdog_interval:    # wake in time for the next ping, not later
            timeout = max(0.0, min(timeout, self.notifier.next_watchdog() - time.monotonic()))
        fds = [self._wake_r] + [c.pipe for c in self.children if c.pipe is not None]
        broker = self.broker.fileno()
        if broker >= 0:
            fds.append(broker)
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        for fd in readable:
            if fd == broker:
                self.broker.serve(self.cfg.get("server", "local_roles"))
            elif fd == self._wake_r:
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
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
                    signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, self._record_signal)

    def _record_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    def handle_signals(self) -> None:
        handlers = {signal.SIGTERM: self.handle_term, signal.SIGINT: self.handle_term,
                    signal.SIGQUIT: self.handle_quit, signal.SIGHUP: self.handle_hup,
                    signal.SIGTTIN: self.handle_ttin, signal.SIGTTOU: self.handle_ttou,
                    signal.SIGUSR1: self.handle_usr1}
        while self.signals:
            signum = self.signals.pop(0)
            if signum in handlers:
                handlers[signum](signum)

    def handle_term(self, signum: int) -> None:
        if self.stopping:
            log.warning("second %s: stopping fast", signal.Signals(signum).name)
            self.handle_quit(signum)
            return
        log.info("%s: graceful stop", signal.Signals(signum).name)
        self.stopping = True
        self.notifier.send("STOPPING=1")
        self.abandon_reload()

    def handle_quit(self, signum: int = signal.SIGQUIT) -> None:
        log.info("stopping fast: running jobs are handed back now")
        if not self.stopping:
            self.notifier.send("STOPPING=1")
        self.stopping = True
        self.fast_stop = True
        self.abandon_reload()
        for item in self.children:
            if item.proc and item.state is ChildState.STOPPING:
                self.kill_child(item, signal.SIGQUIT)
                item.stop_deadline = min(item.stop_deadline,
                                         time.monotonic() + self._stop_wait(item, fast=True))

    def handle_hup(self, signum: int) -> None:
        """Reload: every check a start makes, then apply; a refused file changes nothing."""
        self.reload_seq += 1
        if self.stopping:
            self.refuse_reload("the master is stopping")
            return
        self.write_verdict(ReloadState.RELOADING, "checking the configuration")
        try:
            new = configmod.load(self.cfg.path)
        except configmod.ConfigError as exc:
            self.refuse_reload(str(exc))
            return
        report = checks.preflight(new, checks.Occasion.RELOAD, running=self.cfg)
        if report.errors:
            self.refuse_reload("; ".join(report.errors))
            return
        try:
            child.setup_logging(new, "master")
        except OSError as exc:
            self.refuse_reload(f"[dtsd] log_file: {exc}")
            return
        for warning in report.warnings:
            log.warning("%s", warning)
        self.notifier.reloading()
        old, self.cfg = self.cfg, new
        self.insecure = bool(configmod.server_exposure(new)[1])
        self.counts = self.wanted(new)
        digests, self.file_digests = self.file_digests, self.digests(new)
        files = {role: tls.changed(digests.get(role, {}), self.file_digests.get(role, {}))
                 for role in self.file_digests}
        changed = [role for role, sections in ROLE_SECTIONS.items()
                   if any(_part(old, s) != _part(new, s) for s in sections) or files.get(role)]
        renewed = sorted({name for names in files.values() for name in names})
        for item in self.children:
            if item.role in changed and not item.retiring:
                item.outdated = True
        self.reloading = True
        self.applied_seq = self.reload_seq
        self.write_verdict(ReloadState.RELOADING, "applying: " + (
            f"restarting {', '.join(changed)}" if changed else "scaling only"))
        log.info("reloading %s: processes %s; restarting %s%s", new.path,
                 ", ".join(f"{r}={n}" for r, n in self.counts.items()),
                 ", ".join(changed) or "nothing",
                 f" ({', '.join(renewed)} changed on disk)" if renewed else "")

    def abandon_reload(self) -> None:
        if self.reloading and self.verdict is ReloadState.RELOADING:
            self.write_verdict(ReloadState.FAILED, "the master is stopping")

    def refuse_reload(self, why: str) -> None:
        log.error("reload refused, keeping the running configuration: %s", why)
        self.write_verdict(ReloadState.REFUSED, why)

    def handle_ttin(self, signum: int) -> None:
        self.counts["worker"] += 1
        log.info("TTIN: %d worker children", self.counts["worker"])

    def handle_ttou(self, signum: int) -> None:
        self.counts["worker"] = max(0, self.counts["worker"] - 1)
        log.info("TTOU: %d worker children", self.counts["worker"])

    def handle_usr1(self, signum: int) -> None:
        child.reopen_logs()
        for item in self.children:
            self.kill_child(item, signal.SIGUSR1)
        log.info("USR1: log files reopened")

    # --- children -------------------------------------------------------------------------

    @staticmethod
    def wanted(cfg: Config) -> dict[str, int]:
        return {"coordinator": 1,
                "server": cfg.get("server", "processes"),
                "worker": cfg.get("worker", "processes"),
                "web": cfg.get("web", "processes")}

    @staticmethod
    def digests(cfg: Config) -> dict[str, dict[str, str]]:
        """What each role's boot-time files hold now (ROLE_FILES), for the next reload."""
        return {role: read(cfg) for role, read in ROLE_FILES.items()}

    def setting(self, role: str, key: str):
        return COORDINATOR[key] if role == "coordinator" else self.cfg.get(role, key)

    def manage_children(self) -> None:
        """Start what is missing, retire what is too many, restart what died."""
        now = time.monotonic()
        for role, count in self.counts.items():
            active = [c for c in self.children if c.role == role and not c.retiring]
            present = {c.index for c in active}
            for index in range(count):
                if index not in present:
                    self.children.append(Child(role, index))
            for item in active:
                if item.index >= count:
                    self.retire_child(item, "scaled down")
        for item in self.children:
            if item.state is ChildState.STOPPED and not item.retiring:
                self.spawn_child(item)
            elif item.state is ChildState.BACKOFF and now >= item.retry_at:
                self.spawn_child(item)

    def advance_reload(self) -> None:
        """Replace outdated children one at a time: the new one first, then the old one goes.

        Servers share the port, so a replacement serves before its predecessor stops; a
        worker being replaced drains (its running jobs finish or are handed back).
        """
        if not self.reloading:
            return
        outdated = [c for c in self.children if c.outdated and not c.retiring]
        for old in outdated:
            successor = self._successor(old)
            if successor and successor.state is ChildState.RUNNING:
                self.retire_child(old, "replaced after reload")
        if any(c.generation and c.state is ChildState.STARTING for c in self.children):
            return                              # one replacement at a time
        for old in [c for c in self.children if c.outdated and not c.retiring]:
            if self._successor(old):
                continue
            if old.state is ChildState.RUNNING:
                replacement = Child(old.role, old.index, generation=old.generation + 1)
                self.children.append(replacement)
                self.spawn_child(replacement)
                return
            if old.state is not ChildState.STARTING:
                self.retire_child(old, "settings changed")   # BACKOFF, FATAL, EXITED: start anew
        busy = any(c.outdated or (c.retiring and c.proc) for c in self.children)
        if not busy and self.all_running():
            self.reloading = False
            log.info("reload complete")
            self.write_node_record(force=True)   # whoever acts on READY reads this
            # STATUS= without "reloading; " before READY=1 and the verdict: `systemctl
            # reload` returns on the verdict, and what it shows then must be the outcome.
            self.notifier.status(self.status_line())
            self.notifier.send("READY=1")
            self.write_verdict(ReloadState.DONE, "reload complete")
            return
        fatal = [c.name for c in self.children if c.state is ChildState.FATAL and not c.retiring]
        if fatal and self.verdict is ReloadState.RELOADING:
            self.write_verdict(ReloadState.FAILED, f"{', '.join(fatal)} FATAL: the reload "
                                                   "cannot complete (see the log)")

    def _successor(self, old: Child) -> Child | None:
        return next((c for c in self.children if c.role == old.role and c.index == old.index
                     and c.generation > old.generation and not c.retiring), None)

    def all_running(self) -> bool:
        active = [c for c in self.children if not c.retiring]
        return (len(active) == sum(self.counts.values())
                and all(c.state is ChildState.RUNNING for c in active))

    def spawn_child(self, item: Child) -> None:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        argv = [*self.privileges[item.role], sys.executable, "-m", ROLES[item.role],
                *self.config_args(),
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
        item.pipe, item.buffer, item.ready, item.outdated = read_end, b"", False, False
        item.started = item.last_alive = time.monotonic()
        item.transition(ChildState.STARTING, f"pid {item.proc.pid}")

    def read_report(self, fd: int) -> None:
        item = next((c for c in self.children if c.pipe == fd), None)
        if item is None:
            return
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:               # the child closed its end (it is exiting)
            self._close_pipe(item)
            return
        item.buffer += data
        *lines, item.buffer = item.buffer.split(b"\n")
        item.last_alive = time.monotonic()
        for line in lines:
            if line == b"ready":
                item.ready = True
            elif line.startswith(b"store "):
                self.store_report(item, line)
            elif line.startswith(b"status ") and item.role == "coordinator":
                try:
                    report = json.loads(line[7:])
                except ValueError:
                    continue
                self.leader = report.get("leader")
                self.pending = report.get("pending")
        self.check_children()

    def store_report(self, item: Child, line: bytes) -> None:
        """`store NAME down T` or `store NAME up` from a child (dtsd/backing.py)."""
        words = line.decode("ascii", "replace").split()
        try:
            store = backing.BackingStore(words[1])
            if words[2] == "down":
                item.stores_down[store] = float(words[3])
            elif words[2] == "up":
                item.stores_down.pop(store, None)
            else:
                return
        except (IndexError, ValueError):
            log.warning("%s sent a malformed store report: %r", item.name, line[:100])
            return
        Child.changed = True

    def stores_down(self) -> dict[backing.BackingStore, float]:
        """Each store some live child cannot reach, since the earliest of them lost it."""
        down: dict[backing.BackingStore, float] = {}
        for item in self.children:
            for store, since in item.stores_down.items():
                down[store] = min(since, down.get(store, since))
        return down

    def check_children(self) -> None:
        """Promote started children to RUNNING; kill the ones that stopped reporting."""
        now = time.monotonic()
        timeout = self.cfg.get("dtsd", "child_timeout")
        for item in self.children:
            if item.state is ChildState.STARTING and item.ready and \
                    now - item.started >= self.setting(item.role, "startsecs"):
                item.failed_starts = 0
                item.running_since = now
                item.transition(ChildState.RUNNING, "ready")
            elif item.state is ChildState.RUNNING and now - item.last_alive > timeout:
                log.error("%s (pid %s) silent for %.0fs: killing it", item.name, item.pid,
                          now - item.last_alive)
                self.kill_child(item, signal.SIGKILL)
                item.last_alive = now

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
        if item.stores_down:
            item.stores_down.clear()
            Child.changed = True
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        pid, item.proc = item.pid, None
        metrics.forget(pid)
        if item.role == "server":
            self.remove_file(identity.api_socket(self.runtime_dir, pid))
        if item.role == "worker" and code != 0:
            swept = self.sweep_job_slots()
            if swept:
                log.warning("%s died (%s): swept %d job slot(s) it left; the leader recovers "
                            "their jobs", item.name, how, swept)
        if item.retiring or self.stopping:
            item.transition(ChildState.STOPPED, how, pid)
            self.children.remove(item)
            return
        if code in (child.EXIT_CONFIG, child.EXIT_BOOT) and not self.was_ready:
            what = "cannot use the configuration" if code == child.EXIT_CONFIG else "cannot start"
            log.error("%s %s (%s): stopping the master", item.name, what, how)
            item.transition(ChildState.FATAL, how, pid)
            self.children.remove(item)
            # 78 tells systemd not to restart (RestartPreventExitStatus=78): it would not help.
            self.exit_code = child.EXIT_CONFIG if code == child.EXIT_CONFIG else 1
            self.stopping = True
            self.notifier.send("STOPPING=1")
            return
        if item.state is ChildState.STARTING:
            self._failed_start(item, how, pid)
            return
        restart = self.setting(item.role, "autorestart")
        if restart == "false" or (restart == "unexpected" and code == 0):
            item.transition(ChildState.EXITED, f"{how}; autorestart={restart}", pid)
            return
        item.restarts += 1
        metrics.CHILD_RESTARTS.labels(item.role).inc()
        item.transition(ChildState.EXITED, f"{how}; restarting", pid)
        self.spawn_child(item)

    def _failed_start(self, item: Child, why: str, pid: int | None = None) -> None:
        item.failed_starts += 1
        retries = self.setting(item.role, "startretries")
        if item.failed_starts >= retries:
            item.transition(ChildState.FATAL, f"{why}; gave up after {item.failed_starts} "
                                              "failed starts", pid)
            return
        delay = min(BACKOFF_MAX, 2.0 ** (item.failed_starts - 1))
        item.retry_at = time.monotonic() + delay
        item.restarts += 1
        metrics.CHILD_RESTARTS.labels(item.role).inc()
        item.transition(ChildState.BACKOFF, f"{why}; next start in {delay:.0f}s", pid)

    def kill_child(self, item: Child, sig: int) -> None:
        if item.proc is None:
            return
        try:
            os.kill(item.proc.pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    def retire_child(self, item: Child, why: str) -> None:
        """Stop one child on purpose (scale-down, replacement): drained, never restarted."""
        item.retiring = True
        if item.proc is None:
            item.transition(ChildState.STOPPED, why)
            self.children.remove(item)
            return
        item.stop_deadline = time.monotonic() + self._stop_wait(item)
        item.transition(ChildState.STOPPING, why)
        self.kill_child(item, self.setting(item.role, "stopsignal"))

    def _stop_wait(self, item: Child, fast: bool = False) -> float:
        grace = self.cfg.get("worker", "kill_grace") if item.role == "worker" else 0.0
        if fast:
            return grace + STOP_MARGIN
        return self.setting(item.role, "stopwaitsecs") + grace + STOP_MARGIN

    def stop_children(self) -> None:
        """Ask every child to stop once; KILL those that overstay their deadline."""
        now = time.monotonic()
        for item in list(self.children):
            if item.proc is None:
                self.children.remove(item)
                continue
            if item.state is not ChildState.STOPPING:
                item.stop_deadline = now + self._stop_wait(item, self.fast_stop)
                item.transition(ChildState.STOPPING)
                self.kill_child(item, signal.SIGQUIT if self.fast_stop
                                else self.setting(item.role, "stopsignal"))
            elif now > item.stop_deadline:
                log.warning("%s (pid %s) did not stop in time: KILL", item.name, item.pid)
                self.kill_child(item, signal.SIGKILL)
                item.stop_deadline = now + 3600

    # --- what the master tells the world --------------------------------------------------

    def report(self) -> None:
        """READY once everything runs for the first time; the STATUS line; the watchdog."""
        if not self.stopping and not self.was_ready and self.all_running():
            self.was_ready = True
            log.info("all %d children are running: ready", sum(self.counts.values()))
            self.write_node_record(force=True)   # whoever acts on READY reads this
            self.notifier.send("READY=1")
        self.notifier.status(self.status_line())
        self.notifier.watchdog()
        self.count_children()

    def count_children(self) -> None:
        """dtsd_children{role,state}: every role and state, 0 where none."""
        counts = {(role, state): 0 for role in ROLES for state in ChildState}
        for item in self.children:
            counts[(item.role, item.state)] += 1
        if counts != self._counted:
            self._counted = counts
            for (role, state), count in counts.items():
                metrics.CHILDREN.labels(role, state.value).set(count)

    def status_line(self) -> str:
        active = [c for c in self.children if not c.retiring]
        up = sum(c.state is ChildState.RUNNING for c in active)
        role = {None: "election pending", True: "leader", False: "follower"}[self.leader]
        if role == "leader" and not self.cfg.get("etcd", "endpoints"):
            role = "leader (single-node)"
        parts = [role, f"children {up}/{sum(self.counts.values())} running"]
        fatal = [c.name for c in active if c.state is ChildState.FATAL]
        if fatal:
            parts.append("FATAL: " + ", ".join(fatal))
        now = time.time()
        for store, since in sorted(self.stores_down().items()):
            parts.append(f"{store.value} unreachable for {max(0, now - since):.0f} s")
        if self.pending is not None:
            parts.append(f"{self.pending} jobs pending")
        if self.insecure:
            parts.append("INSECURE")
        if self.stopping:
            parts.insert(0, "stopping")
        elif self.reloading:
            parts.insert(0, "reloading")
        return "; ".join(parts)

    def node_record(self) -> dict:
        """What node.json holds. Each RUNNING child's `running_since` is a unix time, from
        which the coordinator computes the uptime it publishes: the file is rewritten only
        every few seconds, and an uptime frozen in it read up to 5 s low."""
        now = time.monotonic()
        wall = time.time()
        return {
            "node_id": self.cfg.node_id, "version": __version__, "pid": os.getpid(),
            "started_at": self.started,
            "state": "stopping" if self.stopping else "reloading" if self.reloading else "running",
            "status": self.status_line(),
            "unreachable": {store.value: since for store, since in self.stores_down().items()},
            "children": [{"role": c.role, "index": c.index, "pid": c.pid, "state": c.state.value,
                          "uptime": round(now - c.running_since, 1)
                          if c.state is ChildState.RUNNING else 0.0,
                          "running_since": round(wall - (now - c.running_since), 3)
                          if c.state is ChildState.RUNNING else None,
                          "restarts": c.restarts} for c in self.children],
        }

    def write_node_record(self, force: bool = False) -> None:
        """For the coordinator to publish: what this master supervises. Written at once when
        a child changes state, else every few seconds (for the uptimes)."""
        now = time.monotonic()
        if not force and not Child.changed and now - self._last_record < 5.0:
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

    def write_verdict(self, state: ReloadState, message: str) -> None:
        """Record the newest reload's verdict for `dtsd reload`. The completion of an
        earlier reload does not cover a later HUP's refusal."""
        seq = self.reload_seq
        if state in (ReloadState.DONE, ReloadState.FAILED) and seq and seq != self.applied_seq:
            return
        self.verdict = state
        record = {"pid": os.getpid(), "seq": seq, "state": state.value, "message": message,
                  "time": time.time()}
        temporary = self.verdict_file + ".tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
            os.replace(temporary, self.verdict_file)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.verdict_file, exc)

    def remove_verdict(self) -> None:
        try:
            os.unlink(self.verdict_file)
        except OSError:
            pass

    def remove_node_record(self) -> None:
        try:
            os.unlink(self.node_file)
        except OSError:
            pass

    # --- one-shot work before the children start ------------------------------------------

    def config_args(self) -> list[str]:
        """How children find the file (none when the default file is absent: defaults)."""
        return ["-c", self.cfg.path] if self.cfg.from_file else []

    def job_slots_usable(self) -> bool:
        """Refuse [worker] job_uids that processes of this host already run as (another
        dtsd instance, say): they would share a job's identity, and the end of a job would
        kill them. Checked after this node's own slots were swept."""
        problem = job_uids_in_use(self.cfg)
        if problem:
            log.error("%s", problem)
            return False
        return True

    def address_is_free(self) -> bool:
        """Refuse to start when something already listens on our address.

        The servers bind with SO_REUSEPORT, so without this check a second dtsd (or a
        stale one) would silently share the port and split the clients between them.
        Exit 1, not 78: the address may well be free on the next try.
        """
        for section in ("server", "web"):
            if not self.cfg.get(section, "processes"):
                continue
            problem = checks.address_in_use(*self.cfg.get(section, "listen"))
            if problem:
                log.error("[%s] listen: %s (is another dtsd running?)", section, problem)
                return False
        return True

    def open_broker(self) -> bool:
        """The local-identity broker and its signing key, before any child starts (servers
        read the key at boot). Leftover API sockets of a previous master go first."""
        for name in os.listdir(self.runtime_dir):
            if name.startswith(identity.API_SOCKET_PREFIX) and name.endswith(".sock"):
                self.remove_file(os.path.join(self.runtime_dir, name))
        try:
            self.broker.open()
        except OSError as exc:
            log.error("cannot serve local identities on %s: %s", self.broker.path, exc)
            return False
        return True

    @staticmethod
    def remove_file(path: str) -> None:
        """E.g. a server child's local API socket once the child is gone (gRPC removes it
        on a clean stop, not after a KILL): dtsctl must not knock on a dead one."""
        try:
            os.unlink(path)
        except OSError:
            pass

    def sweep_job_slots(self) -> int:
        """Kill whatever runs in the job slots no live launcher holds (a worker and its
        launcher died: their jobs are nobody's now), as each slot's uid (dtsd/launcher.py)."""
        if not self.cfg.get("worker", "job_user"):
            return 0
        result = subprocess.run(
            [sys.executable, "-m", "dtsd.launcher", "--sweep", self.cfg.get("dtsd", "runtime_dir")],
            stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            log.error("sweeping the job slots failed: %s", result.stderr.strip()[-500:])
            return 0
        return len(result.stdout.split())

    def migrate(self) -> int:
        """Bring the schema up to date in a child process (the master opens no connection).

        0 when done, else the master's exit code: EXIT_CONFIG when `dtsd migrate` found no
        such database or role (a restart would not create them; its error line names the
        commands that do), 1 otherwise (the database may be back on the next try)."""
        result = subprocess.run([sys.executable, "-m", "dtsd", "migrate", *self.config_args()],
                                stdin=subprocess.DEVNULL)
        if result.returncode == 0:
            return 0
        if result.returncode == child.EXIT_CONFIG:
            log.error("schema migration failed: the database or its role does not exist (the "
                      "line above says how to create them); not starting")
            return child.EXIT_CONFIG
        log.error("schema migration failed (exit code %d); not starting", result.returncode)
        return 1


def _part(cfg: Config, part: str):
    """A section without its process count (scaling restarts nothing), or one key."""
    section, _, key = part.partition(".")
    if key:
        return cfg.values[section][key]
    return {k: value for k, value in cfg.values[section].items() if k != "processes"}
