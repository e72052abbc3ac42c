"""The checks a configuration must pass before dtsd acts on it.

One list, run at every start (before the master starts anything), at every reload (HUP: a
refused reload keeps the running configuration) and by `dtsd --check-config`, so that
none of the three can skip a check another makes. A check is a function that takes the
`Checked` configuration and yields `Problem`s; `@check` adds it to the list:

    @check
    def log_level_sane(checked: Checked) -> Iterator[Problem]:
        if checked.cfg.get("dtsd", "log_level") == "DEBUG":
            yield warning("[dtsd] log_level = debug logs every job's id")

Options of `@check`: `occasions=` for a check that only makes sense at some of them (a
setting a reload cannot change), and `isolated=True` for a check that needs a client
library (redis, psycopg, grpc). The master holds no client library, so it runs the
isolated checks in a subprocess (`python -m dtsd.checks`); `--check-config` and the
children at boot run them in-process.

Errors refuse the start or the reload; warnings are logged and the configuration is used.
"""

from __future__ import annotations

import ctypes
import enum
import json
import os
import pwd
import socket
import stat as stat_module
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from . import config as configmod
from .config import Config

# --- what a check reports -----------------------------------------------------------------


class Severity(str, enum.Enum):
    ERROR = "error"          # refuses the start or the reload
    WARNING = "warning"      # logged; the configuration is used


class Occasion(str, enum.Enum):
    START = "start"
    RELOAD = "reload"
    CHECK_CONFIG = "check-config"


ALL_OCCASIONS = frozenset(Occasion)


@dataclass(frozen=True)
class Problem:
    severity: Severity
    message: str
    check: str = ""          # the name of the check that found it

    def as_dict(self) -> dict:
        return {"severity": self.severity.value, "message": self.message, "check": self.check}


def error(message: str) -> Problem:
    return Problem(Severity.ERROR, message)


def warning(message: str) -> Problem:
    return Problem(Severity.WARNING, message)


def from_pair(pair: tuple[str | None, str | None]) -> Iterator[Problem]:
    """The (error, warning) pairs of config.server_exposure and friends, as problems."""
    found, warned = pair
    if found:
        yield error(found)
    if warned:
        yield warning(warned)


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [p.message for p in self.problems if p.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[str]:
        return [p.message for p in self.problems if p.severity is Severity.WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors


# --- whose permissions the file checks take -----------------------------------------------

_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    """Empty this process's capability sets (capset(2)): what dtsd's children hold when
    they read their files. Only ever called in a forked child."""
    libc = ctypes.CDLL(None, use_errno=True)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), data) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@dataclass(frozen=True)
class Reader:
    """Who reads dtsd's files: this process without its capabilities (what the master's
    children are), or another user (`dtsd --check-config --user`, or `dtsd` when the check
    runs as root). Checked by trying: a forked process takes that identity and opens each
    file, so directory permissions, ACLs and groups all count."""

    name: str
    uid: int | None = None           # None: this process's own identity
    gid: int | None = None
    groups: tuple[int, ...] = ()

    @classmethod
    def current(cls) -> "Reader":
        try:
            name = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            name = f"uid {os.getuid()}"
        return cls(name=f"{name} (without capabilities, as dtsd's children run)")

    @classmethod
    def user(cls, name: str) -> "Reader":
        """Raises KeyError for an unknown user."""
        entry = pwd.getpwnam(name)
        return cls(name=name, uid=entry.pw_uid, gid=entry.pw_gid,
                   groups=tuple(os.getgrouplist(name, entry.pw_gid)))

    def failures(self, reads: Iterable[str], appends: Iterable[str] = ()) -> dict[str, str]:
        """{path: why} for the paths this reader cannot read (or append to). A missing file
        of `appends` is fine when its directory lets this reader create it."""
        reads, appends = list(reads), list(appends)
        if not reads and not appends:
            return {}
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:                               # the child: never returns
            code = 70
            try:
                os.close(read_end)
                if self.uid is not None and (self.uid, self.gid) != (os.getuid(), os.getgid()):
                    os.setgroups(list(self.groups))
                    os.setresgid(self.gid, self.gid, self.gid)
                    os.setresuid(self.uid, self.uid, self.uid)
                _drop_capabilities()
                found = {}
                for path in reads:
                    problem = _try_open(path, os.O_RDONLY)
                    if problem:
                        found[path] = problem
                for path in appends:
                    problem = _try_open(path, os.O_WRONLY | os.O_APPEND)
                    if problem == "no such file":
                        problem = _try_create_in(os.path.dirname(os.path.abspath(path)))
                    if problem:
                        found[path] = problem
                os.write(write_end, json.dumps(found).encode())
                code = 0
            except BaseException as exc:  # noqa: BLE001 - report, whatever went wrong
                try:
                    os.write(write_end, json.dumps({"": f"{type(exc).__name__}: {exc}"}).encode())
                except BaseException:  # noqa: BLE001
                    pass
            finally:
                os._exit(code)
        os.close(write_end)
        chunks = []
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_end)
        os.waitpid(pid, 0)
        try:
            found = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            found = {"": "the checking process said nothing"}
        if "" in found:
            raise OSError(f"cannot check as {self.name}: {found['']}")
        return found


