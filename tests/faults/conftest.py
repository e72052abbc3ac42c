"""Fixtures of the fault scenarios (tests/faults/, `make test-faults`).

`rig`: a PostgreSQL cluster and a Redis of the test's own (it may stop, restart and kill
them), each behind a `FaultyLink` proxy the test can blackhole, slow down or make drop
connections, and `rig.node(...)` to start dtsd masters wired through those links. At the
end of the run, every scenario's counts are printed (submitted, completed, lost, run
twice, recovery time): the README's fault table comes from them.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from tests.conftest import DtsdFactory
from tests.faults.common import Tally
from tests.faults.proxy import FaultyLink
from tests.helpers import DtsdMaster, PostgresServer, RedisServer, tail

_REPORTS: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    if _REPORTS:
        terminalreporter.section("fault scenarios")
        for line in _REPORTS:
            terminalreporter.write_line(line)


@pytest.fixture
def report(request: pytest.FixtureRequest):
    """`report(tally, recovery=seconds, **more)`: print it now and in the summary."""
    def record(tally: Tally, **figures: Any) -> None:
        extra = ", ".join(f"{key} {value:.1f}s" if isinstance(value, float) else
                          f"{key} {value}" for key, value in figures.items())
        line = tally.line(request.node.name) + (f"; {extra}" if extra else "")
        print(line)
        _REPORTS.append(line)
    return record


class Rig:
    """Stores of the test's own, behind proxies, and the masters started on them."""

    def __init__(self, request: pytest.FixtureRequest, redis_appendonly: bool = False):
        self.request = request
        self.pg = PostgresServer().start()
        self.redis = RedisServer(appendonly=redis_appendonly).start()
        self.db = f"t_{secrets.token_hex(6)}"
        self.dsn = self.pg.create_database(self.db)          # direct: the test's own checks
        self.pg_link = FaultyLink(("127.0.0.1", self.pg.port)).start()
        self.redis_link = FaultyLink(("127.0.0.1", self.redis.port)).start()
        self.node_dsn = self.dsn.replace(f":{self.pg.port}/", f":{self.pg_link.port}/")
        self.node_redis = f"redis://127.0.0.1:{self.redis_link.port}/0"
        self.factory = DtsdFactory(request, self.node_dsn, self.redis)
        self.dir = Path(tempfile.mkdtemp(prefix="dtsd-f-"))
        self.dir.chmod(0o777)            # jobs (as the test job user) write their ledger here
        self.ledger = self.dir / "ledger"
        self.ledger.touch()
        self.ledger.chmod(0o666)         # each job slot is a uid of its own

    def node(self, overrides: Mapping[str, Mapping[str, Any]] | None = None, *,
             env: Mapping[str, str] | None = None, **sections: Mapping[str, Any]
             ) -> DtsdMaster:
        """A master on the rig's links; `env` adds to its environment (LD_PRELOAD...)."""
        merged: dict[str, dict[str, Any]] = {"redis": {"url": self.node_redis}}
        for section, values in {**(overrides or {}), **sections}.items():
            merged[section] = {**merged.get(section, {}), **values}
        master = self.factory(merged, start=False)
        if env:
            plain = master.env
            master.env = lambda: {**plain(), **env}
        return master.start()

    def close(self, failed: bool) -> None:
        self.factory.stop_all()
        if failed:
            for master in self.factory.masters:
                print(f"\n----- {master.node_id} log -----\n{tail(master.log_path, 80)}")
        self.pg_link.close()
        self.redis_link.close()
        self.redis.cleanup()
        self.pg.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)
        if not failed:
            shutil.rmtree(self.factory.dir, ignore_errors=True)


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
               for when in ("setup", "call"))


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    marker = request.node.get_closest_marker("redis_appendonly")
    setup = Rig(request, redis_appendonly=marker is not None)
    try:
        yield setup
    finally:
        setup.close(_failed(request))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "redis_appendonly: the rig's Redis keeps an AOF")
