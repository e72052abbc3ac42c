"""dtsd/config.py: converters, errors that name file/section/key, env overrides, and the
shipped etc/dtsd/dtsd.ini."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from dtsd import config
from dtsd.config import ConfigError
from tests.helpers import REPO_ROOT


@pytest.mark.parametrize("text, seconds", [
    ("30", 30.0), ("30s", 30.0), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0),
    ("7d", 604800.0), (" 2s ", 2.0), ("1.5s", 1.5), ("0", 0.0),
])
def test_duration(text, seconds):
    assert config.duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "5x", "-1s", "1 h m", "10sec", "abc"])
def test_duration_rejects(text):
    with pytest.raises(ValueError, match="not a duration"):
        config.duration(text)


@given(st.integers(min_value=0, max_value=10**6),
       st.sampled_from([("", 1), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)]))
def test_duration_property(number, unit):
    suffix, factor = unit
    assert config.duration(f"{number}{suffix}") == number * factor


def test_positive_duration():
    assert config.positive_duration("1s") == 1.0
    with pytest.raises(ValueError, match="more than 0"):
        config.positive_duration("0")


@pytest.mark.parametrize("text, size", [
    ("512", 512), ("64KB", 64 * 1024), ("1MB", 1024 ** 2), ("1mb", 1024 ** 2),
    ("2k", 2048), ("1GiB", 1024 ** 3), ("10 b", 10),
])
def test_size(text, size):
    assert config.size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "1.5MB", "-1", "1TB", "ten"])
def test_size_rejects(text):
    with pytest.raises(ValueError, match="not a size"):
        config.size(text)


def test_other_converters():
    assert config.boolean("yes") is True and config.boolean("off") is False
    with pytest.raises(ValueError):
        config.boolean("maybe")
    assert config.host_port("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert config.host_port("[::1]:1") == ("::1", 1)
    assert config.host_port(":50051") == ("0.0.0.0", 50051)
    for bad in ("nohost", "h:x", "h:70000"):
        with pytest.raises(ValueError):
            config.host_port(bad)
    assert config.queue_list("high, default low,high") == ("high", "default", "low")
    with pytest.raises(ValueError, match="bad queue name"):
        config.queue_list("Bad!")


def test_defaults_from_empty_file():
    cfg = config.parse("", "empty.ini", env={})
    assert cfg.get("server", "listen") == ("127.0.0.1", 50051)
    assert cfg.server.processes == 2
    assert cfg.worker.concurrency == 4
    assert cfg.worker.queues == ("default",)
    assert cfg.postgres.dsn == "postgresql:///dtsd"
    assert cfg.redis.url == "unix:///run/redis/redis-server.sock?db=0"
    assert cfg.etcd.endpoints == ()
    assert cfg.etcd.lease_ttl == 10.0
    assert cfg.client.servers == ("127.0.0.1:50051",)
    assert cfg.key_prefix == "dtsd:default:"
    assert cfg.node_id  # the host name when empty


def test_values_and_inline_comments():
    cfg = config.parse(
        "[dtsd]\ncluster = prod ; a comment\nnode_id = n1\n"
        "[worker]\nconcurrency = 16\nmax_output_bytes = 64KB\nstopwaitsecs = 1m\n"
        "[etcd]\nendpoints = 10.0.0.1:2379, 10.0.0.2:2379\n",
        "x.ini", env={})
    assert cfg.dtsd.cluster == "prod"
    assert cfg.node_id == "n1"
    assert cfg.key_prefix == "dtsd:prod:"
    assert cfg.worker.concurrency == 16
    assert cfg.worker.max_output_bytes == 65536
    assert cfg.worker.stopwaitsecs == 60.0
    assert cfg.etcd.endpoints == ("10.0.0.1:2379", "10.0.0.2:2379")


def test_unknown_section_names_file_and_section():
    with pytest.raises(ConfigError) as info:
        config.parse("[wokrer]\nprocesses = 1\n", "/etc/dtsd/test.ini", env={})
    message = str(info.value)
    assert "/etc/dtsd/test.ini" in message
    assert "[wokrer]" in message
    assert "unknown section" in message


def test_unknown_key_names_file_section_and_key():
    with pytest.raises(ConfigError) as info:
        config.parse("[worker]\nconcurency = 4\n", "/etc/dtsd/test.ini", env={})
    message = str(info.value)
    assert "/etc/dtsd/test.ini" in message
    assert "[worker]" in message
    assert "concurency" in message


@pytest.mark.parametrize("section, key, value", [
    ("worker", "concurrency", "lots"),
    ("worker", "concurrency", "0"),
    ("server", "listen", "nowhere"),
    ("server", "max_message_size", "huge"),
    ("worker", "heartbeat_ttl", "0s"),
    ("worker", "queues", "Bad Queue!"),
    ("dtsd", "log_level", "loud"),
    ("dtsd", "cluster", ""),
    ("etcd", "lease_ttl", "soon"),
])
def test_bad_value_names_file_section_and_key(section, key, value):
    with pytest.raises(ConfigError) as info:
        config.parse(f"[{section}]\n{key} = {value}\n", "/srv/dtsd.ini", env={})
    message = str(info.value)
    assert message.startswith("/srv/dtsd.ini: ")
    assert f"[{section}] {key}" in message


def test_syntax_error_names_file():
    with pytest.raises(ConfigError, match="broken.ini"):
        config.parse("no section header\n", "broken.ini", env={})


def test_pool_min_above_max():
    with pytest.raises(ConfigError, match=r"\[postgres\] pool_min"):
        config.parse("[postgres]\npool_min = 5\npool_max = 2\n", "p.ini", env={})


def test_env_overrides():
    text = ("[postgres]\ndsn = postgresql:///file\n[redis]\nurl = redis://file:1/0\n"
            "[server]\nlisten = 0.0.0.0:50051\n")
    cfg = config.parse(text, "e.ini", env={
        "DATABASE_URL": "postgresql://u@db.example:5432/jobs",
        "REDIS_ADDR": "cache.example:6380",
        "SERVER_PORT": "6000",
        "ETCD_ENDPOINTS": "http://e1:2379,http://e2:2379",
        "LEASE_TTL": "15",
        "PG_MAX_CONNS": "20",
        "PG_MIN_CONNS": "2",
    })
    assert cfg.postgres.dsn == "postgresql://u@db.example:5432/jobs"
    assert cfg.redis.url == "redis://cache.example:6380/0"
    assert cfg.server.listen == ("0.0.0.0", 6000)
    assert cfg.etcd.endpoints == ("e1:2379", "e2:2379")
    assert cfg.etcd.lease_ttl == 15.0
    assert cfg.postgres.pool_max == 20
    assert cfg.postgres.pool_min == 2


def test_env_redis_url_kept_and_empty_env_ignored():
    cfg = config.parse("[redis]\nurl = redis://file:1/0\n", "e.ini",
                       env={"REDIS_ADDR": "unix:///run/redis.sock", "DATABASE_URL": ""})
    assert cfg.redis.url == "unix:///run/redis.sock"
    assert cfg.postgres.dsn == "postgresql:///dtsd"


def test_env_server_port_keeps_default_host():
    cfg = config.parse("", "e.ini", env={"SERVER_PORT": "7000"})
    assert cfg.server.listen == ("127.0.0.1", 7000)


def test_bad_env_value_is_reported():
    with pytest.raises(ConfigError, match=r"\[server\] listen"):
        config.parse("", "e.ini", env={"SERVER_PORT": "http"})


def test_load(tmp_path):
    path = tmp_path / "dtsd.ini"
    path.write_text("[worker]\nprocesses = 3\n")
    cfg = config.load(str(path), env={})
    assert cfg.path == str(path)
    assert cfg.worker.processes == 3
    cfg = config.load(None, env={"DTSD_CONFIG": str(path)})
    assert cfg.worker.processes == 3
    with pytest.raises(ConfigError, match="no such file"):
        config.load(str(tmp_path / "missing.ini"), env={})


def test_shipped_ini_is_the_reference():
    shipped = (REPO_ROOT / "etc" / "dtsd" / "dtsd.ini").read_bytes().decode("utf-8")
    assert shipped == config.reference_ini(), (
        "etc/dtsd/dtsd.ini differs from config.reference_ini(); regenerate it with\n"
        "  /usr/bin/python3 -c 'from dtsd import config; "
        "print(config.reference_ini(), end=\"\")' > etc/dtsd/dtsd.ini")


def test_reference_ini_lists_every_option_and_parses_to_defaults():
    text = config.reference_ini()
    for opt in config.OPTIONS:
        assert f";{opt.key} = {opt.default}".rstrip() in text
        assert f"[{opt.section}]" in text
    commented = config.parse(text, "ref.ini", env={})
    uncommented = re.sub(r"(?m)^;([a-z_]+ =)", r"\1", text)
    assert uncommented.count("\n;") < text.count("\n;")
    explicit = config.parse(uncommented, "ref.ini", env={})
    assert commented.values == explicit.values


# --- backing-store security keys and secrets_exposure() -----------------------------------

def test_etcd_security_keys_go_together():
    for text, message in (
            ("[etcd]\nuser = dtsd\n", "user and password_file go together"),
            ("[etcd]\npassword_file = /p\n", "user and password_file go together"),
            ("[etcd]\ntls_ca = /ca\ntls_cert = /c\n", "tls_cert and tls_key go together"),
            ("[etcd]\ntls_cert = /c\ntls_key = /k\n", "tls_cert needs tls_ca"),
            ("[etcd]\nendpoints = https://h:2379\n", "https:// but [etcd] tls_ca is not set"),
            ("[etcd]\nendpoints = http://h:2379\ntls_ca = /ca\n", "http:// but [etcd] tls_ca")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            config.parse(text, "d.ini", env={})
    cfg = config.parse("[etcd]\nendpoints = https://h1:2379, h2:2379\ntls_ca = /ca\n"
                       "user = dtsd\npassword_file = /p\n", "d.ini", env={})
    assert cfg.etcd.user == "dtsd" and cfg.etcd.tls_ca == "/ca"


class FakeStat:
    """`stat` for secrets_exposure: path -> mode; a path not listed does not exist."""

    def __init__(self, modes: dict[str, int]):
        self.modes = modes

    def __call__(self, path: str):
        import os
        import stat as stat_module
        if path not in self.modes:
            raise FileNotFoundError(path)
        return os.stat_result((stat_module.S_IFREG | self.modes[path],) + (0,) * 9)


def _exposure(text: str, modes: dict[str, int], env: dict[str, str] | None = None):
    cfg = config.parse(text, "/etc/dtsd/dtsd.ini", env=env or {})
    return config.secrets_exposure(cfg, stat=FakeStat(modes))


@pytest.mark.parametrize("text", [
    "[redis]\nurl = redis://dtsd:s3cret@r:6379/0\n",
    "[postgres]\ndsn = postgresql://dtsd:s3cret@db/dtsd\n",
    "[postgres]\ndsn = host=db user=dtsd password='s3 cret'\n",
    "[postgres]\ndsn = postgresql://db/dtsd?password=s3cret\n",
])
def test_a_world_readable_ini_holding_a_password_is_refused(text):
    error, warning = _exposure(text, {"/etc/dtsd/dtsd.ini": 0o644})
    assert error and "/etc/dtsd/dtsd.ini holds a password" in error and "mode 0644" in error
    assert "chmod 640" in error and "s3cret" not in error and "s3 cret" not in error
    assert _exposure(text, {"/etc/dtsd/dtsd.ini": 0o640}) == (None, None)


def test_a_world_readable_ini_without_secrets_is_fine_but_not_a_world_writable_one():
    text = "[redis]\nurl = rediss://r:6380/0?ssl_ca_certs=/ca\n[postgres]\ndsn = " \
           "host=db passfile=/etc/dtsd/pgpass sslmode=verify-full\n"
    assert _exposure(text, {"/etc/dtsd/dtsd.ini": 0o644}) == (None, None)
    error, _ = _exposure(text, {"/etc/dtsd/dtsd.ini": 0o666})
    assert error and "writable by every user" in error


def test_a_password_from_the_environment_is_not_the_files():
    error, _ = _exposure("", {"/etc/dtsd/dtsd.ini": 0o644},
                         env={"DATABASE_URL": "postgresql://u:p@db/dtsd"})
    assert error is None


@pytest.mark.parametrize("key_line, path, what", [
    ("[etcd]\nuser = dtsd\npassword_file = /s/etcd", "/s/etcd", "[etcd] password_file"),
    ("[etcd]\ntls_ca = /ca\ntls_cert = /c\ntls_key = /s/ek", "/s/ek", "[etcd] tls_key"),
    ("[server]\ntls_cert = /c\ntls_key = /s/sk", "/s/sk", "[server] tls_key"),
    ("[postgres]\ndsn = host=db passfile=/s/pgpass", "/s/pgpass", "passfile of [postgres] dsn"),
    ("[postgres]\ndsn = postgresql://db/d?sslkey=/s/pk", "/s/pk", "sslkey of [postgres] dsn"),
    ("[redis]\nurl = rediss://r/0?ssl_keyfile=/s/rk", "/s/rk", "ssl_keyfile of [redis] url"),
])
def test_readable_password_files_and_keys_are_refused(key_line, path, what):
    text = key_line + "\n"
    error, _ = _exposure(text, {path: 0o644})
    assert error == (f"{what} {path} (mode 0644) is readable by every "
                     f"user: chmod 600 {path} (or 640, group dtsd)")
    assert _exposure(text, {path: 0o640}) == (None, None)
    assert _exposure(text, {}) == (None, None)        # missing: whoever reads it says so


def test_a_readable_tokens_file_is_a_warning_a_writable_one_an_error():
    text = "[server]\ntokens_file = /etc/dtsd/tokens\n"
    error, warning = _exposure(text, {"/etc/dtsd/tokens": 0o644})
    assert error is None
    assert warning and "[server] tokens_file /etc/dtsd/tokens (mode 0644)" in warning
    error, _ = _exposure(text, {"/etc/dtsd/tokens": 0o662})
    assert error and "writable by every user" in error


def test_server_exposure_is_exposure_of_the_configured_listen():
    cfg = config.parse("[server]\nlisten = 0.0.0.0:6000\n", env={})
    assert config.server_exposure(cfg) == config.exposure(
        "0.0.0.0", 6000, tokens_file="", tls_cert="", tls_key="", insecure=False)
    assert config.server_exposure(cfg)[0]
    no_servers = config.parse("[server]\nlisten = 0.0.0.0:6000\nprocesses = 0\n", env={})
    assert config.server_exposure(no_servers) == (None, None)


def test_the_documentation_lists_every_option_as_the_code_does():
    """docs/configuration.md's option table is config.reference_table(), row for row."""
    lines = (REPO_ROOT / "docs" / "configuration.md").read_text().splitlines()
    start = lines.index("| Section | Key | Default | Meaning |") + 2
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    assert lines[start:end] == config.reference_table()
    # One table: a second copy in the README would go stale unchecked.
    assert "| Section | Key | Default | Meaning |" not in (REPO_ROOT / "README.md").read_text()
