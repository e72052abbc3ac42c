"""dtsd against backing stores that want credentials and TLS, and the checks on who may
read the secrets: a real PostgreSQL with scram-sha-256 over TLS only, a real Redis with an
ACL user over TLS only, a real etcd with client certificates and authentication, all with
certificates from a throwaway CA made by openssl."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from dtsd import auth, config as configmod, queue as queuemod
from tests.etcd_helpers import Contender, EtcdServer
from tests.helpers import (REPO_ROOT, TEST_JOB_USER, DtsdMaster, PostgresServer, RedisServer,
                           clean_env, free_port, tail, wait_for, write_ini)
from tests.test_tls import issue, openssl

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

PG_PASSWORD = "pg-Secret-4711"
REDIS_PASSWORD = "redis secret/42"          # a space and a slash: percent-encoded in the URL
ETCD_PASSWORD = "etcd-Secret-0815"
FAST = {"server": {"processes": 1, "startsecs": "0"}, "worker": {"processes": 1}}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-days", "2",
            "-subj", "/CN=dtsd backing test CA", "-out", "ca.pem", cwd=directory)
    # clientAuth too: etcd's JSON gateway dials etcd's own gRPC port with this certificate.
    issue(directory, "server", "/CN=localhost",
          "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
          "extendedKeyUsage=serverAuth,clientAuth\n")
    # Not the name of any etcd user: etcd would take a certificate's CN as the user.
    issue(directory, "client", "/CN=dtsd-node", "extendedKeyUsage=clientAuth\n")
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return directory


def tls_files(pki: Path) -> dict[str, str]:
    return {"ca": str(pki / "ca.pem"), "cert": str(pki / "server.pem"),
            "key": str(pki / "server.key"), "client_cert": str(pki / "client.pem"),
            "client_key": str(pki / "client.key")}


def secret_file(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


# --- the servers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secure_pg(pki):
    """scram-sha-256 over TLS for user dtsd; plain TCP refused. postgres keeps trust (helpers)."""
    server = PostgresServer(
        settings={"ssl": "on", "password_encryption": "scram-sha-256"},
        hba=["local all all trust", "host all postgres 127.0.0.1/32 trust",
             "hostssl all dtsd 127.0.0.1/32 scram-sha-256"])
    for name in ("server.pem", "server.key"):
        shutil.copy(pki / name, server.dir / name)
        server.own(server.dir / name)
    server.settings.update(ssl_cert_file=str(server.dir / "server.pem"),
                           ssl_key_file=str(server.dir / "server.key"))
    try:
        server.start()
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE dtsd LOGIN PASSWORD '{PG_PASSWORD}'")
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def secure_db(secure_pg):
    name = f"t_{secrets.token_hex(6)}"
    secure_pg.create_database(name)
    with psycopg.connect(secure_pg.admin_dsn, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} OWNER TO dtsd")
    try:
        yield name
    finally:
        secure_pg.drop_database(name)


def pg_dsn(server: PostgresServer, db: str, passfile: str, pki: Path) -> str:
    return (f"host=127.0.0.1 port={server.port} dbname={db} user=dtsd passfile={passfile} "
            f"sslmode=verify-full sslrootcert={pki / 'ca.pem'}")


def passfile(directory: Path, server: PostgresServer, db: str, password: str) -> str:
    return secret_file(directory, "pgpass", f"127.0.0.1:{server.port}:{db}:dtsd:{password}")


@pytest.fixture(scope="module")
def secure_redis(pki):
    server = RedisServer(tls=tls_files(pki), auth=("dtsd", REDIS_PASSWORD))
    try:
        yield server.start()
    finally:
        server.cleanup()


def redis_url(server: RedisServer, pki: Path, password: str = REDIS_PASSWORD,
              client_cert: bool = True) -> str:
    url = (f"rediss://dtsd:{password.replace(' ', '%20').replace('/', '%2F')}"
           f"@127.0.0.1:{server.port}/0?ssl_ca_certs={pki / 'ca.pem'}&ssl_cert_reqs=required")
    if client_cert:
        url += f"&ssl_certfile={pki / 'client.pem'}&ssl_keyfile={pki / 'client.key'}"
    return url


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def secure_etcd(pki):
    """etcd over TLS with client certificates; user dtsd may read and write /dtsd/ only."""
    # Tokens unused for 2 s expire (etcd's default is 5 minutes), for the re-login test.
    server = EtcdServer(tls=tls_files(pki), extra_args=["--auth-token-ttl", "2"])
    try:
        server.start()
        server.api("auth/role/add", {"name": "dtsd"})
        server.api("auth/role/grant", {"name": "dtsd", "perm": {
            "permType": "READWRITE", "key": b64("/dtsd/"), "range_end": b64("/dtsd0")}})
        for user, role, password in (("dtsd", "dtsd", ETCD_PASSWORD),
                                     ("root", "root", secrets.token_hex(8))):
            server.api("auth/user/add", {"name": user, "password": password})
            server.api("auth/user/grant", {"user": user, "role": role})
        server.api("auth/enable", {})
        yield server
    except BaseException:
        print(server.logs(40))
        raise
    finally:
        server.cleanup()


def etcd_settings(server: EtcdServer, pki: Path, password_file: str) -> dict[str, str]:
    return {"endpoints": f"https://{server.endpoint}", "lease_ttl": "3s", "user": "dtsd",
            "password_file": password_file, "tls_ca": str(pki / "ca.pem"),
            "tls_cert": str(pki / "client.pem"), "tls_key": str(pki / "client.key")}


# --- dtsd masters -----------------------------------------------------------------------------

@pytest.fixture
def masters(request):
    """`masters(sections)` -> a DtsdMaster (not started) in a private directory; all are
    stopped afterwards, their logs shown when the test failed."""
    root = Path(tempfile.mkdtemp(prefix="dtsd-bs-"))
    made: list[DtsdMaster] = []

    def make(sections: dict) -> DtsdMaster:
        workdir = root / f"m{len(made) + 1}"
        (workdir / "run").mkdir(parents=True)
        base = {"dtsd": {"node_id": f"secure-{len(made) + 1}",
                         "runtime_dir": str(workdir / "run")},
                "server": {"listen": f"127.0.0.1:{free_port()}"}}
        for section, values in sections.items():
            base.setdefault(section, {}).update(values)
        master = DtsdMaster(workdir, base["dtsd"]["node_id"], base)
        # Created private, so that write_ini keeps the mode: the file will hold passwords.
        master.ini_path.touch(mode=0o640)
        made.append(master)
        return master

    yield make
    failed = any(getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
                 for when in ("setup", "call"))
    for master in made:
        master.stop()
        if failed:
            print(f"\n----- {master.node_id} log -----\n{tail(master.log_path, 80)}")
    if not failed:
        shutil.rmtree(root, ignore_errors=True)


def status_nodes(master: DtsdMaster, token: str | None = None) -> list[dict]:
    result = master.dtsctl("-o", "json", "status", token=token, timeout=20)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["nodes"]


def run_dtsd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dtsd", *args], cwd=REPO_ROOT,
                          env=clean_env({"PYTHONPATH": str(REPO_ROOT)}), capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


# --- tests ------------------------------------------------------------------------------------

def test_dtsd_runs_on_stores_that_want_passwords_and_tls(masters, pki, secure_pg, secure_db,
                                                         secure_redis, secure_etcd, tmp_path):
    """PostgreSQL through a passfile and verify-full, Redis as an ACL user over rediss://
    with a client certificate, etcd as a user over TLS with a client certificate: a job
    runs, the node leads, and the group/world-readable tokens file is warned about."""
    tokens = str(tmp_path / "tokens")
    token = auth.add_token(tokens, "admin", "admin", lock_dir=str(tmp_path))
    os.chmod(tokens, 0o644)
    master = masters({
        **FAST,
        "server": {**FAST["server"], "tokens_file": tokens},
        "postgres": {"dsn": pg_dsn(secure_pg, secure_db,
                                   passfile(tmp_path, secure_pg, secure_db, PG_PASSWORD), pki)},
        "redis": {"url": redis_url(secure_redis, pki)},
        "etcd": etcd_settings(secure_etcd, pki,
                              secret_file(tmp_path, "etcd-password", ETCD_PASSWORD))})
    master.start(timeout=60)

    done = master.dtsctl("submit", "--wait", "--", "echo", "behind passwords", token=token)
    assert done.returncode == 0, (done.stdout, done.stderr)
    wait_for(lambda: any(n["node_id"] == "secure-1" and n["leader"]
                         for n in status_nodes(master, token)),
             timeout=30, message="secure-1 leading through the authenticated etcd")
    log = master.log()
    assert "SECRETS EXPOSED: [server] tokens_file" in log and "mode 0644" in log
    for password in (PG_PASSWORD, ETCD_PASSWORD, REDIS_PASSWORD):
        assert password not in log
    with pytest.raises(psycopg.OperationalError, match="no encryption|pg_hba.conf"):
        psycopg.connect(f"host=127.0.0.1 port={secure_pg.port} dbname={secure_db} user=dtsd "
                        f"password={PG_PASSWORD} sslmode=disable", connect_timeout=5)


def test_a_wrong_postgres_password_stops_the_master_and_says_why(masters, pki, secure_pg,
                                                                 secure_db, secure_redis,
                                                                 tmp_path):
    master = masters({
        **FAST,
        "postgres": {"dsn": pg_dsn(secure_pg, secure_db,
                                   passfile(tmp_path, secure_pg, secure_db, "wrong-Pass-99"),
                                   pki)},
        "redis": {"url": redis_url(secure_redis, pki)}})
    with pytest.raises(AssertionError, match="exited with"):
        master.start(timeout=60)
    assert master.proc.wait(timeout=30) != 0
    log = master.log()
    assert 'password authentication failed for user "dtsd"' in log, log
    assert "schema migration failed" in log
    assert "wrong-Pass-99" not in log


def test_a_wrong_etcd_password_keeps_the_node_from_leading_and_says_why(
        masters, pki, secure_pg, secure_db, secure_redis, secure_etcd, tmp_path):
    password_file = secret_file(tmp_path, "etcd-password", "not-the-password")
    master = masters({
        **FAST,
        "postgres": {"dsn": pg_dsn(secure_pg, secure_db,
                                   passfile(tmp_path, secure_pg, secure_db, PG_PASSWORD), pki)},
        "redis": {"url": redis_url(secure_redis, pki)},
        "etcd": etcd_settings(secure_etcd, pki, password_file)})
    master.start(timeout=60)
    wait_for(lambda: "refused user 'dtsd'" in master.log(), timeout=20,
             message="the coordinator's log line about the refused etcd password")
    line = next(l for l in master.log().splitlines() if "refused user 'dtsd'" in l)
    assert "authentication failed" in line and password_file in line, line
    assert "not-the-password" not in master.log()
    nodes = status_nodes(master)
    assert nodes and not any(n["leader"] for n in nodes), nodes


def test_election_logs_in_again_when_etcd_forgets_its_token(pki, secure_etcd, tmp_path):
    """etcd forgets a token unused for --auth-token-ttl (or when it restarts): calls with
    it are UNAUTHENTICATED, and the election must log in again rather than fail forever.
    A node frozen (SIGSTOP) past the token's life shows it."""
    security = {"user": "dtsd", "tls_ca": str(pki / "ca.pem"),
                "password_file": secret_file(tmp_path, "etcd-password", ETCD_PASSWORD),
                "tls_cert": str(pki / "client.pem"), "tls_key": str(pki / "client.key")}
    contender = Contender("c1", [f"https://{secure_etcd.endpoint}"], ttl=3, workdir=tmp_path,
                          security=security)
    try:
        contender.start()
        first = contender.wait_line(lambda l: l["leader"], timeout=20, what="leadership")
        contender.signal(signal.SIGSTOP)
        time.sleep(4)       # the frozen time itself is the condition: token ttl is 2 s
        contender.signal(signal.SIGCONT)
        again = contender.wait_line(lambda l: l["leader"] and l["token"] != first["token"],
                                    timeout=30, after=first["t"], what="leadership again")
        assert again["token"] > first["token"]
        assert "UNAUTHENTICATED: etcdserver: invalid auth token" in tail(contender.logfile, 400)
    finally:
        contender.stop()
        contender.cleanup()


