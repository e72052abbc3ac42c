"""The web UI: pages for people, served by the web child beside the JSON API.

One authority, as the JSON API (httpapi.py): every page is made of calls of the gRPC API
on this node's local sockets with the session's bearer token, so validation, roles, the
audit line and the submitter's identity are the API's. The UI never calls an address a
browser names.

Pages are rendered on the server (jinja2, autoescaped) and work without JavaScript. One
static script, served from /static/ (no inline script: the Content-Security-Policy allows
none), adds what needs it: times in the browser's zone, "3 min ago" kept current, live
output (an EventSource on /jobs/{id}/events, relaying WatchJob), select-all, and the
confirmations of destructive buttons. Nothing comes from another origin.

Sessions. With `[server] tokens_file`, a person logs in with a token of that file: the
web child checks it (and its role) there, and keeps `{token, name, role, expiry}` in a file
named by the SHA-256 of a random session id under `<runtime_dir>/web/` (mode 0700, the
daemon's user; jobs run as other users and cannot read it), so every web process of the
node knows the session and a restart of the web child keeps it. The browser holds only the
id, in a cookie that is HttpOnly, SameSite=Strict, Secure under TLS, and lives
SESSION_TTL seconds; a login replaces the id (no fixation), a logout removes the file.
Without a login, a visitor has the role of `[server] anonymous_role` (none by default:
then every page but /login says how to get a token).

Local users log in without a token, as dtsctl knows them: `dtsctl web-login` fetches a
local token from this host's master (the kernel says who runs it) and posts it, from
loopback only, to /login/local; the web child checks it with the master's key and answers
with a link holding a one-time code (good for LOCAL_LINK_TTL seconds, a file under
`<runtime_dir>/web/`). Opening the link asks to confirm (a CSRF-protected form, so no other
page can log a browser in as someone else); the session then calls the API with local
tokens the web child signs for that user with the master's key, as the broker would, for
LOCAL_SESSION_TTL seconds (the role is the one `[server] local_roles` gave at the link).

CSRF. Every form carries a token: an HMAC of the session id under a key the web child
keeps in `<runtime_dir>/web/key`; every POST must send it back and come from this origin
(Origin, when the browser sends one, must name this host). Visitors without a session get
an id (cookie only, nothing stored), so the login form is protected too.

Roles shape pages: a read role sees no submit form and no cancel, retry, requeue or purge
buttons; the API refuses such calls anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import grpc
import jinja2
from aiohttp import web
from google.protobuf import timestamp_pb2

from . import auth, config, identity
from .config import Config
from .dtsdpb import pb
from .httpapi import Channels, Refusal, relay
from .identity import Role
from .shown import ending, error_text, escape

log = logging.getLogger("dtsd.webui")

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
SESSION_COOKIE = "dtsd_session"
FLASH_COOKIE = "dtsd_flash"
SESSION_TTL = 8 * 3600          # seconds a login lasts
LOCAL_SESSION_TTL = 3600        # seconds a local user's login lasts (its role is fixed then)
LOCAL_LINK_TTL = 120            # seconds a `dtsctl web-login` link may wait to be opened
LOCAL_RENEW = 60                # seconds before expiry a session's local token is renewed
PAGE_SIZE = 50                  # jobs per page of a listing
RECENT_FAILURES = 8             # on the overview
SCHEDULE_RUNS = 20              # on a schedule's page
SWEEP_EVERY = 600.0             # seconds between removals of expired session files
LIVE_KEEPALIVE = 15.0           # seconds between comments on a quiet event stream
REFRESH = 10                    # seconds between the overview's (and jobs') own reloads
STATUSES = [s for s in pb.JobStatus.keys() if s != "JOB_STATUS_UNSPECIFIED"]
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".svg": "image/svg+xml"}
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{43}\Z")


def visible(data: bytes | str) -> str:
    """Output as text a page can show: UTF-8 (bad bytes as U+FFFD), with control and
    direction characters shown as escapes (\\x1b, \\u202e) rather than obeyed, by the
    rule dtsctl follows on a terminal (dtsd/shown.py); newlines and tabs kept."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return escape(text, layout=True)


def local_path(value: Any, default: str) -> str:
    """`value` when it is a path on this site (`/jobs?status=FAILED`), else `default`: what
    a redirect may go to. Browsers read `//host`, `/\\host` and the same with a tab or a
    newline in between as another site, so a path with a backslash or a control
    character goes nowhere either."""
    if (not isinstance(value, str) or not value.startswith("/") or value.startswith("//")
            or "\\" in value or any(ord(char) < 0x20 or ord(char) == 0x7F for char in value)):
        return default
    return value


def refusal_of(exc: Exception) -> Refusal:
    """The API's refusal (a grpc.RpcError) or the HTTP side's, as one Refusal."""
    return exc if isinstance(exc, Refusal) else Refusal.from_rpc(exc)


# --- formatting -----------------------------------------------------------------------------

def when(message) -> datetime | None:
    """An aware datetime from a set google.protobuf.Timestamp field, else None."""
    if message is None or (message.seconds == 0 and message.nanos == 0):
        return None
    return message.ToDatetime(tzinfo=timezone.utc)


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """'12 s ago', '3 min ago', 'in 2 h', 'yesterday'-free and exact to the unit shown."""
    if moment is None:
        return "–"
    seconds = ((now or datetime.now(timezone.utc)) - moment).total_seconds()
    text = duration(abs(seconds), coarse=True)
    if abs(seconds) < 1:
        return "now"
    return f"{text} ago" if seconds > 0 else f"in {text}"