def _try_open(path: str, flags: int) -> str | None:
    try:
        # O_NONBLOCK: a FIFO named by mistake must not hang the check.
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        if flags == os.O_RDONLY:
            os.read(fd, 1)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
    return None


def _try_create_in(directory: str) -> str | None:
    try:
        if os.access(directory, os.W_OK | os.X_OK):
            return None
    except OSError as exc:
        return f"directory {directory}: {exc.strerror}"
    return f"no such file, and directory {directory} is not writable"


# --- the checks -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Checked:
    """What a check looks at."""

    cfg: Config
    occasion: Occasion
    running: Config | None = None   # on reload: the configuration in force
    reader: Reader = field(default_factory=Reader.current)


CheckFunction = Callable[[Checked], Iterable[Problem]]


@dataclass(frozen=True)
class Check:
    function: CheckFunction
    occasions: frozenset[Occasion]
    isolated: bool                   # needs a client library: not in the master's process

    @property
    def name(self) -> str:
        return self.function.__name__

    def run(self, checked: Checked) -> list[Problem]:
        try:
            found = list(self.function(checked))
        except Exception as exc:  # noqa: BLE001 - a check that breaks is itself a finding
            found = [error(f"check {self.name} failed: {type(exc).__name__}: {exc}")]
        return [Problem(p.severity, p.message, self.name) for p in found]


CHECKS: list[Check] = []


def check(function: CheckFunction | None = None, *, occasions: Iterable[Occasion] = ALL_OCCASIONS,
          isolated: bool = False):
    """Register a check (as `@check` or `@check(occasions=..., isolated=True)`)."""
    def register(func: CheckFunction) -> CheckFunction:
        CHECKS.append(Check(func, frozenset(occasions), isolated))
        return func
    return register(function) if function is not None else register


@check
def listen_address(checked: Checked) -> Iterator[Problem]:
    """A non-loopback [server] listen needs tokens and TLS (config.exposure)."""
    yield from from_pair(configmod.server_exposure(checked.cfg))


@check
def secrets_on_disk(checked: Checked) -> Iterator[Problem]:
    """Who else on this host may read or write dtsd's secrets (config.secrets_exposure)."""
    found, warned = configmod.secrets_exposure(checked.cfg)
    yield from from_pair((found, warned and f"SECRETS EXPOSED: {warned}"))


@check
def job_user(checked: Checked) -> Iterator[Problem]:
    """[worker] job_user exists and is not root."""
    from .jobbox import job_user_exposure   # stdlib only: the master imports it already
    yield from from_pair(job_user_exposure(checked.cfg))


