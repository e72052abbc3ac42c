"""The one place that knows dtsd's configuration: every section, key, type and default.

`/etc/dtsd/dtsd.ini` is parsed here and nowhere else. Each key has a typed converter;
any problem (unknown section or key, bad value, missing value) raises `ConfigError`
naming the file, section and key, so a typo never silently becomes a default.
The shipped `etc/dtsd/dtsd.ini` is generated from `OPTIONS` (`dtsd config-reference`)
and a test keeps the two identical.

The seed's environment variables (`DATABASE_URL`, `REDIS_ADDR`, `ETCD_ENDPOINTS`,
`LEASE_TTL`, `SERVER_PORT`, `PG_MAX_CONNS`, `PG_MIN_CONNS`) override the file when set.
"""

from __future__ import annotations

import configparser
import enum
import ipaddress
import math
import os
import re
import resource
import signal
import socket
import stat as stat_module
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .identity import ROLE_NAMES, parse_local_roles

DEFAULT_PATH = "/etc/dtsd/dtsd.ini"


class ConfigError(Exception):
    """A configuration problem, with a message that names where it is."""


# --- converters ---------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|k|kib|mb|m|mib|gb|g|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024,
               "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def duration(text: str) -> float:
    """`30`, `30s`, `500ms`, `5m`, `1h`, `7d` -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use 30, 30s, 500ms, 5m, 1h or 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def size(text: str) -> int:
    """`512`, `64KB`, `1MB`, `1GiB` -> bytes (binary multiples)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use 512, 64KB or 1MB)")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _SIZE_UNITS[unit]


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"not a whole number: {text!r}") from None
        if low is not None and value < low:
            raise ValueError(f"{value} is below the minimum {low}")
        if high is not None and value > high:
            raise ValueError(f"{value} is above the maximum {high}")
        return value
    return convert


def positive_duration(text: str) -> float:
    value = duration(text)
    if value <= 0:
        raise ValueError(f"must be more than 0: {text!r}")
    return value


def string(text: str) -> str:
    return text.strip()


def nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def name_list(text: str) -> tuple[str, ...]:
    """Comma- or space-separated names; order kept, duplicates dropped."""
    items = [item for item in re.split(r"[\s,]+", text.strip()) if item]
    return tuple(dict.fromkeys(items))


QUEUE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def queue_list(text: str) -> tuple[str, ...]:
    names = name_list(text)
    if not names:
        raise ValueError("needs at least one queue name")
    for queue in names:
        if not QUEUE_NAME.match(queue):
            raise ValueError(f"bad queue name {queue!r} (lower-case letters, digits, '_', '.', '-'; "
                             "at most 64)")
    return names


def host_port(text: str) -> tuple[str, int]:
    """`127.0.0.1:50051`, `[::1]:50051`, `:50051` (all addresses)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"not host:port: {text!r}")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host or "0.0.0.0", number


def address_list(text: str) -> tuple[str, ...]:
    items = name_list(text)
    for item in items:
        host_port(item)
    return items


def stop_signal(text: str) -> signal.Signals:
    """TERM (graceful) or QUIT (fast): the stop signals dtsd's children act on."""
    name = text.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name not in ("SIGTERM", "SIGQUIT"):
        raise ValueError(f"must be TERM (graceful) or QUIT (fast), not {text!r}")
    return signal.Signals[name]


# Per-job resource limits: name -> (setrlimit resource, unit). Each is set as both the soft
# and the hard limit of the job's shell, so nothing the job starts can raise it again.
# `processes` is RLIMIT_NPROC, which the kernel counts per user: every job slot is a user
# of its own ([worker] job_uids), so it bounds the processes of one job.
LIMITS: dict[str, tuple[int, str]] = {
    "processes": (resource.RLIMIT_NPROC, "count"),
    "open_files": (resource.RLIMIT_NOFILE, "count"),
    "file_size": (resource.RLIMIT_FSIZE, "bytes"),
    "memory": (resource.RLIMIT_AS, "bytes"),
    "cpu_time": (resource.RLIMIT_CPU, "seconds"),
}
MAX_LIMIT = 1 << 62
# The same limits as JobSpec.limits (dtsd.v1.ResourceLimits) names them.
LIMIT_PROTO_FIELDS = {"processes": "processes", "open_files": "open_files",
                      "file_size": "file_size_bytes", "memory": "memory_bytes",
                      "cpu_time": "cpu_seconds"}


def limits_text(limits: Mapping[str, int]) -> str:
    """`{"processes": 64, "memory": 1 << 30}` -> `processes=64 memory=1GiB` (for people)."""
    def show(name: str, value: int) -> str:
        if LIMITS[name][1] == "bytes":
            for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
                if value % size == 0:
                    return f"{value // size}{unit}"
            return str(value)
        return f"{value}s" if LIMITS[name][1] == "seconds" else str(value)
    return " ".join(f"{name}={show(name, value)}" for name, value in limits.items())


