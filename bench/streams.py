#!/usr/bin/python3
"""Streams benchmark: unary latency while 1,000 WatchJob streams and 3,000 idle connections are open.

Runs a real dtsd (2 server children, 1 worker) over a private PostgreSQL and Redis,
submits one delayed job per stream, and measures GetJob, ListJobs (20 per page) and
ClusterStatus one after another from one client: first on a quiet server, then with
`--streams` WatchJob streams (one per job, spread over 10 connections) and `--idle` idle
HTTP/2 connections (they answer the server's SETTINGS and PINGs, and send nothing else).

    /usr/bin/python3 bench/streams.py [--streams 1000] [--idle 3000] [--calls 300] [--runs 3]

Every stream comes from 127.0.0.1, so the run sets `[server] max_streams_per_peer` to
`--streams` (the default, 100, would refuse most of them: that is the per-peer cap doing
its job), and `[server] idle_timeout` to an hour, so the idle connections stay for the
whole measurement. A checkout without those options (before the stream caps) runs with
its defaults. A unary call gets 5 s; one that runs out counts as 5,000 ms, and a run stops
after 10 of them (a starved server would otherwise take 25 minutes per run).
`--streams 0` or `--idle 0` leave one load out. It is a benchmark, not a test: it prints what it measures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import selectors
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

import pipeline  # noqa: E402  (bench/ is this script's own directory)
import grpc.aio  # noqa: E402

from dtsd import config  # noqa: E402
from dtsd.dtsdpb import pb, pb_grpc  # noqa: E402
from tests.helpers import DtsdMaster, PostgresServer, RedisServer, free_port  # noqa: E402

CALL_TIMEOUT = 5.0
GIVE_UP = 10
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
STREAM_CONNECTIONS = 10


def machine() -> str:
    return f"{pipeline.machine()}, grpcio {grpc.__version__}"


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


# --- idle connections ------------------------------------------------------------------------

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SETTINGS, _PING, _ACK = 0x4, 0x6, 0x1


def _frame(kind: int, flags: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", 0) + payload


class IdleConnections:
    """`count` HTTP/2 connections that do nothing but answer SETTINGS and PINGs, as a
    well-behaved idle client would; one thread serves them all."""

    def __init__(self, port: int, count: int):
        self.selector = selectors.DefaultSelector()
        self.buffers: dict[socket.socket, bytes] = {}
        self.closed = 0
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(_PREFACE + _frame(_SETTINGS, 0))
            sock.setblocking(False)
            self.buffers[sock] = b""
            self.selector.register(sock, selectors.EVENT_READ)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            for key, _ in self.selector.select(timeout=0.5):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(sock)
                    sock.close()
                    del self.buffers[sock]
                    self.closed += 1
                    continue
                buffer = self.buffers[sock] + data
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    kind, flags, payload = buffer[3], buffer[4], buffer[9:9 + length]
                    buffer = buffer[9 + length:]
                    if kind == _SETTINGS and not flags & _ACK:
                        sock.sendall(_frame(_SETTINGS, _ACK))
                    elif kind == _PING and not flags & _ACK:
                        sock.sendall(_frame(_PING, _ACK, payload))
                self.buffers[sock] = buffer

    @property
    def open(self) -> int:
        return len(self.buffers)

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        for sock in list(self.buffers):
            sock.close()


# --- streams ------------------------------------------------------------------------------------

class Streams:
    """WatchJob streams on `STREAM_CONNECTIONS` aio channels, in a thread with its own loop."""

    def __init__(self, address: str, job_ids: list[str], wait: float = 60.0):
        self.loop = asyncio.new_event_loop()
        self.outcomes: dict[str, int] = {}
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(address, job_ids, wait, ready),
                                       daemon=True)
        self.thread.start()
        ready.wait()

    def _run(self, address, job_ids, wait, ready) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._open(address, job_ids, wait))
        ready.set()
        self.loop.run_forever()

    async def _open(self, address, job_ids, wait) -> None:
        self.channels = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION)
                         for _ in range(STREAM_CONNECTIONS)]
        stubs = [pb_grpc.SchedulerStub(channel) for channel in self.channels]
        self.calls = [stubs[i % len(stubs)].WatchJob(pb.WatchJobRequest(id=job_id))
                      for i, job_id in enumerate(job_ids)]

        async def first(call) -> str:
            try:
                await call.read()
                return "open"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        tasks = [asyncio.ensure_future(first(call)) for call in self.calls]
        await asyncio.wait(tasks, timeout=wait)
        for task in tasks:
            outcome = task.result() if task.done() else "no answer"
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def close(self) -> None:
        async def close_all():
            for channel in self.channels:
                await channel.close()
        asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


# --- unary latency -----------------------------------------------------------------------------

def measure(stubs, job_ids: list[str], calls: int) -> tuple[float, float, int]:
    """(p50 ms, p99 ms, calls that failed) over `calls` unary calls, one after another.
    After GIVE_UP failures the run stops: the server is starved, and each costs 5 s."""
    latencies, failed = [], 0
    for i in range(calls):
        if failed >= GIVE_UP:
            break
        api = stubs[i % len(stubs)]
        method = i % 3
        started = time.monotonic()
        try:
            if method == 0:
                api.GetJob(pb.GetJobRequest(id=job_ids[i % len(job_ids)]), timeout=CALL_TIMEOUT)
            elif method == 1:
                api.ListJobs(pb.ListJobsRequest(page_size=20), timeout=CALL_TIMEOUT)
            else:
                api.ClusterStatus(pb.ClusterStatusRequest(), timeout=CALL_TIMEOUT)
            latencies.append((time.monotonic() - started) * 1000)
        except grpc.RpcError:
            failed += 1
            latencies.append(CALL_TIMEOUT * 1000)
    latencies.sort()
    return (latencies[len(latencies) // 2],
            latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], failed)


def phase(name: str, stubs, job_ids, calls: int, runs: int) -> None:
    p50s, p99s = [], []
    for run in range(runs):
        p50, p99, failed = measure(stubs, job_ids, calls)
        p50s.append(p50)
        p99s.append(p99)
        print(f"  {name}, run {run + 1}: {calls} unary calls: p50 {p50:.1f} ms, p99 {p99:.1f} ms"
              + (f"; {failed} got no answer within {CALL_TIMEOUT:.0f} s"
                 + (" (run stopped there)" if failed >= GIVE_UP else "") if failed else ""))
    print(f"{name}: median p50 {statistics.median(p50s):.1f} ms, "
          f"median p99 {statistics.median(p99s):.1f} ms")


def server_children(runtime_dir: Path) -> list[int]:
    record = json.loads((runtime_dir / "node.json").read_text())
    return [c["pid"] for c in record["children"] if c["role"] == "server" and c.get("pid")]


def footprint(pids: list[int], seconds: float = 10.0) -> str:
    """CPU (% of a core, over `seconds`) and RSS of each server child."""
    def ticks(pid: int) -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def rss(pid: int) -> str:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return f"{int(line.split()[1]) / 1024:.0f} MB"
        return "?"

    def threads(pid: int) -> int:
        return len(os.listdir(f"/proc/{pid}/task"))

    before = {pid: ticks(pid) for pid in pids}
    time.sleep(seconds)
    hz = os.sysconf("SC_CLK_TCK")
    return "; ".join(f"pid {pid}: {(ticks(pid) - before[pid]) / hz / seconds * 100:.1f} % CPU, "
                     f"RSS {rss(pid)}, {threads(pid)} threads" for pid in pids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=3000)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--servers", type=int, default=2)
    args = parser.parse_args()
    raise_nofile(args.idle + args.streams + 1000)

    known = {(option.section, option.key) for option in config.OPTIONS}
    server = {"listen": f"127.0.0.1:{free_port()}", "processes": args.servers}
    for key, value in (("max_streams_per_peer", max(100, args.streams)), ("idle_timeout", "1h")):
        if ("server", key) in known:
            server[key] = value
    print(f"machine: {machine()}")
    print(f"dtsd: {args.servers} servers, 1 worker; [server] {server}")
    pg = PostgresServer().start()
    redis = RedisServer().start()
    workdir = Path(tempfile.mkdtemp(prefix="dtsd-bench-"))
    (workdir / "run").mkdir(parents=True)
    master = DtsdMaster(workdir, "bench", {
        "dtsd": {"node_id": "bench", "runtime_dir": str(workdir / "run"),
                 "log_level": os.environ.get("BENCH_LOG", "warning")},
        "server": server,
        "worker": {"processes": 1},
        "postgres": {"dsn": pg.create_database("bench")},
        "redis": {"url": redis.url},
    })
    idle = streams = None
    channels = [grpc.insecure_channel(master.address, OWN_CONNECTION) for _ in range(4)]
    try:
        master.start()
        stubs = [pb_grpc.SchedulerStub(channel) for channel in channels]
        later = (datetime.now(timezone.utc) + timedelta(hours=2)).replace(tzinfo=None)
        job_ids: list[str] = []
        while len(job_ids) < max(1, args.streams):
            specs = []
            for _ in range(min(500, max(1, args.streams) - len(job_ids))):
                spec = pb.JobSpec(command="true")
                spec.run_at.FromDatetime(later)
                specs.append(spec)
            job_ids += [job.id for job in stubs[0].SubmitJobs(
                pb.SubmitJobsRequest(jobs=specs), timeout=60).jobs]
        measure(stubs, job_ids, 60)          # warm up: connections, plans
        pids = server_children(workdir / "run")
        print(f"server children, quiet: {footprint(pids, 5.0)}")
        phase("quiet server", stubs, job_ids, args.calls, args.runs)

        started = time.monotonic()
        idle = IdleConnections(master.port, args.idle)
        print(f"{idle.open} idle connections open ({time.monotonic() - started:.1f} s)")
        if args.streams:
            started = time.monotonic()
            streams = Streams(master.address, job_ids[:args.streams])
            print(f"{args.streams} WatchJob streams on {STREAM_CONNECTIONS} connections: "
                  f"{streams.outcomes} ({time.monotonic() - started:.1f} s)")
        print(f"server children under that load, no calls: {footprint(pids)}")
        phase(f"{args.streams} streams + {args.idle} idle connections", stubs, job_ids,
              args.calls, args.runs)
        print(f"idle connections still open: {idle.open} of {args.idle}")
    finally:
        if streams is not None:
            streams.close()
        if idle is not None:
            idle.close()
        for channel in channels:
            channel.close()
        master.stop()
        if os.environ.get("BENCH_LOG"):
            print(master.log()[-20000:])
        redis.cleanup()
        pg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
