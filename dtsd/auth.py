"""Who may call what: callers, roles, the method table, tokens, and the exposure rule.

Roles are ordered, `read < submit < admin`, each including the ones below it. A call
comes from one **principal** (`Caller.principal`), which is what owns a job and what the
audit log names:

- `user:NAME`: a local user on a unix-socket peer, with a local token from this host's
  master, which read the uid from the kernel (see dtsd/identity.py); its role comes from
  `[server] local_roles`. Local tokens are refused over TCP, loopback included.
- `token:NAME`: a bearer token of `[server] tokens_file` (TCP or the local sockets).
  Tokens live hashed there, one per line `NAME ROLE SHA256HEX` (`#` starts a comment);
  the secret is printed once by `dtsd token add` and never stored. The server rereads the
  file when it changes (a stat at most once a second): adding or removing a token needs
  no restart.
- `anonymous`: a call with no token at all, only when `[server] anonymous_role` gives
  such calls a role (default: none; then the call is UNAUTHENTICATED with a message that
  says how to get in). Every anonymous caller is the same principal.

`METHODS` is deny-by-default: every RPC of every service the server registers has an
entry (a test enumerates the descriptors), and a method without one is refused.
Health and reflection need no token (`PUBLIC`): load balancers and probes carry none, and
both only say what is already public (that the server is up, and the API's schema).

Promises of the interceptor: a call without a usable credential gets UNAUTHENTICATED
(a malformed or unknown token, a forged or expired local token, a local token over TCP,
or no token without an anonymous role); a caller whose role is too low gets
PERMISSION_DENIED naming the role needed; otherwise the handler runs with `caller()`
returning the `Caller`. What a role may see and touch of other principals' jobs (env
values, cancel, retry) is decided by the handlers with `Caller.owns`.
"""

from __future__ import annotations

import contextvars
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import grpc

from . import identity
from .identity import Role

log = logging.getLogger("dtsd.auth")
audit_log = logging.getLogger("dtsd.audit")

#: Marks a method that needs no token at all.
PUBLIC = None

_V1 = "/dtsd.v1.Scheduler/"
_HEALTH = "/grpc.health.v1.Health/"
_REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/"

#: Every RPC the server serves -> the least role that may call it (PUBLIC: anyone).
METHODS: dict[str, Role | None] = {
    _V1 + "SubmitJob": Role.SUBMIT,
    _V1 + "SubmitJobs": Role.SUBMIT,
    _V1 + "GetJob": Role.READ,
    _V1 + "ListJobs": Role.READ,
    _V1 + "WatchJob": Role.READ,
    _V1 + "CancelJob": Role.SUBMIT,
    _V1 + "RetryJob": Role.SUBMIT,
    _V1 + "ListDeadLetters": Role.READ,
    _V1 + "RequeueDeadLetters": Role.ADMIN,
    _V1 + "PurgeDeadLetters": Role.ADMIN,
    _V1 + "ClusterStatus": Role.READ,
    _V1 + "JobActivity": Role.READ,
    _V1 + "CreateSchedule": Role.ADMIN,
    _V1 + "ListSchedules": Role.READ,
    _V1 + "PauseSchedule": Role.ADMIN,
    _V1 + "ResumeSchedule": Role.ADMIN,
    _V1 + "DeleteSchedule": Role.ADMIN,
    _V1 + "TriggerSchedule": Role.ADMIN,
    _V1 + "PreviewSchedule": Role.READ,
    "/scheduler.JobService/SubmitJob": Role.SUBMIT,
    "/scheduler.JobService/GetJobStatus": Role.READ,
    "/scheduler.TaskScheduler/SubmitTask": Role.SUBMIT,
    "/scheduler.TaskScheduler/GetTaskStatus": Role.READ,
    _HEALTH + "Check": PUBLIC,
    _HEALTH + "Watch": PUBLIC,
    _REFLECTION + "ServerReflectionInfo": PUBLIC,
}

TOKEN_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
SECRET_PREFIX = "dtsd_"
_HEX = re.compile(r"^[0-9a-f]{64}$")

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Caller:
    """Who makes the current call: `principal` (`user:alice`, `token:ci-bot`, `anonymous`),
    its `role` (None: none), and the gRPC `peer` (`ipv4:127.0.0.1:PORT`, `unix:`)."""

    principal: str
    role: Role | None
    peer: str

    @property
    def local_user(self) -> bool:
        """Identified by the kernel on this host (a local token)."""
        return self.principal.startswith("user:")

    @property
    def submitted_by(self) -> str:
        """How a job and the audit log record the caller: `user:alice` (the kernel says
        who; the socket adds nothing), else `token:ci-bot@ipv4:...`, `anonymous@ipv4:...`."""
        return self.principal if self.local_user else f"{self.principal}@{self.peer}"

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN

    def owns(self, owner: str) -> bool:
        """May see the secrets of, cancel and retry what `owner` submitted: the owner
        itself, and admins."""
        return self.admin or self.principal == owner


