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
import ipaddress
import os
import re
import signal
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

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


def log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"unknown log level: {text!r} (debug, info, warning, error)")
    return level


def autorestart(text: str) -> str:
    value = text.strip().lower()
    if value in ("true", "false", "unexpected"):
        return value
    raise ValueError(f"not one of true, false, unexpected: {text!r}")


# --- the schema ---------------------------------------------------------------------------

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
          "Bearer tokens with roles (dtsd token add). Empty: no authentication."),
        o("server", "tls_cert", "", string,
          "PEM certificate chain of the API; with tls_key it turns on TLS."),
        o("server", "tls_key", "", string, "PEM private key for tls_cert."),
        o("server", "tls_client_ca", "", string,
          "PEM CA bundle: when set, clients must present a certificate it signed (mTLS)."),
        o("server", "insecure", "false", boolean,
          "Allow a non-loopback listen address without tokens_file and TLS (logs a warning)."),
        o("server", "threads", "32", integer(2, 1024),
          "RPCs served at once per server child (watch streams hold one each)."),
        o("server", "max_message_size", "4MB", size,
          "Largest request accepted; a larger one is answered RESOURCE_EXHAUSTED."),
        o("server", "max_batch", "10000", integer(1, 100000),
          "Most jobs in one SubmitJobs call."),
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
          "After TERM to a job's process group (timeout, cancel, stop), wait this long before KILL."),
        o("worker", "cwd", "/", nonempty, "Working directory of jobs that set none."),
        o("worker", "shell", "/bin/sh", nonempty, "Runs each command as `shell -c COMMAND`."),
        o("worker", "path", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
          nonempty, "PATH in the clean environment jobs start with."),
        o("worker", "retry_backoff", "1s", duration,
          "First retry waits about this long; each next one twice as long (with jitter)."),
        o("worker", "retry_backoff_max", "5m", duration, "Longest wait between retries."),
        o("worker", "heartbeat_ttl", "10s", positive_duration,
          "A worker whose heartbeat is older than this is dead; its jobs are recovered."),
        o("worker", "stopwaitsecs", "30s", duration,
          "On graceful stop, how long running jobs may go on before they are handed back."),
        *_process_options("worker"),

        o("postgres", "dsn", "postgresql:///dtsd", nonempty,
          "libpq connection string or URI (env DATABASE_URL)."),
        o("postgres", "pool_min", "1", integer(0, 100),
          "Connections kept open per server child (env PG_MIN_CONNS)."),
        o("postgres", "pool_max", "8", integer(1, 1000),
          "Most connections per server child, at most [server] threads (env PG_MAX_CONNS). "
          "Workers use up to 3, the coordinator 2."),

        o("redis", "url", "redis://127.0.0.1:6379/0", nonempty,
          "redis:// or unix:// URL (env REDIS_ADDR, as host:port)."),

        o("etcd", "endpoints", "", address_list,
          "host:port list. Empty: single-node mode, this node always leads (env ETCD_ENDPOINTS)."),
        o("etcd", "lease_ttl", "10s", positive_duration,
          "Leader lease; a dead leader is replaced within about this long (env LEASE_TTL)."),

        o("client", "servers", "127.0.0.1:50051", address_list,
          "Servers dtsctl talks to when given none."),
        o("client", "timeout", "10s", positive_duration, "Deadline of each dtsctl call."),
        o("client", "tls_ca", "", string,
          "PEM CA bundle to verify the servers with; when set, dtsctl uses TLS."),
        o("client", "tls_cert", "", string, "PEM client certificate, for servers that want mTLS."),
        o("client", "tls_key", "", string, "PEM private key for [client] tls_cert."),
    ]


OPTIONS: tuple[Option, ...] = tuple(_options())
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(opt.section for opt in OPTIONS))
_BY_KEY: dict[tuple[str, str], Option] = {(opt.section, opt.key): opt for opt in OPTIONS}


# --- the parsed configuration -------------------------------------------------------------

@dataclass
class Config:
    """Parsed, typed configuration: `config.get("worker", "concurrency")` or `config.worker.concurrency`."""

    path: str
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    from_file: bool = True     # False: the default file is absent and defaults apply

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
    for section in parser.sections():
        if section not in raw:
            raise ConfigError(f"{path}: unknown section [{section}] "
                              f"(known: {', '.join(SECTIONS)})")
        for key, value in parser.items(section):
            if (section, key) not in _BY_KEY:
                known = ", ".join(opt.key for opt in OPTIONS if opt.section == section)
                raise ConfigError(f"{path}: [{section}] unknown key {key!r} (known: {known})")
            raw[section][key] = value
    _apply_env(raw, os.environ if env is None else env)
    config = Config(path=path)
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
    return config


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
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{chosen}: cannot read: {exc}") from None
    config = parse(text, chosen, environ)
    config.from_file = found
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
             insecure: bool) -> tuple[str | None, str | None]:
    """(error, warning) for serving on host:port with this security configuration.

    An error means: do not start. A non-loopback listen address needs both a tokens file
    and a TLS certificate and key, unless `[server] insecure = true` says otherwise, in
    which case the warning is to be logged loudly.
    """
    if bool(tls_cert) != bool(tls_key):
        return ("[server] tls_cert and tls_key go together: set both or neither", None)
    if is_loopback(host):
        return None, None
    missing = [what for what, given in (("[server] tokens_file", tokens_file),
                                        ("[server] tls_cert and tls_key", tls_cert))
               if not given]
    if not missing:
        return None, None
    where = f"[server] listen = {host}:{port}"
    if insecure:
        return None, (f"INSECURE: {where} is reachable from other hosts without "
                      f"{' and '.join(missing)}; anyone who can connect may run commands as "
                      "the workers' user ([server] insecure = true)")
    return (f"refusing to start: {where} is not a loopback address, and "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. "
            "Jobs are shell commands: configure tokens and TLS, listen on 127.0.0.1, or set "
            "[server] insecure = true to accept the risk", None)
