"""The API's TLS files: `[server] tls_cert`, `tls_key` and `tls_client_ca`.

The server children (gRPC) and the web child (HTTPS, the same certificate) read them once,
at boot. So a reload restarts those two roles when the files' contents changed, even under
the same names (a certificate renewed in place, as certbot and most ACME clients do it):
the master compares `digests` of the running configuration with the new one's. And a pair
that does not load (a key of another certificate, a truncated file, an encrypted key, which
neither child could unlock) refuses the start or the reload, before any child tries it
(`load_problem`, one of the start checks).

Python's ssl module only: the master loads this, and holds no gRPC.
"""

from __future__ import annotations

import hashlib
import re
import ssl

from .config import Config

KEYS = ("tls_cert", "tls_key", "tls_client_ca")
ROLES = ("server", "web")          # the children that read these files at boot


def _no_passphrase() -> bytes:
    """An encrypted key fails to load instead of asking a terminal for its passphrase."""
    return b""


def server_context(cfg: Config) -> ssl.SSLContext | None:
    """The web child's TLS context (None: no TLS); also how the pair is tried. Raises
    OSError for a file that cannot be read, ssl.SSLError for one that does not load."""
    cert, key = cfg.get("server", "tls_cert"), cfg.get("server", "tls_key")
    if not (cert and key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key, password=_no_passphrase)
    client_ca = cfg.get("server", "tls_client_ca")
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def load_problem(cfg: Config) -> str | None:
    """Why the configured certificate, key and client CA do not load, or None. A file that
    cannot be read at all is left to the check of readable files, which names the reader."""
    if not (cfg.get("server", "processes") or cfg.get("web", "processes")):
        return None
    try:
        server_context(cfg)
    except OSError as exc:
        if not isinstance(exc, ssl.SSLError):
            return None
        cert, key = cfg.get("server", "tls_cert"), cfg.get("server", "tls_key")
        ca = cfg.get("server", "tls_client_ca")
        named = f"[server] tls_cert {cert} with tls_key {key}" + (
            f" and tls_client_ca {ca}" if ca else "")
        why = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc))
        return (f"{named} do not load: {why} (a key of another certificate, a file that is "
                "not PEM, or an encrypted key: dtsd cannot ask for a passphrase)")
    return None


def digests(cfg: Config) -> dict[str, str]:
    """{"[server] tls_cert": sha256 of its contents, ...} for the files set; an unreadable
    file counts by its error, so that becoming readable is a change too."""
    found = {}
    for key in KEYS:
        path = cfg.get("server", key)
        if not path:
            continue
        try:
            with open(path, "rb") as handle:
                found[f"[server] {key}"] = hashlib.sha256(handle.read()).hexdigest()
        except OSError as exc:
            found[f"[server] {key}"] = f"unreadable: {exc.strerror}"
    return found


def changed(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The names (`[server] tls_cert`, ...) whose contents differ between two `digests`."""
    return [name for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