NOBODY = Caller(ANONYMOUS, None, "")
_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("dtsd_caller", default=NOBODY)


def caller() -> Caller:
    """The caller of the current RPC (NOBODY outside one, and in public methods)."""
    return _caller.get()


def audit(action: str, detail: str) -> None:
    """One line per state-changing call on `dtsd.audit`: who, what, which."""
    audit_log.info("%s by %s: %s", action, caller().submitted_by, detail)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


# --- the tokens file ----------------------------------------------------------------------

class TokenError(ValueError):
    """A bad token name, role, duplicate, or a malformed tokens file (message says where)."""


@dataclass(frozen=True)
class Token:
    name: str
    role: Role
    sha256: str


def check_name(name: str) -> str:
    if not TOKEN_NAME.match(name):
        raise TokenError(f"bad token name {name[:80]!r} (lower-case letters, digits, '_', '.', "
                         "'-'; at most 64; starts with a letter or digit)")
    return name


def check_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise TokenError(f"unknown role {text!r} (use read, submit or admin)") from None


def parse_tokens(text: str, path: str = "tokens file") -> list[Token]:
    tokens: list[Token] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{path}:{number}"
        if len(fields) != 3:
            raise TokenError(f"{where}: expected NAME ROLE SHA256HEX")
        name, role, hashed = fields
        try:
            token = Token(check_name(name), check_role(role), hashed.lower())
        except TokenError as exc:
            raise TokenError(f"{where}: {exc}") from None
        if not _HEX.match(token.sha256):
            raise TokenError(f"{where}: the hash is not 64 hex digits")
        if any(t.name == name for t in tokens):
            raise TokenError(f"{where}: token {name!r} is listed twice")
        tokens.append(token)
    return tokens


def read_tokens(path: str) -> list[Token]:
    try:
        with open(path, encoding="utf-8") as handle:
            return parse_tokens(handle.read(), path)
    except FileNotFoundError:
        return []


LOCK_FILE = "tokens.lock"


