"""The job's box: the user, capabilities and resource limits a job's shell starts with.

A job is started through two util-linux programs that exec each other and then the shell,
so everything is in place before the command's first instruction, and nothing here runs
between fork and exec in a threaded worker:

    setpriv --reuid U --regid G --groups G,...      the job user and its groups
            --inh-caps=-all --ambient-caps=-all      no capability, in any set
            --bounding-set=-all --no-new-privs       none to gain later, not even by setuid
    prlimit --nproc=N:N --fsize=B:B ...              soft = hard: the job cannot raise them
    /bin/sh -c COMMAND

Who holds what (see README, Security):
- the master: whatever it was started with. Under the packaged unit that is user dtsd with
  CAP_SETUID, CAP_SETGID, CAP_SETPCAP and CAP_KILL, nothing else.
- server and coordinator children: started through `setpriv` with every set emptied
  (`privilege_argv`); they need no privilege.
- worker children keep the four: they switch to the job user, drop the bounding set, and
  signal the job's process group, which belongs to another user.
- the job: nothing.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
from dataclasses import dataclass
from typing import Mapping

from .config import LIMITS, Config, ConfigError, limit_ceiling, limits_text

CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 5, 6, 7, 8
SWITCH_CAPS = {CAP_SETUID: "CAP_SETUID", CAP_SETGID: "CAP_SETGID"}
WORKER_CAPS = ("+kill", "+setgid", "+setuid", "+setpcap")   # setpriv's names


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd, CapAmb of a process, as bit masks."""
    caps = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Cap"):
                name, _, value = line.partition(":")
                caps[name] = int(value, 16)
    return caps


def holds(cap: int, caps: Mapping[str, int] | None = None) -> bool:
    return bool((caps or capabilities())["CapEff"] >> cap & 1)


def _setpriv() -> str:
    path = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if not path:
        raise ConfigError("setpriv is missing (it is in util-linux): jobs cannot be boxed")
    return path


def privilege_argv(role: str) -> list[str]:
    """The argv prefix the master starts a `role` child with, to shed its privileges.

    Servers and the coordinator keep no capability and get no_new_privs. Workers keep
    WORKER_CAPS in their bounding set, so even a worker of a root master holds only
    those. Empty when the master holds no capability: nothing would change. Shrinking
    the bounding set needs CAP_SETPCAP; without it the set stays, harmless with an empty
    permitted set and no_new_privs.
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


def job_user_exposure(cfg: Config) -> tuple[str | None, str | None]:
    """For `dtsd --check-config`: (error, warning) about [worker] job_user on this host.

    Only what holds whoever runs the check: the user exists and is not root. Whether the
    workers may switch to it depends on the capabilities they start with, which the
    worker itself checks at boot."""
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
    return None, None


@dataclass(frozen=True)
class JobBox:
    """How this worker boxes its jobs; built once at boot by `JobBox.from_config`."""

    user: pwd.struct_passwd | None   # None: the worker's own user
    groups: tuple[int, ...]           # the job user's groups, resolved once at boot
    setpriv: str
    prlimit: str
    drop_bounding: bool
    defaults: Mapping[str, int]
    ceiling: Mapping[str, int]

    @classmethod
    def from_config(cls, cfg: Config) -> "JobBox":
        """Resolve [worker] job_user and check this process may switch to it.

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
            if user.pw_uid != os.getuid() or user.pw_gid != os.getgid():
                missing = [cap for bit, cap in SWITCH_CAPS.items() if not holds(bit, caps)]
                if missing:
                    raise ConfigError(
                        f"[worker] job_user = {name}: the worker (uid {os.getuid()}) lacks "
                        f"{' and '.join(missing)} to switch to it. Start dtsd as root or "
                        "with those capabilities (the packaged unit grants them), or set "
                        "job_user to empty to run jobs as dtsd's own user")
            if user.pw_uid == os.getuid():
                user = None   # already that user: no switch, the rest of the box still applies
        elif os.getuid() == 0:
            raise ConfigError("[worker] job_user is empty and the workers run as root: jobs "
                              "would run as root. Set job_user to an unprivileged user (the "
                              "package creates dtsd-job)")
        prlimit = shutil.which("prlimit", path="/usr/bin:/bin:/usr/sbin:/sbin")
        if not prlimit:
            raise ConfigError("prlimit is missing (it is in util-linux): jobs cannot be limited")
        # Resolved here rather than per job (setpriv --init-groups reads /etc/group at every
        # start): a change of the job user's groups takes a restart of the workers.
        groups = tuple(os.getgrouplist(user.pw_name, user.pw_gid)) if user else ()
        return cls(user=user, groups=groups, setpriv=_setpriv(), prlimit=prlimit,
                   drop_bounding=holds(CAP_SETPCAP, caps),
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

    def wrapper(self, limits: Mapping[str, int]) -> list[str]:
        """The argv prefix that execs the shell inside the box."""
        argv = [self.setpriv]
        if self.user is not None:
            argv += [f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}",
                     f"--groups={','.join(map(str, self.groups or (self.user.pw_gid,)))}"]
        argv += ["--inh-caps=-all", "--ambient-caps=-all"]
        if self.drop_bounding:
            argv.append("--bounding-set=-all")
        argv += ["--no-new-privs", "--"]
        if not limits:     # one exec fewer (about 0.7 ms a job) when there is nothing to set
            return argv
        argv.append(self.prlimit)
        for name, value in limits.items():
            # CPU time: SIGXCPU at the limit (the job may report it), SIGKILL a second later.
            hard = value + 1 if name == "cpu_time" else value
            argv.append(f"{LIMITS[name][0]}={value}:{hard}")
        return [*argv, "--"]

    @functools.cached_property
    def env(self) -> dict[str, str]:
        """USER and LOGNAME of the job (HOME stays [worker]'s choice: job users have none).
        Looked up once: the worker reads it for every job."""
        name = self.user.pw_name if self.user is not None else pwd.getpwuid(os.getuid()).pw_name
        return {"USER": name, "LOGNAME": name}

    def explain(self, limits: Mapping[str, int], exit_code: int | None, signum: int | None,
                output: bytes) -> str:
        """Name the limit that most likely ended a failed job, or "".

        A process killed by SIGXFSZ/SIGXCPU hit file_size/cpu_time (the shell reports it as
        exit 128+N); a shell that could not fork says so in its last output line."""
        import signal
        sig = signum if signum else (exit_code - 128 if exit_code and exit_code > 128 else None)
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
