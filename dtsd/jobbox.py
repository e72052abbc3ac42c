"""The job's box as the worker sees it: who a job runs as, with what limits, and the handle
on the launcher process that starts it (dtsd/launcher.py holds the privileged side).

Who holds what (see docs/security.md):
- the master: whatever it was started with. Under the packaged unit that is user dtsd with
  CAP_SETUID, CAP_SETGID and CAP_SETPCAP, nothing else.
- server and coordinator children: started through `setpriv` with every set emptied
  (`privilege_argv`); they need no privilege.
- worker children start with those three, start their launcher, and then give up every one
  (`launcher.keep_only(())`: empty sets, empty bounding set, no_new_privs) before their
  first thread. The launcher keeps CAP_SETUID and CAP_SETGID and nothing else.
- the job: nothing, as a uid of its own per slot (`[worker] job_uids`), with the groups of
  `[worker] job_user`.
"""

from __future__ import annotations

import os
import pwd
import grp
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from . import launcher as launchermod
from .config import LIMITS, Config, ConfigError, limit_ceiling, limits_text
from .launcher import (CAP_SETGID, CAP_SETPCAP, CAP_SETUID, SWITCH_CAPS,  # noqa: F401
                       capabilities, holds)

WORKER_CAPS = ("+setgid", "+setuid", "+setpcap")   # setpriv's names; the launcher keeps two


def _setpriv() -> str:
    path = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if not path:
        raise ConfigError("setpriv is missing (it is in util-linux): children cannot shed privileges")
    return path


def privilege_argv(role: str) -> list[str]:
    """The argv prefix the master starts a `role` child with, to shed its privileges.

    Servers and the coordinator keep no capability and get no_new_privs. Workers keep
    WORKER_CAPS in their bounding set, so even a worker of a root master holds only those
    (and hands two of them to its launcher before dropping all). Empty when the master
    holds no capability: nothing would change. Shrinking the bounding set needs
    CAP_SETPCAP; without it the set stays, harmless with an empty permitted set and
    no_new_privs.
    """
    caps = capabilities()
    if not (caps["CapEff"] or caps["CapPrm"] or caps["CapAmb"]):
        return []
    can_bound = holds(CAP_SETPCAP, caps)
    if role == "worker":
        if not can_bound:
            return []
        return [_setpriv(), f"--bounding-set=-all,{','.join(WORKER_CAPS)}", "--"]
    argv = [_setpriv(), "--inh-caps=-all", "--ambient-caps=-all"]
    if can_bound:
        argv.append("--bounding-set=-all")
    return [*argv, "--no-new-privs", "--"]


def _taken_ids(first: int, last: int, job_user: str) -> list[str]:
    """Users and groups of the host with ids in first..last other than dtsd's own slot
    users: `<job_user>-N`, each with a private group of the same name and number (the
    package creates them, so that programs that look a user up, ssh or whoami, work)."""
    ours: dict[int, str] = {}
    taken = []
    for user in pwd.getpwall():
        if first <= user.pw_uid <= last:
            if user.pw_name.startswith(f"{job_user}-") and user.pw_gid == user.pw_uid:
                ours[user.pw_uid] = user.pw_name
            else:
                taken.append(f"user {user.pw_name} ({user.pw_uid})")
    for group in grp.getgrall():
        if first <= group.gr_gid <= last and ours.get(group.gr_gid) != group.gr_name:
            taken.append(f"group {group.gr_name} ({group.gr_gid})")
    return taken


