"""Redis: how job ids reach workers fast. Every key name and Lua script lives here.

Redis is an accelerator, not the record: everything in it can be rebuilt from
PostgreSQL (the leader's reconciler does exactly that), so a lost or flushed Redis
delays jobs but loses none.

Keys, all under `dtsd:<cluster>:`:
  queue:<q>:<p>        list   ready job ids of queue q at priority p (0..9), FIFO (RPUSH / LMOVE LEFT)
  wake:<q>             list   one token per pushed id; idle workers block on it (BLPOP)
  processing:<worker>  list   ids a worker took and has not acknowledged yet
  delayed              zset   "q|p|id" scored by due time (run_at, retry back-off)
  queued               set    every id Redis holds in one of the above (the reconciler's index)
  worker:<worker>      string heartbeat, JSON, with a TTL; gone = the worker is dead
  workers              set    worker ids seen, so the leader can look for dead ones
  job:<id>             pubsub state changes and live output of one job
  live:<id>            string output of the running attempt so far (for watchers who join late)
  cancel               pubsub ids of jobs to kill wherever they run
  schedules            pubsub a schedule was created or resumed: the leader looks at once
  paused               set    paused queues: the fetch takes nothing from them (a mirror of
                              PostgreSQL's paused_queues, rebuilt by the leader's reconcile)
  limits               hash   queue -> max_running (a mirror of queue_limits, rebuilt the same
                              way): ids of these go to the worker's limited claim
  full:<q>             string a limited queue had no room at a claim: fetches skip it until
                              it expires (FULL_HOLD) or a job of it ends
  node:<node>          string a master's node record (children, leader flag), JSON, with a TTL
  nodes                set    node ids seen

Priorities are separate lists because Redis lists cannot be ordered by score; a worker's
fetch takes from the highest non-empty list of its queues, in one Lua call that moves up
to N ids into its processing list (atomically, like BLMOVE, but for a batch). An idle
worker blocks on the wake lists of its queues rather than polling.
"""

from __future__ import annotations

import inspect
import json
import struct
import urllib.parse
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Sequence

import redis

from .models import MAX_PRIORITY, JobStatus

PRIORITIES = tuple(range(MAX_PRIORITY, -1, -1))  # fetch order: 9 first
WAKE_TOKENS_MAX = 10000

# KEYS: the processing list, the paused set, the limits hash, then each queue's priority
# lists (ARGV[2] of them per queue, in ARGV order from ARGV[4] on; ARGV[3] is the key
# prefix). A paused queue's lists are skipped, checked in the same call that takes ids, so
# no id of a queue is taken once its pause is in Redis; so is a limited queue marked full,
# and of a limited one at most its limit is taken. Returns {id, queue index, priority
# index, limit (0: none)} per id.
_FETCH = """
local out = {}
local want = tonumber(ARGV[1])
local per = tonumber(ARGV[2])
local prefix = ARGV[3]
for q = 4, #ARGV do
  local name = ARGV[q]
  if redis.call('SISMEMBER', KEYS[2], name) == 0
      and redis.call('EXISTS', prefix .. 'full:' .. name) == 0 then
    local limit = tonumber(redis.call('HGET', KEYS[3], name) or 0)
    local cap = want
    if limit > 0 then cap = math.min(want, #out + limit) end
    local first = 4 + (q - 4) * per
    for i = first, first + per - 1 do
      while #out < cap do
        local id = redis.call('LMOVE', KEYS[i], KEYS[1], 'LEFT', 'RIGHT')
        if not id then break end
        out[#out + 1] = {id, q - 4, i - first, limit}
      end
      if #out >= cap then break end
    end
  end
  if #out >= want then break end
end
return out
"""

_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local q, p, id = string.match(member, '^([^|]+)|(%d)|(.+)$')
  if q then
    redis.call('RPUSH', ARGV[3] .. 'queue:' .. q .. ':' .. p, id)
    redis.call('RPUSH', ARGV[3] .. 'wake:' .. q, '1')
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

