"""Streams never starve unary calls: caps, the shared watch hub, idle connections.

Against a real dtsd (one server child, so that every connection of a test meets the same
counts). Streams are opened many to a channel, and the load test uses grpc.aio, so the
test itself holds hundreds of streams without a thread each.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import resource
import signal
import socket
import struct
import time
from concurrent import futures
from datetime import datetime, timedelta, timezone

import grpc
import grpc.aio
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from dtsd import auth, streams
from dtsd.dtsdpb import pb, pb_grpc
from dtsd.health import health_pb2, health_pb2_grpc
from dtsd.reflection import reflection_pb2, reflection_pb2_grpc
from tests.helpers import free_port, wait_for

ONE_SERVER = {"processes": 1}
NO_WORKERS = {"processes": 0}
FAST = {"worker": {"kill_grace": "1s"}, "dtsd": {"housekeeping_interval": "200ms"}}
#: A channel with its own connection (grpc shares one between channels of the same target).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def later_job_time() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime((datetime.now(timezone.utc) + timedelta(hours=1)).replace(tzinfo=None))
    return stamp


def later_job(api, metadata=None) -> str:
    """A job that stays PENDING for an hour: something to watch that never changes."""
    spec = pb.JobSpec(command="true", run_at=later_job_time())
    return api.SubmitJob(pb.SubmitJobRequest(job=spec), timeout=10, metadata=metadata).id


def first(call):
    """The first message of a stream, or the RpcError that ended it."""
    try:
        return next(call)
    except grpc.RpcError as exc:
        return exc


def refused(outcome, option: str) -> bool:
    return (isinstance(outcome, grpc.RpcError)
            and outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and option in outcome.details())


def accepted(outcome) -> bool:
    return not isinstance(outcome, grpc.RpcError)


class Reflection:
    """A reflection stream held open: one question answered, then silence until close()."""

    def __init__(self, channel):
        self.requests: queue.Queue = queue.Queue()
        self.requests.put(reflection_pb2.ServerReflectionRequest(list_services="*"))
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        self.call = stub.ServerReflectionInfo(iter(self.requests.get, None), timeout=60)

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


def watch(api, job_id: str, **kwargs):
    return api.WatchJob(pb.WatchJobRequest(id=job_id), **kwargs)


def health_watch(channel):
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                     timeout=60)


# --- pure logic -------------------------------------------------------------------------------

@pytest.mark.parametrize("peer, key", [
    ("ipv4:10.0.0.7:51234", "10.0.0.7"),
    ("ipv6:[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"),
    ("ipv6:[2001:db8:1:2:ffff::9]:443", "2001:db8:1:2::/64"),   # same /64: same peer
    ("ipv6:[::ffff:10.0.0.7]:51234", "10.0.0.7"),
    ("ipv6:[::1]:5", "::/64"),
    ("unix:/run/dtsd/api.sock", "unix"),
    ("unix:", "unix"),
    ("ipv4:not-an-address:1", "ipv4:not-an-address:1"),
    ("", "unknown"),
])
def test_a_peer_is_its_address(peer, key):
    assert streams.peer_key(peer) == key


def test_the_counts_refuse_each_cap_and_every_release_counts_once():
    slots = streams.StreamSlots(streams.Caps(total=6, per_peer=3, public_total=3,
                                             public_per_peer=2))
    a = [slots.acquire("a", public=False) for _ in range(3)]
    with pytest.raises(streams.Refused, match=r"peer a .*max_streams_per_peer = 3"):
        slots.acquire("a", public=False)
    b1, _ = slots.acquire("b", public=True), slots.acquire("b", public=True)
    with pytest.raises(streams.Refused, match=r"peer b .*at most 2 per peer"):
        slots.acquire("b", public=True)
    slots.acquire("c", public=True)
    with pytest.raises(streams.Refused, match=r"\[server\] max_streams = 6"):
        slots.acquire("d", public=False)
    for slot in a:
        slot.release()
    with pytest.raises(streams.Refused, match=r"\[server\] max_public_streams = 3"):
        slots.acquire("d", public=True)
    b1.release()
    b1.release()                    # twice: counted once
    slots.acquire("d", public=True)
    slots.acquire("d", public=False)
    assert slots.counts() == {"total": 4, "public": 3, "peers": 3, "refused": 4}
    assert streams.is_public("/grpc.health.v1.Health/Watch")
    assert streams.is_public("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not streams.is_public("/dtsd.v1.Scheduler/WatchJob")


# --- the caps on a real server ------------------------------------------------------------------

def test_streams_beyond_the_cap_of_a_server_are_refused_at_once(dtsd_factory):
    master = dtsd_factory(server={**ONE_SERVER, "max_streams": 4, "max_streams_per_peer": 100},
                          worker=NO_WORKERS)
    with grpc.insecure_channel(master.address) as channel:
        api = pb_grpc.SchedulerStub(channel)
        job_id = later_job(api)
        held = [watch(api, job_id, timeout=60) for _ in range(4)]
        assert all(accepted(first(call)) for call in held)
        started = time.monotonic()
        extra = first(watch(api, job_id, timeout=60))
        assert refused(extra, "[server] max_streams = 4"), extra
        assert time.monotonic() - started < 5
        # Public streams count against the same cap.
        assert refused(first(health_watch(channel)), "[server] max_streams = 4")
        assert api.GetJob(pb.GetJobRequest(id=job_id), timeout=5).id == job_id
        for call in held:
            call.cancel()


def two_peers(port: int) -> dict:
    """Listen on [::] (dual stack), so that 127.0.0.1 and ::1 are two peers of one child.
    Not loopback, hence `insecure`: the test's own server, for the length of a test."""
    return {"listen": f"[::]:{port}", "insecure": "true"}


