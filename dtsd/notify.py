"""Webhook notifications: the leader POSTs what became of a job to the administrator's targets.

A job names targets from `[notify] targets` (never URLs: a submitter who could choose one
would make dtsd POST job data to any address it reaches) and events (NotifyEvent); jobs
that name none get `[notify] default` and `on` when they are created (models.resolve_notify).
When a job reaches a notified final state, `store.finish` or `store.recover_lost` inserts one
`notifications` row per target in the transaction that records the state: the outbox.

`Notifier` is a thread of the coordinator: while this node leads it claims due rows (fenced,
like every leader write) and POSTs them, at most `IN_FLIGHT` at once, so a slow receiver
never delays cron firing or recovery. A 2xx answer deletes the row; anything else (another
status, a redirect, which is never followed, a refused connection, a timeout) is retried with
exponential back-off until `[notify] max_attempts`, then given up with one ERROR line. Delivery
is at least once: a leader that dies mid-POST leaves the row to the next one, which sends it
again under the same delivery id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures
from datetime import datetime
from typing import Any, Callable

from . import __version__, metrics
from .config import Config
from .models import job_label, retry_delay
from .store import Deposed, Fence, Store

log = logging.getLogger("dtsd.notify")

IN_FLIGHT = 4            # POSTs at once: a few slow receivers cannot hold up the others
ANSWER_BYTES = 4096      # of a receiver's answer, read and dropped
CONTENT_TYPE = "application/json"
# Headers of each POST. The signature is over `<X-Dtsd-Timestamp>.<body>`
# (docs/notifications.md).
EVENT_HEADER = "X-Dtsd-Event"
DELIVERY_HEADER = "X-Dtsd-Delivery"
TIMESTAMP_HEADER = "X-Dtsd-Timestamp"
SIGNATURE_HEADER = "X-Dtsd-Signature"


class Result:
    """What became of one POST, as the metrics label it."""

    DELIVERED = "delivered"
    FAILED = "failed"        # will be tried again
    GAVE_UP = "gave_up"


def sign(key: bytes, timestamp: str, body: bytes) -> str:
    """`sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`: what X-Dtsd-Signature carries."""
    return "sha256=" + hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _rfc3339(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def payload(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of one notification, from its outbox row and its job's row as
    they are at delivery (`store.claim_notifications`). The output is its last
    `store.OUTPUT_TAIL` bytes as UTF-8, U+FFFD where it is not; json.dumps escapes the
    control characters, so the document is valid JSON whatever the job printed."""
    tail = bytes(row["output_tail"] or b"")
    return {
        "delivery_id": str(row["delivery_id"]),
        "event": row["event"],
        "target": row["target"],
        "job_id": row["job_id"],
        "name": row["name"],
        "queue": row["queue"],
        "status": row["status"],
        "dead_lettered": row["dead_lettered"],
        "exit_code": row["exit_code"],
        "attempts": row["job_attempts"],
        "error": row["error"],
        "submitted_by": row["submitted_by"],
        "schedule_id": row["schedule_id"],
        "created_at": _rfc3339(row["created_at"]),
        "started_at": _rfc3339(row["started_at"]),
        "finished_at": _rfc3339(row["finished_at"]),
        "output_tail": tail.decode("utf-8", errors="replace"),
        "output_truncated": bool(row["output_truncated"] or row["output_cut"]),
    }


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a new target: following it could lead dtsd anywhere
    (the SSRF the named targets exist to prevent). urllib then raises HTTPError(3xx)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


