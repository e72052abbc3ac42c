"""dtsd.backing's tracker, the master's store reports and the client's choice of error,
without any store: what a failing store makes dtsd log, report and tell its callers."""

from __future__ import annotations

import logging
import threading

import grpc
import psycopg
import psycopg_pool
import pytest
import redis

from dtsd import backing, config, master, metrics
from dtsd.backing import BackingStore, StoreHealth
from dtsd.client import _telling, unreachable_store

REDIS, POSTGRES = BackingStore.REDIS, BackingStore.POSTGRES


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tracked(caplog):
    """A tracker on a clock the test moves, its log records and its listeners' calls."""
    clock = Clock()
    health = StoreHealth(logging.getLogger("test.stores"), remind_every=60, clock=clock,
                         wall=lambda: clock.now + 1.7e9)
    heard: list[tuple[BackingStore, float | None]] = []
    health.listen(lambda store, outage: heard.append((store, outage and outage.since)))
    caplog.set_level(logging.DEBUG, logger="test.stores")
    return health, clock, heard, caplog


def lines(caplog) -> list[str]:
    return [f"{r.levelname} {r.getMessage()}" for r in caplog.records]


def test_a_store_down_is_logged_once_reminded_each_minute_and_its_return_counted(tracked):
    health, clock, heard, caplog = tracked
    refused = redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    for _ in range(40):                    # twice a second for 20 s
        health.failure(REDIS, refused)
        clock.now += 0.5
    assert lines(caplog) == ["WARNING redis unreachable: Error 111 connecting to "
                             "127.0.0.1:6379. Connection refused."]
    assert heard == [(REDIS, 1000.0 + 1.7e9)]
    for _ in range(90):                    # 45 s more: one reminder, at 60 s
        health.failure(REDIS, refused)
        clock.now += 0.5
    assert lines(caplog)[1:] == ["WARNING redis still unreachable after 60 s, 121 attempts "
                                 "failed: Error 111 connecting to 127.0.0.1:6379. Connection "
                                 "refused."]
    health.success(REDIS)
    health.success(REDIS)
    assert lines(caplog)[2:] == ["INFO redis reachable again after 65 s, 130 attempts failed"]
    assert heard[1:] == [(REDIS, None)]
    assert not health.is_down(REDIS) and health.down() == {}


def test_success_of_a_store_that_was_up_says_nothing(tracked):
    health, _, heard, caplog = tracked
    health.success(POSTGRES)
    assert lines(caplog) == [] and heard == []