def duration(seconds: float | None, coarse: bool = False) -> str:
    """1.2 s, 45 s, 3 min 20 s, 2 h 5 min, 3 d 4 h (coarse: the first unit only)."""
    if seconds is None or math.isnan(seconds):
        return "–"
    if seconds < 10 and not coarse:
        return f"{seconds:.1f} s" if seconds >= 0.1 else f"{seconds * 1000:.0f} ms"
    whole = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if whole >= size or (unit == "s" and not parts):
            parts.append(f"{whole // size} {unit}")
            whole %= size
    return parts[0] if coarse else " ".join(parts[:2])


def exact(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


def iso(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z") if moment else ""


def ended(item) -> str:
    """What the end of a job, attempt or event says, once, as dtsctl says it: 'exit code
    7', 'killed by SIGKILL (timeout after 5s)'."""
    code = item.exit_code if item.HasField("exit_code") else None
    said, error = ending(code), error_text(code, item.error)
    return f"{said} ({error})" if said and error else said or error or ""


def job_duration(job) -> float | None:
    started, finished = when(job.started_at), when(job.finished_at)
    if started is None:
        return None
    return ((finished or datetime.now(timezone.utc)) - started).total_seconds()


# --- sessions -------------------------------------------------------------------------------

@dataclass
class Session:
    principal: str              # token:NAME, or user:NAME (a local user)
    role: Role | None
    token: str | None           # the bearer token of a token session
    expires: float
    uid: int | None = None      # a local user's, for the local tokens the web child signs


class Sessions:
    """Logged-in sessions as files in `directory` (see the module's docstring)."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        self.key = self._key()
        self._swept = 0.0

    def _key(self) -> bytes:
        path = os.path.join(self.directory, "key")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            for _ in range(50):         # another web process may be writing it now
                with open(path, "rb") as f:
                    key = f.read()
                if len(key) == 32:
                    return key
                time.sleep(0.01)
            raise RuntimeError(f"{path} does not hold a 32-byte key")
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(32)

    def csrf(self, session_id: str) -> str:
        return hmac.new(self.key, b"csrf:" + session_id.encode(), hashlib.sha256).hexdigest()

    def _path(self, session_id: str) -> str:
        return os.path.join(self.directory,
                            "s-" + hashlib.sha256(session_id.encode()).hexdigest())

    def create(self, session: Session) -> str:
        session_id = self.new_id()
        path = self._path(session_id)
        temporary = f"{path}.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"principal": session.principal, "token": session.token,
                       "role": session.role.value if session.role else None,
                       "expires": session.expires, "uid": session.uid}, f)
        os.replace(temporary, path)
        self.sweep()
        return session_id

    def _link_path(self, code: str) -> str:
        return os.path.join(self.directory, "l-" + hashlib.sha256(code.encode()).hexdigest())

    def create_link(self, claim: identity.LocalClaim) -> str:
        """A one-time code for `claim`'s user, good for LOCAL_LINK_TTL seconds."""
        code = self.new_id()
        path = self._link_path(code)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"user": claim.user, "uid": claim.uid, "role": claim.role.value,
                       "expires": time.time() + LOCAL_LINK_TTL}, f)
        return code

    def peek_link(self, code: str) -> dict | None:
        if not _SESSION_ID.match(code):
            return None
        try:
            with open(self._link_path(code), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        return record if record.get("expires", 0) >= time.time() else None

    def use_link(self, code: str) -> dict | None:
        """The link's record, once: it is moved aside before it is read, so two uses at
        once cannot both succeed."""
        if not _SESSION_ID.match(code):
            return None
        path = self._link_path(code)
        taken = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.used"
        try:
            os.rename(path, taken)
        except OSError:
            return None
        try:
            with open(taken, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        finally:
            os.unlink(taken)
        return record if record.get("expires", 0) >= time.time() else None

    def get(self, session_id: str) -> Session | None:
        if not _SESSION_ID.match(session_id):
            return None
        path = self._path(session_id)
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        if record.get("expires", 0) < time.time():
            self.remove(session_id)
            return None
        return Session(record["principal"], Role(record["role"]) if record["role"] else None,
                       record["token"], record["expires"], record.get("uid"))

    def remove(self, session_id: str) -> None:
        try:
            os.unlink(self._path(session_id))
        except FileNotFoundError:
            pass

    def sweep(self) -> None:
        """Remove expired session files, at most every SWEEP_EVERY seconds."""
        if time.monotonic() - self._swept < SWEEP_EVERY:
            return
        self._swept = time.monotonic()
        now = time.time()
        for name in os.listdir(self.directory):
            if not name.startswith(("s-", "l-")):
                continue
            path = os.path.join(self.directory, name)
            try:
                with open(path, encoding="utf-8") as f:
                    if json.load(f).get("expires", 0) >= now:
                        continue
                os.unlink(path)
            except (OSError, ValueError):
                continue


@dataclass
class Viewer:
    """Who is looking at a page: the session (or none) and what that allows."""

    session_id: str
    new_id: bool                # the cookie is to be set on the answer
    session: Session | None
    anonymous_role: Role | None
    csrf: str

    @property
    def logged_in(self) -> bool:
        return self.session is not None

    @property
    def role(self) -> Role | None:
        return self.session.role if self.session else self.anonymous_role

    @property
    def name(self) -> str:
        return self.session.principal if self.session else "anonymous"

    def may(self, role: str) -> bool:
        return self.role is not None and self.role.allows(Role(role))

    local_token: str | None = None      # a session of a local user: signed per request

    @property
    def metadata(self):
        token = self.local_token or (self.session.token if self.session else None)
        return (("authorization", f"Bearer {token}"),) if token else None


class Redirect(Exception):
    def __init__(self, location: str, flash: str = ""):
        super().__init__(location)
        self.location, self.flash = location, flash


class FieldErrors(Exception):
    """The API refused a form: {form field: message}, and a message for the rest."""

    def __init__(self, fields: dict[str, str], message: str):
        super().__init__(message)
        self.fields, self.message = fields, message


# --- the pages ------------------------------------------------------------------------------

class WebUI:
    def __init__(self, cfg: Config, channels: Channels, tls: bool):
        self.cfg = cfg
        self.channels = channels
        self.tls = tls
        tokens_file = cfg.get("server", "tokens_file")
        self.tokens = auth.TokenFile(tokens_file) if tokens_file else None
        anonymous = cfg.get("server", "anonymous_role")
        self.anonymous_role = Role(anonymous) if anonymous else None
        runtime_dir = cfg.get("dtsd", "runtime_dir")
        self.sessions = Sessions(os.path.join(runtime_dir, "web"))
        self.local_key = identity.read_key(runtime_dir)   # the master's: local logins
        self.node = cfg.node_id
        self._signed: dict[str, tuple[float, str]] = {}    # session id -> (expiry, token)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(os.path.join(ASSETS, "templates")),
            autoescape=True, undefined=jinja2.StrictUndefined,
            trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(ago=ago, duration=duration, exact=exact, iso=iso,
                                visible=visible, ended=ended)
        self.env.globals.update(when=when, job_duration=job_duration, STATUSES=STATUSES,
                                STATUS_NAMES={v: k for k, v in pb.JobStatus.items()},
                                cluster=cfg.get("dtsd", "cluster"), node=cfg.node_id)
        self.static = {}
        for name in os.listdir(os.path.join(ASSETS, "static")):
            with open(os.path.join(ASSETS, "static", name), "rb") as f:
                self.static[name] = f.read()

    def add_routes(self, app: web.Application) -> None:
        app.middlewares.append(self.guard)
        get, post = app.router.add_get, app.router.add_post
        get("/", self.overview)
        get("/login", self.login_page)
        post("/login", self.login)
        post("/login/local", self.local_link)
        get("/login/local/{code}", self.local_confirm)
        post("/login/local/{code}", self.local_login)
        post("/logout", self.logout)
        get("/jobs", self.jobs)
        post("/jobs/bulk", self.bulk)
        get("/jobs/{id}", self.job)
        get("/jobs/{id}/output", self.output)
        get("/jobs/{id}/events", self.events)
        post("/jobs/{id}/cancel", self.cancel)
        post("/jobs/{id}/retry", self.retry)
        get("/submit", self.submit_page)
        post("/submit", self.submit)
        get("/schedules", self.schedules)
        post("/schedules", self.create_schedule)
        get("/schedules/{name}", self.schedule)
        post("/schedules/{name}/{action:pause|resume|trigger|delete}", self.schedule_action)
        post("/queues/{name}/{action:pause|resume}", self.queue_action)
        get("/dead-letters", self.dead_letters)
        post("/dead-letters/{action:requeue|purge}", self.dead_letter_action)
        get("/static/{name}", self.asset)

    # --- the guard: headers, session, CSRF -------------------------------------------------

    @web.middleware
    async def guard(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith("/api/") or request.path in ("/healthz", "/readyz",
                                                                 "/metrics"):
            return await handler(request)
        viewer = self._viewer(request)
        request["viewer"] = viewer
        try:
            if request.method == "POST" and request.path != "/login/local":
                await self._check_post(request, viewer)      # /login/local: a local token
            if (viewer.role is None and request.path not in ("/login", "/logout")
                    and not request.path.startswith(("/static/", "/login/local"))):
                raise Redirect("/login?next=" + urllib.parse.quote(request.path_qs, safe=""))
            response = await handler(request)
        except Redirect as redirect:
            response = web.HTTPSeeOther(redirect.location)
            if redirect.flash:
                self._set_flash(response, redirect.flash)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = self.page(request, "error.html", status=exc.status,
                                 title=exc.reason, message=exc.text or exc.reason)
        if viewer.new_id and not response.prepared:
            self._set_session(response, viewer.session_id)
        if not request.path.startswith("/static/") and not response.prepared:
            response.headers.update(HEADERS)
        return response

    def _viewer(self, request: web.Request) -> Viewer:
        session_id = request.cookies.get(SESSION_COOKIE, "")
        new = not _SESSION_ID.match(session_id)
        if new:
            session_id = Sessions.new_id()
        session = None if new else self.sessions.get(session_id)
        if session is not None and session.token and self.tokens is not None:
            found = self.tokens.lookup(session.token)       # removed or changed since?
            session = None if found is None else Session(
                f"token:{found.name}", found.role, session.token, session.expires)
        viewer = Viewer(session_id, new, session, self.anonymous_role,
                        self.sessions.csrf(session_id))
        if session is not None and session.uid is not None:
            viewer.local_token = self._local_token(session_id, session)
            if viewer.local_token is None:
                viewer.session = None                    # the master's key is gone
        return viewer

    def _local_token(self, session_id: str, session: Session) -> str | None:
        """A local token for a local user's session, signed as the master's broker signs
        them, renewed LOCAL_RENEW seconds before it expires."""
        if self.local_key is None or session.role is None:
            return None
        now = time.time()
        expires, token = self._signed.get(session_id, (0.0, ""))
        if expires - now < LOCAL_RENEW:
            expires = int(now) + identity.LOCAL_TOKEN_TTL
            token = identity.sign(self.local_key, identity.LocalClaim(
                session.principal.removeprefix("user:"), session.uid, session.role,
                self.node, expires))
            if len(self._signed) > 10_000:
                self._signed.clear()
            self._signed[session_id] = (expires, token)
        return token

    async def _check_post(self, request: web.Request, viewer: Viewer) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and origin != "null":
            if urllib.parse.urlsplit(origin).netloc != request.host:
                raise web.HTTPForbidden(text=f"a form of another origin ({origin[:100]}) "
                                             "cannot change anything here")
        form = await request.post()
        request["form"] = form
        sent = form.get("csrf", "")
        if viewer.new_id or not isinstance(sent, str) or not hmac.compare_digest(
                sent, viewer.csrf):
            raise web.HTTPForbidden(text="the form's CSRF token is missing or stale: load "
                                         "the page again and resend it")

    def _cookie(self, response: web.StreamResponse, name: str, value: str,
                max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True,
                            samesite="Strict", secure=self.tls)

    def _set_session(self, response: web.StreamResponse, session_id: str) -> None:
        self._cookie(response, SESSION_COOKIE, session_id, SESSION_TTL)

    def _set_flash(self, response: web.StreamResponse, text: str) -> None:
        payload = base64.urlsafe_b64encode(text[:500].encode()).decode().rstrip("=")
        mac = hmac.new(self.sessions.key, b"flash:" + payload.encode(),
                       hashlib.sha256).hexdigest()[:32]
        self._cookie(response, FLASH_COOKIE, f"{payload}.{mac}", 60)

    def _flash(self, request: web.Request) -> str:
        value = request.cookies.get(FLASH_COOKIE, "")
        payload, _, mac = value.partition(".")
        wanted = hmac.new(self.sessions.key, b"flash:" + payload.encode(),
                          hashlib.sha256).hexdigest()[:32]
        if not value or not hmac.compare_digest(mac, wanted):
            return ""
        try:
            return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError):
            return ""

    # --- rendering and calling -------------------------------------------------------------

    def page(self, request: web.Request, template: str, status: int = 200,
             **context: Any) -> web.Response:
        viewer: Viewer = request["viewer"]
        flash = self._flash(request)
        body = self.env.get_template(template).render(
            viewer=viewer, path=request.path, flash=flash, tokens=self.tokens is not None,
            now=datetime.now(timezone.utc), **context)
        response = web.Response(text=body, status=status, content_type="text/html",
                                charset="utf-8")
        if flash:
            response.del_cookie(FLASH_COOKIE, path="/")
        return response

    async def call(self, request: web.Request, rpc: str, message):
        """One API call as the viewer; a refused session token ends the session."""
        viewer: Viewer = request["viewer"]
        try:
            return await self.channels.call(rpc, message, viewer.metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                if viewer.session:
                    self.sessions.remove(viewer.session_id)
                raise Redirect("/login?next=" + urllib.parse.quote(request.path_qs, safe=""),
                               f"Log in again: {exc.details()}") from None
            raise

    def failure(self, request: web.Request, exc: Exception) -> web.Response:
        """An answer for an API refusal on a page load."""
        refusal = refusal_of(exc)
        return self.page(request, "error.html", status=refusal.status, title=refusal.code,
                         message=refusal.message)

    def done(self, request: web.Request, default: str, flash: str) -> Redirect:
        """Back to the page the form was on (a local path only), with a message."""
        return Redirect(local_path(request["form"].get("back", ""), default), flash)

    # --- login -----------------------------------------------------------------------------

    async def login_page(self, request: web.Request) -> web.Response:
        return self.page(request, "login.html", title="Log in", error="",
                         next=local_path(request.query.get("next", ""), "/"),
                         tokens_file=self.cfg.get("server", "tokens_file"))

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = request["form"]
        secret = str(form.get("token", "")).strip()
        target = local_path(form.get("next", "/"), "/")
        found = self.tokens.lookup(secret) if self.tokens and secret else None
        if found is None:
            if self.tokens is None:
                error = ("this node has no [server] tokens_file, so there is nothing to log "
                         "in with")
            else:
                error = "not a token of this node's tokens file (dtsd token list shows them)"
            log.warning("web login refused from %s", request.remote)
            return self.page(request, "login.html", status=401, title="Log in", error=error,
                             next=target, tokens_file=self.cfg.get("server", "tokens_file"))
        old = request["viewer"]
        if old.session:
            self.sessions.remove(old.session_id)
        session_id = self.sessions.create(Session(f"token:{found.name}", found.role, secret,
                                                  time.time() + SESSION_TTL))
        auth.audit("web login", f"token:{found.name} ({found.role.value}) from "
                                f"{request.remote}")
        response = web.HTTPSeeOther(target)
        self._set_session(response, session_id)
        request["viewer"].new_id = False       # the guard must not put the old id back
        return response

    async def local_link(self, request: web.Request) -> web.Response:
        """From `dtsctl web-login`: a local token in, a one-time login link out. Only from
        this host (a loopback peer), as JSON (a cross-site form cannot send that)."""
        try:
            loopback = ipaddress.ip_address(request.remote or "").is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            return web.json_response({"error": "a local login is made on this host only "
                                               "(from a loopback address)"}, status=403,
                                     headers=HEADERS)
        if request.content_type != "application/json":
            return web.json_response({"error": "send the local token as JSON"}, status=415,
                                     headers=HEADERS)
        try:
            secret = str((await request.json()).get("token", ""))
        except (ValueError, AttributeError):
            secret = ""
        if self.local_key is None:
            return web.json_response({"error": "this web child cannot read the master's "
                                               "key: local logins are off"}, status=503,
                                     headers=HEADERS)
        try:
            claim = identity.verify(self.local_key, secret, self.node)
        except identity.LocalTokenError as exc:
            return web.json_response({"error": str(exc)}, status=401, headers=HEADERS)
        code = self.sessions.create_link(claim)
        auth.audit("web login link", f"{claim.principal} ({claim.role.value})")
        return web.json_response({"path": f"/login/local/{code}", "user": claim.principal,
                                  "role": claim.role.value, "expires_in": LOCAL_LINK_TTL},
                                 headers=HEADERS)

    async def local_confirm(self, request: web.Request) -> web.Response:
        record = self.sessions.peek_link(request.match_info["code"])
        return self.page(request, "local_login.html", status=200 if record else 404,
                         title="Log in as a local user", record=record,
                         code=request.match_info["code"])

    async def local_login(self, request: web.Request) -> web.StreamResponse:
        record = self.sessions.use_link(request.match_info["code"])
        if record is None:
            return self.page(request, "local_login.html", status=404,
                             title="Log in as a local user", record=None, code="")
        old = request["viewer"]
        if old.session:
            self.sessions.remove(old.session_id)
        session_id = self.sessions.create(Session(
            f"user:{record['user']}", Role(record["role"]), None,
            time.time() + LOCAL_SESSION_TTL, int(record["uid"])))
        auth.audit("web login", f"user:{record['user']} ({record['role']}) from "
                                f"{request.remote}")
        response = web.HTTPSeeOther("/")
        self._set_session(response, session_id)
        request["viewer"].new_id = False
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        viewer: Viewer = request["viewer"]
        self.sessions.remove(viewer.session_id)
        self._signed.pop(viewer.session_id, None)
        response = web.HTTPSeeOther("/login")
        self._set_session(response, Sessions.new_id())
        viewer.new_id = False
        return response

    # --- overview --------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        try:
            status, activity, failures = await asyncio.gather(
                self.call(request, "ClusterStatus", pb.ClusterStatusRequest()),
                self.call(request, "JobActivity", pb.JobActivityRequest(minutes=60)),
                self.call(request, "ListJobs", pb.ListJobsRequest(
                    statuses=[pb.FAILED], page_size=RECENT_FAILURES)))
        except (grpc.RpcError, Refusal) as exc:
            return self.failure(request, exc)
        served: dict[str, int] = {}
        for worker in status.workers:
            for queue in worker.queues:
                served[queue] = served.get(queue, 0) + 1
        # Every queue a worker serves gets a row (to pause it, say), busy or not.
        queues = list(status.queues)
        listed = {q.queue for q in queues}
        queues += [pb.QueueDepth(queue=name) for name in sorted(served) if name not in listed]
        return self.page(request, "overview.html", title="Overview", state=status,
                         queues=queues, refresh=REFRESH,
                         served=served,
                         chart=chart(activity), failures=failures.jobs,
                         totals=_totals(activity))

    # --- jobs ------------------------------------------------------------------------------

    def _filters(self, request: web.Request) -> tuple[pb.ListJobsRequest, dict[str, str]]:
        query = request.query
        shown = {key: query.get(key, "").strip() for key in
                 ("status", "queue", "name", "schedule", "selector", "after", "before",
                  "page")}
        message = pb.ListJobsRequest(page_size=PAGE_SIZE, queue=shown["queue"],
                                     name=shown["name"], schedule=shown["schedule"],
                                     selector=shown["selector"], page_token=shown["page"])
        for status in query.getall("status", []):
            if status:
                if status not in STATUSES:
                    raise Refusal(400, "INVALID_ARGUMENT", f"status: not one of "
                                                           f"{', '.join(STATUSES)}")
                message.statuses.append(pb.JobStatus.Value(status))
        for key, field_name in (("after", "created_after"), ("before", "created_before")):
            if shown[key]:
                getattr(message, field_name).CopyFrom(timestamp(parse_time(shown[key], key)))
        return message, shown

    async def jobs(self, request: web.Request) -> web.Response:
        try:
            message, shown = self._filters(request)
            answer = await self.call(request, "ListJobs", message)
        except (grpc.RpcError, Refusal) as exc:
            return self.failure(request, exc)
        kept = [(k, v) for k, v in request.query.items() if k != "page" and v]
        following = urllib.parse.urlencode([*kept, ("page", answer.next_page_token)])
        return self.page(request, "jobs.html", title="Jobs", jobs=answer.jobs, shown=shown,
                         request_statuses=request.query.getall("status", []),
                         query=request.query_string,
                         query_without_page=urllib.parse.urlencode(kept),
                         next_page=f"/jobs?{following}" if answer.next_page_token else "",
                         first_page=bool(shown["page"]),
                         refresh=0 if shown["page"] else REFRESH)

    async def job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        try:
            job = await self.call(request, "GetJob", pb.GetJobRequest(id=job_id,
                                                                     include_attempts=True))
        except (grpc.RpcError, Refusal) as exc:
            return self.failure(request, exc)
        return self.page(request, "job.html", title=f"Job {job.id}", job=job,
                         spec=job.spec, limits=_limits(job.spec.limits))

    async def output(self, request: web.Request) -> web.StreamResponse:
        """The raw bytes of an attempt's output (the last finished one by default)."""
        job_id = request.match_info["id"]
        try:
            job = await self.call(request, "GetJob", pb.GetJobRequest(
                id=job_id, include_attempts="attempt" in request.query))
        except (grpc.RpcError, Refusal) as exc:
            return self.failure(request, exc)
        data = job.output
        if "attempt" in request.query:
            chosen = [a for a in job.attempt_history if str(a.number) == request.query["attempt"]]
            if not chosen:
                raise web.HTTPNotFound(text=f"job {job.id} has no attempt "
                                            f"{request.query['attempt'][:20]!r}")
            data = chosen[0].output
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", job.id)
        return web.Response(body=data, content_type="application/octet-stream", headers={
            **HEADERS, "Content-Disposition": f'attachment; filename="{safe}.out"'})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events for the job page: WatchJob's events, output as visible text."""
        viewer: Viewer = request["viewer"]
        try:
            call, first = await self.channels.stream(
                "WatchJob", pb.WatchJobRequest(id=request.match_info["id"]), viewer.metadata)
        except (grpc.RpcError, Refusal) as exc:
            refusal = refusal_of(exc)
            return web.json_response({"error": refusal.message}, status=refusal.status)
        response = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)
            async with contextlib.aclosing(relay(call, first, LIVE_KEEPALIVE)) as events:
                async for kind, event in events:
                    if kind == "keepalive":
                        await response.write(b": keepalive\n\n")
                        continue
                    if kind == "error":
                        await response.write(f"event: failure\ndata: "
                                             f"{json.dumps(event.details())}\n\n".encode())
                        return response
                    item = {"kind": pb.JobEvent.Kind.Name(event.kind),
                            "status": pb.JobStatus.Name(event.status),
                            "attempt": event.attempt}
                    if event.kind == pb.JobEvent.OUTPUT:
                        item.update(offset=event.offset, text=visible(event.output))
                    elif event.HasField("exit_code") or event.error:
                        item["ended"] = ended(event)
                    await response.write(f"data: {json.dumps(item)}\n\n".encode())
            await response.write(b"event: end\ndata: {}\n\n")
        except ConnectionResetError:
            pass                                    # the page went away: stop watching
        return response

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        return await self._job_action(request, "CancelJob", pb.CancelJobRequest, "cancelled")

    async def retry(self, request: web.Request) -> web.StreamResponse:
        return await self._job_action(request, "RetryJob", pb.RetryJobRequest, "queued again")

    async def _job_action(self, request, rpc, message_class, verb) -> web.StreamResponse:
        job_id = request.match_info["id"]
        try:
            await self.call(request, rpc, message_class(id=job_id))
        except (grpc.RpcError, Refusal) as exc:
            refusal = refusal_of(exc)
            raise self.done(request, f"/jobs/{job_id}", f"Not {verb}: {refusal.message}")
        raise self.done(request, f"/jobs/{job_id}", f"Job {job_id} {verb}.")

    async def bulk(self, request: web.Request) -> web.StreamResponse:
        form = request["form"]
        action = form.get("action")
        ids = [i for i in form.getall("id", []) if isinstance(i, str)][:PAGE_SIZE]
        if action not in ("cancel", "retry") or not ids:
            raise self.done(request, "/jobs", "Select jobs, then Cancel or Retry.")
        rpc, message_class = (("CancelJob", pb.CancelJobRequest) if action == "cancel"
                              else ("RetryJob", pb.RetryJobRequest))
        changed, refused = 0, []
        for job_id in ids:
            try:
                await self.call(request, rpc, message_class(id=job_id))
                changed += 1
            except (grpc.RpcError, Refusal) as exc:
                refusal = refusal_of(exc)
                refused.append(f"{job_id}: {refusal.message}")
        verb = "cancelled" if action == "cancel" else "queued again"
        text = f"{changed} of {len(ids)} {verb}."
        if refused:
            text += " Refused: " + "; ".join(refused[:5]) + (" …" if len(refused) > 5 else "")
        raise self.done(request, "/jobs", text)

    # --- submit ----------------------------------------------------------------------------

    async def submit_page(self, request: web.Request) -> web.Response:
        return self.page(request, "submit.html", title="Submit a job", values={},
                         errors={}, message="")

    async def submit(self, request: web.Request) -> web.StreamResponse:
        form = request["form"]
        values = {key: str(form.get(key, "")) for key in SUBMIT_FIELDS}
        try:
            spec = job_spec(values)
            answer = await self.call(request, "SubmitJob", pb.SubmitJobRequest(job=spec))
        except FieldErrors as bad:
            return self.page(request, "submit.html", status=400, title="Submit a job",
                             values=values, errors=bad.fields, message=bad.message)
        except (grpc.RpcError, Refusal) as exc:
            fields, message = api_errors(exc, "job.")
            return self.page(request, "submit.html", status=_status_of(exc),
                             title="Submit a job", values=values, errors=fields,
                             message=message)
        raise Redirect(f"/jobs/{answer.id}", f"Job {answer.id} submitted."
                       if answer.created else f"Job {answer.id} exists already (same "
                                              "idempotency key): shown here.")

    # --- schedules -------------------------------------------------------------------------

    async def schedules(self, request: web.Request, values=None, errors=None,
                        message: str = "", status: int = 200) -> web.Response:
        try:
            answer = await self.call(request, "ListSchedules", pb.ListSchedulesRequest())
        except (grpc.RpcError, Refusal) as exc:
            return self.failure(request, exc)
        return self.page(request, "schedules.html", status=status, title="Schedules",
                         schedules=answer.schedules, values=values or {"timezone": "UTC"},
                         errors=errors or {}, message=message)

    async def create_schedule(self, request: web.Request) -> web.StreamResponse:
        form = request["form"]
        values = {key: str(form.get(key, "")) for key in (*SUBMIT_FIELDS, *SCHEDULE_FIELDS)}
        try:
            schedule = pb.Schedule(name=values["schedule_name"].strip(),
                                   expression=values["expression"].strip(),
                                   timezone=values["timezone"].strip(),
                                   overlap=pb.OverlapPolicy.Value(values["overlap"] or "ALLOW"),
                                   job=job_spec(values))
            await self.call(request, "CreateSchedule",
                            pb.CreateScheduleRequest(schedule=schedule))
        except FieldErrors as bad:
            return await self.schedules(request, values, bad.fields, bad.message, 400)
        except ValueError:
            return await self.schedules(request, values, {"overlap": "ALLOW, FORBID or "
                                                                     "REPLACE"}, "", 400)
        except (grpc.RpcError, Refusal) as exc:
            fields, message = api_errors(exc, "schedule.job.", "schedule.")
            if "name" in fields:
                fields["schedule_name"] = fields.pop("name")
            return await self.schedules(request, values, fields, message, _status_of(exc))
        raise Redirect(f"/schedules/{urllib.parse.quote(schedule.name)}",
                       f"Schedule {schedule.name} created.")

    async def schedule(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            listed, preview, runs = await asyncio.gather(
                self.call(request, "ListSchedules", pb.ListSchedulesRequest()),
                self.call(request, "PreviewSchedule", pb.PreviewScheduleRequest(
                    name=name, count=8)),
                self.call(request, "ListJobs", pb.ListJobsRequest(
                    schedule=name, page_size=SCHEDULE_RUNS)))
        except (grpc.RpcError, Refusal) as exc:
            return self.failure(request, exc)
        found = [s for s in listed.schedules if s.name == name]
        if not found:
            raise web.HTTPNotFound(text=f"no schedule named {name!r}")
        return self.page(request, "schedule.html", title=f"Schedule {name}",
                         schedule=found[0], preview=preview.times, runs=runs.jobs,
                         limits=_limits(found[0].job.limits))

    async def schedule_action(self, request: web.Request) -> web.StreamResponse:
        name, action = request.match_info["name"], request.match_info["action"]
        rpc = {"pause": "PauseSchedule", "resume": "ResumeSchedule",
               "trigger": "TriggerSchedule", "delete": "DeleteSchedule"}[action]
        here = f"/schedules/{urllib.parse.quote(name)}"
        try:
            answer = await self.call(request, rpc, pb.ScheduleRef(name=name))
        except (grpc.RpcError, Refusal) as exc:
            refusal = refusal_of(exc)
            raise self.done(request, here, f"Not done ({action}): {refusal.message}")
        said = {"pause": f"Schedule {name} paused: it fires no slot until resumed.",
                "resume": f"Schedule {name} resumed.",
                "trigger": f"Schedule {name} fired now: job {getattr(answer, 'id', '')}.",
                "delete": f"Schedule {name} deleted."}[action]
        raise self.done(request, "/schedules" if action == "delete" else here, said)

    # --- queues ----------------------------------------------------------------------------

    async def queue_action(self, request: web.Request) -> web.StreamResponse:
        name, action = request.match_info["name"], request.match_info["action"]
        rpc = "PauseQueue" if action == "pause" else "ResumeQueue"
        try:
            await self.call(request, rpc, pb.QueueRef(name=name))
        except (grpc.RpcError, Refusal) as exc:
            raise self.done(request, "/", f"Not done ({action} {name}): {refusal_of(exc).message}")
        raise self.done(request, "/", f"Queue {name} paused: workers take no new job of it; "
                                      "submits still wait in it." if action == "pause"
                        else f"Queue {name} resumed.")

    # --- dead letters ----------------------------------------------------------------------

    async def dead_letters(self, request: web.Request) -> web.Response:
        queue = request.query.get("queue", "").strip()
        try:
            answer = await self.call(request, "ListDeadLetters", pb.ListDeadLettersRequest(
                queue=queue, page_size=PAGE_SIZE, page_token=request.query.get("page", "")))
        except (grpc.RpcError, Refusal) as exc:
            return self.failure(request, exc)
        following = {"queue": queue, "page": answer.next_page_token}
        return self.page(request, "dead_letters.html", title="Dead letters",
                         jobs=answer.jobs, queue=queue,
                         next_page=("/dead-letters?" + urllib.parse.urlencode(following))
                         if answer.next_page_token else "")

    async def dead_letter_action(self, request: web.Request) -> web.StreamResponse:
        """Requeue or purge the selected dead letters, or all (of a queue) when the form
        says `all` and the person confirmed it on the confirmation page."""
        form, action = request["form"], request.match_info["action"]
        ids = [i for i in form.getall("id", []) if isinstance(i, str)]
        every = form.get("all") == "yes"
        queue = str(form.get("queue", "")).strip()
        if not ids and not every:
            raise Redirect("/dead-letters", "Select dead letters first (or use the "
                                            "buttons for all of them).")
        if form.get("confirmed") != "yes":
            return self.page(request, "confirm.html", title=f"Confirm {action}",
                             action=action, ids=ids, every=every, queue=queue)
        try:
            if action == "requeue":
                answer = await self.call(request, "RequeueDeadLetters",
                                         pb.RequeueDeadLettersRequest(ids=ids, all=every,
                                                                      queue=queue))
                said = f"{len(answer.ids)} requeued."
            else:
                answer = await self.call(request, "PurgeDeadLetters",
                                         pb.PurgeDeadLettersRequest(ids=ids, queue=queue))
                said = f"{answer.purged} purged from the dead-letter queue (their FAILED " \
                       "records are kept)."
        except (grpc.RpcError, Refusal) as exc:
            refusal = refusal_of(exc)
            raise Redirect("/dead-letters", f"Not done ({action}): {refusal.message}")
        raise Redirect("/dead-letters", said)

    # --- assets ----------------------------------------------------------------------------

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = self.static.get(name)
        if body is None:
            raise web.HTTPNotFound(text=f"no asset {name[:60]!r}")
        return web.Response(body=body, headers={
            "Content-Type": STATIC_TYPES.get(os.path.splitext(name)[1],
                                             "application/octet-stream"),
            "Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})


# --- forms ------------------------------------------------------------------------------------

SUBMIT_FIELDS = ("command", "name", "queue", "priority", "timeout_seconds", "max_retries",
                 "env", "labels", "cwd", "run_at", "idempotency_key", "limits.memory_bytes",
                 "limits.cpu_seconds", "limits.processes", "limits.open_files",
                 "limits.file_size_bytes")
SCHEDULE_FIELDS = ("schedule_name", "expression", "timezone", "overlap")
_INTEGERS = {"priority": "priority", "max_retries": "max_retries",
             "limits.cpu_seconds": "cpu_seconds", "limits.processes": "processes",
             "limits.open_files": "open_files"}
_SIZES = {"limits.memory_bytes": "memory_bytes", "limits.file_size_bytes": "file_size_bytes"}


def parse_time(text: str, field_name: str) -> datetime:
    """ISO 8601 (a browser's datetime-local without an offset is UTC)."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise FieldErrors({field_name: "a date and time like 2026-12-03T17:40 (UTC) or with "
                                       "an offset"}, "") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(moment.astimezone(timezone.utc))
    return message


def job_spec(values: dict[str, str]) -> pb.JobSpec:
    """A JobSpec from the submit form; FieldErrors for what the form itself can tell."""
    errors: dict[str, str] = {}
    spec = pb.JobSpec(command=values["command"].replace("\r\n", "\n"),
                      name=values["name"].strip(), queue=values["queue"].strip(),
                      cwd=values["cwd"].strip(),
                      idempotency_key=values["idempotency_key"].strip())
    for key, field_name in _INTEGERS.items():
        text = values[key].strip()
        if not text:
            continue
        try:
            number = int(text)
        except ValueError:
            errors[key] = f"a whole number, not {text[:20]!r}"
            continue
        if key.startswith("limits."):
            if number < 0:
                errors[key] = "must not be negative"
                continue
            setattr(spec.limits, field_name, number)
        else:
            try:
                setattr(spec, field_name, number)
            except ValueError:
                errors[key] = f"out of range: {text[:20]}"
    for key, field_name in _SIZES.items():
        text = values[key].strip()
        if not text:
            continue
        try:
            setattr(spec.limits, field_name, config.size(text))     # as [worker] limits
        except ValueError:
            errors[key] = f"a size like 512M or 2G, not {text[:20]!r}"
    text = values["timeout_seconds"].strip()
    if text:
        try:
            spec.timeout_seconds = float(text)
            if not math.isfinite(spec.timeout_seconds):
                raise ValueError
        except ValueError:
            errors["timeout_seconds"] = f"seconds, like 30 or 1.5, not {text[:20]!r}"
    for number, line in enumerate(values["env"].splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            errors["env"] = f"line {number}: NAME=value, not {line[:40]!r}"
            break
        spec.env[key.strip()] = value
    for number, line in enumerate(values["labels"].replace(",", "\n").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.strip().partition("=")
        if not sep or not key.strip():
            errors["labels"] = f"KEY=value, not {line.strip()[:40]!r}"
            break
        spec.labels[key.strip()] = value.strip()
    if values["run_at"].strip():
        try:
            spec.run_at.CopyFrom(timestamp(parse_time(values["run_at"], "run_at")))
        except FieldErrors as bad:
            errors.update(bad.fields)
    if errors:
        raise FieldErrors(errors, "Fix the fields marked below.")
    return spec


_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.+)\Z", re.S)


def api_errors(exc: Exception, *prefixes: str) -> tuple[dict[str, str], str]:
    """The API's refusal as ({form field: problem}, message): the API names the field
    (`job.timeout_seconds: must be ...`), and the form puts it beside that field."""
    refusal = refusal_of(exc)
    match = _FIELD.match(refusal.message)
    if refusal.code == "INVALID_ARGUMENT" and match:
        field_name = match.group(1)
        for prefix in prefixes:
            if field_name.startswith(prefix):
                field_name = field_name[len(prefix):]
                break
        field_name = re.sub(r"\[\d+\]", "", field_name)
        if field_name.startswith(("env.", "env[")):
            field_name = "env"
        if field_name.startswith(("labels.", "labels[")):
            field_name = "labels"
        known = {*SUBMIT_FIELDS, *SCHEDULE_FIELDS, "name", "expression", "timezone",
                 "overlap"}
        if field_name in known:
            return {field_name: match.group(2)}, "The API refused a field: see below."
    return {}, f"{refusal.code}: {refusal.message}"


def _status_of(exc: Exception) -> int:
    return refusal_of(exc).status


def _limits(limits) -> str:
    """A job's limits as `[worker] limits` writes them: `memory=512MiB cpu_time=10s`."""
    return config.limits_text({name: getattr(limits, field)
                               for name, field in config.LIMIT_PROTO_FIELDS.items()
                               if getattr(limits, field)})


# --- the overview's chart ---------------------------------------------------------------------

@dataclass
class Bar:
    x: float
    width: float
    parts: list[tuple[str, float, float, int]]     # (status class, y, height, count)
    label: str


def _totals(activity) -> dict[str, int]:
    return {"succeeded": sum(m.succeeded for m in activity.minutes),
            "failed": sum(m.failed for m in activity.minutes),
            "cancelled": sum(m.cancelled for m in activity.minutes)}


def chart(activity, width: float = 600.0, height: float = 120.0) -> dict[str, Any]:
    """Stacked bars, one per minute (succeeded, failed, cancelled), scaled to the busiest
    minute: drawn as SVG by the template, so the page needs no script for it."""
    minutes = list(activity.minutes)
    peak = max((m.succeeded + m.failed + m.cancelled for m in minutes), default=0)
    step = width / max(len(minutes), 1)
    bars = []
    for index, minute in enumerate(minutes):
        y = height
        parts = []
        for name in ("succeeded", "failed", "cancelled"):
            count = getattr(minute, name)
            if count and peak:
                h = max(1.0, height * count / peak)
                y -= h
                parts.append((name, round(y, 1), round(h, 1), count))
        start = when(minute.minute)
        bars.append(Bar(round(index * step, 1), round(max(step - 1, 1), 1), parts,
                        f"{start.strftime('%H:%M') if start else ''} UTC: "
                        f"{minute.succeeded} succeeded, {minute.failed} failed, "
                        f"{minute.cancelled} cancelled"))
    return {"bars": bars, "width": width, "height": height, "peak": peak}
