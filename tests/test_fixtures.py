"""The test fixtures themselves: real PostgreSQL and Redis on loopback ports."""

from __future__ import annotations

import socket

import psycopg
import pytest
import redis as redis_py

from tests.helpers import Timeout, free_port, wait_for


def test_free_port_is_free_and_unique():
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    for port in list(ports)[:3]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_wait_for_returns_value_and_times_out():
    calls = []

    def third_time():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("not yet")
        return "ready"

    assert wait_for(third_time, timeout=5, interval=0.01) == "ready"
    with pytest.raises(Timeout, match="the impossible"):
        wait_for(lambda: False, timeout=0.2, interval=0.01, message="the impossible")


def test_postgres_server(postgres):
    assert postgres.admin_dsn == f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres"
    assert postgres.dsn("x") == f"postgresql://postgres@127.0.0.1:{postgres.port}/x"
    with psycopg.connect(postgres.admin_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
        assert conn.execute("SHOW max_connections").fetchone() == ("300",)
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)
        assert conn.execute("SELECT inet_server_addr()::text").fetchone()[0].startswith(
            "127.0.0.1")


def test_pg_dsn_is_a_fresh_database(postgres, pg_dsn):
    dbname = pg_dsn.rsplit("/", 1)[1]
    assert dbname.startswith("t_")
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (dbname,)
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone() == (0,)
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_drop_database_forces_out_connections(postgres):
    # What pg_dsn's teardown does: the drop must not hang on a connection a test left open.
    dsn = postgres.create_database("t_fixture_check")
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        postgres.drop_database("t_fixture_check")
    finally:
        conn.close()
    with psycopg.connect(postgres.admin_dsn) as admin:
        assert admin.execute("SELECT count(*) FROM pg_database WHERE datname = 't_fixture_check'"
                             ).fetchone() == (0,)


def test_redis_set_get(redis):
    assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
    client = redis_py.Redis.from_url(redis.url)
    try:
        assert client.ping()
        client.set("k", "v")
        assert client.get("k") == b"v"
    finally:
        client.close()


def test_redis_stop_start_is_empty(redis):
    client = redis_py.Redis.from_url(redis.url, socket_timeout=2)
    try:
        client.set("k", "v")
        port = redis.port
        redis.stop()
        with pytest.raises(redis_py.ConnectionError):
            client.ping()
        redis.start()
        assert redis.port == port
        assert client.ping()
        assert client.get("k") is None
        assert client.dbsize() == 0
    finally:
        client.close()
