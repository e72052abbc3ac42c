"""The start checks (dtsd/checks.py) as `dtsd --check-config` runs them: files taken as the
daemon's user would read them, the Redis URL as redis-py would take it, and the stores
that jobs on this host could reach. Then dtsd itself on Redis behind a unix socket."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys

import pytest

from dtsd import checks, config as configmod
from tests.helpers import REPO_ROOT, TEST_JOB_USER, RedisServer, clean_env


def run_dtsd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dtsd", *args], cwd=REPO_ROOT,
                          env=clean_env({"PYTHONPATH": str(REPO_ROOT)}), capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def throwaway_user():
    """A system user made for the test (and its group), removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd")
    name = f"dtsdt{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                    "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


def test_check_config_reads_the_files_as_the_daemons_user(tmp_path, throwaway_user):
    name, gid = throwaway_user.pw_name, throwaway_user.pw_gid
    key, cert, tokens = tmp_path / "server.key", tmp_path / "server.pem", tmp_path / "tokens"
    # A real pair: the checks also load it (tls_pair_loads), once every reader can read it.
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    tokens.write_text("x\n")
    cert.chmod(0o644)
    key.chmod(0o600)         # root's alone: what an admin who forgets the group leaves
    tokens.chmod(0o640)
    os.chown(tokens, 0, gid)
    ini = tmp_path / "dtsd.ini"
    ini.write_text(f"[server]\ntls_cert = {cert}\ntls_key = {key}\ntokens_file = {tokens}\n"
                   f"[worker]\njob_user = {TEST_JOB_USER}\n"
                   "[redis]\nurl = unix:///run/redis/redis-server.sock?db=0\n")
    ini.chmod(0o644)

    refused = run_dtsd("--check-config", "--user", name, "-c", str(ini))
    assert refused.returncode == 1, refused
    assert f"dtsd: error: [server] tls_key {key} cannot be read by {name}: Permission denied" \
        in refused.stderr
    assert "tls_cert" not in refused.stderr and "tokens_file" not in refused.stderr

    # As root and without a dtsd user, the check takes root's view without capabilities
    # (what dtsd's children have): root's own 0600 file is fine.
    as_root = run_dtsd("--check-config", "-c", str(ini))
    assert as_root.returncode == 0, as_root
    assert "files checked as root (without capabilities" in as_root.stdout

    key.chmod(0o640)
    os.chown(key, 0, gid)
    fine = run_dtsd("--check-config", "--user", name, "-c", str(ini))
    assert fine.returncode == 0, fine
    assert f"configuration is valid (files checked as {name})" in fine.stdout

    # The way to a file counts, not only its own mode.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    key.rename(private / "server.key")
    ini.write_text(ini.read_text().replace(str(key), str(private / "server.key")))
    hidden = run_dtsd("--check-config", "--user", name, "-c", str(ini))
    assert hidden.returncode == 1
    assert f"[server] tls_key {private / 'server.key'} cannot be read by {name}: " \
           "Permission denied" in hidden.stderr
    # And the configuration file itself.
    ini.chmod(0o600)
    unreadable = run_dtsd("--check-config", "--user", name, "-c", str(ini))
    assert f"the configuration file {ini} cannot be read by {name}" in unreadable.stderr

    assert "no such user" in run_dtsd("--check-config", "--user", "no-such-user-dtsd",
                                      "-c", str(ini)).stderr


