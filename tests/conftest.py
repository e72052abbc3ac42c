"""Fixtures: real PostgreSQL, Redis and dtsd masters on free loopback ports (no mocks).

- `postgres` (session): one private cluster for the whole run; `.port`, `.dsn(db)`,
  `.admin_dsn`.
- `pg_dsn` (function): a fresh database in it, dropped afterwards.
- `redis` (function): a private redis-server; `.url`, `.port`, `.stop()`, `.start()`.
- `dtsd_factory` (function): `dtsd_factory(**overrides)` starts a real master wired to
  the test's `pg_dsn` and `redis`, and returns once its gRPC health check says SERVING.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from tests.helpers import (DtsdMaster, PostgresServer, RedisServer, free_port,
                           merge_sections, tail)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Remember each phase's report on the item (`item.rep_setup`, `item.rep_call`), so
    fixtures can tell at teardown whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def _failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(getattr(getattr(node, f"rep_{when}", None), "failed", False)
               for when in ("setup", "call"))


@pytest.fixture(autouse=True)
def _jobs_may_use_tmp_path(request: pytest.FixtureRequest) -> None:
    """Jobs run as the unprivileged TEST_JOB_USER, and many tests hand them a `tmp_path`
    to write marks into: open it (and the way to it) to them. pytest makes these 0700."""
    if "tmp_path" not in request.fixturenames:
        return
    path: Path = request.getfixturevalue("tmp_path")
    path.chmod(0o777)
    for parent in path.parents:
        if parent == Path(tempfile.gettempdir()):
            break
        parent.chmod(parent.stat().st_mode | 0o011)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_dsn(postgres: PostgresServer) -> Iterator[str]:
    name = f"t_{secrets.token_hex(6)}"
    dsn = postgres.create_database(name)
    try:
        yield dsn
    finally:
        postgres.drop_database(name)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


class DtsdFactory:
    """Starts real dtsd masters for one test: `factory({"worker": {"processes": 1}})` or
    `factory(worker={"processes": 1})`. Each gets its own node id (test-1, test-2, ...),
    port and runtime directory, and shares the test's PostgreSQL database and Redis."""

    def __init__(self, request: pytest.FixtureRequest, pg_dsn: str, redis: RedisServer):
        self.request = request
        self.pg_dsn = pg_dsn
        self.redis = redis
        self.masters: list[DtsdMaster] = []
        # Short: the runtime directory holds unix sockets (108-byte path limit).
        self.dir = Path(tempfile.mkdtemp(prefix="dtsd-t-"))

    def __call__(self, overrides: Mapping[str, Mapping[str, Any]] | None = None, *,
                 timeout: float = 30, start: bool = True,
                 **section_overrides: Mapping[str, Any]) -> DtsdMaster:
        number = len(self.masters) + 1
        workdir = self.dir / f"m{number}"
        (workdir / "run").mkdir(parents=True)
        base = {
            "dtsd": {"node_id": f"test-{number}", "runtime_dir": str(workdir / "run")},
            "server": {"listen": f"127.0.0.1:{free_port()}"},
            "web": {"processes": 0, "listen": f"127.0.0.1:{free_port()}"},
            "postgres": {"dsn": self.pg_dsn},
            "redis": {"url": self.redis.url},
        }
        sections = merge_sections(merge_sections(base, overrides), section_overrides)
        master = DtsdMaster(workdir, str(sections["dtsd"]["node_id"]), sections)
        self.masters.append(master)
        if start:
            master.start(timeout=timeout)
        return master

    def stop_all(self) -> None:
        for master in reversed(self.masters):
            try:
                master.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others all the same
                print(f"stopping {master!r} failed: {exc!r}")


@pytest.fixture
def dtsd_factory(request: pytest.FixtureRequest, pg_dsn: str,
                 redis: RedisServer) -> Iterator[DtsdFactory]:
    factory = DtsdFactory(request, pg_dsn, redis)
    try:
        yield factory
    finally:
        factory.stop_all()
        if _failed(request):
            # Shown by pytest as "Captured stdout teardown" under the failure.
            for master in factory.masters:
                print(f"\n----- dtsd {master.node_id} ({master.address}) log, last 100 lines: "
                      f"{master.log_path} -----\n{tail(master.log_path, 100)}")
            print(f"(kept {factory.dir} for inspection)")
        else:
            shutil.rmtree(factory.dir, ignore_errors=True)


# --- etcd (tests/etcd_helpers.py) ------------------------------------------------------------
# `etcd`: a private single-member etcd; `etcd_cluster`: three members (stop/kill/start them
# one by one with `.stop_member(i)`, `.kill_member(i)`, `.start_member(i)`). Both give
# `.endpoints` ("127.0.0.1:p1,..."), and are function-scoped: every test gets fresh data.

@pytest.fixture
def etcd(request: pytest.FixtureRequest):
    from tests.etcd_helpers import EtcdServer
    server = EtcdServer()
    try:
        server.start()
        yield server
    finally:
        if _failed(request):
            print(f"\n{server.logs(60)}")
        server.cleanup()


@pytest.fixture
def etcd_cluster(request: pytest.FixtureRequest):
    from tests.etcd_helpers import EtcdCluster
    cluster = EtcdCluster(3)
    try:
        cluster.start()
        yield cluster
    finally:
        if _failed(request):
            print(f"\n{cluster.logs(60)}")
        cluster.cleanup()
