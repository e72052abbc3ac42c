"""Local identity: on this host, the kernel says who a caller is (as PostgreSQL's `peer`).

gRPC Python hands a servicer no peer uid on a unix socket (`context.peer()` is just
`unix:`), so SO_PEERCRED is out of reach through gRPC. The master therefore runs a small
**peer-credential broker** on `<[dtsd] runtime_dir>/ident.sock` (mode 0666): whoever
connects gets, at once, either a short-lived **local token** or a refusal, and the
connection is closed. The broker reads the caller's uid from the kernel (SO_PEERCRED), looks
the user and its groups up (pwd, os.getgrouplist), and decides the role from `[server]
local_roles` (`root:admin %dtsd-admin:admin` by default; the highest matching entry
wins). A caller with no role gets a refusal text that says so, never a token.

A local token is `dtsdl_<payload>.<mac>`: the payload (base64url JSON: user name, uid,
role, node, expiry `LOCAL_TOKEN_TTL` seconds ahead) signed with HMAC-SHA256 under a random
32-byte key the master creates at start in `<runtime_dir>/local.key` (mode 0600, the
daemon's own user; written before any child starts, kept across reloads, new at every
start, removed at stop). The API servers read the key at boot and accept a local token
only from a unix-socket peer: never over TCP, loopback included, so a token that leaks
off the host is worthless. The role is the one the broker decided when it signed, so a
change of `local_roles` or of a user's groups applies to tokens issued after it (within
`LOCAL_TOKEN_TTL` for everyone). The web child reads the key too: it checks the local
token `dtsctl web-login` posts from loopback, and signs local tokens for the user of such
a session, for at most its hour (dtsd/webui.py).

This module is standard library only, and light: the master imports it. Python's `hmac`
and `hashlib` load OpenSSL (+4 MB of master RSS), so the HMAC here is the RFC 2104
construction over the interpreter's built-in SHA-256; a test checks it against `hmac`.
"""

from __future__ import annotations

import base64
import enum
import grp
import json
import logging
import os
import pwd
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Sequence

try:                                    # the built-in SHA-256, without OpenSSL
    from _sha256 import sha256 as _sha256   # Python 3.11
except ImportError:                     # pragma: no cover - other interpreters
    try:
        from _sha2 import sha256 as _sha256     # Python 3.12 and later
    except ImportError:
        from hashlib import sha256 as _sha256

log = logging.getLogger("dtsd.identity")

IDENT_SOCKET = "ident.sock"
KEY_FILE = "local.key"
API_SOCKET_PREFIX = "api-"          # each server child's `<runtime_dir>/api-<pid>.sock`
LOCAL_TOKEN_PREFIX = "dtsdl_"
LOCAL_TOKEN_TTL = 300               # seconds a local token is good for
MAX_ANSWER = 4096                   # bytes of a broker answer, at most
ANSWERS_PER_TURN = 16               # connections the master answers per loop turn, at most


class Role(str, enum.Enum):
    """What a caller may do; ordered, each role includes the ones below it."""

    READ = "read"
    SUBMIT = "submit"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: "Role") -> bool:
        return self.rank >= needed.rank


_RANK = {Role.READ: 0, Role.SUBMIT: 1, Role.ADMIN: 2}
ROLE_NAMES = tuple(role.value for role in Role)


def api_socket(runtime_dir: str, pid: int) -> str:
    """Where server child `pid` serves the API for local callers."""
    return os.path.join(runtime_dir, f"{API_SOCKET_PREFIX}{pid}.sock")


def api_sockets(runtime_dir: str) -> list[str]:
    """The paths of the API sockets served in `runtime_dir` now, sorted (OSError if it
    cannot be listed): what dtsctl and the web child call on this host."""
    return sorted(os.path.join(runtime_dir, name) for name in os.listdir(runtime_dir)
                  if name.startswith(API_SOCKET_PREFIX) and name.endswith(".sock"))


# --- [server] local_roles -----------------------------------------------------------------

_ACCOUNT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?\Z")


@dataclass(frozen=True)
class RoleRule:
    """One entry of `[server] local_roles`: `USER:ROLE`, or `%GROUP:ROLE` for its members."""

    name: str
    role: Role
    group: bool = False

    def __str__(self) -> str:
        return f"{'%' if self.group else ''}{self.name}:{self.role.value}"


