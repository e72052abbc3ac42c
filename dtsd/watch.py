"""WatchJob: one shared Redis subscription and one PostgreSQL recheck per server child.

`WatchHub` serves every WatchJob stream of its process with two threads:

* the *pubsub* thread owns one Redis pub/sub connection. It subscribes a job's channel
  (`Keys.job`) when the first stream of that job joins and unsubscribes it when the
  last one leaves, and it hands each message to the streams of that job through their
  own inboxes. It is the only thread that touches the connection (redis-py's PubSub is
  not safe to share); streams ask for changes and it applies them within `TICK`.
* the *recheck* thread reads the state of every watched job in one statement
  (`Store.job_states`) every `WATCH_POLL` seconds and tells a stream when its job's
  state differs from what it last told it.

So 1,000 streams cost one Redis connection and one small query every two seconds, not
1,000 connections and 500 queries a second, and a stream's thread sleeps on its inbox
until there is something to send.

What a stream (`Watch`) promises, as before the hub:

* It is subscribed before it reads: `WatchHub.join` returns only once Redis has answered
  a PING sent after the SUBSCRIBE (Redis answers a connection's commands in order), so
  nothing published after the stream's first read is missed.
* Output is sent by (attempt, offset), each byte once; a chunk that would leave a gap is
  skipped, and the gap is filled from the stored output at the end, or from the live
  output when the stream resynchronises.
* A lost message delays a watcher but never strands it: the recheck sees the job's
  state change (and its final state) whatever Redis does. When the subscription itself
  was lost (Redis restarted), or a stream fell more than `BACKLOG_BYTES` behind, the
  stream resynchronises: it rereads the job and its live output.
* It ends after the job's final state, when the client goes, or when the server stops.
"""

from __future__ import annotations

import enum
import logging
import queue as queuemod
import threading
import time
from typing import Any, Iterator

import psycopg
import psycopg_pool
import redis

from . import backing
from .dtsdpb import pb
from .models import FINAL_STATES, JobStatus
from .queue import Event, Queue
from .store import Store

log = logging.getLogger("dtsd.watch")

WATCH_POLL = 2.0        # seconds between rechecks of every watched job in PostgreSQL
TICK = 0.02             # the pubsub thread applies joins and leaves at least this often
JOIN_TIMEOUT = 5.0      # a stream whose subscription Redis has not confirmed by then: UNAVAILABLE
BARRIER_TIMEOUT = 3.0   # a PING unanswered this long means the subscription is broken
RETRY = 1.0             # after a Redis error, the pubsub thread waits this long to reconnect
IDLE_CHECK = 30.0       # a stream with nothing to send checks its call this often anyway
BACKLOG_BYTES = 1 << 20  # a stream this far behind drops messages and resynchronises

_BARRIER = b"dtsd-watch "


class Kind(enum.Enum):
    """What a stream's inbox carries."""

    MESSAGE = "message"     # raw bytes published on the job's channel
    STATE = "state"         # the job's row from the recheck (None: the job is gone)
    RESYNC = "resync"       # messages may have been lost: reread the job
    END = "end"             # the call or the server ended


_UNSEEN = object()


class Subscription:
    """One stream's place in the hub: its inbox and what the hub last told it."""

    def __init__(self, job_id: str, channel: str):
        self.job_id = job_id
        self.channel = channel
        self.ready = threading.Event()
        self.error: Exception | None = None
        self.barrier = 0            # the PING whose answer proves it is subscribed
        self.seen: Any = _UNSEEN    # the recheck row last sent (the hub's thread only)
        self._inbox: queuemod.SimpleQueue = queuemod.SimpleQueue()
        self._lock = threading.Lock()
        self._backlog = 0
        self._lagging = False

    def put(self, kind: Kind, payload: Any = None) -> None:
        self._inbox.put((kind, payload))

    def end(self) -> None:
        """Wake the stream to end (a gRPC termination callback; any thread)."""
        self.put(Kind.END)

    def deliver(self, data: bytes) -> None:
        """A message of the job's channel; dropped, and a RESYNC queued, past the backlog."""
        with self._lock:
            if self._backlog + len(data) > BACKLOG_BYTES:
                if not self._lagging:
                    self._lagging = True
                    self.put(Kind.RESYNC)
                return
            self._backlog += len(data)
        self.put(Kind.MESSAGE, data)

    def get(self, timeout: float) -> tuple[Kind, Any] | None:
        try:
            kind, payload = self._inbox.get(timeout=timeout)
        except queuemod.Empty:
            return None
        with self._lock:
            if kind is Kind.MESSAGE:
                self._backlog -= len(payload)
            elif kind is Kind.RESYNC:
                self._lagging = False     # what is dropped from now on asks again
        return kind, payload

    def fail(self, error: Exception) -> None:
        self.error = error
        self.ready.set()