def test_each_peer_has_its_own_allowance(dtsd_factory):
    port = free_port()
    master = dtsd_factory(server={**ONE_SERVER, **two_peers(port),
                                  "max_streams": 10, "max_streams_per_peer": 3},
                          worker=NO_WORKERS)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as v4, \
            grpc.insecure_channel(f"[::1]:{port}") as v6:
        api4, api6 = pb_grpc.SchedulerStub(v4), pb_grpc.SchedulerStub(v6)
        job_id = later_job(api4)
        mine = [watch(api4, job_id, timeout=60) for _ in range(3)]
        assert all(accepted(first(call)) for call in mine)
        extra = first(watch(api4, job_id, timeout=60))
        assert refused(extra, "[server] max_streams_per_peer = 3"), extra
        assert "peer 127.0.0.1 " in extra.details()
        theirs = [watch(api6, job_id, timeout=60) for _ in range(3)]
        assert all(accepted(first(call)) for call in theirs)
        assert refused(first(watch(api6, job_id, timeout=60)), "max_streams_per_peer = 3")
        for call in mine + theirs:
            call.cancel()


def test_streams_without_credentials_are_capped_hard(dtsd_factory):
    """Health Watch and reflection need no token: a few per peer, a few in all."""
    port = free_port()
    master = dtsd_factory(server={**ONE_SERVER, **two_peers(port), "max_public_streams": 6},
                          worker=NO_WORKERS)
    reflections = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as v4, \
            grpc.insecure_channel(f"[::1]:{port}") as v6:
        try:
            held = [health_watch(v4) for _ in range(3)]
            assert all(accepted(first(call)) for call in held)
            reflections.append(Reflection(v4))
            assert accepted(first(reflections[-1].call))
            over = first(health_watch(v4))                          # a 5th from one peer
            assert refused(over, "at most 4 per peer"), over
            reflections.append(Reflection(v4))
            assert refused(first(reflections[-1].call), "at most 4 per peer")
            others = [health_watch(v6) for _ in range(2)]             # 6 in all
            assert all(accepted(first(call)) for call in others)
            over = first(health_watch(v6))
            assert refused(over, "[server] max_public_streams = 6"), over
            # Streams that need credentials have their own allowance.
            api = pb_grpc.SchedulerStub(v4)
            assert accepted(first(watch(api, later_job(api), timeout=60)))
            for call in held + others:
                call.cancel()
        finally:
            for stream in reflections:
                stream.close()