def limit_list(text: str) -> dict[str, int]:
    """`processes=4096 open_files=1024 memory=2GB cpu_time=1h` -> {name: value}.

    Counts are whole numbers, sizes take 64KB/1MB/1GiB, times take durations (whole seconds).
    """
    limits: dict[str, int] = {}
    for item in name_list(text):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"not name=value: {item!r} (names: {', '.join(LIMITS)})")
        if name not in LIMITS:
            raise ValueError(f"unknown limit {name!r} (names: {', '.join(LIMITS)})")
        unit = LIMITS[name][1]
        number = (size(value) if unit == "bytes" else
                  math.ceil(duration(value)) if unit == "seconds" else integer(1)(value))
        if not 0 < number <= MAX_LIMIT:
            raise ValueError(f"{name}: must be more than 0")
        limits[name] = number
    return limits


MAX_ID_NUMBER = 2**31 - 2


def id_range(text: str) -> tuple[int, int]:
    """`70000-70999` -> (70000, 70999): uids (and gids of the same numbers) for job slots."""
    first, sep, last = text.strip().partition("-")
    try:
        low, high = int(first), int(last)
    except ValueError:
        raise ValueError(f"not a range FIRST-LAST of ids: {text!r}") from None
    if not sep or not 1000 <= low <= high <= MAX_ID_NUMBER:
        raise ValueError(f"not a range FIRST-LAST with 1000 <= FIRST <= LAST <= {MAX_ID_NUMBER}: "
                         f"{text!r}")
    return low, high


def umask(text: str) -> int:
    """`0027` (octal) -> 0o027."""
    try:
        value = int(text.strip(), 8)
    except ValueError:
        raise ValueError(f"not an octal umask: {text!r} (e.g. 0027)") from None
    if not 0 <= value <= 0o777:
        raise ValueError(f"a umask is 0000 to 0777, not {text!r}")
    return value


def log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"unknown log level: {text!r} (debug, info, warning, error)")
    return level


def optional_role(text: str) -> str:
    """Empty (no role), or read, submit, admin."""
    value = text.strip().lower()
    if value and value not in ROLE_NAMES:
        raise ValueError(f"unknown role {text.strip()[:20]!r} (empty for none, or "
                         f"{', '.join(ROLE_NAMES)})")
    return value


#: What a webhook target is called in [notify] targets, JobSpec.notify and dtsctl --notify.
TARGET_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
class NotifyEvent(str, enum.Enum):
    """What a webhook tells: a job failed for good (dead-lettered, lost with no retries
    left included), or succeeded. Stored in notifications.event, sent as X-Dtsd-Event."""

    FAILED = "failed"
    SUCCEEDED = "succeeded"

    def __str__(self) -> str:
        return self.value


NOTIFY_EVENTS = tuple(event.value for event in NotifyEvent)


