"""What every child process (server, worker, coordinator) shares: how it boots and talks to the master.

The master starts each child as a fresh interpreter (`python3 -m dtsd.<role> -c FILE
--index N --notify-fd FD`), so no connection or thread crosses a fork. The child
reports to the master over the inherited pipe FD: `ready` once it serves, then
`alive` now and then. Exit codes are a contract the master acts on (it stops instead
of crash-looping on a configuration error).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Callable

from . import config as configmod

# Exit codes of children, a documented contract (README, "Processes").
EXIT_OK = 0
EXIT_CONFIG = 78      # EX_CONFIG: the configuration is unusable; restarting will not help
EXIT_BOOT = 3         # could not start (e.g. cannot bind the port)
# Before the node was first ready, either one stops the master; later, a failing child
# backs off and ends FATAL, while the rest of the node goes on serving.


def setup_logging(cfg: configmod.Config | None, role: str) -> None:
    level = cfg.get("dtsd", "log_level") if cfg else "INFO"
    log_file = cfg.get("dtsd", "log_file") if cfg else ""
    handler: logging.Handler
    if log_file:
        from logging.handlers import WatchedFileHandler
        handler = WatchedFileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s [{role} %(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def reopen_logs() -> None:
    """After logrotate moved the file: write to a fresh one (USR1)."""
    for handler in logging.getLogger().handlers:
        reopen = getattr(handler, "reopenIfNeeded", None)
        if reopen:
            reopen()


class Parent:
    """The child's end of its pipe to the master. Silent when there is no master."""

    def __init__(self, fd: int | None):
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, word: str) -> None:
        if self.fd is None:
            return
        with self._lock:
            try:
                os.write(self.fd, word.encode() + b"\n")
            except OSError:
                self.fd = None

    def ready(self) -> None:
        self.send("ready")

    def alive(self) -> None:
        self.send("alive")

    def status(self, report: dict) -> None:
        self.send("status " + json.dumps(report))


def boot(role: str, argv: list[str] | None = None) -> tuple[configmod.Config, int, Parent]:
    """Parse the child's arguments and configuration; exits EXIT_CONFIG on a bad file."""
    parser = argparse.ArgumentParser(prog=f"dtsd-{role}")
    parser.add_argument("-c", "--config", default=None)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--notify-fd", type=int, default=None)
    args = parser.parse_args(argv)
    # The master handles Ctrl-C for the whole tree; a terminal's SIGINT reaches every
    # process of the foreground group, and children must not act on it by themselves.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, lambda *_: reopen_logs())
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as exc:
        setup_logging(None, role)
        logging.getLogger(role).error("%s", exc)
        sys.exit(EXIT_CONFIG)
    setup_logging(cfg, f"{role}-{args.index}")
    return cfg, args.index, Parent(args.notify_fd)


def connect(store, queue, log: logging.Logger, stop: threading.Event,
            *also: Callable[[], object]) -> bool:
    """Open the child's PostgreSQL pool and reach Redis (then run `also`), retrying until
    everything answers; False if `stop` was set first."""
    def attempt() -> bool:
        store.open(wait=True, timeout=30)
        queue.redis.ping()
        for step in also:
            step()
        return True
    return retry_forever("connecting to PostgreSQL and Redis", attempt, log, stop) is not None


def retry_forever(what: str, attempt: Callable[[], object], log: logging.Logger,
                  stop: threading.Event, first_delay: float = 0.2, max_delay: float = 5.0):
    """Call `attempt` until it succeeds or `stop` is set, backing off; logs each failure once."""
    delay = first_delay
    while not stop.is_set():
        try:
            return attempt()
        except Exception as exc:  # a backing store is down: wait and try again
            log.warning("%s failed: %s; retrying in %.1fs", what, exc, delay)
            stop.wait(delay)
            delay = min(max_delay, delay * 2)
    return None