def test_redis_acl_user_over_tls(pki, secure_redis):
    """The URL forms docs/security.md documents, on this redis-py: user, password, CA, client
    certificate; each missing or wrong piece is refused by the server."""
    client = queuemod.connect(redis_url(secure_redis, pki))
    assert client.ping() and client.acl_whoami() == "dtsd"
    refused = [redis_url(secure_redis, pki, password="wrong"),
               redis_url(secure_redis, pki, client_cert=False),
               f"redis://dtsd:x@127.0.0.1:{secure_redis.port}/0"]
    for url in refused:
        with pytest.raises(Exception):
            queuemod.connect(url).ping()


def test_check_config_refuses_a_world_readable_ini_holding_a_password(tmp_path):
    ini = tmp_path / "dtsd.ini"
    ini.write_text("[redis]\nurl = redis://dtsd:hunter2@127.0.0.1:6379/0\n"
                   f"[worker]\njob_user = {TEST_JOB_USER}\n")
    ini.chmod(0o644)
    result = run_dtsd("--check-config", "-c", str(ini))
    assert result.returncode == 1, result
    assert f"{ini} holds a password ([redis] url) and is readable by every user (mode " \
           f"0644): chmod 640" in result.stderr
    assert "hunter2" not in result.stderr
    # The master refuses the same way, before it starts anything.
    started = run_dtsd("-c", str(ini))
    assert started.returncode == 78 and "holds a password" in started.stderr, started

    ini.chmod(0o640)
    fine = run_dtsd("--check-config", "-c", str(ini))
    assert fine.returncode == 0 and "configuration is valid" in fine.stdout, fine