def notify_targets(text: str) -> dict[str, str]:
    """`ops=https://hooks.example.com/dtsd team=http://127.0.0.1:9000/hook` -> {name: url}.

    Only the administrator names URLs (a submitter who could would make dtsd POST to any
    address it reaches); jobs name targets."""
    targets: dict[str, str] = {}
    for item in name_list(text):
        name, sep, url = item.partition("=")
        if not sep:
            raise ValueError(f"not NAME=URL: {item[:80]!r}")
        if not TARGET_NAME.match(name):
            raise ValueError(f"bad target name {name[:40]!r} (lower-case letter first, then "
                             "letters, digits, '_', '-'; at most 32)")
        if name in targets:
            raise ValueError(f"target {name!r} is named twice")
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port    # raises on a bad port
        except ValueError as exc:
            raise ValueError(f"target {name}: bad URL {url[:200]!r}: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"target {name}: {url[:200]!r} is not an http:// or https:// URL")
        if not parts.hostname:
            raise ValueError(f"target {name}: {url[:200]!r} names no host")
        if parts.username or parts.password:
            raise ValueError(f"target {name}: no user or password in the URL (sign with "
                             "[notify] secret_file instead)")
        targets[name] = url
    return targets


def target_names(text: str) -> tuple[str, ...]:
    names = name_list(text)
    for name in names:
        if not TARGET_NAME.match(name):
            raise ValueError(f"bad target name {name[:40]!r}")
    return names


def notify_events(text: str) -> tuple[str, ...]:
    events = name_list(text.lower())
    for event in events:
        if event not in NOTIFY_EVENTS:
            raise ValueError(f"unknown event {event[:40]!r} (known: {', '.join(NOTIFY_EVENTS)})")
    return events


def autorestart(text: str) -> str:
    value = text.strip().lower()
    if value in ("true", "false", "unexpected"):
        return value
    raise ValueError(f"not one of true, false, unexpected: {text!r}")


# --- the schema ---------------------------------------------------------------------------

#: Streams that need no credentials one peer may hold per server child (dtsd/streams.py):
#: fixed, since a health watcher or a grpcurl session needs one or two.
PUBLIC_STREAMS_PER_PEER = 4


@dataclass(frozen=True)
class Option:
    section: str
    key: str
    default: str | None          # text as written in the ini; None: required
    convert: Callable[[str], Any]
    help: str


def _process_options(role: str) -> list[Option]:
    """supervisord's vocabulary for how the master runs a role's children."""
    return [
        Option(role, "startsecs", "1s", duration,
               f"A {role} child counts as started (RUNNING) once ready and up this long."),
        Option(role, "startretries", "5", integer(1, 1000),
               f"Failed starts in a row before a {role} child is given up (FATAL)."),
        Option(role, "stopsignal", "TERM", stop_signal,
               f"Signal that asks a {role} child to stop: TERM (graceful) or QUIT (fast)."),
        Option(role, "autorestart", "true", autorestart,
               f"Restart a {role} child that exits: true, false, or unexpected (only on a "
               "non-zero exit)."),
    ]


def _options() -> list[Option]:
    o = Option
    return [
        o("dtsd", "cluster", "default", nonempty,
          "Name of the cluster; prefixes every key in Redis and etcd."),
        o("dtsd", "node_id", "", string,
          "This host's name in the cluster. Empty: the host name."),
        o("dtsd", "log_level", "info", log_level, "debug, info, warning or error."),
        o("dtsd", "log_file", "", string,
          "Empty: log to standard error (the journal under systemd). USR1 reopens it."),
        o("dtsd", "log_jobs", "false", boolean,
          "Log one info line as each attempt starts and one as it ends (job, queue, worker, "
          "outcome, exit code, duration). A job that fails for good or is lost with its "
          "worker is logged whatever this says."),
        o("dtsd", "runtime_dir", "/run/dtsd", string,
          "The master's node record (node.json), the workers' job registries, and the "
          "log when detached without log_file."),
        o("dtsd", "housekeeping_interval", "1s", positive_duration,
          "How often the leader promotes delayed jobs and recovers work of dead workers."),
        o("dtsd", "reconcile_interval", "5s", positive_duration,
          "How often the leader re-pushes PENDING jobs that Redis does not hold."),
        o("dtsd", "retention", "30d", duration,
          "The leader deletes finished jobs older than this (dead-lettered ones stay); 0: keep all."),
        o("dtsd", "child_timeout", "30s", positive_duration,
          "A child that has not reported alive for this long is killed and replaced."),

        o("server", "processes", "2", integer(0, 64),
          "gRPC API children, all bound to `listen` (SO_REUSEPORT)."),
        o("server", "listen", "127.0.0.1:50051", host_port, "Address of the gRPC API."),
        o("server", "tokens_file", "", string,
          "Bearer tokens with roles (dtsd token add), for TCP and the local sockets. Empty: "
          "no tokens."),
        o("server", "local_roles", "root:admin %dtsd-admin:admin", parse_local_roles,
          "Roles of local users on this host's API sockets, from their OS identity: "
          "USER:ROLE or %GROUP:ROLE (its members), roles read, submit, admin; the highest "
          "matching entry wins; anyone else gets no role."),
        o("server", "anonymous_role", "", optional_role,
          "Role of a call that carries no token (TCP or local socket): read, submit or "
          "admin. Empty: none, such calls are UNAUTHENTICATED. On a non-loopback listen "
          "address it is refused unless insecure = true."),
        o("server", "tls_cert", "", string,
          "PEM certificate chain of the API; with tls_key it turns on TLS."),
        o("server", "tls_key", "", string, "PEM private key for tls_cert."),
        o("server", "tls_client_ca", "", string,
          "PEM CA bundle: when set, clients must present a certificate it signed (mTLS)."),
        o("server", "insecure", "false", boolean,
          "Allow a non-loopback listen address without tokens_file and TLS, or with an "
          "anonymous_role (logs a warning)."),
        o("server", "threads", "32", integer(2, 1024),
          "Unary RPCs served at once per server child. Streams do not use these: each "
          "child has max_streams more threads for them."),
        o("server", "max_streams", "1000", integer(1, 20000),
          "Streams (WatchJob, health Watch, reflection) open at once per server child; "
          "each holds a thread. One more is refused with RESOURCE_EXHAUSTED."),
        o("server", "max_streams_per_peer", "100", integer(1, 20000),
          "Streams one peer (an IPv4 address, an IPv6 /64, or all of a unix socket's "
          "callers) may hold open per server child."),
        o("server", "max_public_streams", "16", integer(1, 1000),
          "Streams that need no credentials (health Watch, reflection) open at once per "
          f"server child; at most {PUBLIC_STREAMS_PER_PEER} of them per peer."),
        o("server", "idle_timeout", "5m", positive_duration,
          "A connection with no RPC in flight for this long is closed (clients reconnect "
          "when they next call). Open streams keep theirs."),
        o("server", "max_message_size", "4MB", size,
          "Largest request accepted; a larger one is answered RESOURCE_EXHAUSTED."),
        o("server", "max_batch", "10000", integer(1, 100000),
          "Most jobs in one SubmitJobs call."),
        o("server", "max_pending", "100000", integer(0, 100_000_000),
          "A submit to a queue already holding this many PENDING jobs (ready or delayed, "
          "counted in Redis) is answered RESOURCE_EXHAUSTED; a batch that would pass it is "
          "refused whole. Approximate: may overshoot by the submits in flight, and by what "
          "the other server children admitted in the last 0.1 s (a child counts on its "
          "last reading of Redis for 0.1 s while submits fit; before refusing it reads "
          "again). 0: no limit."),
        o("server", "max_pending_total", "1000000", integer(0, 1_000_000_000),
          "A submit while Redis holds this many job ids in all queues together (ready, "
          "delayed, or taken by a worker and not finished) is answered RESOURCE_EXHAUSTED, "
          "whichever queue it names; a batch that would pass it is refused whole. "
          "Approximate as max_pending. 0: no limit."),
        o("server", "stopwaitsecs", "10s", duration,
          "On stop, how long in-flight RPCs may take before they are cut."),
        *_process_options("server"),

        o("worker", "processes", "2", integer(0, 256), "Worker children."),
        o("worker", "concurrency", "4", integer(1, 1024), "Jobs run at once per worker child."),
        o("worker", "queues", "default", queue_list,
          "Queues this host's workers take jobs from, most important first."),
        o("worker", "max_output_bytes", "1MB", size,
          "Output kept per attempt (stdout and stderr together); the rest is cut and flagged."),
        o("worker", "default_timeout", "0", duration,
          "Timeout of jobs that set none; 0: no timeout."),
        o("worker", "kill_grace", "10s", duration,
          "After TERM to a job's processes (timeout, cancel, stop), wait this long before KILL."),
        o("worker", "cwd", "/", nonempty, "Working directory of jobs that set none."),
        o("worker", "shell", "/bin/sh", nonempty, "Runs each command as `shell -c COMMAND`."),
        o("worker", "path", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
          nonempty, "PATH in the clean environment jobs start with."),
        o("worker", "job_user", "dtsd-job", string,
          "Jobs run with this user's groups (and its name as USER), each as a uid of its own "
          "from job_uids, with every capability dropped and no_new_privs set. Empty: jobs "
          "run unboxed as the workers' own user, refused when that is root. Boxing needs "
          "CAP_SETUID, CAP_SETGID and CAP_SETPCAP (the packaged unit grants them to dtsd's "
          "own user; only the workers' launchers keep two of them)."),
        o("worker", "job_uids", "70000-70999", id_range,
          "Uids (with gids of the same numbers) that job slots run as, one per job running "
          "at once, with job_user's groups; the lowest free ones are taken first. No program "
          "of the host may use them; the only users allowed in the range are the slot users "
          "`<job_user>-N` (the package creates dtsd-job-0 to dtsd-job-31, uids 70000-70031, "
          "so that ssh and whoami know them). Needs 2 x processes x concurrency ids (a reload "
          "runs old and new workers side by side); give each dtsd instance a range of its own."),
        o("worker", "job_umask", "0027", umask,
          "The umask jobs start with (octal). Each slot has a group of its own, so group "
          "bits share only with groups an administrator chose (setgid directories)."),
        o("worker", "limits", "processes=4096 open_files=1024", limit_list,
          "Resource limits of each job, soft and hard: processes (of the job: each slot is a "
          "user of its own), open_files, file_size, memory (address space), cpu_time. "
          "Unlisted: inherited from the worker."),
        o("worker", "limits_max", "processes=16384 open_files=65536", limit_list,
          "Highest limits a job may ask for (JobSpec.limits, dtsctl submit --limit); above "
          "is refused with INVALID_ARGUMENT. A limit listed in neither key has no ceiling; "
          "one only in `limits` is its own ceiling."),
        o("worker", "retry_backoff", "1s", duration,
          "First retry waits about this long; each next one twice as long (with jitter)."),
        o("worker", "retry_backoff_max", "5m", duration, "Longest wait between retries."),
        o("worker", "heartbeat_ttl", "10s", positive_duration,
          "A worker that has not renewed its lease in PostgreSQL for this long is dead and "
          "the leader recovers its jobs; the worker itself stops them before that."),
        o("worker", "stopwaitsecs", "30s", duration,
          "On graceful stop, how long running jobs may go on before they are handed back."),
        *_process_options("worker"),

        o("web", "processes", "1", integer(0, 16),
          "HTTP children serving the web UI (/), /healthz, /readyz, /metrics and the HTTP "
          "JSON API (/api/v1/); the UI and the API are clients of this node's API sockets. "
          "On `listen` (SO_REUSEPORT). 0: none."),
        o("web", "listen", "127.0.0.1:8080", host_port,
          "Address of the HTTP listener. Not on a loopback address only with [server] "
          "tokens_file and TLS ([server] tls_cert and tls_key serve both) and without "
          "[server] anonymous_role, as the gRPC port; with a tokens file, /metrics wants a "
          "bearer token of any role, /api/v1/ passes the caller's token to the API, and "
          "the web UI asks for a token of the tokens file at login."),
        o("web", "stopwaitsecs", "5s", duration,
          "On stop, how long in-flight HTTP requests may take before they are cut."),
        *_process_options("web"),

        o("postgres", "dsn", "postgresql:///dtsd", nonempty,
          "libpq connection string or URI (env DATABASE_URL). Keep the password out of it: "
          "passfile=FILE (mode 0600, owned by dtsd's user); TLS with sslmode=verify-full "
          "sslrootcert=FILE, a client certificate with sslcert=FILE sslkey=FILE."),
        o("postgres", "pool_min", "1", integer(0, 100),
          "Connections kept open per server child (env PG_MIN_CONNS)."),
        o("postgres", "pool_max", "8", integer(1, 1000),
          "Most connections per server child, at most [server] threads (env PG_MAX_CONNS). "
          "Workers use up to 3, the coordinator 3."),

        o("redis", "url", "unix:///run/redis/redis-server.sock?db=0", nonempty,
          "unix://PATH?db=N, redis:// or rediss:// (TLS) URL (env REDIS_ADDR, as host:port). "
          "The default is Debian's redis-server on its unix socket, which only members of "
          "the group redis may open (jobs cannot; docs/security.md). An ACL user: "
          "redis://USER:PASSWORD@host:port/0 (percent-encoded; keep this file 0640). TLS: "
          "rediss://host:port/0?ssl_ca_certs=FILE, a client certificate with "
          "&ssl_certfile=FILE&ssl_keyfile=FILE."),

        o("etcd", "endpoints", "", address_list,
          "host:port list. Empty: single-node mode, this node always leads (env ETCD_ENDPOINTS)."),
        o("etcd", "lease_ttl", "10s", positive_duration,
          "Leader lease; a dead leader is replaced within about this long (env LEASE_TTL)."),
        o("etcd", "user", "", string,
          "etcd user to authenticate as (with password_file). Empty: no authentication."),
        o("etcd", "password_file", "", string,
          "File holding the etcd user's password (one line; mode 0640 or less), read at "
          "each (re)connection."),
        o("etcd", "tls_ca", "", string,
          "PEM CA bundle to verify etcd with; when set, dtsd talks to etcd over TLS "
          "(endpoints may then be written https://host:port)."),
        o("etcd", "tls_cert", "", string,
          "PEM client certificate, for an etcd started with --client-cert-auth."),
        o("etcd", "tls_key", "", string, "PEM private key for [etcd] tls_cert."),

        o("notify", "targets", "", notify_targets,
          "Webhook targets jobs may name: NAME=URL list (http:// or https://), e.g. "
          "`ops=https://hooks.example.com/dtsd`. Only these URLs are ever posted to: jobs "
          "name targets, never URLs. Empty: no notifications."),
        o("notify", "default", "", target_names,
          "Targets notified for every job (and cron run) that names none. Empty: none."),
        o("notify", "on", "failed", notify_events,
          "Events notified for jobs that name none: failed (failed for good: "
          "dead-lettered, lost with no retries left included), succeeded."),
        o("notify", "secret_file", "", string,
          "File whose content is the HMAC-SHA256 key that signs each webhook "
          "(X-Dtsd-Signature; mode 0640 or less). Empty: unsigned."),
        o("notify", "timeout", "5s", positive_duration,
          "Deadline of each webhook POST (connect, send, answer)."),
        o("notify", "max_attempts", "10", integer(1, 100),
          "POSTs of one notification before it is given up (one ERROR log line); the wait "
          "between them doubles from retry_backoff up to retry_backoff_max."),
        o("notify", "retry_backoff", "1s", positive_duration,
          "Wait after a notification's first failed POST; each next one twice as long."),
        o("notify", "retry_backoff_max", "5m", positive_duration,
          "Longest wait between two POSTs of one notification."),

        o("client", "servers", "127.0.0.1:50051", address_list,
          "Servers dtsctl talks to when given none, and when this host runs no dtsd (if it "
          "does, dtsctl uses its local sockets)."),
        o("client", "timeout", "10s", positive_duration, "Deadline of each dtsctl call."),
        o("client", "token_file", "", string,
          "File holding the token dtsctl sends (one line; keep it 0600). Empty: none (on "
          "this host dtsctl then asks the master who you are)."),
        o("client", "tls_ca", "", string,
          "PEM CA bundle to verify the servers with; when set, dtsctl uses TLS."),
        o("client", "tls_cert", "", string, "PEM client certificate, for servers that want mTLS."),
        o("client", "tls_key", "", string, "PEM private key for [client] tls_cert."),
    ]


OPTIONS: tuple[Option, ...] = tuple(_options())
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(opt.section for opt in OPTIONS))
_BY_KEY: dict[tuple[str, str], Option] = {(opt.section, opt.key): opt for opt in OPTIONS}