def _locked(lock_dir: str):
    """An exclusive lock for add/rm: `<lock_dir>/tokens.lock` ([dtsd] runtime_dir, so
    nothing is left beside the tokens file). Opened without following a symlink: the
    directory may belong to the daemon's user while root runs `dtsd token`."""
    os.makedirs(lock_dir, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(lock_dir, LOCK_FILE),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    handle = os.fdopen(fd, "r+b")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def add_token(path: str, name: str, role: str, *, lock_dir: str, group: int | None = None) -> str:
    """Append a new token; returns its secret (shown once, stored only as a hash).

    A tokens file created here is mode 0640 with group `group` (the caller passes the
    configuration file's: the package installs that root:dtsd 0640, so the daemon can read
    the tokens as it reads its configuration). An existing file keeps its owner and mode.
    """
    check_name(name)
    level = check_role(role)
    with _locked(lock_dir):
        if any(t.name == name for t in read_tokens(path)):
            raise TokenError(f"token {name!r} exists already (dtsd token rm {name} first)")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
            created = True
        except FileExistsError:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            created = False
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            if created:
                if group is not None:
                    os.fchown(fd, -1, group)
                os.fchmod(fd, 0o640)        # whatever the umask
            handle.write(f"{name} {level.value} {digest(secret)}\n")
    return secret


def remove_token(path: str, name: str, *, lock_dir: str) -> None:
    """Remove a token by name (atomically: the file is replaced, never half-written)."""
    check_name(name)
    with _locked(lock_dir):
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines(keepends=True)
        except FileNotFoundError:
            lines = []
        kept = [line for line in lines if line.split("#", 1)[0].split()[:1] != [name]]
        if len(kept) == len(lines):
            raise TokenError(f"no token named {name!r} in {path}")
        temporary = path + ".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        try:
            st = os.stat(path)
            os.chown(temporary, st.st_uid, st.st_gid)
            os.chmod(temporary, st.st_mode & 0o7777)
        except OSError:
            pass
        os.replace(temporary, path)


class TokenFile:
    """The server's view of the tokens file, reread when it changes (stat at most 1/s).

    A file that cannot be parsed keeps the tokens read before (and logs an error), like a
    bad config reload; a file that disappears means no token is valid.
    """

    CHECK_EVERY = 1.0

    def __init__(self, path: str):
        self.path = path
        self._tokens: list[Token] = []
        self._signature: tuple | None = None
        self._checked = -self.CHECK_EVERY
        self._lock = threading.Lock()
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.CHECK_EVERY:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            signature = None
        if signature == self._signature and not force:
            return
        self._signature = signature
        if signature is None:
            log.warning("tokens file %s is missing: every call that needs a token is refused",
                        self.path)
            self._tokens = []
            return
        try:
            self._tokens = read_tokens(self.path)
        except (TokenError, OSError, UnicodeDecodeError) as exc:
            log.error("tokens file not reloaded, keeping the %d token(s) read before: %s",
                      len(self._tokens), exc)
            return
        log.info("tokens file %s: %d token(s)", self.path, len(self._tokens))

    def lookup(self, secret: str) -> Token | None:
        with self._lock:
            self._refresh()
            tokens = self._tokens
        hashed = digest(secret)
        found = None
        for token in tokens:          # compare with every entry: no early exit
            if hmac.compare_digest(token.sha256, hashed):
                found = token
        return found


# --- the interceptor ----------------------------------------------------------------------

class Refused(Exception):
    """A call refused before its handler runs: the status code and a message to act on."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def bearer_secret(value: str) -> str:
    """The secret of an `Authorization: Bearer SECRET` value ('' when malformed): for gRPC
    metadata here, and for the web child's HTTP requests."""
    scheme, _, secret = value.partition(" ")
    return secret.strip() if scheme.lower() == "bearer" else ""


def _bearer(metadata) -> str | None:
    """The token of `authorization: Bearer TOKEN`; '' when the header is there but
    malformed; None without the header."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            return bearer_secret(value)
    return None


def _same_shape(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    codecs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(behavior, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(behavior, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(behavior, **codecs)
    return grpc.stream_stream_rpc_method_handler(behavior, **codecs)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
             message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts."""
    def deny(request_or_iterator, context):
        context.abort(code, message)
    return _same_shape(handler, deny)


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks every call against `METHODS`: who calls (`authenticate`), then the role.

    The peer address is known only inside the call (`context.peer()`), so the check runs
    there, on the thread that then runs the handler, before the request is parsed.
    """

    def __init__(self, tokens: TokenFile | None, *, local_key: bytes | None, node: str,
                 anonymous_role: Role | None, runtime_dir: str):
        self.tokens = tokens
        self.local_key = local_key
        self.node = node
        self.anonymous_role = anonymous_role
        self.runtime_dir = runtime_dir

    def authenticate(self, metadata, peer: str) -> Caller:
        """The caller of a call with this metadata from this peer; Refused if none."""
        local = peer.startswith("unix:")
        secret = _bearer(metadata)
        if secret is None:
            if self.anonymous_role is not None:
                return Caller(ANONYMOUS, self.anonymous_role, peer)
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, self._no_token(local))
        if identity.is_local_token(secret):
            if not local:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                              "a local token is accepted only on this host's local API "
                              "sockets, never over TCP: send a token of the tokens file")
            if self.local_key is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                              "this server cannot check local tokens (it could not read the "
                              "master's key; see its log): use a token of the tokens file")
            try:
                claim = identity.verify(self.local_key, secret, self.node)
            except identity.LocalTokenError as exc:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
            return Caller(claim.principal, claim.role, peer)
        token = self.tokens.lookup(secret) if (secret and self.tokens) else None
        if token is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                          "unknown or malformed token (send 'authorization: Bearer TOKEN' "
                          "with a token from `dtsd token add`)")
        return Caller(f"token:{token.name}", token.role, peer)

    def _no_token(self, local: bool) -> str:
        if local:
            return ("no token: on this host, dtsctl asks the master who you are "
                    f"({os.path.join(self.runtime_dir, identity.IDENT_SOCKET)}); other clients "
                    "send 'authorization: Bearer TOKEN'")
        return ("a call over TCP needs a token: send 'authorization: Bearer TOKEN' (an admin "
                "creates one with `dtsd token add NAME --role ROLE`; dtsctl reads it from "
                "--token-file FILE, $DTSD_TOKEN_FILE or [client] token_file), or run dtsctl on "
                "the server's host without --servers: its local socket knows who you are")

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None     # no such method: UNIMPLEMENTED, as without auth
        method = handler_call_details.method
        if method not in METHODS:
            log.error("%s has no entry in the access table: refused", method)
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"{method} is not open to any role")
        needed = METHODS[method]
        if needed is PUBLIC:
            return handler
        return _same_shape(handler, self._guard(handler, method.rsplit("/", 1)[1], needed))

    def _guard(self, handler: grpc.RpcMethodHandler, short: str, needed: Role) -> Callable:
        """The handler's behaviour, run only for a caller with role `needed` or more, with
        `caller()` returning that caller (on the pool thread that runs it)."""
        original = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                    or handler.stream_stream)

        def admit(context) -> contextvars.Token:
            try:
                who = self.authenticate(context.invocation_metadata(), context.peer() or "")
            except Refused as refused:
                context.abort(refused.code, refused.message)
            if who.role is None or not who.role.allows(needed):
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"{short} needs role {needed.value}; {who.principal} has role "
                              f"{who.role.value if who.role else 'none'}")
            return _caller.set(who)

        if handler.response_streaming:
            def behavior(request, context) -> Iterator:
                reset = admit(context)
                try:
                    yield from original(request, context)
                finally:
                    _caller.reset(reset)
        else:
            def behavior(request, context):
                reset = admit(context)
                try:
                    return original(request, context)
                finally:
                    _caller.reset(reset)
        return behavior


# --- exposure: pure checks of the configuration, kept in config.py so that the master
# (which must not load gRPC) can run them; re-exported here for the API's side.
from .config import exposure, is_loopback  # noqa: E402,F401