def test_many_threads_failing_at_once_make_one_line_and_one_report(tracked):
    health, _, heard, caplog = tracked
    start = threading.Barrier(8)

    def fail() -> None:
        start.wait()
        for _ in range(200):
            health.failure(POSTGRES, psycopg.OperationalError("connection refused"))
    threads = [threading.Thread(target=fail) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(heard) == 1 and len(lines(caplog)) == 1
    assert health.down()[POSTGRES].failures == 1600
    health.success(POSTGRES)
    assert lines(caplog)[1] == "INFO postgres reachable again after 0 s, 1600 attempts failed"


def test_a_pool_timeout_keeps_the_error_that_said_why(tracked):
    health, _, _, _ = tracked
    health.failure(POSTGRES, psycopg.OperationalError("connection refused"))
    health.failure(POSTGRES, psycopg_pool.PoolTimeout("couldn't get a connection after 3 sec"))
    assert health.down()[POSTGRES].error == "connection refused"


def test_only_errors_that_say_a_store_is_away_count():
    assert backing.store_of(redis.ConnectionError("refused")) is REDIS
    assert backing.store_of(redis.TimeoutError("timed out")) is REDIS
    assert backing.store_of(psycopg_pool.PoolTimeout("no connection")) is POSTGRES
    assert backing.store_of(psycopg.OperationalError("connection refused")) is POSTGRES
    assert backing.store_of(psycopg.errors.AdminShutdown("terminating")) is POSTGRES
    assert backing.store_of(psycopg.errors.SerializationFailure("retry")) is None
    assert backing.store_of(psycopg.errors.UniqueViolation("dup")) is None
    assert backing.store_of(redis.ResponseError("WRONGTYPE")) is None
    assert backing.store_of(ValueError("a bug")) is None


def test_probes_try_only_the_stores_that_are_down_unless_asked_for_all(tracked):
    health, _, heard, _ = tracked
    tried: list[BackingStore] = []
    answers = {REDIS: redis.ConnectionError("refused"), POSTGRES: None}

    def check(store):
        def run():
            tried.append(store)
            if answers[store]:
                raise answers[store]
        return run
    health.probe_with(REDIS, check(REDIS))
    health.probe_with(POSTGRES, check(POSTGRES))
    health.probe()
    assert tried == []
    health.probe(always=True)
    assert tried == [REDIS, POSTGRES] and health.is_down(REDIS)
    answers[REDIS] = None
    health.probe()
    assert tried[2:] == [REDIS] and not health.is_down(REDIS)
    assert [store for store, _ in heard] == [REDIS, REDIS]


# --- the master's side --------------------------------------------------------------------

def test_the_master_shows_the_earliest_outage_and_forgets_a_child_that_exits(tmp_path,
                                                                           monkeypatch):
    ini = tmp_path / "dtsd.ini"
    ini.write_text(f"[dtsd]\nruntime_dir = {tmp_path}\n")
    boss = master.Master(config.load(str(ini), env={}))
    first, second = master.Child("worker", 0), master.Child("server", 0)
    boss.children = [first, second]
    monkeypatch.setattr(master.time, "time", lambda: 1_700_000_100.0)
    boss.store_report(first, b"store redis down 1700000060.5")
    boss.store_report(second, b"store redis down 1700000090.0")
    boss.store_report(second, b"store nosuch down 1")          # ignored, warned
    assert "redis unreachable for 40 s" in boss.status_line()
    assert boss.node_record()["unreachable"] == {"redis": 1700000060.5}
    boss.store_report(first, b"store redis up")
    assert "redis unreachable for 10 s" in boss.status_line()
    restarted: list[master.Child] = []
    monkeypatch.setattr(boss, "spawn_child", restarted.append)
    boss.handle_exit(second, 1)                 # died without a report: restarted anew
    assert restarted == [second] and second in boss.children
    assert "unreachable" not in boss.status_line()
    assert boss.node_record()["unreachable"] == {}


# --- the client's side --------------------------------------------------------------------

class Answer(grpc.RpcError):
    """What a failed call raises: a code, trailing metadata, details (as grpc's do)."""

    def __init__(self, code, metadata=(), details=""):
        self._code, self._metadata, self._details = code, metadata, details

    def code(self):
        return self._code

    def trailing_metadata(self):
        return self._metadata

    def details(self):
        return self._details


def test_the_client_reports_the_server_that_named_a_store_over_a_later_refused_connection():
    named = Answer(grpc.StatusCode.UNAVAILABLE, (("dtsd-store", "postgres"),))
    no_connection = Answer(grpc.StatusCode.UNAVAILABLE)
    assert unreachable_store(named) == "postgres"
    assert unreachable_store(no_connection) is None
    # Metadata lost on the way (a proxy, a stream): the server's own words still name it.
    worded = Answer(grpc.StatusCode.UNAVAILABLE, details="Redis is unreachable from this "
                                                         "server: Connection refused")
    assert unreachable_store(worded) == "redis"
    assert unreachable_store(Answer(grpc.StatusCode.UNAVAILABLE,
                                    details="failed to connect to all addresses")) is None
    assert _telling(no_connection, named) is named
    assert _telling(named, no_connection) is named
    assert _telling(no_connection, None) is no_connection


def test_every_failure_is_counted_in_the_store_errors_metric(tracked):
    health = tracked[0]
    counter = metrics.STORE_ERRORS.labels("redis")
    before = counter._value.get()
    for _ in range(5):
        health.failure(REDIS, redis.ConnectionError("refused"))
    assert counter._value.get() == before + 5
