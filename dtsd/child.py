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
import re
import select
import signal
import sys
import threading
import time
from logging.handlers import WatchedFileHandler
from typing import Callable

from . import backing
from . import config as configmod

# Exit codes of children, a documented contract (docs/processes.md).
EXIT_OK = 0
EXIT_CONFIG = 78      # EX_CONFIG: the configuration is unusable; restarting will not help
EXIT_BOOT = 3         # could not start (e.g. cannot bind the port)
EXIT_MASTER_GONE = 1  # the master died and the child outstayed its stop budget (nobody reaps it)
# Before the node was first ready, either one stops the master; later, a failing child
# backs off and ends FATAL, while the rest of the node goes on serving.

# Seconds a child may take, after its drain (stopwaitsecs, and kill_grace for a worker), to
# record what it holds and let go. The master KILLs a child that overstays it by more
# (STOP_MARGIN in dtsd/master.py); a child whose master is gone ends itself at that point.
FINISH_GRACE = 3.0
COORDINATOR_STOPWAIT = 5.0     # the coordinator has no section of its own


def stop_budget(cfg: configmod.Config, role: str) -> float:
    """Seconds from a TERM to the moment the child must be gone: its stopwaitsecs, a
    worker's kill_grace (to kill what the drain hands back), and FINISH_GRACE."""
    wait = COORDINATOR_STOPWAIT if role == "coordinator" else cfg.get(role, "stopwaitsecs")
    grace = cfg.get("worker", "kill_grace") if role == "worker" else 0.0
    return wait + grace + FINISH_GRACE


# --- logging ------------------------------------------------------------------------------

# syslog priorities by logging level: the journal reads a `<N>` prefix on each line it gets.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))
_DEBUG_PRIORITY = 7
# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators: none of
# them may reach a log line raw, or a name read from Redis could start a line of its own.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
LOG_FILE_MODE = 0o640


