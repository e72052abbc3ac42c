"""Run one job's shell command: spawn, pump its output, enforce its deadline, end it.

The worker runs several of these at once, one thread each, so nothing here uses signal
handlers or module state. The job is started by the worker's launcher (dtsd/launcher.py),
in a slot of its own: a timeout or a cancel reaches every process of the slot, and nothing
the command started outlives the attempt -- when `run()` returns, the slot has been
released, and the launcher kills whatever is left of it before the slot's next job starts.
"""

from __future__ import annotations

import logging
import math
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from dtsd.models import EndReason
from dtsd.shown import describe_signal

if TYPE_CHECKING:
    from dtsd.jobbox import Launcher

log = logging.getLogger(__name__)

OutputCallback = Callable[[bytes, int], None]

READ_SIZE = 64 * 1024       # a full default pipe buffer per read
FLUSH_INTERVAL = 0.05       # at most this often to on_output...
FLUSH_BYTES = 64 * 1024     # ...unless this much kept output is waiting
LINGER = 0.05               # after the shell exits, how long leftovers may hold the pipe
MAX_POLL_MS = 2**31 - 1      # poll()'s largest timeout
REPORT_WAIT = 60.0          # after the release, how long the launcher may take to report the end
DRAIN_READS = 16            # bounded final read of what leftovers already wrote


def build_env(job_env: dict[str, str], *, path: str, job_id: str, attempt: int,
              home: str = "/") -> dict[str, str]:
    """A job's whole environment, built from nothing.

    The worker's own environment holds database DSNs and tokens, so none of it is
    inherited. The job's env may override PATH, HOME and LANG, but the two DTSD_
    variables are dtsd's word about which attempt this is and always win.
    """
    env = {"PATH": path, "HOME": home, "LANG": "C.UTF-8"}
    env.update(job_env)
    env["DTSD_JOB_ID"] = job_id
    env["DTSD_ATTEMPT"] = str(attempt)
    return env


@dataclass
class Result:
    """How one run ended, in the terms the store records."""

    exit_code: int | None      # the shell's exit status; None if a signal ended it or it never ran
    signal: int | None         # the signal that ended the shell, if any
    output: bytes              # stdout and stderr as interleaved by the job, the first max_output bytes
    truncated: bool            # the job wrote more than was kept
    reason: EndReason | None   # why dtsd ended it; None when the command exited on its own
    error: str                 # for people: "" when the command exited on its own with a status
    duration: float            # seconds from spawn to reap

    @property
    def ok(self) -> bool:
        return self.reason is None and self.exit_code == 0