def parse_local_roles(text: str) -> tuple[RoleRule, ...]:
    """`root:admin %dtsd-admin:admin alice:submit` -> rules; ValueError naming a bad entry."""
    rules: list[RoleRule] = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        who, sep, role = item.rpartition(":")
        group = who.startswith("%")
        name = who[1:] if group else who
        if not sep or not _ACCOUNT.match(name):
            raise ValueError(f"bad entry {item[:80]!r} (use USER:ROLE or %GROUP:ROLE)")
        if role not in ROLE_NAMES:
            raise ValueError(f"bad entry {item[:80]!r}: unknown role {role[:20]!r} "
                             f"(use {', '.join(ROLE_NAMES)})")
        rules.append(RoleRule(name, Role(role), group))
    return tuple(rules)


def local_role(rules: Sequence[RoleRule], user: str, gid: int) -> Role | None:
    """The highest role `rules` give `user` (primary group `gid`), or None.

    Group membership is the user database's (os.getgrouplist), as for a new login: adding
    someone to a group takes effect at their next dtsctl call, with no new login needed.
    """
    best: Role | None = None
    member_of: set[int] | None = None
    for rule in rules:
        if best is not None and rule.role.rank <= best.rank:
            continue
        if rule.group:
            try:
                wanted = grp.getgrnam(rule.name).gr_gid
            except KeyError:
                continue        # no such group on this host: it grants nothing
            if member_of is None:
                try:
                    member_of = set(os.getgrouplist(user, gid))
                except OSError:
                    member_of = {gid}
            if wanted not in member_of:
                continue
        elif rule.name != user:
            continue
        best = rule.role
    return best


# --- local tokens -------------------------------------------------------------------------

def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104) over the built-in SHA-256 (see the module docstring)."""
    if len(key) > 64:
        key = _sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = _sha256(bytes(b ^ 0x36 for b in key) + message).digest()
    return _sha256(bytes(b ^ 0x5C for b in key) + inner).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class LocalClaim:
    """What a valid local token says: who, which role, on which node, until when."""

    user: str
    uid: int
    role: Role
    node: str
    expires: int

    @property
    def principal(self) -> str:
        return f"user:{self.user}"


class LocalTokenError(ValueError):
    """A local token that is malformed, forged, expired or from another node."""


def sign(key: bytes, claim: LocalClaim) -> str:
    payload = _b64(json.dumps({"user": claim.user, "uid": claim.uid, "role": claim.role.value,
                               "node": claim.node, "exp": claim.expires},
                              separators=(",", ":")).encode())
    return f"{LOCAL_TOKEN_PREFIX}{payload}.{_b64(hmac_sha256(key, payload.encode()))}"


def is_local_token(secret: str) -> bool:
    return secret.startswith(LOCAL_TOKEN_PREFIX)


def verify(key: bytes, secret: str, node: str, now: float | None = None) -> LocalClaim:
    """The claim of a local token signed with `key` for `node`; LocalTokenError otherwise."""
    import hmac                      # servers only: constant-time comparison
    body = secret[len(LOCAL_TOKEN_PREFIX):] if is_local_token(secret) else ""
    payload, dot, mac = body.partition(".")
    try:
        given = _unb64(mac)
    except ValueError:
        given = b""
    if not dot or not hmac.compare_digest(given, hmac_sha256(key, payload.encode())):
        raise LocalTokenError("local token not signed by this node's master (forged, or "
                              "from before a restart: fetch a new one)")
    try:
        data = json.loads(_unb64(payload))
        claim = LocalClaim(str(data["user"]), int(data["uid"]), Role(data["role"]),
                           str(data["node"]), int(data["exp"]))
    except (ValueError, KeyError, TypeError):
        raise LocalTokenError("local token malformed") from None
    now = time.time() if now is None else now
    if claim.node != node:
        raise LocalTokenError(f"local token of node {claim.node[:64]!r}, not {node!r}")
    if claim.expires <= now:
        raise LocalTokenError("local token expired (dtsctl fetches a new one as needed)")
    if claim.expires > now + LOCAL_TOKEN_TTL + 60:
        raise LocalTokenError("local token lives longer than any this node issues")
    return claim


def claim_expiry(secret: str) -> int:
    """When a local token expires (unverified: for the client deciding when to renew)."""
    try:
        payload = secret[len(LOCAL_TOKEN_PREFIX):].partition(".")[0]
        return int(json.loads(_unb64(payload))["exp"])
    except (ValueError, KeyError, TypeError):
        return 0


def read_key(runtime_dir: str) -> bytes | None:
    """The master's signing key, or None when it cannot be read (then local tokens fail)."""
    try:
        with open(os.path.join(runtime_dir, KEY_FILE), "rb") as handle:
            key = handle.read()
    except OSError as exc:
        log.error("local tokens are refused: cannot read the master's key: %s", exc)
        return None
    return key if len(key) >= 32 else None


