"""The web child: dtsd over HTTP, on `[web] listen`.

    GET /healthz   200 while this process answers (liveness)
    GET /readyz    200 when this node reaches PostgreSQL, Redis and (in a cluster) etcd;
                   503 naming what it does not reach (readiness)
    GET /metrics   the node's Prometheus metrics (dtsd/metrics.py), in the text format
    /api/v1/...    the HTTP JSON API (dtsd/httpapi.py): a client of this node's gRPC API
                   on its local sockets, with the caller's bearer token
    /, /jobs, ...  the web UI (dtsd/webui.py): pages over the same API, with sessions

It follows the gRPC port's rules (docs/security.md): on a loopback address by default;
anywhere else only with `[server] tokens_file` and TLS (`[server] tls_cert`/`tls_key`,
the same certificate), unless `[server] insecure = true`. With a tokens file, /metrics
wants `Authorization: Bearer <token>` of any role; /healthz and /readyz answer anyone and
say only which store is unreachable (the why goes to the log).

The event loop never blocks: a scrape (the metric files, one PostgreSQL and one Redis
round trip) runs on a small thread pool, at most SCRAPES at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import ssl
import sys
import threading
import time

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from . import __version__, auth, child, httpapi, metrics, webui
from . import tls as tlsmod
from .config import Config
from .queue import Queue, connect
from .store import Store

log = logging.getLogger("dtsd.web")

SCRAPES = 2                  # scrapes (and readiness checks) running at once
READY_FRESH = 1.0            # seconds a readiness answer is reused
STORE_TIMEOUT = 2.0          # seconds a store may take to answer a check or a scrape
ETCD_STALE = 3.0             # the coordinator polls etcd every 0.5 s: older means unreachable
ETCD_POLLED = "dtsd_etcd_polled"     # metrics.ETCD_POLLED, internal
# The classic text format, which every Prometheus reads (prometheus_client 0.2x would
# announce version=1.0.0, which Debian 12's Prometheus 2.42 does not know).
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


class Stores:
    """What the stores say, for /readyz and /metrics: each read bounded by STORE_TIMEOUT."""

    def __init__(self, cfg: Config, directory: str | None):
        self.cfg = cfg
        self.directory = directory
        self.store = Store(cfg.get("postgres", "dsn"), min_size=0, max_size=2,
                           name="dtsd-web", timeout=STORE_TIMEOUT)
        self.queue = Queue(connect(cfg.get("redis", "url")), cfg.key_prefix)
        self.clustered = bool(cfg.get("etcd", "endpoints"))
        self._ready: tuple[float, dict[str, bool]] = (-READY_FRESH, {})
        self._lock = threading.Lock()
        self._reported: dict[str, bool] = {}

    def open(self) -> None:
        self.store.open(wait=False)

    def close(self) -> None:
        self.store.close()

    # --- reachability ---------------------------------------------------------------------

    def _check(self, store: str, probe) -> bool:
        try:
            probe()
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            self._report(store, False, exc)
            return False
        self._report(store, True)
        return True

    def _report(self, store: str, up: bool, exc: BaseException | None = None) -> None:
        """Log a store's reachability when it changes, not at every check."""
        if self._reported.get(store, True) != up:
            if up:
                log.info("%s is reachable again", store)
            else:
                log.warning("%s is unreachable from this node: %s", store, exc)
        self._reported[store] = up

    def _postgres(self) -> None:
        with self.store.connection(timeout=STORE_TIMEOUT, limit=STORE_TIMEOUT) as conn:
            conn.execute("SELECT 1")

    def etcd_up(self) -> bool | None:
        """The coordinator's view (it holds this node's etcd session): None when this node
        is not in a cluster."""
        if not self.clustered:
            return None
        polled = 0.0
        if self.directory:
            for family in MultiProcessCollector(None, self.directory).collect():
                if family.name == ETCD_POLLED:
                    polled = max((s.value for s in family.samples), default=0.0)
        up = polled > 0 and time.time() - polled < ETCD_STALE
        self._report("etcd", up, None if up else
                     Exception("the coordinator has not reached it for "
                               f"{'ever' if not polled else f'{time.time() - polled:.0f} s'}"))
        return up

    def readiness(self) -> dict[str, bool]:
        """{store: reachable}, answered again at most every READY_FRESH seconds."""
        with self._lock:
            at, answer = self._ready
            if time.monotonic() - at < READY_FRESH:
                return answer
            answer = {"postgres": self._check("postgres", self._postgres),
                      "redis": self._check("redis", self.queue.redis.ping)}
            etcd = self.etcd_up()
            if etcd is not None:
                answer["etcd"] = etcd
            self._ready = (time.monotonic(), answer)
            return answer

    # --- the metrics only the stores know --------------------------------------------------

    def collect(self):
        """A prometheus_client collector: store reachability, then what each store holds."""
        up = self.readiness()
        store_up = GaugeMetricFamily("dtsd_store_up",
                                     "1 if this node reaches the backing store at scrape time.",
                                     labels=["store"])
        for store, reachable in up.items():
            store_up.add_metric([store], 1.0 if reachable else 0.0)
        yield store_up
        info = GaugeMetricFamily("dtsd_build_info", "The dtsd version this node runs.",
                                 labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info
        if up["postgres"]:
            try:
                by_status, dead = self.store.status_counts(timeout=STORE_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - a scrape shows what it could read
                log.warning("metrics: job counts not read from PostgreSQL: %s", exc)
            else:
                jobs = GaugeMetricFamily("dtsd_jobs", "Jobs stored, by status.",
                                         labels=["status"])
                for status, count in sorted(by_status.items()):
                    jobs.add_metric([status], float(count))
                yield jobs
                yield GaugeMetricFamily("dtsd_dead_letters",
                                        "Dead-lettered jobs not yet requeued or purged.",
                                        value=float(dead))
        if up["redis"]:
            try:
                ready, delayed = self.queue.depths()
            except Exception as exc:  # noqa: BLE001
                log.warning("metrics: queue depths not read from Redis: %s", exc)
            else:
                depth = GaugeMetricFamily("dtsd_queue_depth",
                                          "Job ids ready to run in Redis, by queue and priority.",
                                          labels=["queue", "priority"])
                summed: dict[tuple[str, str], int] = {}
                for (queue, priority), count in ready.items():
                    key = (metrics.queue_label(queue), str(priority))
                    summed[key] = summed.get(key, 0) + count
                for key, count in sorted(summed.items()):
                    depth.add_metric(list(key), float(count))
                yield depth
                yield GaugeMetricFamily(
                    "dtsd_queue_delayed",
                    "Job ids in Redis waiting for their run_at or retry back-off.",
                    value=float(delayed))


class Processes:
    """The metrics the node's processes wrote (metrics.py), without the internal ones."""

    HIDDEN = frozenset({ETCD_POLLED})

    def __init__(self, directory: str):
        self.collector = MultiProcessCollector(None, directory)

    def collect(self):
        for family in self.collector.collect():
            if family.name not in self.HIDDEN:
                yield family


class Web:
    def __init__(self, cfg: Config, index: int, parent: child.Parent):
        self.cfg = cfg
        self.parent = parent
        directory = os.environ.get(metrics.ENV) or None
        self.stores = Stores(cfg, directory)
        self.registry = CollectorRegistry(auto_describe=False)
        if directory:
            self.registry.register(Processes(directory))
        self.registry.register(self.stores)
        tokens_file = cfg.get("server", "tokens_file")
        self.tokens = auth.TokenFile(tokens_file) if tokens_file else None
        self.pool = concurrent.futures.ThreadPoolExecutor(SCRAPES, thread_name_prefix="scrape")
        self.api = httpapi.HttpApi(cfg)
        self.ui = webui.WebUI(cfg, self.api.channels,
                              tls=bool(cfg.get("server", "tls_cert") and cfg.get("server", "tls_key")))
        self.stopping = asyncio.Event()

    # --- handlers -------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers=HEADERS)

    async def readyz(self, request: web.Request) -> web.Response:
        answer = await asyncio.get_running_loop().run_in_executor(self.pool,
                                                                  self.stores.readiness)
        lines = [f"{store}: {'ok' if up else 'unreachable'}" for store, up in answer.items()]
        ready = all(answer.values())
        return web.Response(text="\n".join(["ready" if ready else "not ready", *lines]) + "\n",
                            status=200 if ready else 503, headers=HEADERS)

    async def metrics(self, request: web.Request) -> web.Response:
        refusal = self._authenticate(request)
        if refusal is not None:
            return refusal
        body = await asyncio.get_running_loop().run_in_executor(
            self.pool, generate_latest, self.registry)
        return web.Response(body=body, headers={**HEADERS, "Content-Type": METRICS_TYPE})

    def _authenticate(self, request: web.Request) -> web.Response | None:
        """None when the caller may read; else the 401 to answer."""
        if self.tokens is None:
            return None
        secret = auth.bearer_secret(request.headers.get("Authorization", ""))
        if secret and self.tokens.lookup(secret):
            return None
        return web.Response(status=401, text="a bearer token of [server] tokens_file is needed\n",
                            headers={**HEADERS, **httpapi.CHALLENGE})

    def app(self) -> web.Application:
        # Bodies up to the API's own limit: only the JSON API reads one.
        app = web.Application(client_max_size=self.api.max_body,
                              middlewares=[httpapi.json_errors])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        self.api.add_routes(app)
        self.ui.add_routes(app)
        return app

    # --- running --------------------------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGQUIT):
            loop.add_signal_handler(signum, self.stopping.set)
        self.stores.open()
        host, port = self.cfg.get("web", "listen")
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            tls = tlsmod.server_context(self.cfg)
            site = web.TCPSite(runner, host, port, ssl_context=tls, reuse_port=True)
            await site.start()
        except (OSError, ssl.SSLError) as exc:
            log.error("cannot listen on %s:%d: %s", host, port, exc)
            await runner.cleanup()
            return child.EXIT_BOOT
        log.info("serving /healthz, /readyz, /metrics and %s/ on %s://%s:%d (%s)",
                 httpapi.PREFIX,
                 "https" if tls else "http", host, port,
                 "bearer tokens for /metrics" if self.tokens else "no tokens")
        self.parent.ready()
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), 1.0)
            except asyncio.TimeoutError:
                self.parent.alive()
        await runner.cleanup()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.stores.close()
        return child.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    cfg, index, parent = child.boot("web", argv)
    return asyncio.run(Web(cfg, index, parent).serve())


if __name__ == "__main__":
    sys.exit(main())