def test_a_call_refused_for_its_credentials_takes_no_slot(dtsd_factory, tmp_path):
    """With tokens, a WatchJob without one is UNAUTHENTICATED before it is counted: a
    stranger cannot use up the slots of the token holders. Streams that need no token
    (health, reflection) count against the same cap."""
    tokens = tmp_path / "tokens"
    secret = auth.add_token(str(tokens), "watcher", "admin", lock_dir=str(tmp_path))
    master = dtsd_factory(server={**ONE_SERVER, "tokens_file": str(tokens), "max_streams": 2},
                          worker=NO_WORKERS)
    token = (("authorization", f"Bearer {secret}"),)
    with grpc.insecure_channel(master.address) as channel:
        api = pb_grpc.SchedulerStub(channel)
        job_id = later_job(api, token)
        strangers = [first(watch(api, job_id, timeout=60)) for _ in range(10)]
        assert all(isinstance(outcome, grpc.RpcError)
                   and outcome.code() == grpc.StatusCode.UNAUTHENTICATED for outcome in strangers)
        held = [watch(api, job_id, timeout=60, metadata=token) for _ in range(2)]
        assert all(accepted(first(call)) for call in held)
        assert refused(first(watch(api, job_id, timeout=60, metadata=token)), "max_streams = 2")
        assert refused(first(health_watch(channel)), "max_streams = 2")
        for call in held:
            call.cancel()


def test_a_slot_is_free_again_however_its_stream_ends(dtsd_factory):
    master = dtsd_factory(FAST, server={**ONE_SERVER, "max_streams": 2})
    with grpc.insecure_channel(master.address) as channel:
        api = pb_grpc.SchedulerStub(channel)
        job_id = later_job(api)

        def full() -> bool:
            return refused(first(watch(api, job_id, timeout=60)), "max_streams = 2")

        def take_slot(stub=api, job=job_id, timeout=60.0):
            """A stream that got a slot, or None while every slot is taken."""
            call = watch(stub, job, timeout=timeout)
            return call if accepted(first(call)) else None

        kept, cancelled = take_slot(), take_slot()
        assert kept and cancelled and full()
        cancelled.cancel()                                          # the client cancels
        replacement = wait_for(take_slot, timeout=10, message="a slot after a cancel")
        assert full()

        replacement.cancel()
        expiring = wait_for(lambda: take_slot(timeout=2.0), timeout=10)
        assert full()                                               # the deadline passes
        replacement = wait_for(take_slot, timeout=10, message="a slot after a deadline")
        assert full()

        with grpc.insecure_channel(master.address, OWN_CONNECTION) as other:  # the connection goes
            replacement.cancel()
            dropped = wait_for(lambda: take_slot(pb_grpc.SchedulerStub(other)), timeout=10)
            assert full()
        replacement = wait_for(take_slot, timeout=10, message="a slot after a closed connection")
        assert full()

        replacement.cancel()
        quick = api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="sleep 1")),
                              timeout=10).id
        ends = wait_for(lambda: take_slot(job=quick), timeout=10)   # the job ends the stream
        assert full()
        assert [event.status for event in ends][-1] == pb.SUCCEEDED
        wait_for(take_slot, timeout=10, message="a slot after the stream ended")
        assert expiring.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert dropped.code() == grpc.StatusCode.CANCELLED
        kept.cancel()


def test_streams_end_when_the_server_stops(dtsd_factory):
    master = dtsd_factory(server={**ONE_SERVER, "stopwaitsecs": "20s"}, worker=NO_WORKERS)
    with grpc.insecure_channel(master.address) as channel:
        api = pb_grpc.SchedulerStub(channel)
        calls = [watch(api, later_job(api), timeout=60) for _ in range(5)]
        assert all(accepted(first(call)) for call in calls)
        started = time.monotonic()
        master.signal(signal.SIGTERM)
        for call in calls:
            assert list(call) == []         # the stream ends, without an error
        assert time.monotonic() - started < 10, "WatchJob streams waited for the grace"
        assert master.proc.wait(timeout=30) == 0


