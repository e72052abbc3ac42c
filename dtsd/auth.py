"""Who may call what: bearer tokens with roles, the method table, and the exposure rule.

Roles are ordered, `read < submit < admin`, each including the ones below it. Tokens live
hashed in `[server] tokens_file`, one per line `NAME ROLE SHA256HEX` (`#` starts a
comment); the secret itself is printed once by `dtsd token add` and never stored. The
server rereads the file when it changes (a stat at most once a second), so adding or
removing a token needs no restart. No tokens file configured means no authentication.

`METHODS` is deny-by-default: every RPC of every service the server registers has an
entry (a test enumerates the descriptors), and a method without one is refused.
Health and reflection need no token (`PUBLIC`): load balancers and probes carry none, and
both only say what is already public (that the server is up, and the API's schema).

Promises of the interceptor: a call without a well-formed `authorization: Bearer TOKEN`
or with an unknown token gets UNAUTHENTICATED; a known token whose role is too low gets
PERMISSION_DENIED naming the role needed; otherwise the handler runs with `caller()`
returning the token's name.
"""

from __future__ import annotations

import contextvars
import enum
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

log = logging.getLogger("dtsd.auth")
audit_log = logging.getLogger("dtsd.audit")


class Role(str, enum.Enum):
    READ = "read"
    SUBMIT = "submit"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANK = {Role.READ: 0, Role.SUBMIT: 1, Role.ADMIN: 2}

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

_caller: contextvars.ContextVar[str] = contextvars.ContextVar("dtsd_caller", default="")


def caller() -> str:
    """The name of the token the current RPC was authenticated with ('' without auth)."""
    return _caller.get()


def who(peer: str) -> str:
    """How an RPC's caller is recorded (`submitted_by`, the audit log)."""
    name = caller()
    return f"token:{name}@{peer}" if name else peer


def audit(peer: str, action: str, detail: str) -> None:
    """One line per state-changing call on `dtsd.audit`: who, what, which."""
    audit_log.info("%s by %s: %s", action, who(peer), detail)


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


def _locked(path: str):
    """An exclusive lock for add/rm, on a file beside the tokens file."""
    handle = open(path + ".lock", "a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def add_token(path: str, name: str, role: str) -> str:
    """Append a new token; returns its secret (shown once, stored only as a hash)."""
    check_name(name)
    level = check_role(role)
    with _locked(path):
        if any(t.name == name for t in read_tokens(path)):
            raise TokenError(f"token {name!r} exists already (dtsd token rm {name} first)")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(f"{name} {level.value} {digest(secret)}\n")
    return secret


def remove_token(path: str, name: str) -> None:
    """Remove a token by name (atomically: the file is replaced, never half-written)."""
    check_name(name)
    with _locked(path):
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

def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, secret = value.partition(" ")
            if scheme.lower() == "bearer" and secret.strip():
                return secret.strip()
            return None
    return None


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
             message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts."""
    def deny(request_or_iterator, context):
        context.abort(code, message)
    return _same_shape(handler, deny)


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


def _as_caller(handler: grpc.RpcMethodHandler, name: str) -> grpc.RpcMethodHandler:
    """The handler, run with `caller()` returning `name` (on the pool thread that runs it)."""
    original = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                or handler.stream_stream)
    if handler.response_streaming:
        def behavior(request, context) -> Iterator:
            reset = _caller.set(name)
            try:
                yield from original(request, context)
            finally:
                _caller.reset(reset)
    else:
        def behavior(request, context):
            reset = _caller.set(name)
            try:
                return original(request, context)
            finally:
                _caller.reset(reset)
    return _same_shape(handler, behavior)


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks every call against `METHODS` and the tokens file."""

    def __init__(self, tokens: TokenFile):
        self.tokens = tokens

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
        secret = _bearer(handler_call_details.invocation_metadata)
        token = self.tokens.lookup(secret) if secret else None
        if token is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "missing or unknown token (send 'authorization: Bearer TOKEN'; "
                            "dtsctl --token or $DTSD_TOKEN)")
        if not token.role.allows(needed):
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"{method.rsplit('/', 1)[1]} needs a token with role "
                            f"{needed.value}; token {token.name} has role {token.role.value}")
        return _as_caller(handler, token.name)


# --- exposure: pure checks of the configuration, kept in config.py so that the master
# (which must not load gRPC) can run them; re-exported here for the API's side.
from .config import exposure, is_loopback  # noqa: E402,F401
