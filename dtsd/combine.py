"""Group commit: calls that arrive while one is being served share the next round.

A server child answers many SubmitJob calls at once, each on its own thread. Stored one
by one, every call pays a PostgreSQL transaction (a commit: a WAL flush), a pool checkout
and a Redis pipeline of its own. `Combiner` lets the first caller serve everyone who
queued up behind it in one go, then hands the lead to the first caller that arrived
meanwhile: no timer and no extra thread, so a lone call is served at once, exactly as
before, and a crowd is served in rounds as large as the crowd (flat combining, the way
PostgreSQL's own group commit and Go's singleflight keep the caller's thread doing the
work).

Each caller still returns only after its own round is done, with its own result or its
own exception: durability and error reporting do not change, only who runs the statement.
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, Sequence, TypeVar

Request = TypeVar("Request")
Reply = TypeVar("Reply")


class _Call(Generic[Request, Reply]):
    __slots__ = ("request", "weight", "reply", "error", "ready", "lead")

    def __init__(self, request: Request, weight: int):
        self.request = request
        self.weight = weight
        self.reply: Reply | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()   # set when answered, or when this call must lead
        self.lead = False


class Combiner(Generic[Request, Reply]):
    """Serve concurrent calls of `serve` in rounds of up to `max_weight` (at least one call).

    `serve(requests)` returns one reply per request, in order; where it gives an
    exception instead of a reply, that caller gets the exception raised. If `serve`
    itself raises, every call of that round gets the exception.
    """

    def __init__(self, serve: Callable[[list[Request]], Sequence[Reply | BaseException]],
                 max_weight: int = 1000):
        self.serve = serve
        self.max_weight = max_weight
        self.lock = threading.Lock()
        self.waiting: list[_Call[Request, Reply]] = []
        self.busy = False
        self.rounds = 0          # for tests and benchmarks: how many rounds were served
        self.calls = 0

    def call(self, request: Request, weight: int = 1) -> Reply:
        mine: _Call[Request, Reply] = _Call(request, weight)
        with self.lock:
            self.waiting.append(mine)
            lead = not self.busy
            self.busy = True
        if not lead:
            mine.ready.wait()
            lead = mine.lead
        if lead:
            self._lead()
        if mine.error is not None:
            raise mine.error
        return mine.reply  # type: ignore[return-value]

    def _lead(self) -> None:
        """Serve one round (the leader's own call is always the first waiting), then pass
        the lead to the next caller in line, or stand down."""
        with self.lock:
            weight, taken = 0, 0
            for call in self.waiting:
                if taken and weight + call.weight > self.max_weight:
                    break
                weight += call.weight
                taken += 1
            round_, self.waiting = self.waiting[:taken], self.waiting[taken:]
            self.rounds += 1
            self.calls += taken
        try:
            replies = self.serve([call.request for call in round_])
            if len(replies) != len(round_):
                raise RuntimeError(f"combined round: {len(replies)} replies for "
                                   f"{len(round_)} calls")
            for call, reply in zip(round_, replies):
                if isinstance(reply, BaseException):
                    call.error = reply
                else:
                    call.reply = reply
        except BaseException as exc:
            for call in round_:
                call.error = exc
        finally:
            with self.lock:
                if self.waiting:
                    following = self.waiting[0]
                    following.lead = True
                    following.ready.set()
                else:
                    self.busy = False
            for call in round_:
                call.ready.set()