class Execution:
    """One attempt of one command, from spawn to the end of everything it started.

    Single use: `run()` once, in the thread that owns it. `stop()` may come from any
    thread at any time; it only records the reason and wakes `run()`, which does all the
    signalling itself. The launcher reports the shell's exit from its reader thread, which
    also only records it and wakes `run()`.
    """

    def __init__(self, command: str, *, env: dict[str, str], cwd: str, launcher: "Launcher",
                 slot: int, shell: str = "/bin/sh", timeout: float = 0.0,
                 kill_grace: float = 10.0, max_output: int = 1 << 20,
                 on_output: OutputCallback | None = None,
                 limits: Sequence[tuple[int, int, int]] = ()):
        """`launcher` and `slot`: where the job runs (the caller runs one Execution per slot
        at a time). `limits`: (RLIMIT_*, soft, hard) for the job's shell."""
        self.argv = [shell, "-c", command]
        self.env = env
        self.cwd = cwd
        self.launcher = launcher
        self.slot = slot
        self.limits = list(limits)
        self.timeout = timeout
        self.kill_grace = kill_grace
        self.max_output = max_output
        self.on_output = on_output

        self._lock = threading.Lock()     # guards _started, _requested, _wake_fd, _code
        self._started = False
        self._requested: EndReason | None = None
        self._kill_by: float | None = None
        self._wake_fd: int | None = None
        self._code: int | None = None     # the shell's exit, as the launcher reported it
        self._spawn_error: str | None = None   # why the shell never ran, if it did not
        self._reported = threading.Event()

        self._spawned = False
        self._out_fd: int | None = None
        self._poller = select.poll()
        self._kept = bytearray()
        self._truncated = False
        self._flushed = 0
        self._last_flush = 0.0
        self._deadline: float | None = None
        self._kill_at: float | None = None
        self._exited_at: float | None = None
        self._ended_by: EndReason | None = None

    @property
    def running(self) -> bool:
        """Whether the job was handed to the launcher and has not been reported ended."""
        return self._spawned and self._code is None

    def stop(self, reason: EndReason, kill_by: float | None = None) -> None:
        """Ask `run()` to end the job: TERM to its processes now, KILL after `kill_grace`
        (or at the monotonic time `kill_by`, if that is sooner).

        The first reason wins (a later, sooner `kill_by` still counts). Before `run()`, the
        job will not start at all. If the shell has already exited by the time `run()` sees
        the request, the job finished on its own and its own result stands. Takes a lock,
        so not for signal handlers: let the handler wake a loop that calls this.
        """
        with self._lock:
            if self._requested is None:
                self._requested = reason
            if kill_by is not None:
                self._kill_by = kill_by if self._kill_by is None else min(self._kill_by, kill_by)
            if self._wake_fd is not None:
                os.eventfd_write(self._wake_fd, 1)

    def run(self) -> Result:
        """Run the command to its end and say how it ended. Never raises for the job's faults."""
        started = time.monotonic()
        with self._lock:
            if self._started:
                raise RuntimeError("an Execution runs only once")
            self._started = True
            if self._requested is not None:
                return self._never_started(self._requested, f"{self._requested} before start")
            self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            try:
                self._spawn()
            except Exception as exc:  # LauncherError, OSError
                self.launcher.release(self.slot)
                return self._never_started(EndReason.SPAWN_FAILED, f"cannot start: {exc}",
                                           time.monotonic() - started)
            try:
                self._watch(started)
                self._pump()
            finally:
                self._end()
            if self._spawn_error is not None:
                return self._never_started(EndReason.SPAWN_FAILED,
                                           f"cannot start: {self._spawn_error}",
                                           time.monotonic() - started)
            self._flush()
            return self._result(time.monotonic() - started)
        finally:
            self._close_fds()

    # --- spawning and ending --------------------------------------------------------------

    def _spawn(self) -> None:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            self.launcher.spawn(self.slot, self.argv, self.env, self.cwd, self.limits,
                                write_end, self._on_exit)
            self._spawned = True
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self._out_fd = read_end
        os.set_blocking(self._out_fd, False)

    def _on_exit(self, code: int, error: str | None) -> None:
        """From the launcher's reader thread: the shell ended with `code` (-N: signal N), or
        never ran, for the reason `error`."""
        with self._lock:
            self._spawn_error = error
            self._code = code
            if self._wake_fd is not None:
                os.eventfd_write(self._wake_fd, 1)
        self._reported.set()

    def _watch(self, started: float) -> None:
        """Register what can wake the loop and arm the deadline."""
        self._last_flush = started
        if self.timeout > 0:
            self._deadline = started + self.timeout
        self._poller.register(self._out_fd, select.POLLIN)
        self._poller.register(self._wake_fd, select.POLLIN)

    def _end(self) -> None:
        """Release the slot (the launcher kills what is left of it), and learn how the shell
        ended if it had not said yet."""
        self.launcher.release(self.slot)
        if not self._reported.wait(REPORT_WAIT):
            log.error("the launcher did not report the end of the job in slot %d in %.0fs",
                      self.slot, REPORT_WAIT)
            self._code = -signal.SIGKILL
        if self._exited_at is None:
            self._exited_at = time.monotonic()

    def _signal_group(self, sig: int) -> None:
        self.launcher.signal(self.slot, sig)

    def _close_fds(self) -> None:
        if self._out_fd is not None:
            os.close(self._out_fd)
            self._out_fd = None
        with self._lock:
            if self._wake_fd is not None:
                os.close(self._wake_fd)
                self._wake_fd = None

    # --- the loop ---------------------------------------------------------------------------

    def _pump(self) -> None:
        """Serve output, stop requests and deadlines until the shell is gone and the pipe done."""
        while self._exited_at is None or self._out_fd is not None:
            for fd, _ in self._poller.poll(self._poll_timeout_ms()):
                self._dispatch(fd)
            now = time.monotonic()
            if self._exited_at is None and self._code is not None:
                self._exited_at = now
            self._act_on_request(now)
            self._act_on_time(now)

    def _dispatch(self, fd: int) -> None:
        if fd == self._out_fd:
            self._read_once()
        elif fd == self._wake_fd:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass

    def _act_on_request(self, now: float) -> None:
        reason = self._requested
        if reason is not None and self._ended_by is None and self._exited_at is None:
            self._terminate(reason, now)
        if self._kill_by is not None and self._kill_at is not None and self._kill_by < self._kill_at:
            self._kill_at = self._kill_by

    def _act_on_time(self, now: float) -> None:
        if (self._deadline is not None and now >= self._deadline
                and self._ended_by is None and self._exited_at is None):
            self._terminate(EndReason.TIMEOUT, now)
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            if self._exited_at is None:
                self._signal_group(signal.SIGKILL)
        if self._exited_at is not None and self._out_fd is not None \
                and now >= self._exited_at + LINGER:
            self._abandon_output()
        if self._flush_due(now):
            self._flush(now)

    def _terminate(self, reason: EndReason, now: float) -> None:
        """The polite half of ending a job; the KILL follows after the grace period."""
        self._ended_by = reason
        self._signal_group(signal.SIGTERM)
        self._kill_at = now + self.kill_grace
        if self._kill_by is not None:
            self._kill_at = min(self._kill_at, self._kill_by)

    def _poll_timeout_ms(self) -> int:
        """Sleep until the next thing due, or until an fd wakes us; -1 when only fds can."""
        due = []
        if self._deadline is not None and self._ended_by is None and self._exited_at is None:
            due.append(self._deadline)
        if self._kill_at is not None:
            due.append(self._kill_at)
        if self._exited_at is not None and self._out_fd is not None:
            due.append(self._exited_at + LINGER)
        if self._unflushed():
            due.append(self._last_flush + FLUSH_INTERVAL)
        if not due:
            return -1
        # poll() takes at most 2**31-1 ms (24.8 days); a farther deadline is looked at again.
        return min(MAX_POLL_MS, max(0, math.ceil((min(due) - time.monotonic()) * 1000)))

    # --- output -----------------------------------------------------------------------------

    def _read_once(self) -> bool:
        """Read what the pipe has; False once there is nothing more to read now."""
        try:
            data = os.read(self._out_fd, READ_SIZE)
        except BlockingIOError:
            return False
        if not data:
            self._close_output()
            return False
        self._keep(data)
        return True

    def _keep(self, data: bytes) -> None:
        """Keep the head, drop the rest -- but the job's writes still succeed, so it never blocks."""
        room = self.max_output - len(self._kept)
        if room > 0:
            self._kept += data[:room]
        if len(data) > room:
            self._truncated = True

    def _abandon_output(self) -> None:
        """The shell is gone but something it left still holds the pipe: kill it, keep what it wrote."""
        self._signal_group(signal.SIGKILL)
        for _ in range(DRAIN_READS):
            if self._out_fd is None or not self._read_once():
                break
        self._close_output()

    def _close_output(self) -> None:
        if self._out_fd is not None:
            self._poller.unregister(self._out_fd)
            os.close(self._out_fd)
            self._out_fd = None

    def _unflushed(self) -> int:
        """Kept bytes on_output has not seen yet; 0 without a callback, so no timer is armed."""
        return len(self._kept) - self._flushed if self.on_output is not None else 0

    def _flush_due(self, now: float) -> bool:
        waiting = self._unflushed()
        return waiting >= FLUSH_BYTES or (waiting > 0 and now >= self._last_flush + FLUSH_INTERVAL)

    def _flush(self, now: float | None = None) -> None:
        """Hand the kept output not yet seen to on_output, in one chunk with its offset."""
        self._last_flush = time.monotonic() if now is None else now
        if not self._unflushed():
            return
        offset, self._flushed = self._flushed, len(self._kept)
        try:
            self.on_output(bytes(self._kept[offset:]), offset)
        except Exception:   # a broken stream must not leave the job unwatched
            log.exception("on_output failed; no more live output from slot %d", self.slot)
            self.on_output = None

    # --- results ----------------------------------------------------------------------------

    def _result(self, duration: float) -> Result:
        code = self._code if self._code is not None else -signal.SIGKILL
        exit_code, signum = (code, None) if code >= 0 else (None, -code)
        return Result(exit_code=exit_code, signal=signum, output=bytes(self._kept),
                      truncated=self._truncated, reason=self._ended_by,
                      error=self._error(signum), duration=duration)

    def _error(self, signum: int | None) -> str:
        if self._ended_by is EndReason.TIMEOUT:
            return f"timeout after {self.timeout:g}s"
        if self._ended_by is not None:
            return str(self._ended_by)
        if signum is not None:
            return f"killed by {describe_signal(signum)}"
        return ""

    @staticmethod
    def _never_started(reason: EndReason, error: str, duration: float = 0.0) -> Result:
        return Result(exit_code=None, signal=None, output=b"", truncated=False,
                      reason=reason, error=error, duration=duration)