def default(section: str, key: str) -> Any:
    """An option's default value, converted: what a host without the file has."""
    opt = _BY_KEY[(section, key)]
    return opt.convert(opt.default)


# --- the parsed configuration -------------------------------------------------------------

@dataclass
class Config:
    """Parsed, typed configuration: `config.get("worker", "concurrency")` or `config.worker.concurrency`."""

    path: str
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    from_file: bool = True     # False: the default file is absent and defaults apply
    # (section, key) -> text exactly as the file gives it (before the environment's
    # overrides): what secrets_exposure() judges the file by.
    written: dict[tuple[str, str], str] = field(default_factory=dict)

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def __getattr__(self, section: str) -> Any:
        values = self.__dict__.get("values", {})
        if section in values:
            return _Section(values[section])
        raise AttributeError(section)

    @property
    def node_id(self) -> str:
        return self.values["dtsd"]["node_id"] or socket.gethostname()

    @property
    def key_prefix(self) -> str:
        return f"dtsd:{self.values['dtsd']['cluster']}:"


def limit_ceiling(config: "Config") -> dict[str, int]:
    """Per limit, the highest a job may ask for: limits_max, else the default in limits."""
    worker = config.values["worker"]
    return {**worker["limits"], **worker["limits_max"]}


class _Section:
    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)