def files_read(cfg: Config) -> list[tuple[str, str]]:
    """(what, path) of every file dtsd's processes read, as the configuration names them."""
    files = []
    if cfg.from_file:
        files.append(("the configuration file", cfg.path))
    server, etcd = cfg.values["server"], cfg.values["etcd"]
    if server["processes"]:
        files += [(f"[server] {key}", server[key])
                  for key in ("tls_cert", "tls_key", "tls_client_ca")]
    if etcd["endpoints"]:
        files += [(f"[etcd] {key}", etcd[key])
                  for key in ("password_file", "tls_ca", "tls_cert", "tls_key")]
    files.append(("[notify] secret_file", cfg.get("notify", "secret_file")))
    dsn = configmod.connection_fields(cfg.get("postgres", "dsn"))
    files += [(f"{key} of [postgres] dsn", dsn.get(key, ""))
              for key in ("passfile", "sslrootcert", "sslcert", "sslkey")]
    url = configmod.connection_fields(cfg.get("redis", "url"))
    files += [(f"{key} of [redis] url", url.get(key, ""))
              for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")]
    # libpq's sslrootcert=system is its word for the system's CA store, not a file.
    return [(what, path) for what, path in files if path and path != "system"]


@check
def files_readable(checked: Checked) -> Iterator[Problem]:
    """Every file dtsd reads is readable by whoever reads it (the children hold no
    capability, so as root only the files' modes count), and the log file can be written."""
    cfg = checked.cfg
    reads = files_read(cfg)
    tokens_file = cfg.get("server", "tokens_file") if cfg.get("server", "processes") else ""
    if tokens_file:
        reads.append(("[server] tokens_file", tokens_file))
    log_file = cfg.get("dtsd", "log_file")
    try:
        failed = checked.reader.failures([path for _, path in reads],
                                         [log_file] if log_file else [])
    except OSError as exc:
        yield error(f"{exc} (run the check as root, or with --user naming yourself)")
        return
    for what, path in reads:
        why = failed.get(path)
        if not why:
            continue
        if what == "[server] tokens_file" and why == "no such file":
            yield warning(f"[server] tokens_file {path} does not exist: every call that needs "
                          "a token is refused until `dtsd token add` creates it")
        else:
            yield error(f"{what} {path} cannot be read by {checked.reader.name}: {why}")
    if log_file and log_file in failed:
        yield error(f"[dtsd] log_file {log_file} cannot be written by {checked.reader.name}: "
                    f"{failed[log_file]}")


@check
def tls_pair_loads(checked: Checked) -> Iterator[Problem]:
    """The API's certificate and key load as a pair, and the client CA as CAs (dtsd/tls.py):
    a reload must not replace working servers with ones that cannot serve. Tried only when
    the files' reader can read them all: else files_readable names the file and the reader."""
    from . import tls                    # stdlib only: the master imports it already
    paths = [path for key in tls.KEYS if (path := checked.cfg.get("server", key))]
    try:
        if not paths or checked.reader.failures(paths):
            return
    except OSError:
        return                           # files_readable says why it could not check
    problem = tls.load_problem(checked.cfg)
    if problem:
        yield error(problem)


def _job_user_groups(cfg: Config) -> tuple[int | None, set[int]]:
    name = cfg.get("worker", "job_user")
    try:
        entry = pwd.getpwnam(name) if name else pwd.getpwuid(os.getuid())
    except KeyError:
        return None, set()
    return entry.pw_uid, set(os.getgrouplist(entry.pw_name, entry.pw_gid))


@check
def redis_reachable_by_jobs(checked: Checked) -> Iterator[Problem]:
    """Jobs must not reach the daemon's Redis: a TCP Redis without a password, or a unix
    socket the job user may open, lets any job read and change the queues."""
    cfg = checked.cfg
    if not cfg.get("worker", "processes"):
        return
    url = urllib.parse.urlsplit(cfg.get("redis", "url"))
    fix = ("use Redis on a unix socket only the group redis may open, or an ACL user with a "
           "password (docs/security.md)")
    if url.scheme in ("redis", "rediss"):
        if not url.password:
            yield warning(f"[redis] url {url.hostname}:{url.port or 6379} takes no password: "
                          f"jobs on this host can connect to it and steer the queues; {fix}")
        return
    if url.scheme != "unix" or not url.path:
        return
    try:
        info = os.stat(url.path)
    except OSError:
        return           # not there (yet): redis_url and the children say so
    uid, groups = _job_user_groups(cfg)
    mode = info.st_mode
    if (mode & stat_module.S_IWOTH or (uid == info.st_uid and mode & stat_module.S_IWUSR)
            or (info.st_gid in groups and mode & stat_module.S_IWGRP)):
        who = cfg.get("worker", "job_user") or "the workers' own user"
        yield warning(f"[redis] url: jobs (user {who}) may open {url.path} (mode "
                      f"{stat_module.S_IMODE(mode):04o}) and steer the queues; {fix}")


@check
def etcd_reachable_by_jobs(checked: Checked) -> Iterator[Problem]:
    """An etcd without authentication takes orders from any process that reaches it, jobs
    included: they could write the leader key."""
    etcd = checked.cfg.values["etcd"]
    if not etcd["endpoints"] or etcd["user"] or etcd["tls_cert"]:
        return
    from .election import parse_endpoints     # stdlib only at import
    hosts = parse_endpoints(etcd["endpoints"], tls=bool(etcd["tls_ca"]))
    local = [f"{host}:{port}" for host, port in hosts if configmod.is_loopback(host)]
    where = f"on this host ({', '.join(local)})" if local else "it"
    yield warning(f"[etcd] endpoints: neither [etcd] user nor a client certificate is set, so "
                  f"jobs on this host can reach etcd {where} and write the leader key; enable "
                  "etcd authentication (docs/security.md)")


def address_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (something holds it), or None.

    The servers bind with SO_REUSEPORT, so a second or stale dtsd would share the port
    silently; this probe binds without it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


@check(occasions=[Occasion.RELOAD])
def new_listen_address_free(checked: Checked) -> Iterator[Problem]:
    """A reload that moves [server] or [web] listen, or starts a role that had no
    processes: the new address must be free (at start the master probes its addresses
    itself, and exits 1 rather than 78: that may pass)."""
    for section in ("server", "web"):
        new, old = checked.cfg.values[section], checked.running.values[section]
        if new["processes"] and (new["listen"] != old["listen"] or not old["processes"]):
            problem = address_in_use(*new["listen"])
            if problem:
                yield error(f"[{section}] listen: {problem}")


@check(occasions=[Occasion.RELOAD])
def restart_only_settings(checked: Checked) -> Iterator[Problem]:
    """Settings the running master cannot change: where its runtime files are."""
    for section, key in (("dtsd", "runtime_dir"),):
        was, now = checked.running.get(section, key), checked.cfg.get(section, key)
        if was != now:
            yield error(f"[{section}] {key} changed from {was} to {now}: that takes a restart "
                        "(systemctl restart dtsd)")


@check(isolated=True)
def redis_url(checked: Checked) -> Iterator[Problem]:
    """redis-py accepts [redis] url: builds the connection object (no network)."""
    from .queue import check_url
    try:
        check_url(checked.cfg.get("redis", "url"))
    except ValueError as exc:
        yield error(f"[redis] url: {exc}")


# --- running them ---------------------------------------------------------------------------

def preflight(cfg: Config, occasion: Occasion, *, running: Config | None = None,
              reader: Reader | None = None) -> Report:
    """Every check for `occasion`. The master's calls (START, RELOAD) run the isolated
    checks in a subprocess; `--check-config` runs them here."""
    checked = Checked(cfg, occasion, running, reader or Reader.current())
    report = Report()
    isolated = []
    for item in CHECKS:
        if occasion not in item.occasions:
            continue
        if item.isolated and occasion is not Occasion.CHECK_CONFIG:
            isolated.append(item)
            continue
        report.problems += item.run(checked)
    if isolated:
        report.problems += _run_isolated(cfg)
    return report


def isolated_problems(cfg: Config) -> list[Problem]:
    """The isolated checks, in this process (one that may load client libraries)."""
    checked = Checked(cfg, Occasion.START)
    return [p for item in CHECKS if item.isolated for p in item.run(checked)]


def _run_isolated(cfg: Config) -> list[Problem]:
    argv = [sys.executable, "-m", "dtsd.checks", *(["-c", cfg.path] if cfg.from_file else [])]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return [error(f"the checks that load client libraries did not run: {exc}")]
    try:
        return [Problem(Severity(p["severity"]), p["message"], p["check"])
                for p in json.loads(result.stdout)]
    except (ValueError, KeyError, TypeError):
        detail = result.stderr.strip()[-500:] or f"exit code {result.returncode}"
        return [error(f"the checks that load client libraries did not run: {detail}")]


def main(argv: list[str] | None = None) -> int:
    """`python -m dtsd.checks [-c FILE]`: the isolated checks, as JSON, for the master."""
    import argparse
    parser = argparse.ArgumentParser(prog="dtsd-checks")
    parser.add_argument("-c", "--config", default=None)
    args = parser.parse_args(argv)
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as exc:
        problems = [error(str(exc))]
    else:
        problems = isolated_problems(cfg)
    print(json.dumps([p.as_dict() for p in problems]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
