"""dtsd.combine: concurrent calls served in shared rounds, each answered as if alone."""

from __future__ import annotations

import threading
import time

import pytest

from dtsd.combine import Combiner


def test_a_lone_call_is_served_at_once_in_a_round_of_its_own():
    rounds = []
    combiner = Combiner(lambda requests: rounds.append(list(requests)) or
                        [r * 2 for r in requests])
    assert combiner.call(21) == 42
    assert rounds == [[21]]


def first_round_held(reply=lambda r: r):
    """A serve function whose first round waits for `release`, so that the calls made
    meanwhile queue up behind it; `rounds` records what each round served."""
    release = threading.Event()
    rounds: list[list] = []

    def serve(requests):
        rounds.append(list(requests))
        if len(rounds) == 1:
            release.wait(5)
        return [reply(r) for r in requests]
    return serve, release, rounds


def test_calls_arriving_while_a_round_runs_share_the_next_round():
    serve, release, rounds = first_round_held(lambda r: f"reply {r}")
    combiner = Combiner(serve)
    replies = {}

    def caller(n):
        replies[n] = combiner.call(n)

    first = threading.Thread(target=caller, args=(0,))
    first.start()
    while not rounds:
        time.sleep(0.001)
    others = [threading.Thread(target=caller, args=(n,)) for n in range(1, 9)]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 5
    while len(combiner.waiting) < 8 and time.monotonic() < deadline:
        time.sleep(0.001)
    release.set()
    for thread in (first, *others):
        thread.join(5)
    assert replies == {n: f"reply {n}" for n in range(9)}
    assert rounds[0] == [0]
    assert sorted(rounds[1]) == list(range(1, 9)), rounds
    assert (combiner.rounds, combiner.calls) == (2, 9)
    assert not combiner.busy and not combiner.waiting


def test_each_caller_gets_its_own_exception_and_the_others_their_replies():
    def serve(requests):
        return [ValueError(f"bad {r}") if r % 2 else r for r in requests]

    combiner = Combiner(serve)
    assert combiner.call(2) == 2
    with pytest.raises(ValueError, match="bad 3"):
        combiner.call(3)


def test_a_round_that_raises_fails_its_calls_and_the_next_caller_still_leads():
    calls = []

    def serve(requests):
        calls.append(list(requests))
        if len(calls) == 1:
            raise ConnectionError("PostgreSQL went away")
        return list(requests)

    combiner = Combiner(serve)
    with pytest.raises(ConnectionError, match="went away"):
        combiner.call("a")
    assert combiner.call("b") == "b"
    assert not combiner.busy


def test_a_round_never_passes_the_weight_cap_but_always_takes_one_call():
    serve, release, rounds = first_round_held()
    combiner = Combiner(serve, max_weight=10)
    threads = [threading.Thread(target=combiner.call, args=("first", 1))]
    threads[0].start()
    while not rounds:
        time.sleep(0.001)
    for name, weight in (("six", 6), ("five", 5), ("twenty", 20), ("four", 4)):
        threads.append(threading.Thread(target=combiner.call, args=(name, weight)))
        threads[-1].start()
        while len(combiner.waiting) < len(threads) - 1:
            time.sleep(0.001)
    release.set()
    for thread in threads:
        thread.join(5)
    assert rounds == [["first"], ["six"], ["five"], ["twenty"], ["four"]]


def test_many_threads_hammering_get_exactly_their_own_replies():
    combiner = Combiner(lambda requests: [(r, len(requests)) for r in requests])
    results: dict[int, int] = {}
    lock = threading.Lock()

    def caller(base):
        for i in range(200):
            n = base * 1000 + i
            reply, _ = combiner.call(n)
            with lock:
                results[n] = reply

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {n: n for n in results} and len(results) == 1600
    assert combiner.calls == 1600 and combiner.rounds <= 1600
    assert not combiner.busy and not combiner.waiting
