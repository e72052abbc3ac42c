"""Real etcd for tests: one node or a cluster on loopback, and election contenders.

- `EtcdCluster(n)` starts `n` members of the distribution's `etcd` binary on free
  127.0.0.1 client and peer ports, data directories in a temp dir (under /dev/shm when it
  exists, so fsync costs nothing), `--initial-cluster` naming them all. Members can be
  stopped (TERM), killed (KILL), paused (STOP/CONT) and started again one by one, to take
  the quorum away and give it back. `.endpoints` is "127.0.0.1:p1,127.0.0.1:p2,...".
  `EtcdServer` is the one-member case.
- Health is read from etcd's own HTTP endpoint on the client port (`GET /health`: true only
  with a leader and a working linearizable read), so no etcdctl is needed.
- `Contender` runs `python -m tests.etcd_helpers contender ARGS_JSON`: a process with one
  `dtsd.election.EtcdLeadership` that prints one JSON line every 100 ms and on each change:
  `{"t": <CLOCK_MONOTONIC>, "event", "node", "pid", "leader", "token", "seen_leader",
  "seen_token", "members"}`. `t` is read before the state, so a line stamped after a pause
  shows the state as computed after it. Commands on stdin: `stop` (resign and exit 0),
  `members` (print the full member records). The etcd client lives only in these processes,
  started with PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python, so PyPI's etcd3 loads there
  while pytest keeps the fast protobuf.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

if __package__ in (None, ""):  # run as a script: make `tests` and `dtsd` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import REPO_ROOT, Timeout, clean_env, free_port, tail, wait_for  # noqa: E402

ETCD_BINARY = os.environ.get("DTSD_ETCD_BINARY") or shutil.which("etcd") or "/usr/bin/etcd"


def _temp_root() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _etcd_env() -> dict[str, str]:
    # etcd reads every ETCD_* variable as a flag: keep the caller's out.
    return {k: v for k, v in clean_env().items() if not k.startswith("ETCD")}


def _http_get(url: str, timeout: float = 1.0, context: Any = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class EtcdMember:
    def __init__(self, cluster: "EtcdCluster", index: int):
        self.cluster = cluster
        self.index = index
        self.name = f"m{index}"
        self.client_port = 0
        self.peer_port = 0
        self.data_dir = cluster.dir / self.name
        self.logfile = cluster.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        scheme = "https" if self.cluster.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client_urls(self) -> str:
        """Where clients reach this member (a subclass may add addresses)."""
        return self.client_url

    def spawn(self) -> None:
        c = self.cluster
        clients = self.client_urls()
        args = [
            ETCD_BINARY, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", clients, "--advertise-client-urls", clients,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", c.initial_cluster, "--initial-cluster-token", c.token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", str(c.heartbeat_ms), "--election-timeout", str(c.election_ms),
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "info",
        ]
        if c.tls:
            args += ["--cert-file", c.tls["cert"], "--key-file", c.tls["key"],
                     "--client-cert-auth", "--trusted-ca-file", c.tls["ca"]]
        args += c.extra_args
        self._log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=c.dir, env=_etcd_env())

    def alive_http(self) -> bool:
        """The member answers on its client port (quorum or not)."""
        status, _ = _http_get(f"{self.client_url}/version", context=self.cluster.ssl_context())
        return status == 200

    def healthy(self) -> bool:
        """The member has a leader and serves linearizable reads."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"etcd {self.name} exited with {self.proc.returncode}")
        status, body = _http_get(f"{self.client_url}/health",
                                 context=self.cluster.ssl_context())
        return status == 200 and json.loads(body).get("health") == "true"

    def stop(self, timeout: float = 15) -> None:
        """TERM (a clean shutdown), KILL after `timeout`."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self._end(signal.SIGKILL, 15)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def _end(self, sig: int, timeout: float) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.send_signal(signal.SIGCONT)
                    self.proc.send_signal(sig)
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=15)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


class EtcdCluster:
    """`n` etcd members on loopback; see the module docstring.

    `tls` = {"ca", "cert", "key", "client_cert", "client_key"} (PEM paths; the server
    certificate must name IP 127.0.0.1): clients connect over https with a certificate
    signed by "ca" (--client-cert-auth); peers still talk plain http on loopback.
    `extra_args` go to every member's command line (`--auth-token-ttl 2`, say).
    """

    def __init__(self, n: int = 3, *, heartbeat_ms: int = 100, election_ms: int = 1000,
                 tls: dict[str, str] | None = None, extra_args: Iterable[str] = ()):
        self.n = n
        self.tls = tls
        self.extra_args = list(extra_args)
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.dir = Path(tempfile.mkdtemp(prefix="dtsd-etcd-", dir=_temp_root()))
        self.token = f"dtsd-test-{os.getpid()}-{self.dir.name}"
        self.members = [EtcdMember(self, i) for i in range(n)]

    def ssl_context(self):
        """For HTTP requests to the client port (None without TLS)."""
        if not self.tls:
            return None
        import ssl
        context = ssl.create_default_context(cafile=self.tls["ca"])
        context.load_cert_chain(self.tls["client_cert"], self.tls["client_key"])
        return context

    def api(self, path: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
        """POST to etcd's JSON gateway (`/v3/auth/user/add`, ...) on the first member: what
        etcdctl would do, without needing it."""
        request = urllib.request.Request(
            f"{self.members[0].client_url}/v3/{path}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json",
                     **({"Authorization": token} if token else {})})
        with urllib.request.urlopen(request, timeout=10, context=self.ssl_context()) as reply:
            return json.loads(reply.read() or b"{}")

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoint_list(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def endpoints(self) -> str:
        return ",".join(self.endpoint_list)

    def start(self, timeout: float = 30) -> "EtcdCluster":
        for attempt in range(5):
            for member in self.members:
                member.client_port, member.peer_port = free_port(), free_port()
                shutil.rmtree(member.data_dir, ignore_errors=True)
            for member in self.members:
                member.spawn()
            try:
                self.wait_healthy(timeout=timeout)
                return self
            except AssertionError:
                # A port taken in the meantime makes a member exit at once: try new ports.
                exited = any(m.proc is not None and m.proc.poll() is not None
                             for m in self.members)
                for member in self.members:
                    member.kill()
                if not exited or attempt == 4:
                    raise
        return self

    def wait_healthy(self, members: Iterable[int] | None = None, timeout: float = 30) -> None:
        """Every running member (or those named) reports a leader and serves reads."""
        chosen = [self.members[i] for i in members] if members is not None else \
            [m for m in self.members if m.running()]

        def all_healthy() -> bool:
            return all(m.healthy() for m in chosen)

        wait_for(all_healthy, timeout=timeout, interval=0.1,
                 message=lambda: "etcd members healthy: " + "; ".join(
                     f"{m.name}: {tail(m.logfile, 8)}" for m in chosen))

    def stop_member(self, i: int) -> None:
        self.members[i].stop()

    def kill_member(self, i: int) -> None:
        self.members[i].kill()

    def start_member(self, i: int, wait: bool = False, timeout: float = 30) -> None:
        """Start a stopped member again (same ports and data directory)."""
        member = self.members[i]
        if member.running():
            return
        member.spawn()
        wait_for(member.alive_http, timeout=timeout, interval=0.1,
                 message=lambda: f"etcd {member.name} to answer:\n{tail(member.logfile, 20)}")
        if wait:
            self.wait_healthy([i], timeout=timeout)

    def logs(self, lines: int = 40) -> str:
        return "\n".join(f"----- etcd {m.name} ({m.endpoint}) -----\n{tail(m.logfile, lines)}"
                         for m in self.members)

    def stop(self) -> None:
        for member in self.members:
            member.kill()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class EtcdServer(EtcdCluster):
    """A single etcd member: `.endpoint`, `.port`, `.endpoints`."""

    def __init__(self, **kwargs: Any):
        super().__init__(1, **kwargs)

    @property
    def port(self) -> int:
        return self.members[0].client_port

    @property
    def endpoint(self) -> str:
        return self.members[0].endpoint


# --- election contenders --------------------------------------------------------------------

class Contender:
    """A process holding one EtcdLeadership; its JSON lines are collected in `.lines`."""

    def __init__(self, node_id: str, endpoints: str | list[str], *, cluster: str = "test",
                 ttl: float = 2, workdir: Path | None = None, info: dict | None = None,
                 env: dict[str, str] | None = None, poll_interval: float | None = None,
                 security: dict[str, str] | None = None):
        """`security`: EtcdLeadership's user, password_file, tls_ca, tls_cert, tls_key."""
        self.node_id = node_id
        self.args = {"node_id": node_id, "cluster": cluster, "ttl": ttl, "info": info or {},
                     "endpoints": endpoints if isinstance(endpoints, str) else
                     ",".join(endpoints)}
        if poll_interval is not None:
            self.args["poll_interval"] = poll_interval
        if security:
            self.args["security"] = dict(security)
        self.ttl = ttl
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="dtsd-elect-"))
        self.logfile = self.workdir / f"{node_id}.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._log = None

    def start(self) -> "Contender":
        self._log = open(self.logfile, "ab")
        env = clean_env({"PYTHONPATH": str(REPO_ROOT),
                         "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python", **self.env})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.etcd_helpers", "contender", json.dumps(self.args)],
            cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name=f"read-{self.node_id}",
                                        daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            line["received"] = time.monotonic()
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def last(self) -> dict[str, Any] | None:
        with self._cond:
            return self.lines[-1] if self.lines else None

    def snapshot(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self.lines)

    def state_at(self, t: float) -> dict[str, Any] | None:
        """The last line stamped at or before `t`."""
        found = None
        for line in self.snapshot():
            if line["t"] <= t:
                found = line
            else:
                break
        return found

    def wait_line(self, predicate: Callable[[dict[str, Any]], bool], timeout: float,
                  after: float | None = None, what: str = "a line") -> dict[str, Any]:
        """The first line (stamped after `after`, if given) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        index = 0
        with self._cond:
            while True:
                while index < len(self.lines):
                    line = self.lines[index]
                    index += 1
                    if (after is None or line["t"] >= after) and predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"{self.node_id}: no {what} within {timeout:g}s; last line: "
                                  f"{self.lines[-1] if self.lines else None}\n"
                                  f"log tail:\n{tail(self.logfile, 30)}")
                if self.proc is not None and self.proc.poll() is not None \
                        and not self._reader.is_alive():
                    raise Timeout(f"{self.node_id} exited ({self.proc.returncode}) before {what}:"
                                  f"\n{tail(self.logfile, 30)}")
                self._cond.wait(min(remaining, 0.2))

    def command(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def members(self, timeout: float = 10) -> list[dict[str, Any]]:
        asked = time.monotonic()
        self.command("members")
        line = self.wait_line(lambda l: l.get("event") == "members", timeout, after=asked,
                              what="members reply")
        return line["members"]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.running():
            self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=15)

    def stop(self, timeout: float = 20) -> int | None:
        """Ask it to resign and exit; KILL if it does not within `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.command("stop")
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        return self.proc.returncode

    def dump_stacks(self) -> None:
        """Have the process write every thread's stack to its log (faulthandler)."""
        if self.running():
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                os.kill(self.proc.pid, signal.SIGUSR1)
                time.sleep(0.3)
            except OSError:
                pass

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(timeout=15)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<Contender {self.node_id} pid={getattr(self.proc, 'pid', None)}>"


# --- the contender process ------------------------------------------------------------------

def _contender_main(args: dict[str, Any]) -> int:
    import faulthandler
    import logging

    from dtsd.election import EtcdLeadership

    faulthandler.register(signal.SIGUSR1, all_threads=True)   # stacks to the log on demand

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03d %(threadName)s %(name)s "
                               "%(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("grpc", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out_lock = threading.Lock()
    commands: queue.Queue[str] = queue.Queue()
    leadership: EtcdLeadership | None = None

    def emit(event: str, **extra: Any) -> None:
        t = time.monotonic()            # read first: the state below is at least this fresh
        assert leadership is not None
        token = leadership.token()
        line = {"t": t, "event": event, "node": args["node_id"], "pid": os.getpid(),
                "leader": token is not None, "token": token,
                "seen_leader": leadership.leader(), "seen_token": leadership.leader_token(),
                "members": [m["node_id"] for m in leadership.members()],
                "poll_age": leadership.status()["last_poll_ago"], **extra}
        text = json.dumps(line)
        with out_lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def read_stdin() -> None:
        for raw in sys.stdin:
            commands.put(raw.strip())
        commands.put("stop")            # stdin closed: the test is gone

    kwargs = {}
    if "poll_interval" in args:
        kwargs["poll_interval"] = float(args["poll_interval"])
    kwargs.update(args.get("security") or {})
    leadership = EtcdLeadership(args["endpoints"], cluster=args["cluster"],
                                node_id=args["node_id"], ttl=float(args["ttl"]),
                                info=args.get("info") or {},
                                on_change=lambda leading: emit("change", became=leading),
                                **kwargs)
    leadership.start()
    threading.Thread(target=read_stdin, name="stdin", daemon=True).start()
    while True:
        emit("tick")
        try:
            command = commands.get(timeout=0.1)
        except queue.Empty:
            continue
        if command == "members":
            line = {"t": time.monotonic(), "event": "members", "node": args["node_id"],
                    "members": leadership.members()}
            with out_lock:
                sys.stdout.write(json.dumps(line) + "\n")
                sys.stdout.flush()
        elif command == "stop":
            started = time.monotonic()
            leadership.stop()
            emit("stopped", took=time.monotonic() - started)
            return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "contender":
        return _contender_main(json.loads(argv[1]))
    print("usage: python -m tests.etcd_helpers contender ARGS_JSON", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