def _apply_env(raw: dict[str, dict[str, str]], env: Mapping[str, str]) -> None:
    if env.get("DATABASE_URL"):
        raw["postgres"]["dsn"] = env["DATABASE_URL"]
    if env.get("REDIS_ADDR"):
        addr = env["REDIS_ADDR"]
        raw["redis"]["url"] = addr if "://" in addr else f"redis://{addr}/0"
    if env.get("ETCD_ENDPOINTS"):
        raw["etcd"]["endpoints"] = env["ETCD_ENDPOINTS"].replace("http://", "")
    if env.get("LEASE_TTL"):
        raw["etcd"]["lease_ttl"] = env["LEASE_TTL"]
    if env.get("SERVER_PORT"):
        host = raw["server"]["listen"].rpartition(":")[0]
        raw["server"]["listen"] = f"{host}:{env['SERVER_PORT']}"
    if env.get("PG_MAX_CONNS"):
        raw["postgres"]["pool_max"] = env["PG_MAX_CONNS"]
    if env.get("PG_MIN_CONNS"):
        raw["postgres"]["pool_min"] = env["PG_MIN_CONNS"]


def parse(text: str, path: str = "<string>", env: Mapping[str, str] | None = None) -> Config:
    """Parse ini text. Raises ConfigError naming file, section and key."""
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";", "#"), default_section="\0none")
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        raise ConfigError(f"{path}: {exc}") from None
    raw: dict[str, dict[str, str]] = {
        section: {opt.key: opt.default for opt in OPTIONS if opt.section == section}
        for section in SECTIONS}
    written: dict[tuple[str, str], str] = {}
    for section in parser.sections():
        if section not in raw:
            raise ConfigError(f"{path}: unknown section [{section}] "
                              f"(known: {', '.join(SECTIONS)})")
        for key, value in parser.items(section):
            if (section, key) not in _BY_KEY:
                known = ", ".join(opt.key for opt in OPTIONS if opt.section == section)
                raise ConfigError(f"{path}: [{section}] unknown key {key!r} (known: {known})")
            raw[section][key] = value
            written[(section, key)] = value
    _apply_env(raw, os.environ if env is None else env)
    config = Config(path=path, written=written)
    for opt in OPTIONS:
        text_value = raw[opt.section][opt.key]
        if text_value is None:
            raise ConfigError(f"{path}: [{opt.section}] {opt.key} is required")
        try:
            value = opt.convert(text_value)
        except ValueError as exc:
            raise ConfigError(f"{path}: [{opt.section}] {opt.key}: {exc}") from None
        config.values.setdefault(opt.section, {})[opt.key] = value
    if config.values["postgres"]["pool_min"] > config.values["postgres"]["pool_max"]:
        raise ConfigError(f"{path}: [postgres] pool_min is larger than pool_max")
    _check_etcd(config.values["etcd"], path)
    _check_notify(config.values["notify"], path)
    server, web = config.values["server"], config.values["web"]
    if server["processes"] and web["processes"] and server["listen"][1] == web["listen"][1]:
        raise ConfigError(f"{path}: [web] listen and [server] listen use the same port "
                          f"{web['listen'][1]}: give the web children a port of their own")
    worker = config.values["worker"]
    first, last = worker["job_uids"]
    needed = 2 * worker["processes"] * worker["concurrency"]
    if last - first + 1 < needed:
        raise ConfigError(f"{path}: [worker] job_uids {first}-{last} holds {last - first + 1} "
                          f"ids; 2 x processes x concurrency = {needed} are needed")
    for name, value in worker["limits"].items():
        top = worker["limits_max"].get(name)
        if top is not None and value > top:
            raise ConfigError(f"{path}: [worker] limits: {name}={value} is above "
                              f"[worker] limits_max {name}={top}")
    return config