class WatchHub:
    """Every WatchJob stream of one server child, over one subscription (module docstring)."""

    def __init__(self, store: Store, queue: Queue, poll: float = WATCH_POLL):
        self.store = store
        self.queue = queue
        self.poll = poll
        self._lock = threading.Lock()
        self._subs: dict[str, set[Subscription]] = {}     # channel -> its streams
        self._joining: list[Subscription] = []
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # The pubsub thread's own state.
        self._pubsub: Any = None
        self._sent: set[str] = set()         # channels SUBSCRIBEd on this connection
        self._seq = 0                        # the last barrier PING sent
        self._answered = 0                   # the last barrier PING answered
        self._seq_sent_at = 0.0
        self._resync_at = 0                  # after a reconnect: RESYNC everyone once this is answered
        self._healthy = True

    # --- what streams call ----------------------------------------------------------------

    def join(self, job_id: str) -> Subscription:
        """Subscribe to `job_id`; returns once Redis confirms it (or the hub has stopped).

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis did not confirm in time
                (the caller answers UNAVAILABLE).
        """
        sub = Subscription(job_id, self.queue.keys.job(job_id))
        with self._lock:
            if self._stop.is_set():
                sub.end()
                return sub
            self._subs.setdefault(sub.channel, set()).add(sub)
            self._joining.append(sub)
        self._changed.set()
        if not sub.ready.wait(JOIN_TIMEOUT):
            self.leave(sub)
            raise redis.TimeoutError(f"Redis did not confirm the subscription to job {job_id} "
                                     f"within {JOIN_TIMEOUT:.0f}s")
        if sub.error is not None:
            self.leave(sub)
            raise redis.ConnectionError(f"cannot subscribe to job {job_id}: {sub.error}")
        return sub

    def leave(self, sub: Subscription) -> None:
        with self._lock:
            streams = self._subs.get(sub.channel)
            if streams is not None:
                streams.discard(sub)
                if not streams:
                    del self._subs[sub.channel]
            if sub in self._joining:
                self._joining.remove(sub)
        self._changed.set()

    def watching(self) -> int:
        """How many streams are joined (for logs and tests)."""
        with self._lock:
            return sum(len(streams) for streams in self._subs.values())

    # --- the process ----------------------------------------------------------------------

    def start(self) -> None:
        for name, target in (("watch-pubsub", self._pubsub_loop),
                             ("watch-recheck", self._recheck_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """End every stream (they return after their current message) and the threads."""
        with self._lock:
            self._stop.set()
            everyone = [sub for streams in self._subs.values() for sub in streams]
            joining, self._joining = self._joining, []
        for sub in everyone:
            sub.end()
        for sub in joining:
            sub.ready.set()     # not subscribed, but it has nothing to wait for now
        self._changed.set()
        for thread in self._threads:
            thread.join(timeout)

    # --- the pubsub thread ----------------------------------------------------------------

    def _pubsub_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._changed.clear()
                self._apply_changes()
                if self._pubsub is not None and self._sent:
                    message = self._pubsub.get_message(timeout=TICK)
                    while message is not None:
                        self._dispatch(message)
                        message = self._pubsub.get_message(timeout=0)
                    if (self._answered < self._seq
                            and time.monotonic() - self._seq_sent_at > BARRIER_TIMEOUT):
                        raise redis.TimeoutError(f"no answer to a PING within "
                                                 f"{BARRIER_TIMEOUT:.0f}s")
                else:
                    self._changed.wait(1.0)
                if not self._healthy:
                    self._healthy = True
                    log.info("watch hub: subscribed again (%d channels)", len(self._sent))
            except redis.RedisError as exc:
                self._reset(exc)
                self._stop.wait(RETRY)
            except Exception:  # noqa: BLE001 - keep serving the other streams
                log.exception("watch hub: unexpected error; resubscribing")
                self._reset(redis.ConnectionError("watch hub error"))
                self._stop.wait(RETRY)
        self._close()

    def _apply_changes(self) -> None:
        """SUBSCRIBE new channels, UNSUBSCRIBE abandoned ones, PING for waiting joins."""
        with self._lock:
            wanted = set(self._subs)
            joining = [sub for sub in self._joining if not sub.barrier]
        if self._resync_at < 0 and not wanted:
            self._resync_at = 0     # nobody to resynchronise
        add, remove = wanted - self._sent, self._sent - wanted
        if not (add or remove or joining or self._resync_at < 0):
            return
        if self._pubsub is None:
            self._pubsub = self.queue.redis.pubsub()
        if remove:
            self._pubsub.unsubscribe(*sorted(remove))
            self._sent -= remove
        if add:
            self._pubsub.subscribe(*sorted(add))
            self._sent |= add
        if not self._sent:
            return          # PING outside subscribe mode answers differently: no barrier
        if joining or self._resync_at < 0:
            self._seq += 1
            self._seq_sent_at = time.monotonic()
            self._pubsub.ping(_BARRIER + str(self._seq).encode())
            for sub in joining:
                sub.barrier = self._seq
            if self._resync_at < 0:
                self._resync_at = self._seq

    def _dispatch(self, message: dict) -> None:
        kind = message.get("type")
        if kind in ("message", b"message"):
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            with self._lock:
                streams = list(self._subs.get(channel, ()))
            for sub in streams:
                sub.deliver(message["data"])
        elif kind in ("pong", b"pong"):
            data = message.get("data") or b""
            data = data.encode() if isinstance(data, str) else data
            if data.startswith(_BARRIER):
                self._answered = max(self._answered, int(data[len(_BARRIER):]))
                self._release_joins()

    def _release_joins(self) -> None:
        with self._lock:
            ready = [sub for sub in self._joining if sub.barrier and sub.barrier <= self._answered]
            self._joining = [sub for sub in self._joining if sub not in ready]
            resync = []
            if self._resync_at > 0 and self._answered >= self._resync_at:
                self._resync_at = 0
                resync = [sub for streams in self._subs.values() for sub in streams]
        for sub in ready:
            sub.ready.set()
        for sub in resync:
            sub.put(Kind.RESYNC)

    def _reset(self, error: Exception) -> None:
        """The subscription is lost: fail waiting joins, resubscribe everything, and
        have every stream resynchronise once Redis confirms the new subscription."""
        if self._healthy:
            log.warning("watch hub: Redis subscription lost (%s); WatchJob streams fall back "
                        "to the %.0fs recheck until it is back", error, self.poll)
        self._healthy = False
        self._close()
        with self._lock:
            joining, self._joining = self._joining, []
            self._resync_at = -1
        for sub in joining:
            sub.fail(error)

    def _close(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass
        self._pubsub = None
        self._sent = set()
        self._answered = self._seq

    # --- the recheck thread ---------------------------------------------------------------

    def _recheck_loop(self) -> None:
        while not self._stop.wait(self.poll):
            with self._lock:
                by_job: dict[str, list[Subscription]] = {}
                for streams in self._subs.values():
                    for sub in streams:
                        by_job.setdefault(sub.job_id, []).append(sub)
            if not by_job:
                continue
            try:
                rows = self.store.job_states(sorted(by_job))
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                if backing.health.note(exc) is None:    # a store's absence is said once
                    log.warning("watch hub: recheck of %d jobs failed: %s", len(by_job), exc)
                continue
            for job_id, streams in by_job.items():
                row = rows.get(job_id)
                for sub in streams:
                    if sub.seen is _UNSEEN or sub.seen != row:
                        sub.seen = row
                        sub.put(Kind.STATE, row)


class Watch:
    """One WatchJob stream. A job not final yet: its current state first, then output and
    state changes as they come. A job final already: its output, then its final state. The
    final state is the last event in both cases, so a client may stop at it."""

    def __init__(self, hub: WatchHub, store: Store, queue: Queue, job_id: str, context):
        self.hub = hub
        self.store = store
        self.queue = queue
        self.job_id = job_id
        self.context = context
        self.attempt = 0
        self.sent = 0           # bytes of the current attempt's output already sent
        self.status: JobStatus | None = None

    def events(self) -> Iterator[pb.JobEvent]:
        sub = self.hub.join(self.job_id)
        try:
            if not self.context.add_callback(sub.end):
                return      # the call ended while we subscribed
            row = self.store.get_job(self.job_id)
            if JobStatus(row["status"]) in FINAL_STATES:
                yield from self._finish(row)
                return
            yield from self._resync(row)
            while True:
                item = sub.get(IDLE_CHECK)
                if item is None:
                    if not self.context.is_active():
                        return
                    continue
                kind, payload = item
                if kind is Kind.END:
                    return
                if kind is Kind.MESSAGE:
                    done = yield from self._message(payload)
                elif kind is Kind.STATE:
                    done = yield from self._recheck(payload)
                else:
                    row = self.store.get_job(self.job_id)
                    done = JobStatus(row["status"]) in FINAL_STATES
                    yield from (self._finish(row) if done else self._resync(row))
                if done:
                    return
        finally:
            self.hub.leave(sub)

    def _resync(self, row: dict[str, Any]) -> Iterator[pb.JobEvent]:
        """The state if it changed, then the running attempt's output not sent yet."""
        if self.status is None or self._changed(row):
            yield self._state(row)
        if self.status is JobStatus.RUNNING:
            yield from self._output(row["attempts"], 0, self.queue.live_output(self.job_id))

    def _message(self, data: bytes):
        try:
            event = Event.decode(data)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log.debug("job %s: undecodable message ignored: %s", self.job_id, exc)
            return False
        if event.kind == "output":
            yield from self._output(event.attempt, event.offset, event.data)
            return False
        if event.status in FINAL_STATES:
            yield from self._finish(self.store.get_job(self.job_id))
            return True
        self.status = event.status
        if event.attempt and event.attempt != self.attempt:
            self.attempt, self.sent = event.attempt, 0
        yield pb.JobEvent(kind=pb.JobEvent.STATE, status=pb.JobStatus.Value(event.status.value),
                          attempt=event.attempt or self.attempt, error=event.error)
        return False

    def _recheck(self, row: dict[str, Any] | None):
        """The recheck's view of the job (None: gone, and get_job says NOT_FOUND)."""
        if row is None or JobStatus(row["status"]) in FINAL_STATES:
            yield from self._finish(self.store.get_job(self.job_id))
            return True
        if self._changed(row):
            yield self._state(row)
        return False

    def _changed(self, row: dict[str, Any]) -> bool:
        return row["attempts"] != self.attempt or JobStatus(row["status"]) is not self.status

    def _state(self, row: dict[str, Any]) -> pb.JobEvent:
        self.status = JobStatus(row["status"])
        if row["attempts"] != self.attempt:
            self.attempt, self.sent = row["attempts"], 0
        event = pb.JobEvent(kind=pb.JobEvent.STATE, status=pb.JobStatus.Value(row["status"]),
                            attempt=row["attempts"], error=row["error"])
        if row["exit_code"] is not None and self.status in FINAL_STATES:
            event.exit_code = row["exit_code"]
        return event

    def _output(self, attempt: int, offset: int, data: bytes) -> Iterator[pb.JobEvent]:
        if attempt != self.attempt:
            if attempt < self.attempt:
                return
            self.attempt, self.sent = attempt, 0
        end = offset + len(data)
        if end <= self.sent or offset > self.sent:
            return      # already sent, or a gap we will fill from the stored output
        data = data[self.sent - offset:]
        yield pb.JobEvent(kind=pb.JobEvent.OUTPUT, attempt=attempt, offset=self.sent, output=data)
        self.sent = end

    def _finish(self, row: dict[str, Any]) -> Iterator[pb.JobEvent]:
        """The rest of the final attempt's output, then the final state."""
        output = bytes(row.get("output") or b"")
        yield from self._output(row["attempts"], 0, output)
        yield self._state(row)