def test_check_config_refuses_a_tls_pair_that_does_not_load(tmp_path):
    """A reload runs the same check: a renewed certificate with the wrong key, or a key
    that asks for a passphrase, is refused before the servers are replaced."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True,
                       timeout=60)

    for name in ("a", "b"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=localhost", "-keyout", f"{name}.key", "-out", f"{name}.pem")
    openssl("genpkey", "-algorithm", "RSA", "-aes256", "-pass", "pass:secret",
            "-out", "locked.key")
    openssl("req", "-x509", "-key", "locked.key", "-passin", "pass:secret", "-days", "2",
            "-subj", "/CN=localhost", "-out", "locked.pem")

    def check(cert: str, key: str) -> subprocess.CompletedProcess[str]:
        ini = tmp_path / "dtsd.ini"
        ini.write_text(f"[server]\ntls_cert = {tmp_path / cert}\ntls_key = {tmp_path / key}\n"
                       f"[worker]\njob_user = {TEST_JOB_USER}\n")
        ini.chmod(0o644)
        return run_dtsd("--check-config", "-c", str(ini))

    assert check("a.pem", "a.key").returncode == 0
    mismatched = check("a.pem", "b.key")
    assert mismatched.returncode == 1, mismatched
    assert (f"dtsd: error: [server] tls_cert {tmp_path / 'a.pem'} with tls_key "
            f"{tmp_path / 'b.key'} do not load: [X509: KEY_VALUES_MISMATCH] key values "
            "mismatch (a key of another certificate") in mismatched.stderr, mismatched.stderr
    locked = check("locked.pem", "locked.key")
    assert locked.returncode == 1, locked
    assert f"tls_key {tmp_path / 'locked.key'} do not load: " in locked.stderr, locked.stderr


def test_check_config_builds_the_redis_client_without_connecting(tmp_path):
    ini = tmp_path / "dtsd.ini"

    def check(url: str) -> subprocess.CompletedProcess[str]:
        ini.write_text(f"[redis]\nurl = {url}\n[worker]\njob_user = {TEST_JOB_USER}\n")
        return run_dtsd("--check-config", "-c", str(ini))

    fine = check("unix:///run/redis/redis-server.sock?db=0")    # nothing listens there
    assert fine.returncode == 0, fine
    for url, problem in (
            ("unix:///run/redis/redis-server.sock?ssl_ca_certs=/ca",
             "takes no setting 'ssl_ca_certs' for a unix:// URL"),
            ("http://127.0.0.1:6379/0", "Redis URL must specify one of the following schemes"),
            ("redis://127.0.0.1:6379/zero", "the database 'zero' is not a number"),
            ("unix://", "a unix:// URL needs the socket's path")):
        result = check(url)
        assert result.returncode == 1, (url, result)
        assert "dtsd: error: [redis] url: " in result.stderr and problem in result.stderr, \
            (url, result.stderr)


def test_check_config_warns_when_jobs_could_reach_redis_or_etcd(tmp_path):
    ini = tmp_path / "dtsd.ini"
    sock_path = tmp_path / "redis.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))

    def warnings(text: str) -> str:
        ini.write_text(text + f"\n[worker]\njob_user = {TEST_JOB_USER}\n")
        ini.chmod(0o640)         # one of them holds a password
        result = run_dtsd("--check-config", "-c", str(ini))
        assert result.returncode == 0, result
        return result.stderr

    try:
        sock_path.chmod(0o777)
        stderr = warnings(f"[redis]\nurl = unix://{sock_path}?db=0")
        assert f"dtsd: warning: [redis] url: jobs (user {TEST_JOB_USER}) may open {sock_path} " \
               "(mode 0777)" in stderr
        sock_path.chmod(0o770)      # root's group: not the job user's
        assert "[redis]" not in warnings(f"[redis]\nurl = unix://{sock_path}?db=0")
    finally:
        listener.close()
    assert "[redis] url 127.0.0.1:6379 takes no password: jobs on this host can connect" \
        in warnings("[redis]\nurl = redis://127.0.0.1:6379/0")
    assert "[redis]" not in warnings("[redis]\nurl = redis://dtsd:pw@127.0.0.1:6379/0")
    stderr = warnings("[etcd]\nendpoints = 127.0.0.1:2379")
    assert "dtsd: warning: [etcd] endpoints: neither [etcd] user nor a client certificate is " \
           "set, so jobs on this host can reach etcd on this host (127.0.0.1:2379)" in stderr


def test_the_master_runs_the_library_checks_in_a_subprocess(tmp_path):
    """preflight() at START or RELOAD leaves redis unimported in the calling process."""
    ini = tmp_path / "dtsd.ini"
    ini.write_text("[redis]\nurl = unix:///x?no_such_setting=1\n")
    probe = ("import sys; from dtsd import checks, config; "
             f"cfg = config.load({str(ini)!r}); "
             "r = checks.preflight(cfg, checks.Occasion.RELOAD, running=cfg); "
             "print('redis' in sys.modules, [p for p in r.errors if 'redis' in p])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                            text=True, env=clean_env({"PYTHONPATH": str(REPO_ROOT)}), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('False ["[redis] url: redis-py '), result.stdout


def test_a_new_check_is_one_decorated_function():
    @checks.check(occasions=[checks.Occasion.CHECK_CONFIG])
    def no_debug(checked):
        if checked.cfg.get("dtsd", "log_level") == "DEBUG":
            yield checks.warning("debug logging")
    try:
        cfg = configmod.parse("[dtsd]\nlog_level = debug\n[worker]\nprocesses = 0\n", env={})
        report = checks.preflight(cfg, checks.Occasion.CHECK_CONFIG)
        assert [p for p in report.problems if p.check == "no_debug"] == [
            checks.Problem(checks.Severity.WARNING, "debug logging", "no_debug")]
        assert not any(p.check == "no_debug"
                       for p in checks.preflight(cfg, checks.Occasion.START).problems)
    finally:
        checks.CHECKS[:] = [c for c in checks.CHECKS if c.name != "no_debug"]


# --- dtsd on Redis behind a unix socket ---------------------------------------------------------

@pytest.fixture
def unix_redis():
    server = RedisServer(unix_socket=True)
    try:
        yield server.start()
    finally:
        server.cleanup()


def test_dtsd_runs_on_a_unix_socket_redis_that_jobs_cannot_open(dtsd_factory, unix_redis):
    """Finding: on Debian 12's redis-py 4.3 every child retried a unix:// URL forever
    ("unexpected keyword argument 'socket_connect_timeout'")."""
    master = dtsd_factory({"server": {"processes": 1}, "worker": {"processes": 1}},
                          redis={"url": unix_redis.url})
    done = master.dtsctl("submit", "--wait", "--", "echo", "over the socket")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "over the socket" in done.stdout
    # A job (as the unprivileged job user) tries to open the daemon's Redis socket.
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n"
             "    print('refused:', e.strerror); sys.exit(3)\n"
             "print('connected')\n")
    tried = master.dtsctl("submit", "--wait", "--max-retries", "0", "--", "python3", "-c",
                          probe, str(unix_redis.socket))
    assert tried.returncode == 3, (tried.stdout, tried.stderr)
    assert "refused: Permission denied" in tried.stdout, tried.stdout