def uids_in_use(first: int, last: int) -> list[tuple[int, int]]:
    """(pid, uid) of the processes this host shows whose uid is in first..last."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        if first <= uid <= last:
            found.append((int(entry), uid))
    return found


def job_user_exposure(cfg: Config) -> tuple[str | None, str | None]:
    """For the start checks (dtsd/checks.py): (error, warning) about [worker] job_user and
    job_uids on this host.

    Only what holds whoever runs the check: the user exists and is not root, and no user or
    group of the host but the slot users has an id in job_uids (a job slot would share its
    identity: it could then signal or read that user's processes or files, and the end of
    a job would kill them). Whether the workers may switch users depends on the
    capabilities they start with, which the worker itself checks at boot; running
    processes are checked by the master once it has swept its own slots
    (`job_uids_in_use`)."""
    name = cfg.get("worker", "job_user")
    if not cfg.get("worker", "processes") or not name:
        return None, None
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        return (f"[worker] job_user: no user {name!r} on this host (adduser --system --group "
                f"--no-create-home {name})", None)
    if user.pw_uid == 0:
        return "[worker] job_user: jobs must not run as root", None
    first, last = cfg.get("worker", "job_uids")
    taken = _taken_ids(first, last, name)
    if taken:
        return (f"[worker] job_uids {first}-{last} holds ids the host already uses: "
                f"{', '.join(taken)[:300]}; choose a range no other user or group has", None)
    return None, None


def job_uids_in_use(cfg: Config) -> str | None:
    """For the master's start, once its own slots are swept: an error when processes of
    this host run with uids of [worker] job_uids (another dtsd instance?)."""
    if not cfg.get("worker", "processes") or not cfg.get("worker", "job_user"):
        return None
    first, last = cfg.get("worker", "job_uids")
    busy = uids_in_use(first, last)
    if not busy:
        return None
    pids = ", ".join(f"pid {pid} (uid {uid})" for pid, uid in busy[:5])
    return (f"[worker] job_uids {first}-{last}: processes of this host run with uids of the "
            f"range ({pids}): another dtsd instance? Give each instance a range of its own")


@dataclass(frozen=True)
class JobBox:
    """How this worker boxes its jobs; built once at boot by `JobBox.from_config`."""

    user: pwd.struct_passwd | None   # [worker] job_user; None: unboxed, the worker's own user
    groups: tuple[int, ...]           # the job user's groups, resolved once at boot
    uids: tuple[int, int] | None      # [worker] job_uids when boxed
    umask: int
    defaults: Mapping[str, int]
    ceiling: Mapping[str, int]
    _names: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def boxed(self) -> bool:
        return self.uids is not None

    @classmethod
    def from_config(cls, cfg: Config) -> "JobBox":
        """Resolve [worker] job_user and check this process may switch users.

        Raises ConfigError (the worker exits 78) with what to do about it."""
        name = cfg.get("worker", "job_user")
        caps = capabilities()
        user = None
        if name:
            try:
                user = pwd.getpwnam(name)
            except KeyError:
                raise ConfigError(
                    f"[worker] job_user: no user {name!r} on this host. Create it (adduser "
                    f"--system --group --no-create-home {name}) or set job_user to another "
                    "unprivileged user") from None
            if user.pw_uid == 0:
                raise ConfigError("[worker] job_user: jobs must not run as root")
            missing = [cap for bit, cap in SWITCH_CAPS.items() if not holds(bit, caps)]
            if missing:
                raise ConfigError(
                    f"[worker] job_user = {name}: the worker (uid {os.getuid()}) lacks "
                    f"{' and '.join(missing)} to start jobs as users of their own "
                    f"([worker] job_uids). Start dtsd as root or with those capabilities "
                    "(the packaged unit grants them), or set job_user to empty to run jobs "
                    "as dtsd's own user, unboxed")
        elif os.getuid() == 0:
            raise ConfigError("[worker] job_user is empty and the workers run as root: jobs "
                              "would run as root. Set job_user to an unprivileged user (the "
                              "package creates dtsd-job)")
        uids = cfg.get("worker", "job_uids") if user is not None else None
        if uids is not None:
            taken = _taken_ids(*uids, name)
            if taken:
                raise ConfigError(f"[worker] job_uids {uids[0]}-{uids[1]} holds ids the host "
                                  f"already uses: {', '.join(taken)[:300]}")
            if user.pw_uid in range(uids[0], uids[1] + 1):
                raise ConfigError(f"[worker] job_uids must not hold job_user's uid {user.pw_uid}")
        # Resolved here rather than per job: a change of the job user's groups takes a
        # restart of the workers.
        groups = tuple(os.getgrouplist(user.pw_name, user.pw_gid)) if user else ()
        return cls(user=user, groups=groups, uids=uids, umask=cfg.get("worker", "job_umask"),
                   defaults=dict(cfg.get("worker", "limits")), ceiling=limit_ceiling(cfg))

    def limits_for(self, asked: Mapping[str, int]) -> dict[str, int]:
        """The job's limits: the defaults, overridden by what it asked, capped at the ceiling.

        The server refused anything above its ceiling already; a worker whose ceiling is
        lower (another host's configuration) caps rather than fails."""
        limits = dict(self.defaults)
        for name, value in asked.items():
            if name in LIMITS and value > 0:
                top = self.ceiling.get(name)
                limits[name] = min(value, top) if top is not None else value
        return limits

    @staticmethod
    def rlimits(limits: Mapping[str, int]) -> list[tuple[int, int, int]]:
        """(RLIMIT_*, soft, hard) for the launcher: soft = hard, so the job cannot raise
        them; CPU time is the exception, SIGXCPU at the limit (the job may report it) and
        SIGKILL a second later."""
        return [(LIMITS[name][0], value, value + 1 if name == "cpu_time" else value)
                for name, value in limits.items()]

    def env_for(self, uid: int | None) -> dict[str, str]:
        """USER and LOGNAME of a slot's jobs: the slot user's name (dtsd-job-3), or
        job_user's for a slot uid without one, or the worker's user unboxed. Looked up once
        per slot: the worker asks per job."""
        names = self._names
        if uid not in names:
            if uid is None:
                name = pwd.getpwuid(os.getuid()).pw_name
            else:
                try:
                    name = pwd.getpwuid(uid).pw_name
                except KeyError:
                    name = self.user.pw_name
            names[uid] = {"USER": name, "LOGNAME": name}
        return names[uid]

    def start_launcher(self, runtime_dir: str, concurrency: int) -> "Launcher":
        return Launcher(runtime_dir=runtime_dir, concurrency=concurrency, uids=self.uids,
                        groups=self.groups, umask=self.umask)

    def explain(self, limits: Mapping[str, int], exit_code: int | None, signum: int | None,
                output: bytes, oom_killed: bool = False) -> str:
        """Name the limit that most likely ended a failed job, or "".

        A process killed by SIGXFSZ/SIGXCPU hit file_size/cpu_time (the shell reports it as
        exit 128+N); a shell that could not fork says so in its last output line. A KILL
        that came with a new OOM kill in the worker's cgroup (`oom_killed`, see OomCounter)
        was the kernel's OOM killer."""
        sig = signum if signum else (exit_code - 128 if exit_code and exit_code > 128 else None)
        if sig == signal.SIGKILL and oom_killed:
            return "ended by the kernel's OOM killer (out of memory)"
        if sig == signal.SIGXFSZ and "file_size" in limits:
            return f"file size limit exceeded ({limits_text({'file_size': limits['file_size']})})"
        if sig == signal.SIGXCPU and "cpu_time" in limits:
            return f"CPU time limit exceeded ({limits_text({'cpu_time': limits['cpu_time']})})"
        if sig == signal.SIGKILL and "cpu_time" in limits:
            return (f"killed by SIGKILL; the CPU time limit "
                    f"({limits_text({'cpu_time': limits['cpu_time']})}) may have been reached")
        tail = output[-512:].lower()
        if "processes" in limits and (b"cannot fork" in tail or b"fork: resource" in tail
                                      or b"fork: retry" in tail):
            return f"process limit reached ({limits_text({'processes': limits['processes']})})"
        if "memory" in limits and (b"cannot allocate memory" in tail or b"memoryerror" in tail
                                   or b"out of memory" in tail):
            return f"memory limit reached ({limits_text({'memory': limits['memory']})})"
        return ""


class OomCounter:
    """The kernel's count of processes its OOM killer ended in this process's memory cgroup
    (cgroup v2 `memory.events`, v1 `memory.oom_control`: `oom_kill N`), which jobs share
    with their worker.

    Read only when a job died of SIGKILL, so it costs nothing otherwise: each new kill
    counted since the last read explains one such death. Where neither file can be read
    (no memory controller, the root cgroup), it explains nothing."""

    def __init__(self, proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"):
        self.path = self._find(proc_cgroup, root)
        self.seen = self._read()

    @staticmethod
    def _find(proc_cgroup: str, root: str) -> str | None:
        try:
            with open(proc_cgroup, encoding="utf-8") as handle:
                lines = [line.rstrip("\n").split(":", 2) for line in handle]
        except OSError:
            return None
        candidates = [f"{root}/memory{path}/memory.oom_control"
                      for _, controllers, path in lines if "memory" in controllers.split(",")]
        candidates += [f"{root}{path}/memory.events" for hierarchy, _, path in lines
                       if hierarchy == "0"]
        candidates += [f"{root}/unified{path}/memory.events" for hierarchy, _, path in lines
                       if hierarchy == "0"]
        return next((c for c in candidates if os.path.exists(c)), None)

    def _read(self) -> int | None:
        if self.path is None:
            return None
        try:
            with open(self.path, encoding="ascii") as handle:
                for line in handle:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return None

    def claim(self) -> bool:
        """True if the OOM killer ended a process since the last claim (a job that just
        died of SIGKILL: most likely it)."""
        now = self._read()
        if now is None or self.seen is None:
            self.seen = now
            return False
        if now <= self.seen:
            return False
        self.seen += 1
        return True


# --- the worker's handle on its launcher ----------------------------------------------------

class LauncherError(RuntimeError):
    """The launcher could not start, or died."""


class Launcher:
    """The worker's handle on its launcher process: spawn, signal and release, per slot.

    Thread-safe: each job thread drives one slot; a reader thread receives the replies and
    the shells' exits and hands them to whoever waits for them.
    """

    def __init__(self, *, runtime_dir: str, concurrency: int, uids: tuple[int, int] | None,
                 groups: Sequence[int] = (), umask: int = 0o027, tmp_root: str = "/tmp"):
        self.boxed = uids is not None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-m", "dtsd.launcher", "--fd", str(child.fileno()),
                "--runtime-dir", runtime_dir, "--concurrency", str(concurrency),
                "--umask", oct(umask), "--tmp-root", tmp_root]
        if uids is not None:
            argv += ["--uids", f"{uids[0]}-{uids[1]}",
                     "--groups", ",".join(str(g) for g in groups)]
        # Nothing of the worker's environment (DSNs, tokens) reaches the launcher or its jobs.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        for name in ("PYTHONPATH", "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"):
            if name in os.environ:
                env[name] = os.environ[name]
        self.proc = subprocess.Popen(argv, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                                     env=env, close_fds=True)
        child.close()
        self.sock = parent
        self.reader = launchermod.Reader(parent)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._next_id = 0
        self._on_exit: dict[int, Callable[[int, str | None], None]] = {}  # spawn id -> handler
        self._closed = False
        self.dead = threading.Event()
        hello = self._read_one(timeout=60)
        if hello.get("op") != "ready":
            self.proc.wait(timeout=10)
            raise LauncherError(hello.get("error") or f"the launcher said {hello!r}")
        self.uids: list[int | None] = list(hello["uids"])
        self.tmpdirs: list[str] = list(hello.get("tmpdirs", ()))
        self.pid = self.proc.pid
        self._thread = threading.Thread(target=self._read_loop, name="launcher", daemon=True)
        self._thread.start()

    def _read_one(self, timeout: float) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        try:
            while True:
                messages = self.reader.read()
                if messages is None:
                    code = self.proc.wait(timeout=10)
                    raise LauncherError(f"the launcher exited ({code}) before it was ready")
                if messages:
                    return messages[0]
        except socket.timeout:
            self.proc.kill()
            raise LauncherError(f"the launcher was not ready within {timeout:g}s") from None
        finally:
            self.sock.settimeout(None)

    def _read_loop(self) -> None:
        try:
            while True:
                messages = self.reader.read()
                if messages is None:
                    break
                for message in messages:
                    self._dispatch(message)
        except (OSError, ValueError):
            pass
        finally:
            self.dead.set()
            with self._lock:
                handlers, self._on_exit = self._on_exit, {}
            for handler in handlers.values():
                handler(-signal.SIGKILL, None)

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op in ("exited", "failed"):
            with self._lock:
                handler = self._on_exit.pop(message.get("id"), None)
            if handler is None:
                return
            if op == "exited":
                handler(int(message["code"]), None)
            else:
                handler(launchermod.EXIT_SPAWN_FAILED, str(message.get("error") or "spawn failed"))

    def _send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if self.dead.is_set():
            raise LauncherError("the job launcher died")
        with self._send_lock:
            try:
                launchermod.send_message(self.sock, message, fds)
            except OSError as exc:
                raise LauncherError(f"the job launcher is gone: {exc}") from None

    def spawn(self, slot: int, argv: Sequence[str], env: Mapping[str, str], cwd: str,
              limits: Sequence[tuple[int, int, int]], out_fd: int,
              on_exit: Callable[[int, str | None], None]) -> None:
        """Start the job in `slot` with its output on `out_fd`, without waiting for it.

        `on_exit(code, error)` is called once, from the reader thread: when the shell ends
        (code: exit status, or -N for death by signal N; error None), or when it never ran
        (error says why: a working directory it may not enter, a limit it may not have...;
        code launcher.EXIT_SPAWN_FAILED). Raises LauncherError if the launcher is gone."""
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
            self._on_exit[request_id] = on_exit
        try:
            self._send({"op": "spawn", "id": request_id, "slot": slot, "argv": list(argv),
                        "env": dict(env), "cwd": cwd, "limits": [list(x) for x in limits]},
                       (out_fd,))
        except BaseException:
            with self._lock:
                self._on_exit.pop(request_id, None)
            raise

    def signal(self, slot: int, sig: int) -> None:
        """Send `sig` to every process of the job in `slot` (its process group unboxed)."""
        try:
            self._send({"op": "signal", "slot": slot, "signal": int(sig)})
        except LauncherError:
            pass

    def release(self, slot: int) -> None:
        """The attempt in `slot` is over: the launcher kills what is left of it."""
        try:
            self._send({"op": "release", "slot": slot})
        except LauncherError:
            pass

    def close(self, timeout: float = 60.0) -> int | None:
        """End every job and the launcher (it releases every slot when the socket closes);
        returns the launcher's exit code."""
        if self._closed:
            return self.proc.returncode
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(timeout=5)
        self.sock.close()
        return self.proc.returncode