# --- unary calls under many streams --------------------------------------------------------------

async def _hold_streams(address: str, job_id: str, watches: int, public: int):
    """Open `watches` WatchJob streams on one aio channel, and `public` health Watch and
    `public` reflection streams on another; returns (channels, kinds, outcome per call).

    Two connections: one carries at most `max_streams_per_peer + threads` streams at once
    ([server] options); HTTP/2 itself refuses more. The reflection streams stay idle (no
    request), as in the finding: an accepted one says nothing, a refused one ends with
    its status. So this returns once every WatchJob and health stream answered and as
    many reflection streams ended as the per-peer allowance leaves no room for, or after
    15 s; an unfinished reflection stream counts as open."""
    channels = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(2)]
    api = pb_grpc.SchedulerStub(channels[0])
    health = health_pb2_grpc.HealthStub(channels[1])
    reflection = reflection_pb2_grpc.ServerReflectionStub(channels[1])
    calls = [("watch", api.WatchJob(pb.WatchJobRequest(id=job_id))) for _ in range(watches)]
    for _ in range(public):
        calls.append(("health", health.Watch(health_pb2.HealthCheckRequest(service=""))))
        calls.append(("reflection", reflection.ServerReflectionInfo()))

    async def first_message(call):
        try:
            await call.read()
            return "open"
        except grpc.aio.AioRpcError:
            return await call.code()

    tasks = [asyncio.ensure_future(call.code() if kind == "reflection" else first_message(call))
             for kind, call in calls]

    def settled() -> bool:
        answering = [task for (kind, _), task in zip(calls, tasks) if kind != "reflection"]
        if not all(task.done() for task in answering):
            return False
        public_open = sum(task.result() == "open" for (kind, _), task in zip(calls, tasks)
                          if kind == "health")
        ended = sum(task.done() for (kind, _), task in zip(calls, tasks) if kind == "reflection")
        return ended >= public - max(0, streams.PUBLIC_STREAMS_PER_PEER - public_open)

    deadline = time.monotonic() + 15
    while not settled() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    outcomes = [task.result() if task.done() else ("open" if kind == "reflection" else "no answer")
                for (kind, _), task in zip(calls, tasks)]
    return channels, [kind for kind, _ in calls], outcomes


async def _close(channels) -> None:
    for channel in channels:
        await channel.close()


def test_unary_calls_keep_their_threads_under_hundreds_of_streams(dtsd_factory):
    """The finding: 200 health watches, or 200 idle reflection streams, or many WatchJob
    streams held every API thread, and an admin's calls timed out. With the defaults
    ([server] threads 32, max_streams 1000, max_streams_per_peer 100) they all answer."""
    master = dtsd_factory(server=ONE_SERVER, worker=NO_WORKERS)
    loop = asyncio.new_event_loop()
    with grpc.insecure_channel(master.address) as admin:
        api = pb_grpc.SchedulerStub(admin)
        job_id = later_job(api)
        channels, kinds, outcomes = loop.run_until_complete(
            _hold_streams(master.address, job_id, watches=90, public=60))
        try:
            slowest, failures = 0.0, []
            for _ in range(10):
                for name, call in (("GetJob", lambda: api.GetJob(pb.GetJobRequest(id=job_id),
                                                                 timeout=5)),
                                   ("ListJobs", lambda: api.ListJobs(pb.ListJobsRequest(),
                                                                     timeout=5)),
                                   ("ClusterStatus", lambda: api.ClusterStatus(
                                       pb.ClusterStatusRequest(), timeout=5))):
                    started = time.monotonic()
                    try:
                        call()
                    except grpc.RpcError as exc:
                        failures.append(f"{name}: {exc.code()}")
                    slowest = max(slowest, time.monotonic() - started)
                if failures:
                    break
            assert not failures, failures
            assert slowest < 2.0, f"slowest unary call took {slowest:.2f}s"
            opened = [kind for kind, outcome in zip(kinds, outcomes) if outcome == "open"]
            others = collections.Counter(f"{kind}: {outcome}" for kind, outcome
                                         in zip(kinds, outcomes)
                                         if outcome not in ("open", grpc.StatusCode.RESOURCE_EXHAUSTED))
            assert not others, others
            assert opened.count("watch") == 90
            assert opened.count("health") + opened.count("reflection") == 4   # per peer
        finally:
            loop.run_until_complete(_close(channels))
            loop.close()