# No proxies from the environment either: the target is exactly the administrator's URL.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> str | None:
    """POST once; None when the receiver answered 2xx, else why not (for the log)."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": CONTENT_TYPE,
                                              "User-Agent": f"dtsd/{__version__}", **headers})
    try:
        with _OPENER.open(request, timeout=timeout) as answer:
            answer.read(ANSWER_BYTES)
            status = answer.status
    except urllib.error.HTTPError as exc:
        exc.close()
        if 300 <= exc.code < 400:
            return f"HTTP {exc.code} (redirects are not followed)"
        return f"HTTP {exc.code}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return f"no answer within {timeout:g}s"
        return str(reason)
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout:g}s"
    except (OSError, ValueError) as exc:   # reset mid-answer, a malformed answer
        return str(exc) or type(exc).__name__
    return None if 200 <= status < 300 else f"HTTP {status}"


class Notifier:
    """The leader's delivery thread (see the module's docstring)."""

    def __init__(self, cfg: Config, store: Store, leadership: Any, stop: threading.Event,
                 *, poll: float | None = None,
                 send: Callable[[str, bytes, dict[str, str], float], str | None] = post):
        notify = cfg.values["notify"]
        self.targets: dict[str, str] = notify["targets"]
        self.secret_file: str = notify["secret_file"]
        self.timeout: float = notify["timeout"]
        self.max_attempts: int = notify["max_attempts"]
        self.backoff: float = notify["retry_backoff"]
        self.backoff_max: float = notify["retry_backoff_max"]
        self.cluster, self.node = cfg.get("dtsd", "cluster"), cfg.node_id
        self.poll = poll if poll is not None else cfg.get("dtsd", "housekeeping_interval")
        # A claimed row is due again after this: a POST is over long before.
        self.hold = 2 * self.timeout + 10.0
        self.store = store
        self.leadership = leadership
        self.stop = stop
        self.send = send
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.pool = futures.ThreadPoolExecutor(max_workers=IN_FLIGHT,
                                               thread_name_prefix="notify")

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="notifier", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.wake.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def run(self) -> None:
        while not self.stop.is_set():
            wait = self.poll
            try:
                wait = self.step()
            except Deposed as exc:
                log.warning("delivering notifications refused, a newer leader exists: %s", exc)
            except Exception as exc:
                log.warning("delivering notifications failed: %s", exc)
            self.wake.wait(max(0.0, wait))
            self.wake.clear()

    def step(self) -> float:
        """Claim what is due into the free slots; returns how long to wait before looking
        again (a finished POST wakes the loop sooner)."""
        token = self.leadership.token() if self.leadership.is_leader() else None
        with self.lock:
            free = IN_FLIGHT - self.in_flight
        if token is None or free <= 0:
            return self.poll
        due = self.store.next_notification()
        if due is None:
            return self.poll
        if due > 0:
            return min(self.poll, due)
        rows = self.store.claim_notifications(Fence(self.cluster, token, self.node), free,
                                              self.hold)
        for row in rows:
            with self.lock:
                self.in_flight += 1
            self.pool.submit(self._deliver_one, row)
        return 0.0 if len(rows) == free else self.poll   # all slots filled: more may be due

    def _deliver_one(self, row: dict[str, Any]) -> None:
        try:
            self.deliver(row)
        except Exception as exc:   # the row is due again after `hold`
            log.warning("notification %s of job %s: %s", row["delivery_id"], row["job_id"], exc)
        finally:
            with self.lock:
                self.in_flight -= 1
            self.wake.set()

    def deliver(self, row: dict[str, Any]) -> str:
        """POST one claimed notification and record the outcome; returns a `Result`."""
        target, attempt = row["target"], row["attempts"]
        url = self.targets.get(target)
        if url is None:
            error = f"target {target} is not in [notify] targets"
        elif not row["job_found"]:
            error = "the job is no longer stored (pruned or purged)"
        else:
            error = self._post(url, row)
            if error is None:
                self.store.notification_delivered(row["id"])
                metrics.NOTIFICATIONS.labels(target, Result.DELIVERED).inc()
                log.info("notified %s of %s: %s (delivery %s, attempt %d)", target,
                         self._label(row), row["event"], row["delivery_id"], attempt)
                return Result.DELIVERED
            if attempt < self.max_attempts:
                delay = retry_delay(attempt, self.backoff, self.backoff_max, random.random())
                self.store.notification_failed(row["id"], error, delay)
                metrics.NOTIFICATIONS.labels(target, Result.FAILED).inc()
                log.warning("notifying %s of %s failed (attempt %d of %d): %s; next in %.1fs",
                            target, self._label(row), attempt, self.max_attempts, error, delay)
                return Result.FAILED
        self.store.notification_delivered(row["id"])
        metrics.NOTIFICATIONS.labels(target, Result.GAVE_UP).inc()
        log.error("gave up notifying %s of %s (%s, delivery %s) after %d attempt(s): %s",
                  target, self._label(row), row["event"], row["delivery_id"], attempt, error)
        return Result.GAVE_UP

    def _post(self, url: str, row: dict[str, Any]) -> str | None:
        body = json.dumps(payload(row), separators=(",", ":")).encode()
        stamp = str(int(time.time()))
        headers = {EVENT_HEADER: row["event"], DELIVERY_HEADER: str(row["delivery_id"]),
                   TIMESTAMP_HEADER: stamp}
        if self.secret_file:
            try:
                with open(self.secret_file, "rb") as handle:   # read each time: rotations
                    key = handle.read().rstrip(b"\r\n")
            except OSError as exc:   # never unsigned when a key is configured
                return f"cannot read [notify] secret_file: {exc}"
            headers[SIGNATURE_HEADER] = sign(key, stamp, body)
        return self.send(url, body, headers, self.timeout)

    @staticmethod
    def _label(row: dict[str, Any]) -> str:
        return job_label(row["job_id"], row["name"] or "", row["queue"] or "")