# A queue's depth: its ready ids (one LLEN per priority list) and its delayed ids. The
# delayed set holds every queue's ids, so those of one queue are counted member by member
# only while the set is small (ARGV[2]); past that, all of it counts (an upper bound).
_DEPTH = """
local ready = 0
for i = 2, #KEYS do ready = ready + redis.call('LLEN', KEYS[i]) end
local total = redis.call('ZCARD', KEYS[1])
if total > tonumber(ARGV[2]) then return {ready, total} end
local delayed, prefix = 0, ARGV[1]
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(member, 1, #prefix) == prefix then delayed = delayed + 1 end
end
return {ready, delayed}
"""
DEPTH_SCAN_MAX = 1000

# Watch messages on job:<id>. Output: b"O" + attempt (u32) + offset (u64) + bytes.
_OUTPUT_HEADER = struct.Struct(">cIQ")


@dataclass
class Event:
    """A message on a job's channel: a state change or a chunk of live output."""

    kind: str                      # "state" or "output"
    attempt: int = 0
    status: JobStatus | None = None
    exit_code: int | None = None
    error: str = ""
    offset: int = 0
    data: bytes = b""

    def encode(self) -> bytes:
        if self.kind == "output":
            return _OUTPUT_HEADER.pack(b"O", self.attempt, self.offset) + self.data
        body = {"status": self.status.value if self.status else "", "attempt": self.attempt,
                "exit_code": self.exit_code, "error": self.error}
        return b"S" + json.dumps(body).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Event":
        if raw[:1] == b"O":
            _, attempt, offset = _OUTPUT_HEADER.unpack_from(raw)
            return cls("output", attempt=attempt, offset=offset, data=raw[_OUTPUT_HEADER.size:])
        body = json.loads(raw[1:])
        return cls("state", attempt=body["attempt"], status=JobStatus(body["status"]),
                   exit_code=body["exit_code"], error=body["error"])


class Keys:
    """The key names of one cluster."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.delayed = prefix + "delayed"
        self.queued = prefix + "queued"
        self.workers = prefix + "workers"
        self.cancel = prefix + "cancel"
        self.nodes = prefix + "nodes"
        self.schedules = prefix + "schedules"
        self.paused = prefix + "paused"
        self.limits = prefix + "limits"

    def queue(self, queue: str, priority: int) -> str:
        return f"{self.prefix}queue:{queue}:{priority}"

    def wake(self, queue: str) -> str:
        return f"{self.prefix}wake:{queue}"

    def processing(self, worker: str) -> str:
        return f"{self.prefix}processing:{worker}"

    def heartbeat(self, worker: str) -> str:
        return f"{self.prefix}worker:{worker}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def live(self, job_id: str) -> str:
        return f"{self.prefix}live:{job_id}"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    def full(self, queue: str) -> str:
        return f"{self.prefix}full:{queue}"


@dataclass(frozen=True)
class Taken:
    """An id a worker's fetch took, with where it came from and its queue's limit."""

    id: str
    queue: str
    priority: int
    limit: int = 0               # max_running of the queue, by Redis's mirror (0: none)


FULL_HOLD = 0.5   # seconds fetches skip a limited queue that had no room (or until one ends)


@dataclass
class Ready:
    """A job id to put on a queue: now, or at `run_at`."""

    id: str
    queue: str
    priority: int
    run_at: datetime | None = None


# Every call gives up well within a child's heartbeat to the master ([dtsd] child_timeout):
# a Redis behind a partition must not make a child look hung. The longest blocking call
# (a worker's wait for work) lasts 1 s.
_CLIENT_OPTIONS = {"socket_timeout": 5, "socket_connect_timeout": 3, "health_check_interval": 15}


def _accepts(cls: type, name: str) -> bool:
    parameters = inspect.signature(cls.__init__).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _pool(url: str) -> redis.ConnectionPool:
    """The connection pool for `url`, with the options its connection class takes.

    redis-py 4.3 (Debian 12) has no `socket_connect_timeout` for unix sockets (there
    `socket_timeout` covers the connect); newer releases take it for both kinds."""
    pool = redis.ConnectionPool.from_url(url, **_CLIENT_OPTIONS)
    for name in list(pool.connection_kwargs):
        if name in _CLIENT_OPTIONS and not _accepts(pool.connection_class, name):
            del pool.connection_kwargs[name]
    return pool


def check_url(url: str) -> None:
    """Raise ValueError, saying what is wrong, if redis-py cannot use `url`.

    Builds the connection object, as the first call would, without connecting: a scheme
    it does not know, a bad value or a setting the connection kind does not take (an
    ssl_* option on a unix:// URL, a misspelt one) shows here rather than as a retry loop."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("a unix:// URL needs the socket's path: "
                         "unix:///run/redis/redis-server.sock?db=0")
    database = parts.path.strip("/") if parts.scheme in ("redis", "rediss") else ""
    if database and not database.isdigit():
        raise ValueError(f"the database {database!r} is not a number (redis://host:port/0)")
    try:
        pool = _pool(url)
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        text = str(exc)
        if "unexpected keyword argument" in text:
            setting = text.rpartition("argument ")[2].strip("'")
            raise ValueError(f"redis-py {redis.__version__} takes no setting {setting!r} for "
                             f"a {urllib.parse.urlsplit(url).scheme}:// URL") from None
        raise ValueError(text) from None
    except (ValueError, KeyError) as exc:
        raise ValueError(str(exc).strip("'\"") or type(exc).__name__) from None


