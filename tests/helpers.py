"""Test helpers: real PostgreSQL, Redis and dtsd processes on free loopback ports.

Nothing here mocks a server. PostgreSQL is a private cluster made with `initdb` in a
temporary directory (as root, owned by and run as the `postgres` system user, because
initdb and postgres refuse to run as root); Redis is a private `redis-server` without
persistence; dtsd masters are the real `python -m dtsd`.

The fixtures in conftest.py wrap these classes; tests that need a second server of a kind
(a second Redis, say) can use the classes directly.
"""

from __future__ import annotations

import configparser
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent

# Environment variables that would make a dtsd or dtsctl started by a test talk to
# something other than the test's own servers (the seed's overrides, dtsctl's defaults),
# or make it believe it runs under systemd.
_FOREIGN_ENV = (
    "DATABASE_URL", "REDIS_ADDR", "ETCD_ENDPOINTS", "LEASE_TTL", "SERVER_PORT",
    "PG_MAX_CONNS", "PG_MIN_CONNS", "DTSD_CONFIG", "DTSD_SERVERS", "SERVERS",
    "SUBMIT_SERVER", "STATUS_SERVERS", "DTSD_TOKEN", "DTSD_TOKEN_FILE",
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
    "LISTEN_FDNAMES", "INVOCATION_ID",
    "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE",
)


class Timeout(AssertionError):
    """`wait_for` ran out of time."""


class StopWaiting(Exception):
    """Raised by a `wait_for` predicate to end the wait at once (it is re-raised)."""


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.05,
             message: str | Callable[[], str] = "condition") -> Any:
    """Call `predicate` until it returns something truthy; return that value.

    Exceptions from the predicate count as "not yet" (the last one is chained to the
    Timeout), except `StopWaiting`, which ends the wait at once. `message` (text, or a
    callable giving text) says what was awaited.
    """
    __tracebackhide__ = True  # pytest: show the caller, not this loop
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
        except StopWaiting:
            raise
        except Exception as exc:  # noqa: BLE001 - "not ready yet" takes many forms
            last_exc = exc
        else:
            if value:
                return value
            last_exc = None
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            detail = f" (last error: {last_exc!r})" if last_exc is not None else ""
            raise Timeout(f"timed out after {timeout:g}s waiting for {text}{detail}") from last_exc
        time.sleep(interval)


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now, never the same twice in one test run."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without the variables that would redirect dtsd, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env.update(extra or {})
    return env


def tail(path: str | os.PathLike[str], lines: int = 100) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _is_root() -> bool:
    return os.geteuid() == 0


# --- PostgreSQL -----------------------------------------------------------------------------

def pg_bindir() -> Path:
    """Directory with initdb/pg_ctl: $DTSD_PG_BINDIR, Debian's newest, or from PATH."""
    if os.environ.get("DTSD_PG_BINDIR"):
        return Path(os.environ["DTSD_PG_BINDIR"])
    preferred = Path("/usr/lib/postgresql/15/bin")
    if (preferred / "initdb").exists():
        return preferred
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql-15, "
                       "or set DTSD_PG_BINDIR)")