def _check_notify(notify: dict[str, Any], path: str) -> None:
    """Default targets must be targets."""
    unknown = [name for name in notify["default"] if name not in notify["targets"]]
    if unknown:
        raise ConfigError(f"{path}: [notify] default names {', '.join(unknown)}, not in "
                          f"[notify] targets (known: {', '.join(notify['targets']) or 'none'})")


def _check_etcd(etcd: dict[str, Any], path: str) -> None:
    """The [etcd] keys that only make sense together."""
    if bool(etcd["user"]) != bool(etcd["password_file"]):
        raise ConfigError(f"{path}: [etcd] user and password_file go together: set both or "
                          "neither")
    if bool(etcd["tls_cert"]) != bool(etcd["tls_key"]):
        raise ConfigError(f"{path}: [etcd] tls_cert and tls_key go together: set both or "
                          "neither")
    if etcd["tls_cert"] and not etcd["tls_ca"]:
        raise ConfigError(f"{path}: [etcd] tls_cert needs tls_ca (the CA that signed etcd's "
                          "certificate)")
    if etcd["endpoints"]:
        from .election import parse_endpoints   # stdlib only at import: no etcd client here
        try:
            parse_endpoints(etcd["endpoints"], tls=bool(etcd["tls_ca"]))
        except ValueError as exc:
            raise ConfigError(f"{path}: [etcd] endpoints: {exc}") from None


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the file at `path` (default: $DTSD_CONFIG, else /etc/dtsd/dtsd.ini).

    A missing default file is not an error (every key has a default); a missing file
    that was named explicitly is.
    """
    environ = os.environ if env is None else env
    explicit = path or environ.get("DTSD_CONFIG")
    chosen = os.path.abspath(explicit or DEFAULT_PATH)
    found = True
    try:
        with open(chosen, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{chosen}: no such file") from None
        text, found = "", False
    except PermissionError as exc:
        hint = (" (dtsd's children hold no capability, so even as root they read only what "
                "the file's and its directories' modes allow uid 0 as owner, group or other)"
                if os.getuid() == 0 else "")
        raise ConfigError(f"{chosen}: cannot read: {exc}{hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{chosen}: cannot read: {exc}") from None
    config = parse(text, chosen, environ)
    config.from_file = found
    return config


def peek(path: str | None, section: str, key: str) -> Any:
    """One setting, even from a file that does not parse (`dtsd reload` must find the
    master's runtime directory to report that the master refused such a file): the
    checked value when the file is valid, else the line as written, else the default."""
    try:
        return load(path).get(section, key)
    except ConfigError:
        pass
    parser = configparser.ConfigParser(interpolation=None, strict=False,
                                       inline_comment_prefixes=(";", "#"))
    try:
        parser.read(os.path.abspath(path or os.environ.get("DTSD_CONFIG") or DEFAULT_PATH),
                    encoding="utf-8")
        written = parser.get(section, key, fallback=None)
    except (configparser.Error, OSError, UnicodeDecodeError):
        written = None
    option = _BY_KEY[(section, key)]
    try:
        return option.convert(written if written is not None else option.default)
    except ValueError:
        return option.convert(option.default)


def load_keys(path: str, keys: Sequence[tuple[str, str]]) -> Config:
    """Only `keys` of the file at `path`, each checked; every other section and key is
    left unread, so an error there does not count (dtsctl needs [client] of a file whose
    server sections may be wrong). Raises ConfigError naming the file, section and key
    of a wrong one of `keys`, or when the file cannot be read at all."""
    chosen = os.path.abspath(path)
    parser = configparser.ConfigParser(interpolation=None, strict=False,
                                       inline_comment_prefixes=(";", "#"),
                                       default_section="\0none")
    try:
        with open(chosen, encoding="utf-8") as handle:
            parser.read_file(handle, source=chosen)
    except FileNotFoundError:
        raise ConfigError(f"{chosen}: no such file") from None
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ConfigError(f"{chosen}: cannot read: {exc}") from None
    config = Config(path=chosen)
    for section, key in keys:
        option = _BY_KEY[(section, key)]
        text = parser.get(section, key, fallback=None)
        try:
            value = option.convert(option.default if text is None else text)
        except ValueError as exc:
            raise ConfigError(f"{chosen}: [{section}] {key}: {exc}") from None
        config.values.setdefault(section, {})[key] = value
    return config


def reference_ini() -> str:
    """The shipped /etc/dtsd/dtsd.ini: every option, commented out, with its default and help."""
    lines = ["; /etc/dtsd/dtsd.ini: configuration of dtsd, the distributed task scheduler.",
             ";",
             "; Every option is listed with its default value, commented out. Durations take",
             "; 30, 30s, 500ms, 5m, 1h or 7d; sizes 512, 64KB or 1MB. Unknown sections and keys",
             "; are errors. Check a change with: dtsd --check-config -c /etc/dtsd/dtsd.ini",
             "; then apply it with: systemctl reload dtsd", ""]
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for opt in OPTIONS:
            if opt.section != section:
                continue
            lines.append(f"; {opt.help}")
            lines.append(f";{opt.key} = {opt.default}".rstrip())
        lines.append("")
    return "\n".join(lines)


def reference_table() -> list[str]:
    """The rows of docs/configuration.md's option table (a test keeps the page's equal to
    these)."""
    rows = []
    for opt in OPTIONS:
        default = f"`{opt.default}`" if opt.default else "*(empty)*"
        rows.append(f"| `[{opt.section}]` | `{opt.key}` | {default} | {opt.help} |")
    return rows


# --- exposure ---------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; anything else (0.0.0.0, ::, names) is exposed."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure(host: str, port: int, *, tokens_file: str, tls_cert: str, tls_key: str,
             insecure: bool, anonymous_role: str = "") -> tuple[str | None, str | None]:
    """(error, warning) for serving on host:port with this security configuration.

    An error means: do not start (or reload). A non-loopback listen address needs both a
    tokens file and a TLS certificate and key, and no `[server] anonymous_role` (anyone who
    connects would get that role: as good as no tokens), unless `[server] insecure = true`
    says otherwise, in which case the warning is to be logged loudly.
    """
    if bool(tls_cert) != bool(tls_key):
        return ("[server] tls_cert and tls_key go together: set both or neither", None)
    if is_loopback(host):
        return None, None
    missing = [what for what, given in (("[server] tokens_file", tokens_file),
                                        ("[server] tls_cert and tls_key", tls_cert))
               if not given]
    if not missing and not anonymous_role:
        return None, None
    where = f"[server] listen = {host}:{port}"
    anonymous = (f"[server] anonymous_role = {anonymous_role} gives anyone who connects "
                 f"role {anonymous_role}") if anonymous_role else ""
    if insecure:
        lacks = f" without {' and '.join(missing)}" if missing else ""
        return None, (f"INSECURE: {where} is reachable from other hosts{lacks}"
                      f"{'; ' + anonymous if anonymous else ''}; anyone who can connect may "
                      "run commands as the workers' user ([server] insecure = true)")
    if missing:
        problem = (f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. "
                   "Jobs are shell commands: configure tokens and TLS, listen on 127.0.0.1, or "
                   "set [server] insecure = true to accept the risk")
        if anonymous:
            problem += f"; also, {anonymous} (empty it)"
    else:
        problem = (f"{anonymous}. Jobs are shell commands: empty [server] anonymous_role, "
                   "listen on 127.0.0.1, or set [server] insecure = true to accept the risk")
    return f"{where} is not a loopback address, and {problem}", None


def server_exposure(config: Config) -> tuple[str | None, str | None]:
    """`exposure()` for the configured `[server] listen` and `[web] listen`: what the
    master checks at start and reload, and `dtsd --check-config` reports. A role without
    processes exposes nothing. The web child relays its HTTP callers to the API, so an
    `anonymous_role` counts against its address as against the gRPC port's."""
    server = config.values["server"]
    errors: list[str] = []
    warnings: list[str] = []
    for section in ("server", "web"):
        if not config.values[section]["processes"]:
            continue
        host, port = config.values[section]["listen"]
        error, warning = exposure(
            host, port, tokens_file=server["tokens_file"], tls_cert=server["tls_cert"],
            tls_key=server["tls_key"], insecure=server["insecure"],
            anonymous_role=server["anonymous_role"])
        if error:
            errors.append(error.replace("[server] listen", f"[{section}] listen", 1))
        if warning:
            warnings.append(warning.replace("[server] listen", f"[{section}] listen", 1))
    return ("; ".join(dict.fromkeys(errors)) or None), ("; ".join(warnings) or None)


