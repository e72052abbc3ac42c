"""A network namespace joined to the host by one veth pair, and services reachable from it.

Used by tests/test_partition.py to cut one dtsd node off the network without iptables, tc
or nft: the node runs inside its own namespace, whose only way out is a veth pair; taking
the host end down is a clean partition (packets are dropped, nothing is refused), and
bringing it up heals it.

- `Netns.create()`: namespace `dtsd-t-<hex>`, veth `dtsh<hex>` (host, 10.231.X.1/30) /
  `dtsn<hex>` (namespace, 10.231.X.2/30), `lo` up inside; X is random and checked to be
  unused on the host. `.cut()` / `.heal()` take the host end down / up. `.destroy()` kills
  whatever still runs in the namespace and deletes it (and so the veth). Nothing is routed
  anywhere but the /30 between the two ends.
- `DualPostgres`, `DualRedis`, `DualEtcdCluster`: the helpers' servers, listening on
  127.0.0.1 and on the host end's address as well (`*_for(host)` gives the URL to use
  from the namespace). The shared helper classes are subclassed, not changed.
- `NetnsDtsdMaster`: a DtsdMaster started with `ip netns exec NS python -m dtsd -c INI`,
  its API on the namespace's own loopback; its health check and `dtsctl` run in there.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from tests.etcd_helpers import EtcdCluster, EtcdMember
from tests.helpers import (REPO_ROOT, DtsdMaster, PostgresServer, RedisServer, clean_env,
                           tail, write_ini)

IP = shutil.which("ip") or "/usr/sbin/ip"


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([IP, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here (None: they can).

    Tries what `Netns.create()` does: a namespace, and a veth pair with one end moved into
    it. A container without CAP_NET_ADMIN may allow the first (it is a file and a mount)
    and refuse the second ("RTNETLINK answers: Operation not permitted")."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.path.exists(IP):
        return "iproute2 (`ip`) is not installed"
    tag = secrets.token_hex(3)
    probe, host_if, ns_if = f"dtsd-t-probe-{tag}", f"dtsp{tag}", f"dtsq{tag}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    try:
        for step in (("link", "add", host_if, "type", "veth", "peer", "name", ns_if),
                     ("link", "set", ns_if, "netns", probe)):
            done = _ip(*step, check=False)
            if done.returncode != 0:
                return (f"`ip {' '.join(step)}` fails here (CAP_NET_ADMIN missing?): "
                        f"{done.stderr.strip()}")
    finally:
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", probe, check=False)
    return None


def _used_octets() -> set[int]:
    text = _ip("-4", "-o", "addr", "show").stdout
    used = set()
    for word in text.split():
        if word.startswith("10.231."):
            try:
                used.add(int(word.split(".")[2]))
            except (IndexError, ValueError):
                pass
    return used


class Netns:
    def __init__(self, tag: str, octet: int):
        self.name = f"dtsd-t-{tag}"
        self.host_if = f"dtsh{tag}"
        self.ns_if = f"dtsn{tag}"
        self.octet = octet
        self.host_ip = f"10.231.{octet}.1"
        self.ns_ip = f"10.231.{octet}.2"
        self.created = False

    @classmethod
    def create(cls) -> "Netns":
        for _ in range(20):
            tag = secrets.token_hex(3)
            octet = secrets.randbelow(256)
            if octet in _used_octets() or os.path.exists(f"/run/netns/dtsd-t-{tag}"):
                continue
            ns = cls(tag, octet)
            try:
                ns._setup()
            except Exception:
                ns.destroy()
                raise
            return ns
        raise RuntimeError("no free 10.231.X.0/30 for a test namespace")

    def _setup(self) -> None:
        _ip("netns", "add", self.name)
        self.created = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _ip("-n", self.name, "link", "set", self.ns_if, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")

    def exec_prefix(self) -> list[str]:
        return [IP, "netns", "exec", self.name]

    def cut(self) -> None:
        """Partition: the host end goes down (the namespace end loses its carrier)."""
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def link_up(self) -> bool:
        text = _ip("-o", "link", "show", self.host_if).stdout
        return "LOWER_UP" in text

    def pids(self) -> list[int]:
        if not self.created:
            return []
        proc = _ip("netns", "pids", self.name, check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def kill_all(self, timeout: float = 15) -> None:
        """KILL every process still in the namespace (they are all the test's own)."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} linger in namespace {self.name}")
            time.sleep(0.1)

    def destroy(self) -> None:
        errors = []
        try:
            self.kill_all()
        except Exception as exc:  # noqa: BLE001 - delete the namespace all the same
            errors.append(exc)
        if self.created:
            _ip("netns", "del", self.name, check=False)
            self.created = False
        # The veth goes with the namespace once nothing holds it (asynchronously); remove
        # the host end if it lingers (a failed setup, say).
        for _ in range(50):
            if _ip("link", "show", self.host_if, check=False).returncode != 0:
                break
            time.sleep(0.1)
        else:
            _ip("link", "del", self.host_if, check=False)
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        return f"<Netns {self.name} {self.host_ip}<->{self.ns_ip}>"


# --- services on both addresses -------------------------------------------------------------

class DualPostgres(PostgresServer):
    """A private PostgreSQL listening on 127.0.0.1 and `extra_ip`, trusting the /30."""

    def __init__(self, extra_ip: str, settings: Mapping[str, str] | None = None):
        self.extra_ip = extra_ip
        super().__init__(settings)
        hba = self.dir / "pg_hba_test.conf"
        network = ".".join(extra_ip.split(".")[:3]) + ".0/30"
        hba.write_text("local all all trust\n"
                       "host all all 127.0.0.1/32 trust\n"
                       f"host all all {network} trust\n", encoding="utf-8")
        hba.chmod(0o644)
        # Later -c options win over the helper's listen_addresses=127.0.0.1.
        self.settings.update({"listen_addresses": f"127.0.0.1,{extra_ip}",
                              "hba_file": str(hba)})

    def dsn_for(self, host: str, dbname: str) -> str:
        return f"postgresql://postgres@{host}:{self.port}/{dbname}"


class DualRedis(RedisServer):
    """A private redis-server bound to 127.0.0.1 and `extra_ip`."""

    def __init__(self, extra_ip: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.extra_ip = extra_ip

    def url_for(self, host: str) -> str:
        return f"redis://{host}:{self.port}/0"

    def _spawn(self) -> None:
        self._log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", self.extra_ip,
             "--protected-mode", "no",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--daemonize", "no", "--unixsocket", "", "--loglevel", "notice"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.dir, env=clean_env())


class DualEtcdMember(EtcdMember):
    """Clients on 127.0.0.1 and the cluster's `extra_ip`; peers on loopback only."""

    def client_urls(self) -> str:
        return f"{self.client_url},http://{self.cluster.extra_ip}:{self.client_port}"


class DualEtcdCluster(EtcdCluster):
    def __init__(self, extra_ip: str, n: int = 3, **kwargs: Any):
        self.extra_ip = extra_ip
        super().__init__(n, **kwargs)
        self.members = [DualEtcdMember(self, i) for i in range(n)]

    def endpoints_for(self, host: str) -> str:
        return ",".join(f"{host}:{m.client_port}" for m in self.members)


# --- a master inside the namespace ----------------------------------------------------------

class NetnsDtsdMaster(DtsdMaster):
    """`ip netns exec NS python -m dtsd -c INI`; `ip netns exec` execs the command, so the
    Popen pid is the master's, heading its own session like the helper's masters.

    Its API listens on 127.0.0.1 *inside* the namespace (a loopback address needs no
    tokens or TLS, and nothing outside can reach it); the health check and `dtsctl` run
    in the namespace too."""

    def __init__(self, netns: Netns, workdir: Path, node_id: str,
                 sections: Mapping[str, Mapping[str, Any]]):
        super().__init__(workdir, node_id, sections)
        self.netns = netns

    def start(self, timeout: float = 30) -> "NetnsDtsdMaster":
        write_ini(self.ini_path, self.sections)
        self._log_handle = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.netns.exec_prefix(), sys.executable, "-m", "dtsd", "-c", str(self.ini_path)],
            cwd=REPO_ROOT, env=self.env(), stdin=subprocess.DEVNULL,
            stdout=self._log_handle, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = 30, **_: Any) -> None:
        """One probe process in the namespace polls the health service until SERVING."""
        probe = subprocess.Popen(
            [*self.netns.exec_prefix(), sys.executable, "-c", _HEALTH_PROBE, self.address,
             str(timeout)],
            cwd=REPO_ROOT, env=self.env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout + 10
        try:
            while probe.poll() is None:
                if self.proc is None or self.proc.poll() is not None:
                    code = None if self.proc is None else self.proc.returncode
                    raise AssertionError(f"dtsd {self.node_id} exited with {code} before "
                                         f"serving:\n{self.log()[-4000:]}")
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            if probe.poll() is None:
                probe.kill()
            _, err = probe.communicate(timeout=10)
        if probe.returncode != 0:
            raise AssertionError(f"dtsd {self.node_id} did not serve health on {self.address} "
                                 f"in {self.netns.name} within {timeout:g}s "
                                 f"({err.decode(errors='replace').strip()[-500:]}); log tail:\n"
                                 f"{tail(self.log_path, 40)}")

    def dtsctl(self, *args: str, input: str | None = None, timeout: float = 60,
               env: Mapping[str, str] | None = None, **_: Any
               ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.netns.exec_prefix(), sys.executable, "-m", "dtsd.cli",
             "--servers", self.address, *args],
            input=input, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
            env=clean_env({"PYTHONPATH": str(REPO_ROOT), **(env or {})}),
            stdin=None if input is not None else subprocess.DEVNULL)


_HEALTH_PROBE = """
import sys, time
from dtsd.health import health_pb2
from tests.helpers import health_status
address, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
last = None
while time.monotonic() < deadline:
    try:
        if health_status(address) == health_pb2.HealthCheckResponse.SERVING:
            sys.exit(0)
    except Exception as exc:
        last = exc
    time.sleep(0.1)
sys.exit(f"not serving: {last!r}")
"""


__all__ = ["Netns", "DualPostgres", "DualRedis", "DualEtcdCluster", "NetnsDtsdMaster",
           "netns_unavailable"]