def _escaped(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str, keep_newlines: bool = False) -> str:
    """`text` with every control character written as an escape (`\\n`, `\\x1b`, ...).

    What the log gets from outside (worker names read from Redis, job and token names,
    peers) is then one line that a reader's terminal shows as it is: no forged line, no
    escape sequence. `keep_newlines` is for tracebacks, whose lines are Python's own."""
    pattern = _CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL
    return pattern.sub(_escaped, text)


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (journald's `<N>` prefix)."""
    return next((prio for level, prio in _PRIORITIES if levelno >= level), _DEBUG_PRIORITY)


def stderr_is_journal() -> bool:
    """True when standard error is a stream to journald: systemd then sets JOURNAL_STREAM
    to that stream's `device:inode` (a redirected stderr no longer matches it)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat(2)
    except OSError:
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


def journal_line(text: str, levelno: int = logging.ERROR) -> str:
    """`text` as written to standard error: with the `<N>` prefix on every line under
    journald, so `dtsd reload` and the refusals before logging is set up keep their
    priority too."""
    if not stderr_is_journal():
        return text
    prefix = f"<{priority(levelno)}>"
    return "\n".join(prefix + line for line in text.split("\n"))


class LogFormatter(logging.Formatter):
    """Every log line of dtsd: control characters escaped in the message (and in a
    traceback, but for its own newlines); under journald each line starts with its syslog
    priority and carries no time stamp (the journal keeps its own)."""

    def __init__(self, role: str, journal: bool):
        stamp = "" if journal else "%(asctime)s "
        super().__init__(f"{stamp}%(levelname)s [{role} %(process)d] %(name)s: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for extra in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if extra:
                text += "\n" + escape_control(extra, keep_newlines=True)
        if self.journal:
            prefix = f"<{priority(record.levelno)}>"
            text = "\n".join(prefix + line for line in text.split("\n"))
        return text


class LogFile(WatchedFileHandler):
    """`[dtsd] log_file`: created 0640 whatever the umask (the log names jobs, workers and
    callers), and opened anew when logrotate moved it (USR1, or at the next line)."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_FILE_MODE)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)


def open_log_file(path: str):
    """A log stream opened for appending, created 0640 (the detached master's stderr)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_FILE_MODE)
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8")


def setup_logging(cfg: configmod.Config | None, role: str) -> None:
    """The process's one log handler: `[dtsd] log_file`, else standard error (the journal
    under systemd, with priorities). Called again on reload."""
    level = cfg.get("dtsd", "log_level") if cfg else "INFO"
    log_file = cfg.get("dtsd", "log_file") if cfg else ""
    handler: logging.Handler
    if log_file:
        handler = LogFile(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(role, journal=not log_file and stderr_is_journal()))
    root = logging.getLogger()
    for old in root.handlers:
        if old is not handler and isinstance(old, logging.FileHandler):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # psycopg's pool warns at every failed reconnection: dtsd.backing says it once.
    logging.getLogger("psycopg.pool").setLevel(max(logging.ERROR, root.level))
    # A crash's traceback is a log record too: escaped, and at its priority in the journal.
    crashed = logging.getLogger(f"dtsd.{role.split('-')[0]}")
    sys.excepthook = lambda kind, value, tb: crashed.critical(
        "uncaught exception", exc_info=(kind, value, tb))

    def thread_crashed(args) -> None:
        if args.exc_type is not SystemExit:
            crashed.critical("uncaught exception in thread %s",
                             args.thread.name if args.thread else "?",
                             exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
    threading.excepthook = thread_crashed


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

    def watch(self, budget: float, log: logging.Logger) -> None:
        """End this process if the master goes away, whatever its loops are waiting for.

        The master's PR_SET_PDEATHSIG sends a TERM when it dies, and the child drains as
        for any TERM; but nobody is left to KILL a child that then hangs (on a store that
        went too, say). The master holding the pipe's read end is the one sure sign it
        lives: once the read end is closed (POLLERR on the write end), the child has
        `budget` seconds, the time the master would have given it, then exits if it still
        runs. Its jobs die with it (the launcher kills every slot when the worker goes).
        No second TERM is sent: a handler interrupted by itself could deadlock on the
        Event it sets."""
        if self.fd is None:
            return
        fd = self.fd

        def wait_for_the_end() -> None:
            poller = select.poll()
            poller.register(fd, 0)          # POLLERR and POLLHUP are always reported
            while not any(event & (select.POLLERR | select.POLLHUP | select.POLLNVAL)
                          for _, event in poller.poll()):
                pass
            log.warning("the master is gone: stopping within %.0fs", budget)
            time.sleep(budget)
            log.error("still running %.0fs after the master went: exiting now", budget)
            logging.shutdown()
            os._exit(EXIT_MASTER_GONE)
        threading.Thread(target=wait_for_the_end, name="master-watch", daemon=True).start()

    def ready(self) -> None:
        self.send("ready")

    def alive(self) -> None:
        self.send("alive")

    def status(self, report: dict) -> None:
        self.send("status " + json.dumps(report))

    def store_state(self, store: backing.BackingStore, outage: backing.Outage | None) -> None:
        """`store redis down <unix time>` when this process lost a store, `store redis up`
        when it answers again: the master names it in its status line and node record."""
        if outage is None:
            self.send(f"store {store.value} up")
        else:
            self.send(f"store {store.value} down {outage.since:.3f}")


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
        # The checks the master ran in a subprocess (they load client libraries): the file
        # may have changed since, as a child reads it again at every (re)start.
        from .checks import Severity, isolated_problems
        errors = [p.message for p in isolated_problems(cfg) if p.severity is Severity.ERROR]
        if errors:
            raise configmod.ConfigError(f"{cfg.path}: " + "; ".join(errors))
    except configmod.ConfigError as exc:
        setup_logging(None, role)
        logging.getLogger(role).error("%s", exc)
        sys.exit(EXIT_CONFIG)
    setup_logging(cfg, f"{role}-{args.index}")
    parent = Parent(args.notify_fd)
    parent.watch(stop_budget(cfg, role), logging.getLogger(f"dtsd.{role}"))
    backing.health.listen(parent.store_state)
    return cfg, args.index, parent


def connect(store, queue, log: logging.Logger, stop: threading.Event,
            *also: Callable[[], object], probe_always: bool = False) -> bool:
    """Open the child's PostgreSQL pool and reach Redis (then run `also`), retrying until
    everything answers; False if `stop` was set first.

    Then both stores are probed until `stop`: while one is down (every second, so that its
    return is seen), or all the time with `probe_always` (an API server, whose health
    says whether it can serve)."""
    def attempt() -> bool:
        import psycopg      # here: the master, which imports this module, loads no client
        # One connection first, for its error: the pool would only say that it waited
        # 30 s (and psycopg's pool logger, which said why, is held to errors).
        psycopg.connect(store.dsn, connect_timeout=3).close()
        store.open(wait=True, timeout=30)
        queue.redis.ping()
        for step in also:
            step()
        return True
    if retry_forever("connecting to PostgreSQL and Redis", attempt, log, stop) is None:
        return False
    backing.health.probe_with(backing.BackingStore.POSTGRES, backing.probe_postgres(store))
    backing.health.probe_with(backing.BackingStore.REDIS, backing.probe_redis(queue.redis))
    backing.health.start_probing(stop, always=probe_always)
    return True


def retry_forever(what: str, attempt: Callable[[], object], log: logging.Logger,
                  stop: threading.Event, first_delay: float = 0.2, max_delay: float = 5.0):
    """Call `attempt` until it succeeds or `stop` is set, backing off.

    A failure that says a backing store is away goes to `backing.health`, which logs once
    per change of the store's state (not once per try), and the success that follows says
    the store is back. Any other failure is logged each time."""
    delay = first_delay
    failed: set[backing.BackingStore] = set()
    while not stop.is_set():
        try:
            result = attempt()
        except Exception as exc:  # a backing store is down: wait and try again
            store = backing.health.note(exc)
            if store is None:
                log.warning("%s failed: %s; retrying in %.1fs", what, exc, delay)
            else:
                failed.add(store)
                log.debug("%s failed: %s; retrying in %.1fs", what, exc, delay)
            stop.wait(delay)
            delay = min(max_delay, delay * 2)
            continue
        for store in failed:
            backing.health.success(store)
        return result
    return None