# --- secrets on disk ----------------------------------------------------------------------

_CONNINFO_PAIR = re.compile(r"(\w+)\s*=\s*('(?:\\.|[^'\\])*'|\S+)")


def connection_fields(text: str) -> dict[str, str]:
    """The settings of a libpq conninfo (`key=value ...` or URI) or a Redis URL that
    matter here: `password` and the files named in it (a light parse, no client library)."""
    text = text.strip()
    if "://" not in text:
        return {key.lower(): value.strip("'") for key, value in _CONNINFO_PAIR.findall(text)}
    url = urllib.parse.urlsplit(text)
    fields = {key.lower(): values[-1]
              for key, values in urllib.parse.parse_qs(url.query).items()}
    if url.password:
        fields["password"] = url.password
    return fields


def _mode(stat: Callable[[str], os.stat_result], path: str) -> int | None:
    try:
        return stat(path).st_mode
    except OSError:
        return None     # a missing file is reported by whatever reads it


def secrets_exposure(config: Config, stat: Callable[[str], os.stat_result] = os.stat
                     ) -> tuple[str | None, str | None]:
    """(error, warning) about who else on this host can read dtsd's secrets.

    Errors (the master refuses to start or reload, `--check-config` fails):
    - the configuration file holds a password ([postgres] dsn, [redis] url) and every
      user may read it; group-readable is fine (the package installs it 0640 root:dtsd);
    - a password file or private key it names ([etcd] password_file, [notify] secret_file,
      any tls_key, the dsn's passfile/sslkey, the Redis URL's ssl_keyfile) is readable by
      every user;
    - the configuration file or one of those files (tokens file included) is writable by
      every user: anyone could then choose the commands dtsd runs, or the tokens.
    Warning: the tokens file is readable by every user (it holds only hashes of the
    secrets, but names who may do what).
    """
    errors: list[str] = []
    warnings: list[str] = []
    fix = "chmod 640 (owner root or dtsd, group dtsd)"
    written = config.written
    in_file = []
    for section, key in (("postgres", "dsn"), ("redis", "url")):
        if connection_fields(written.get((section, key), "")).get("password"):
            in_file.append(f"[{section}] {key}")
    if config.from_file:
        mode = _mode(stat, config.path)
        if mode is not None and mode & stat_module.S_IWOTH:
            errors.append(f"{config.path} is writable by every user (mode "
                          f"{stat_module.S_IMODE(mode):04o}): {fix} {config.path}")
        elif mode is not None and in_file and mode & stat_module.S_IROTH:
            errors.append(f"{config.path} holds a password ({', '.join(in_file)}) and is "
                          f"readable by every user (mode {stat_module.S_IMODE(mode):04o}): "
                          f"{fix} {config.path}")

    dsn = connection_fields(config.get("postgres", "dsn"))
    url = connection_fields(config.get("redis", "url"))
    secret_files = [
        ("[etcd] password_file", config.get("etcd", "password_file")),
        ("[etcd] tls_key", config.get("etcd", "tls_key")),
        ("[server] tls_key", config.get("server", "tls_key")),
        ("[client] tls_key", config.get("client", "tls_key")),
        ("passfile of [postgres] dsn", dsn.get("passfile", "")),
        ("sslkey of [postgres] dsn", dsn.get("sslkey", "")),
        ("ssl_keyfile of [redis] url", url.get("ssl_keyfile", "")),
        ("[notify] secret_file", config.get("notify", "secret_file")),
    ]
    files = [(what, path, errors) for what, path in secret_files]
    files.append(("[server] tokens_file", config.get("server", "tokens_file"), warnings))
    for what, path, readable_is in files:
        mode = _mode(stat, path) if path else None
        if mode is None:
            continue
        shown = f"{what} {path} (mode {stat_module.S_IMODE(mode):04o})"
        if mode & stat_module.S_IWOTH:
            errors.append(f"{shown} is writable by every user: chmod 600 {path}")
        elif mode & stat_module.S_IROTH:
            readable_is.append(f"{shown} is readable by every user: chmod 600 {path} (or "
                               "640, group dtsd)")
    if errors:
        return "; ".join(errors), None
    return None, ("; ".join(warnings) or None)