# --- the broker (runs in the master's loop) -----------------------------------------------

class Broker:
    """`<runtime_dir>/ident.sock`: answers each connection with a local token or a refusal.

    Never blocks the master: the listening socket is non-blocking, each loop turn answers
    at most `ANSWERS_PER_TURN` connections, an answer is a single send of a few hundred
    bytes on a fresh socket (dropped if the kernel would not take it at once), and the
    caller sends nothing, so nothing is ever read.
    """

    def __init__(self, runtime_dir: str, node: str):
        self.runtime_dir = runtime_dir
        self.node = node
        self.path = os.path.join(runtime_dir, IDENT_SOCKET)
        self.key_path = os.path.join(runtime_dir, KEY_FILE)
        self.key = b""
        self.sock: socket.socket | None = None
        self.paused_until = 0.0     # after a failed accept (EMFILE...): not selected a while

    def open(self) -> None:
        """Write a new key (0600) and listen on the socket (0666). OSError if either fails."""
        self.key = os.urandom(32)
        temporary = self.key_path + ".tmp"
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, self.key)
        finally:
            os.close(fd)
        os.replace(temporary, self.key_path)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o666)     # anyone may ask; the answer depends on who asks
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def fileno(self) -> int:
        """The socket to select on; -1 when closed, or resting after a failed accept (a
        listening socket stays readable, and the loop must not spin on it)."""
        if self.sock is None or time.monotonic() < self.paused_until:
            return -1
        return self.sock.fileno()

    def serve(self, rules: Sequence[RoleRule]) -> None:
        """Answer the connections waiting now (at most ANSWERS_PER_TURN)."""
        if self.sock is None:
            return
        for _ in range(ANSWERS_PER_TURN):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # EMFILE and the like: rest, then try again
                log.warning("identity broker: accept failed: %s; resting a second", exc)
                self.paused_until = time.monotonic() + 1.0
                return
            with conn:
                try:
                    conn.setblocking(False)
                    conn.send(self.answer(conn, rules))
                except OSError as exc:
                    log.debug("identity broker: answer not sent: %s", exc)

    def answer(self, conn: socket.socket, rules: Sequence[RoleRule]) -> bytes:
        pid, uid, gid = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            log.debug("identity broker: uid %d (pid %d) has no user name: refused", uid, pid)
            return (f"ERR uid {uid} has no user name on this host, so [server] local_roles "
                    "grants it nothing; use a token\n").encode()
        role = local_role(rules, user, gid)
        if role is None:
            log.debug("identity broker: %s (uid %d, pid %d): no role", user, uid, pid)
            return (f"ERR user {user} (uid {uid}) has no role on node {self.node}: [server] "
                    f"local_roles grants none (an admin may add {user}:ROLE or %GROUP:ROLE; "
                    "roles read, submit, admin), or use a token\n").encode()
        claim = LocalClaim(user, uid, role, self.node, int(time.time()) + LOCAL_TOKEN_TTL)
        log.debug("identity broker: %s (uid %d, pid %d): %s", user, uid, pid, role.value)
        return f"OK {sign(self.key, claim)}\n".encode()

    def close(self) -> None:
        """Stop answering; remove the socket and the key (tokens die with the master)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for path in (self.path, self.key_path):
            try:
                os.unlink(path)
            except OSError:
                pass


# --- the client's side --------------------------------------------------------------------

class LocalIdentityError(Exception):
    """No local token: `refused` when the broker said no (the message says why)."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


def fetch_local_token(runtime_dir: str, timeout: float = 5.0) -> str:
    """Ask this host's master who we are; returns a local token, or LocalIdentityError."""
    path = os.path.join(runtime_dir, IDENT_SOCKET)
    data = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            while len(data) < MAX_ANSWER:
                chunk = sock.recv(MAX_ANSWER)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise LocalIdentityError(f"cannot ask the dtsd master of this host who you are "
                                 f"({path}: {exc.strerror or exc}); is dtsd running?") from None
    text = data.decode("utf-8", errors="replace").strip()
    if text.startswith("OK ") and is_local_token(text[3:]):
        return text[3:]
    if text.startswith("ERR "):
        raise LocalIdentityError(text[4:], refused=True)
    raise LocalIdentityError(f"unexpected answer from {path}: {text[:200]!r}")