def test_check_config_warns_about_a_readable_tokens_file_and_refuses_a_readable_key(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    tokens.chmod(0o644)
    ini = tmp_path / "dtsd.ini"
    ini.write_text(f"[server]\ntokens_file = {tokens}\n[worker]\njob_user = {TEST_JOB_USER}\n")
    warned = run_dtsd("--check-config", "-c", str(ini))
    assert warned.returncode == 0, warned
    assert f"[server] tokens_file {tokens} (mode 0644) is readable by every user" in warned.stderr

    password = tmp_path / "etcd-password"
    password.write_text("x\n")
    password.chmod(0o604)
    ini.write_text(f"[etcd]\nendpoints = 127.0.0.1:2379\nuser = dtsd\n"
                   f"password_file = {password}\n")
    refused = run_dtsd("--check-config", "-c", str(ini))
    assert refused.returncode == 1
    assert f"[etcd] password_file {password} (mode 0604) is readable by every user" \
        in refused.stderr


def test_check_config_runs_the_listen_address_check(tmp_path):
    port = free_port()
    ini = tmp_path / "dtsd.ini"
    write_ini(ini, {"server": {"listen": f"0.0.0.0:{port}"}})
    result = run_dtsd("--check-config", "-c", str(ini))
    assert result.returncode == 1
    error, _ = configmod.exposure("0.0.0.0", port, tokens_file="", tls_cert="", tls_key="",
                                  insecure=False)
    assert error and error in result.stderr, result.stderr

    write_ini(ini, {"server": {"listen": f"0.0.0.0:{port}", "insecure": "true"}})
    insecure = run_dtsd("--check-config", "-c", str(ini))
    assert insecure.returncode == 0 and "INSECURE" in insecure.stderr, insecure