# --- the shared watch hub ----------------------------------------------------------------------

def _channel_counts(redis_server) -> list[int]:
    """How many channels each pub/sub connection of the server holds. (The coordinator's
    schedule subscription is one of them, and may connect at any moment after the start.)"""
    client = redis_server.client()
    try:
        return sorted(int(entry["sub"]) for entry in client.client_list(_type="pubsub"))
    finally:
        client.close()


def test_many_watch_streams_share_one_redis_subscription(dtsd_factory, redis):
    master = dtsd_factory(server=ONE_SERVER, worker=NO_WORKERS)
    with grpc.insecure_channel(master.address) as channel:
        api = pb_grpc.SchedulerStub(channel)
        calls = [watch(api, later_job(api), timeout=60) for _ in range(20)]
        assert all(accepted(first(call)) for call in calls)
        # One connection holds the 20 jobs' channels; none other holds more than the
        # coordinator's one (a connection per stream would be 20 connections of one).
        counts = _channel_counts(redis)
        assert counts[-1] == 20 and all(n <= 1 for n in counts[:-1]), counts
        for call in calls:
            call.cancel()


def test_two_watchers_of_one_job_each_get_every_byte_once(dtsd_factory):
    master = dtsd_factory(FAST, server=ONE_SERVER)
    with grpc.insecure_channel(master.address) as channel:
        api = pb_grpc.SchedulerStub(channel)
        job_id = api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(
            command="for i in 1 2 3 4 5 6; do echo line$i; sleep 0.3; done", max_retries=0)),
            timeout=10).id
        leaver = watch(api, job_id, timeout=60)
        stayer = watch(api, job_id, timeout=60)
        assert accepted(first(leaver))
        leaver.cancel()             # the channel stays subscribed for the other one
        output = b""
        states = []
        for event in stayer:
            if event.kind == pb.JobEvent.OUTPUT:
                assert event.offset == len(output)
                output += event.output
            else:
                states.append(event.status)
        assert output == b"".join(b"line%d\n" % i for i in range(1, 7))
        assert states[-1] == pb.SUCCEEDED


def test_a_watcher_survives_a_redis_restart(dtsd_factory, redis, tmp_path):
    """The subscription is lost with Redis: the stream resubscribes, rereads the job and
    its live output, and still sends each byte once and the final state."""
    master = dtsd_factory(FAST, server=ONE_SERVER)
    marker = tmp_path / "go"
    with grpc.insecure_channel(master.address) as channel:
        api = pb_grpc.SchedulerStub(channel)
        job_id = api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(
            command=f"echo before; while [ ! -e {marker} ]; do sleep 0.1; done; echo after",
            max_retries=0)), timeout=10).id
        output, states = b"", []
        events = watch(api, job_id, timeout=90)
        for event in events:
            if event.kind == pb.JobEvent.OUTPUT:
                assert event.offset == len(output)
                output += event.output
                if output == b"before\n":
                    break
        redis.stop()
        redis.start()
        marker.touch()
        for event in events:
            if event.kind == pb.JobEvent.OUTPUT:
                assert event.offset == len(output)
                output += event.output
            else:
                states.append(event.status)
        assert output == b"before\nafter\n"
        assert states[-1] == pb.SUCCEEDED


# --- idle connections -----------------------------------------------------------------------------

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SETTINGS = struct.pack(">I", 0)[1:] + bytes([0x4, 0x0]) + struct.pack(">I", 0)   # empty
_GOAWAY = 0x7
_SETTINGS_FRAME = 0x4