class PostgresServer:
    """A private PostgreSQL cluster: initdb in a temp dir, TCP on 127.0.0.1:<free port>.

    `settings` are postgresql.conf settings; `hba`, when given, replaces pg_hba.conf (keep a
    `host all postgres 127.0.0.1/32 trust` line: the helpers connect as postgres, no
    password). Files the server reads (certificates, say) belong in `.dir`, handed to the
    cluster's owner with `own()`.
    """

    def __init__(self, settings: Mapping[str, str] | None = None,
                 hba: Sequence[str] | None = None):
        self.bindir = pg_bindir()
        self.hba = hba
        self.settings = {"fsync": "off", "synchronous_commit": "off",
                         "full_page_writes": "off", "max_connections": "300",
                         **(settings or {})}
        self.dir = Path(tempfile.mkdtemp(prefix="dtsd-pg-"))
        self.data = self.dir / "data"
        self.logfile = self.dir / "postgres.log"
        self.port = 0
        self._as_pg: list[str] = []
        self._options: list[str] = []
        if _is_root():
            # initdb and postgres refuse to run as root: hand the directory to the
            # `postgres` system user and run the server commands as that user.
            pg_user = pwd.getpwnam("postgres")
            os.chown(self.dir, pg_user.pw_uid, pg_user.pw_gid)
            self._as_pg = ["runuser", "-u", "postgres", "--"]

    # Commands run as the cluster owner, from a directory that user can enter.
    def _run(self, *args: str, check: bool = True, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
        cmd = [*self._as_pg, str(self.bindir / args[0]), *args[1:]]
        proc = subprocess.run(cmd, cwd=self.dir, env=clean_env({"LC_ALL": "C"}),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}\n{tail(self.logfile, 30)}")
        return proc

    def start(self) -> "PostgresServer":
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--no-locale", "--no-sync")
        if self.hba is not None:
            (self.data / "pg_hba.conf").write_text("\n".join(self.hba) + "\n")
            self.own(self.data / "pg_hba.conf")
        for attempt in range(5):
            self.port = free_port()
            options = ["-c listen_addresses=127.0.0.1", f"-p {self.port}",
                       f"-c unix_socket_directories='{self.dir}'"]
            options += [f"-c {key}={value}" for key, value in self.settings.items()]
            proc = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile),
                             "-w", "-t", "60", "-o", " ".join(options), "start", check=False)
            if proc.returncode == 0:
                self._options = options
                break
            if "could not bind" not in tail(self.logfile, 20) or attempt == 4:
                raise RuntimeError(f"pg_ctl start failed ({proc.returncode}):\n"
                                   f"{proc.stdout}{proc.stderr}\n{tail(self.logfile, 30)}")
        wait_for(self._accepts, timeout=30, message=f"PostgreSQL on port {self.port}")
        return self

    def resume(self) -> "PostgresServer":
        """Start the cluster again after `stop()`, on the same port with the same data (a
        PostgreSQL restart, as clients see it)."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60",
                  "-o", " ".join(self._options), "start")
        wait_for(self._accepts, timeout=30, message=f"PostgreSQL on port {self.port}")
        return self

    def own(self, path: Path, mode: int = 0o600) -> None:
        """Make `path` the cluster owner's, private (as a server key must be)."""
        if self._as_pg:
            pg_user = pwd.getpwnam("postgres")
            os.chown(path, pg_user.pw_uid, pg_user.pw_gid)
        os.chmod(path, mode)

    def _accepts(self) -> bool:
        import psycopg
        with psycopg.connect(self.admin_dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True

    def dsn(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def admin_dsn(self) -> str:
        return self.dsn("postgres")

    def create_database(self, name: str) -> str:
        import psycopg
        from psycopg import sql
        try:
            with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=10) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0")
                             .format(sql.Identifier(name)))
        except psycopg.Error as exc:
            # Say why: a server that died or ran out of connections shows in its log.
            raise RuntimeError(f"cannot create database {name} on the test PostgreSQL "
                               f"(port {self.port}): {exc}\n--- {self.logfile} ---\n"
                               f"{tail(self.logfile, 30)}") from exc
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        import psycopg
        from psycopg import sql
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop",
                      check=False)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- Redis ----------------------------------------------------------------------------------