def connect(url: str) -> redis.Redis:
    """A client for `url` (redis://, rediss:// or unix://); ValueError if it is unusable.
    Nothing connects until the first call."""
    check_url(url)
    return redis.Redis(connection_pool=_pool(url))


class Queue:
    """The operations dtsd performs on Redis, each a single round trip where possible."""

    def __init__(self, client: redis.Redis, prefix: str):
        self.redis = client
        self.keys = Keys(prefix)
        self._fetch = client.register_script(_FETCH)
        self._promote = client.register_script(_PROMOTE)
        self._depth = client.register_script(_DEPTH)

    # --- producers ------------------------------------------------------------------------

    def push(self, jobs: Iterable[Ready], now: float | None = None) -> None:
        """Make jobs visible to workers: ready ones on their list, future ones in `delayed`."""
        pipe = self.redis.pipeline(transaction=False)
        if self._stage(pipe, jobs, now):
            pipe.execute()

    def _stage(self, pipe, jobs: Iterable[Ready], now: float | None = None) -> int:
        now = time.time() if now is None else now
        wake: dict[str, int] = {}
        ids = []
        for job in jobs:
            ids.append(job.id)
            due = job.run_at.timestamp() if job.run_at else 0.0
            if due > now:
                pipe.zadd(self.keys.delayed, {f"{job.queue}|{job.priority}|{job.id}": due})
            else:
                pipe.rpush(self.keys.queue(job.queue, job.priority), job.id)
                wake[job.queue] = wake.get(job.queue, 0) + 1
        if ids:
            pipe.sadd(self.keys.queued, *ids)
        for queue, count in wake.items():
            key = self.keys.wake(queue)
            pipe.rpush(key, *([b"1"] * min(count, WAKE_TOKENS_MAX)))
            pipe.ltrim(key, -WAKE_TOKENS_MAX, -1)
        return len(ids)

    def depth(self, queue: str) -> int:
        """How many ids wait in `queue`, ready or delayed, in one round trip.

        Approximate by design: a flushed Redis holds none until the reconciler pushes them
        again, and with more than DEPTH_SCAN_MAX delayed ids in the cluster all of them
        count. A cancelled job's id is taken out at once (`forget`).
        """
        keys = [self.keys.delayed, *(self.keys.queue(queue, p) for p in PRIORITIES)]
        ready, delayed = self._depth(keys=keys, args=[f"{queue}|", DEPTH_SCAN_MAX])
        return int(ready) + int(delayed)

    def total(self) -> int:
        """Every id Redis holds, in all queues: ready, delayed, or taken by a worker and not
        acknowledged yet (the `queued` index, one SCARD)."""
        return int(self.redis.scard(self.keys.queued))

    def depths(self) -> tuple[dict[tuple[str, int], int], int]:
        """({(queue, priority): ready ids}, delayed ids) of every queue Redis holds, for the
        metrics: one SCAN over the queue lists, then their lengths and the delayed set's
        size in one pipeline. Empty lists do not exist in Redis, so idle queues are absent."""
        pattern = self.keys.queue("*", 0)[:-2] + ":*"
        start = len(self.keys.prefix) + len("queue:")
        keys = sorted(set(self.redis.scan_iter(match=pattern, count=1000)))
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.llen(key)
        pipe.zcard(self.keys.delayed)
        *lengths, delayed = pipe.execute()
        ready: dict[tuple[str, int], int] = {}
        for key, length in zip(keys, lengths):
            queue, _, priority = key.decode("utf-8", "replace")[start:].rpartition(":")
            if queue and priority.isdigit() and length:
                ready[(queue, int(priority))] = int(length)
        return ready, int(delayed)

    def forget(self, job_id: str, queue: str, priority: int) -> None:
        """Take a job that will not run (cancelled while PENDING) out of Redis: its list,
        the delayed set and the index, in one transaction, so the depths stay true. A worker
        that took it already drops it when its claim fails."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.lrem(self.keys.queue(queue, priority), 0, job_id)
        pipe.zrem(self.keys.delayed, f"{queue}|{priority}|{job_id}")
        pipe.srem(self.keys.queued, job_id)
        pipe.execute()

    def promote_due(self, now: float | None = None, limit: int = 1000) -> int:
        """Move delayed ids whose time has come onto their lists; returns how many."""
        now = time.time() if now is None else now
        return int(self._promote(keys=[self.keys.delayed],
                                 args=[now, limit, self.keys.prefix]))

    # --- queue controls -------------------------------------------------------------------

    def pause(self, queue: str) -> None:
        self.redis.sadd(self.keys.paused, queue)

    def resume(self, queue: str) -> None:
        """Take the pause off, and wake as many idle workers as the queue holds ready ids
        (the wake tokens of its jobs may have been taken by workers that found it paused)."""
        ready = sum(self._lengths([queue]).values())
        pipe = self.redis.pipeline(transaction=False)
        pipe.srem(self.keys.paused, queue)
        if ready:
            key = self.keys.wake(queue)
            pipe.rpush(key, *([b"1"] * min(ready, WAKE_TOKENS_MAX)))
            pipe.ltrim(key, -WAKE_TOKENS_MAX, -1)
        pipe.execute()

    def _lengths(self, queues: Sequence[str]) -> dict[tuple[str, int], int]:
        pipe = self.redis.pipeline(transaction=False)
        keys = [(q, p) for q in queues for p in PRIORITIES]
        for queue, priority in keys:
            pipe.llen(self.keys.queue(queue, priority))
        return dict(zip(keys, pipe.execute()))

    def paused(self) -> set[str]:
        return {name.decode() for name in self.redis.smembers(self.keys.paused)}

    def set_limit(self, queue: str, max_running: int) -> None:
        """Mirror a queue's limit (0: none), and let fetches try it at once."""
        pipe = self.redis.pipeline(transaction=False)
        if max_running:
            pipe.hset(self.keys.limits, queue, max_running)
        else:
            pipe.hdel(self.keys.limits, queue)
        pipe.delete(self.keys.full(queue))
        pipe.rpush(self.keys.wake(queue), b"1")
        pipe.execute()

    def set_limits(self, limits: dict[str, int]) -> None:
        """Make the mirror hold exactly `limits` (PostgreSQL's queue_limits), atomically."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.limits)
        if limits:
            pipe.hset(self.keys.limits, mapping=limits)
        pipe.execute()

    def set_paused(self, queues: Iterable[str]) -> None:
        """Make the mirror hold exactly `queues` (PostgreSQL's paused set), atomically."""
        queues = list(queues)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.paused)
        if queues:
            pipe.sadd(self.keys.paused, *queues)
        pipe.execute()

    # --- consumers ------------------------------------------------------------------------

    def fetch(self, worker: str, queues: Sequence[str], count: int) -> list[Taken]:
        """Move up to `count` ids into the worker's processing list; highest priority first
        within a queue, queues in the given order; nothing from a paused queue or from a
        limited one marked full, and at most its limit from a limited one."""
        keys = [self.keys.processing(worker), self.keys.paused, self.keys.limits]
        for queue in queues:
            keys.extend(self.keys.queue(queue, p) for p in PRIORITIES)
        found = self._fetch(keys=keys, args=[count, len(PRIORITIES), self.keys.prefix, *queues])
        return [Taken(raw.decode(), queues[q], PRIORITIES[p], int(limit))
                for raw, q, p, limit in found]

    def give_back(self, worker: str, taken: Sequence[Taken], hold: float = FULL_HOLD) -> None:
        """Ids a limited queue had no room for go back to the head of their lists, in their
        order, and the queue is marked full for `hold` seconds (fetches skip it)."""
        pipe = self.redis.pipeline(transaction=False)
        processing = self.keys.processing(worker)
        for item in reversed(taken):
            pipe.lrem(processing, 1, item.id)
            pipe.lpush(self.keys.queue(item.queue, item.priority), item.id)
        for queue in {item.queue for item in taken}:
            pipe.set(self.keys.full(queue), b"1", px=max(1, int(hold * 1000)))
        pipe.execute()

    def processing_ids(self, worker: str) -> list[str]:
        """The ids in the worker's processing list (fetched, and not acknowledged yet)."""
        return [i.decode() for i in self.redis.lrange(self.keys.processing(worker), 0, -1)]

    def wait_for_work(self, queues: Sequence[str], timeout: float) -> bool:
        """Block until some job may be ready on `queues` (or the timeout passes)."""
        return self.redis.blpop([self.keys.wake(q) for q in queues], timeout=timeout) is not None

    def ack(self, worker: str, ids: Sequence[str], *, events: Sequence[tuple[str, Event]] = (),
            retries: Sequence[Ready] = (), freed: Iterable[str] = ()) -> None:
        """Forget acknowledged ids, queue retries again and publish events, in one round trip.
        `freed`: limited queues a job of which ended: no longer full, and an idle worker is
        woken to claim in the place."""
        pipe = self.redis.pipeline(transaction=False)
        for queue in freed:
            pipe.delete(self.keys.full(queue))
            pipe.rpush(self.keys.wake(queue), b"1")
        processing = self.keys.processing(worker)
        for job_id in ids:
            pipe.lrem(processing, 1, job_id)
            pipe.delete(self.keys.live(job_id))
        if ids:
            pipe.srem(self.keys.queued, *ids)
        self._stage(pipe, retries)
        for job_id, event in events:
            pipe.publish(self.keys.job(job_id), event.encode())
        pipe.execute()

    def cancelled(self, *, pending: Sequence[tuple[str, str, int]],
                  running: Sequence[tuple[str, int]],
                  events: Sequence[tuple[str, Event]]) -> None:
        """A batch of jobs was cancelled: forget the PENDING ones' ids (id, queue, priority),
        ask the workers to kill the RUNNING ones (id, attempt), publish the events; one
        round trip.

        Unlike `forget`, the ids stay in their ready lists: an LREM walks the whole list,
        and a batch of them on a long queue would stall Redis. A worker drops each such id
        when its claim fails, so until the workers reach them they count in `depth` (not
        in `total`)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, queue, priority in pending:
            pipe.zrem(self.keys.delayed, f"{queue}|{priority}|{job_id}")
        if pending:
            pipe.srem(self.keys.queued, *[job_id for job_id, _, _ in pending])
        for job_id, attempt in running:
            pipe.publish(self.keys.cancel, f"{job_id} {attempt}")
        for job_id, event in events:
            pipe.publish(self.keys.job(job_id), event.encode())
        pipe.execute()

    def publish(self, events: Sequence[tuple[str, Event]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for job_id, event in events:
            pipe.publish(self.keys.job(job_id), event.encode())
        pipe.execute()

    def publish_output(self, job_id: str, attempt: int, offset: int, data: bytes,
                       ttl: int = 3600) -> None:
        """Live output: kept for late watchers and published for current ones."""
        pipe = self.redis.pipeline(transaction=False)
        live = self.keys.live(job_id)
        pipe.setrange(live, offset, data)
        pipe.expire(live, ttl)
        pipe.publish(self.keys.job(job_id),
                     Event("output", attempt=attempt, offset=offset, data=data).encode())
        pipe.execute()

    def live_output(self, job_id: str) -> bytes:
        return self.redis.get(self.keys.live(job_id)) or b""

    def schedules_changed(self) -> None:
        self.redis.publish(self.keys.schedules, b"1")

    def request_cancel(self, job_id: str, attempt: int) -> None:
        """Ask whichever worker runs that attempt to kill it."""
        self.redis.publish(self.keys.cancel, f"{job_id} {attempt}")

    # --- heartbeats and recovery ----------------------------------------------------------

    def heartbeat(self, worker: str, info: dict, ttl: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.heartbeat(worker), json.dumps(info), px=int(ttl * 1000))
        pipe.sadd(self.keys.workers, worker)
        pipe.execute()

    def retire(self, worker: str) -> None:
        """A worker that stops cleanly removes its traces."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self.keys.heartbeat(worker), self.keys.processing(worker))
        pipe.srem(self.keys.workers, worker)
        pipe.execute()

    def workers(self) -> dict[str, dict | None]:
        """Every known worker with its heartbeat (None: no heartbeat, maybe dead)."""
        names = sorted(w.decode() for w in self.redis.smembers(self.keys.workers))
        if not names:
            return {}
        beats = self.redis.mget([self.keys.heartbeat(w) for w in names])
        return {name: (json.loads(beat) if beat else None) for name, beat in zip(names, beats)}

    def alive(self, workers: Sequence[str]) -> dict[str, bool]:
        if not workers:
            return {}
        beats = self.redis.mget([self.keys.heartbeat(w) for w in workers])
        return {w: beat is not None for w, beat in zip(workers, beats)}

    def drop_worker(self, worker: str) -> list[str]:
        """Forget a dead worker: its processing list goes (PostgreSQL decides what reruns)."""
        processing = self.keys.processing(worker)
        pipe = self.redis.pipeline(transaction=True)
        pipe.lrange(processing, 0, -1)
        pipe.delete(processing, self.keys.heartbeat(worker))
        pipe.srem(self.keys.workers, worker)
        ids = [i.decode() for i in pipe.execute()[0]]
        if ids:
            self.redis.srem(self.keys.queued, *ids)
        return ids

    def missing(self, ids: Sequence[str]) -> list[str]:
        """Those of `ids` that Redis holds nowhere (the reconciler pushes them again)."""
        if not ids:
            return []
        present = self.redis.smismember(self.keys.queued, list(ids))
        return [job_id for job_id, here in zip(ids, present) if not here]

    def publish_node(self, node_id: str, record: dict, ttl: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.node(node_id), json.dumps(record), px=int(ttl * 1000))
        pipe.sadd(self.keys.nodes, node_id)
        pipe.execute()

    def nodes(self) -> list[dict]:
        """Node records of the masters seen recently; forgets the ones long gone."""
        names = sorted(n.decode() for n in self.redis.smembers(self.keys.nodes))
        if not names:
            return []
        records = self.redis.mget([self.keys.node(n) for n in names])
        gone = [n for n, r in zip(names, records) if r is None]
        if gone:
            self.redis.srem(self.keys.nodes, *gone)
        return [json.loads(r) for r in records if r]