def _frames(data: bytes):
    """HTTP/2 frame types in `data` (as far as it holds whole frames)."""
    types, at = [], 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at:at + 3], "big")
        types.append(data[at + 3])
        at += 9 + length
    return types


def test_an_idle_connection_is_closed_after_the_idle_timeout(dtsd_factory):
    master = dtsd_factory(server={**ONE_SERVER, "idle_timeout": "1s"}, worker=NO_WORKERS)
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=20)
    try:
        sock.sendall(_PREFACE + _SETTINGS)
        started, received = time.monotonic(), b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except socket.timeout:
            pytest.fail("the server kept an idle connection open for 20 s (idle_timeout 1s)")
        closed_after = time.monotonic() - started
    finally:
        sock.close()
    assert _GOAWAY in _frames(received), _frames(received)
    assert 0.5 < closed_after < 10, closed_after


def test_a_client_reconnects_after_the_idle_timeout_and_open_streams_stay(dtsd_factory):
    master = dtsd_factory(FAST, server={**ONE_SERVER, "idle_timeout": "1s"})
    with grpc.insecure_channel(master.address, OWN_CONNECTION) as channel, \
            grpc.insecure_channel(master.address, OWN_CONNECTION) as idle:
        api, idle_api = pb_grpc.SchedulerStub(channel), pb_grpc.SchedulerStub(idle)
        states: list = []
        idle.subscribe(states.append, try_to_connect=False)
        idle_api.ListJobs(pb.ListJobsRequest(page_size=1), timeout=10)
        job_id = api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(
            command="echo early; sleep 3; echo late", max_retries=0)), timeout=10).id
        stream = watch(api, job_id, timeout=60)
        # The idle channel's connection goes away (GOAWAY, then IDLE) ...
        wait_for(lambda: states and states[-1] == grpc.ChannelConnectivity.IDLE, timeout=15,
                 message="the idle channel to be disconnected")
        # ... and comes back on the next call.
        assert idle_api.ListJobs(pb.ListJobsRequest(page_size=1), timeout=10)
        # The watch, on a connection with a call in flight, ran past the idle time.
        output = b"".join(e.output for e in stream if e.kind == pb.JobEvent.OUTPUT)
        assert output == b"early\nlate\n"


def test_a_thousand_idle_connections_leave_unary_calls_working(dtsd_factory):
    """systemd starts a service with a soft limit of 1,024 open files, and every client
    connection is one: the server child raises its own limit, and its PostgreSQL
    connections work with descriptors past 1023 (Debian's psycopg 3.1.7 waited on them
    with select(), which cannot). The master starts here with that soft limit too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= 4096, "the test needs a hard limit of open files of 4096 or more"
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        master = dtsd_factory(server=ONE_SERVER, worker=NO_WORKERS)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    idle = []
    try:
        for _ in range(1200):
            sock = socket.create_connection(("127.0.0.1", master.port), timeout=20)
            sock.sendall(_PREFACE + _SETTINGS)
            idle.append(sock)
        for sock in idle:       # each one accepted: the server's SETTINGS arrive
            assert _SETTINGS_FRAME in _frames(sock.recv(65536))
        with grpc.insecure_channel(master.address, OWN_CONNECTION) as channel:
            api = pb_grpc.SchedulerStub(channel)
            specs = [pb.JobSpec(command="true", run_at=later_job_time()) for _ in range(300)]
            api.SubmitJobs(pb.SubmitJobsRequest(jobs=specs), timeout=30)

            def page(_) -> str:   # long enough that 16 at once grow the PostgreSQL pool
                try:
                    return str(len(api.ListJobs(pb.ListJobsRequest(page_size=1000),
                                                 timeout=30).jobs))
                except grpc.RpcError as exc:
                    return f"{exc.code()}: {exc.details()}"
            with futures.ThreadPoolExecutor(16) as pool:
                answers = collections.Counter(pool.map(page, range(64)))
        assert answers == {"300": 64}, answers
    finally:
        for sock in idle:
            sock.close()