class RedisServer:
    """A private redis-server on 127.0.0.1 without persistence.

    `stop()` kills it (as a crash would); `start()` brings it back on the same port, empty,
    or, with `appendonly`, with what its append-only file held (fsync'd every second, as
    Debian's packaged redis.conf would have it once AOF is switched on).
    `tls` = {"cert", "key", "ca"} (PEM paths): TLS only, clients need a certificate signed
    by "ca" too, also given as "client_cert"/"client_key" for the helper's own ping.
    `auth` = (user, password): that ACL user may do anything, the default user nothing.
    `unix_socket`: no TCP; the socket `.socket` (mode 0700) in the server's private
    directory (0700), as the packaged default keeps it from jobs.
    """

    def __init__(self, port: int | None = None, binary: str = "redis-server", *,
                 tls: Mapping[str, str] | None = None, auth: tuple[str, str] | None = None,
                 unix_socket: bool = False, appendonly: bool = False):
        self.binary = shutil.which(binary) or binary
        self.appendonly = appendonly
        self.tls = tls
        self.auth = auth
        self.dir = Path(tempfile.mkdtemp(prefix="dtsd-redis-"))
        self.socket = self.dir / "redis.sock" if unix_socket else None
        self.port = port or 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None
        self.logfile = self.dir / "redis.log"

    @property
    def url(self) -> str:
        if self.socket:
            return f"unix://{self.socket}?db=0"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> "RedisServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        fixed_port = bool(self.port)
        for attempt in range(5):
            if not fixed_port and not self.socket:
                self.port = free_port()
            self._spawn()
            try:
                wait_for(self.ping, timeout=timeout,
                         message=lambda: f"redis-server on {self.socket or self.port}:\n"
                                         f"{tail(self.logfile, 20)}")
                return self
            except AssertionError:
                exited = self.proc is not None and self.proc.poll() is not None
                self.stop()
                if fixed_port or not exited or attempt == 4:
                    raise
        return self

    def _spawn(self) -> None:
        self._log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(
            [self.binary, *self._listen_args(), "--bind", "127.0.0.1",
             "--save", "", *self._persistence_args(), "--dir", str(self.dir),
             "--daemonize", "no", *self._socket_args(), "--loglevel", "notice"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.dir, env=clean_env())

    def _persistence_args(self) -> list[str]:
        if self.appendonly:
            return ["--appendonly", "yes", "--appendfsync", "everysec"]
        return ["--appendonly", "no"]

    def _socket_args(self) -> list[str]:
        if self.socket:
            return ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        return ["--unixsocket", ""]

    def _listen_args(self) -> list[str]:
        if self.socket:
            return ["--port", "0"]
        args = ["--port", str(self.port)]
        if self.tls:
            args = ["--port", "0", "--tls-port", str(self.port),
                    "--tls-cert-file", self.tls["cert"], "--tls-key-file", self.tls["key"],
                    "--tls-ca-cert-file", self.tls["ca"]]
        if self.auth:
            user, password = self.auth
            args += ["--user", "default", "off", "--user", user, "on", f">{password}",
                     "~*", "&*", "+@all"]
        return args

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        if self.socket:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.settimeout(1)
                raw.connect(str(self.socket))
                raw.sendall(b"PING\r\n")
                return raw.recv(64).startswith(b"+PONG")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
            sock = raw
            if self.tls:
                import ssl
                context = ssl.create_default_context(cafile=self.tls["ca"])
                context.load_cert_chain(self.tls["client_cert"], self.tls["client_key"])
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            if self.auth:
                user, password = self.auth
                words = [b"AUTH", user.encode(), password.encode()]
                sock.sendall(b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(w), w)
                                                   for w in words))
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def client(self, **kwargs: Any):
        import redis
        return redis.Redis.from_url(self.url, **kwargs)

    def stop(self) -> None:
        """Kill the server (SIGKILL) and wait for it: what a crash looks like."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- dtsd masters ---------------------------------------------------------------------------

# The tests run as root, so their workers switch jobs to an unprivileged user, as a packaged
# dtsd does with dtsd-job. nobody exists everywhere; a test may still set its own job_user.
TEST_JOB_USER = "nobody"


# The suite calls the API over TCP without tokens, as it did before calls needed them:
# write_ini gives such calls this role unless a test sets [server] anonymous_role itself, or
# [server] tokens_file (then it tests authentication, and no token means no access, as
# packaged; `tokens_file = ""` asks for exactly the packaged default).
TEST_ANONYMOUS_ROLE = "admin"


def write_ini(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> None:
    parser = configparser.ConfigParser(interpolation=None)
    for section, values in sections.items():
        parser[section] = {key: str(value) for key, value in values.items()}
    if not parser.has_section("server"):
        parser.add_section("server")
    if "tokens_file" not in parser["server"]:
        parser["server"].setdefault("anonymous_role", TEST_ANONYMOUS_ROLE)
    # The web child (HTTP: /metrics, /healthz, /readyz) only where a test asks for it, on a
    # port of its own: the packaged 127.0.0.1:8080 would be shared by the suite's masters.
    if not parser.has_section("web"):
        parser.add_section("web")
        parser["web"]["processes"] = "0"
    parser["web"].setdefault("listen", f"127.0.0.1:{free_port()}")
    if os.getuid() == 0:
        if not parser.has_section("worker"):
            parser.add_section("worker")
        parser["worker"].setdefault("job_user", TEST_JOB_USER)
        parser["worker"].setdefault("job_uids", test_job_uids(sections))
    with open(path, "w", encoding="utf-8") as handle:
        parser.write(handle)


def test_job_uids(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """A [worker] job_uids range of this master's own: the suite (and another suite run
    beside it) starts many masters on one host, and two masters must never share a uid.
    Derived from the listen port, which no other live master holds."""
    listen = str(sections.get("server", {}).get("listen", "")) or f":{free_port()}"
    port = int(listen.rpartition(":")[2]) or free_port()
    worker = sections.get("worker", {})

    def number(key: str, default: int) -> int:
        try:
            return int(worker.get(key, default))
        except ValueError:      # a test writing a broken value on purpose
            return default
    needed = 2 * number("processes", 2) * number("concurrency", 4)
    first = 10_000_000 + port * 1024
    return f"{first}-{first + max(64, min(needed, 1024)) - 1}"


def merge_sections(base: Mapping[str, Mapping[str, Any]],
                   overrides: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in (overrides or {}).items():
        merged.setdefault(section, {}).update(values)
    return merged


def health_status(address: str, timeout: float = 1.0, credentials: Any = None) -> int:
    """The gRPC health status of `address` for the whole server (""); TLS with `credentials`."""
    import grpc
    from dtsd.health import health_pb2, health_pb2_grpc
    with (grpc.secure_channel(address, credentials) if credentials is not None
          else grpc.insecure_channel(address)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return reply.status


class DtsdMaster:
    """A real `python -m dtsd -c INI` started by the dtsd_factory fixture."""

    def __init__(self, workdir: Path, node_id: str, sections: Mapping[str, Mapping[str, Any]]):
        self.workdir = workdir
        self.node_id = node_id
        self.sections = sections
        self.ini_path = workdir / "dtsd.ini"
        self.log_path = workdir / "dtsd.log"
        listen = str(sections["server"]["listen"])
        self.port = int(listen.rpartition(":")[2])
        self.address = f"127.0.0.1:{self.port}"
        web = str(sections.get("web", {}).get("listen", ""))
        self.web_url = f"http://{web}" if web else ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_handle = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self) -> dict[str, str]:
        return clean_env({"PYTHONPATH": str(REPO_ROOT)})

    def start(self, timeout: float = 30) -> "DtsdMaster":
        write_ini(self.ini_path, self.sections)
        self._log_handle = open(self.log_path, "ab")
        # Its own session, so that a KILL on timeout can take the whole tree.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dtsd", "-c", str(self.ini_path)],
            cwd=REPO_ROOT, env=self.env(), stdin=subprocess.DEVNULL,
            stdout=self._log_handle, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = 30, credentials: Any = None) -> None:
        """`credentials`: grpc channel credentials when the server speaks TLS."""
        from dtsd.health import health_pb2
        serving = health_pb2.HealthCheckResponse.SERVING

        def ready() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise StopWaiting(f"dtsd {self.node_id} exited with {code} before serving:\n"
                              f"{self.log()[-4000:]}")
            return health_status(self.address, credentials=credentials) == serving

        try:
            wait_for(ready, timeout=timeout, interval=0.1,
                     message=lambda: f"dtsd {self.node_id} to serve health on {self.address}; "
                                     f"log tail:\n{tail(self.log_path, 40)}")
        except StopWaiting as exc:
            raise AssertionError(str(exc)) from None
        if str(self.sections.get("web", {}).get("processes", 0)) != "0":
            wait_for(self.web_answers, timeout=timeout, interval=0.1,
                     message=lambda: f"dtsd {self.node_id} to answer on {self.web_url}")

    def web_answers(self) -> bool:
        import urllib.request
        try:
            with urllib.request.urlopen(self.web_url + "/healthz", timeout=1) as reply:
                return reply.status == 200
        except OSError:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int | None:
        """TERM, wait up to `timeout`; KILL the whole session on timeout. The exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.proc.wait(timeout=30)
        self._kill_group()  # children left behind by a master that died
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return self.proc.returncode

    def _kill_group(self) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def dtsctl(self, *args: str, input: str | None = None, timeout: float = 60,
               env: Mapping[str, str] | None = None, token: str | None = None,
               tls: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        return run_dtsctl("--servers", self.address, *args, input=input, timeout=timeout,
                          env=env, token=token, tls=tls)

    def __repr__(self) -> str:
        return f"<DtsdMaster {self.node_id} {self.address} pid={getattr(self.proc, 'pid', None)}>"


def run_dtsctl(*args: str, input: str | None = None, timeout: float = 60,
               env: Mapping[str, str] | None = None, token: str | None = None,
               tls: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run `python -m dtsd.cli ARGS` (dtsctl) from the repo; text output.

    `token` is passed as `--token`; `tls` are global TLS options (`--tls-ca`, FILE, ...).
    """
    extra = [*(("--token", token) if token else ()), *tls]
    return subprocess.run(
        [sys.executable, "-m", "dtsd.cli", *extra, *args],
        input=input, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
        env=clean_env({"PYTHONPATH": str(REPO_ROOT), **(env or {})}),
        stdin=None if input is not None else subprocess.DEVNULL)
