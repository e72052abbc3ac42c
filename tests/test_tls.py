"""TLS and mTLS against a real dtsd, with a throwaway CA made by openssl."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from tests.helpers import DtsdMaster

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

FAST = {"server": {"processes": 1}, "worker": {"processes": 1}}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def issue(directory: Path, name: str, subject: str, extensions: str) -> None:
    """A key and a certificate for `name`, signed by the CA in `directory`."""
    (directory / f"{name}.ext").write_text(extensions)
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-subj", subject, "-out", f"{name}.csr", cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
            "-out", f"{name}.pem", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-days", "2",
            "-subj", "/CN=dtsd test CA", "-out", "ca.pem", cwd=directory)
    issue(directory, "server", "/CN=localhost",
          "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    issue(directory, "client", "/CN=dtsctl",
          "extendedKeyUsage=clientAuth\n")
    return directory


def credentials(pki: Path, client_cert: bool) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(pki / "client.pem").read_bytes() if client_cert else None)


def start_tls(dtsd_factory, pki: Path, mtls: bool) -> DtsdMaster:
    server = {"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key")}
    if mtls:
        server["tls_client_ca"] = str(pki / "ca.pem")
    master = dtsd_factory(FAST, server=server, start=False)
    # The health probe that tells "serving" must speak TLS too.
    master.wait_serving = functools.partial(DtsdMaster.wait_serving, master,
                                            credentials=credentials(pki, client_cert=mtls))
    return master.start()


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def test_tls_server_refuses_plaintext_and_serves_tls_clients(dtsd_factory, pki):
    master = start_tls(dtsd_factory, pki, mtls=False)
    assert "(TLS, no tokens)" in master.log()
    plain = master.dtsctl("--timeout", "3", "list")
    assert plain.returncode == 3, (plain.returncode, plain.stderr)
    # It said only "Socket closed".
    assert f"{master.address} speaks TLS, and dtsctl spoke plaintext: give --tls-ca" \
        in plain.stderr, plain.stderr
    assert "client certificate" not in plain.stderr

    wrong_ca = master.dtsctl("--timeout", "3", "list", tls=["--tls-ca", str(pki / "client.pem")])
    assert wrong_ca.returncode == 3, (wrong_ca.returncode, wrong_ca.stderr)
    assert f"its certificate is not signed by the CA in {pki / 'client.pem'}" in wrong_ca.stderr
    for result in (plain, wrong_ca):      # gRPC's C core keeps its own lines to itself
        assert_no_grpc_core_lines(result.stderr)

    tls = ["--tls-ca", str(pki / "ca.pem")]
    job_id = ok(master.dtsctl("submit", "--wait", "--", "echo", "over tls", tls=tls)).strip()
    assert "over tls" in job_id or job_id
    named = ["--tls-ca", str(pki / "ca.pem"), "--tls-server-name", "localhost"]
    assert json.loads(ok(master.dtsctl("-o", "json", "list", tls=named)))["jobs"]


def test_mtls_needs_a_client_certificate(dtsd_factory, pki):
    master = start_tls(dtsd_factory, pki, mtls=True)
    assert "(mTLS, no tokens)" in master.log()
    no_cert = master.dtsctl("--timeout", "3", "list", tls=["--tls-ca", str(pki / "ca.pem")])
    assert no_cert.returncode == 3, (no_cert.returncode, no_cert.stderr)
    assert f"{master.address} requires a client certificate (mTLS): give --tls-cert" \
        in no_cert.stderr, no_cert.stderr
    plain = master.dtsctl("--timeout", "3", "list")
    assert "speaks TLS" in plain.stderr and "requires a client certificate" in plain.stderr
    assert_no_grpc_core_lines(no_cert.stderr + plain.stderr)
    assert_no_grpc_core_lines(master.log())       # the journal, under systemd
    with_cert = ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"),
                 "--tls-key", str(pki / "client.key")]
    ok(master.dtsctl("list", tls=with_cert))


def test_tls_spoken_to_a_plaintext_server_is_named(dtsd_factory, pki):
    master = dtsd_factory(FAST)
    result = master.dtsctl("--timeout", "3", "list", tls=["--tls-ca", str(pki / "ca.pem")])
    assert result.returncode == 3
    assert f"{master.address} does not speak TLS (it answered in plaintext): drop --tls-ca" \
        in result.stderr, result.stderr
    assert_no_grpc_core_lines(result.stderr)


def assert_no_grpc_core_lines(text: str) -> None:
    """gRPC's C core writes `E1202 12:00:00.000 ... ssl_transport_security.cc:1501] ...`."""
    assert "ssl_transport_security" not in text, text
    assert not re.search(r"^[EWI]\d{4} \d\d:\d\d:\d\d", text, re.M), text


def test_client_tls_settings_from_the_config_file(dtsd_factory, pki, tmp_path):
    master = start_tls(dtsd_factory, pki, mtls=True)
    ini = tmp_path / "client.ini"
    ini.write_text(f"[client]\nservers = {master.address}\ntls_ca = {pki / 'ca.pem'}\n"
                   f"tls_cert = {pki / 'client.pem'}\ntls_key = {pki / 'client.key'}\n")
    from tests.helpers import run_dtsctl
    ok(run_dtsctl("-c", str(ini), "list"))
    half = run_dtsctl("--servers", master.address, "--tls-cert", str(pki / "client.pem"), "list")
    assert half.returncode == 2 and "need --tls-ca" in half.stderr


def served_certificate(port: int) -> bytes:
    """The DER certificate a TLS listener on 127.0.0.1:`port` presents (not verified)."""
    import socket
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as conn:
            return conn.getpeercert(binary_form=True)


def der(pem: Path) -> bytes:
    import ssl
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def test_a_reload_picks_up_a_certificate_renewed_in_place(dtsd_factory, pki, tmp_path):
    """As nginx, Consul and Nomad do on HUP: the same file names, new contents. The servers
    and the web child are replaced, the worker and its running job are not."""
    from tests.helpers import free_port, wait_for
    from tests.test_master import children, counts_are
    from tests.test_reload import reload_command
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(pki / name, live / name)
    web_port = free_port()
    master = dtsd_factory(FAST, server={"tls_cert": str(live / "server.pem"),
                                        "tls_key": str(live / "server.key"),
                                        "startsecs": "0"},
                          web={"processes": 1, "listen": f"127.0.0.1:{web_port}"}, start=False)
    master.wait_serving = functools.partial(DtsdMaster.wait_serving, master,
                                            credentials=credentials(pki, client_cert=False))
    master.web_answers = lambda: bool(served_certificate(web_port))
    master.start()
    wait_for(lambda: counts_are(master, server=1, worker=1, web=1, coordinator=1))
    old = der(pki / "server.pem")
    assert served_certificate(master.port) == old == served_certificate(web_port)
    tls = ["--tls-ca", str(pki / "ca.pem")]
    job = ok(master.dtsctl("submit", "--", "sleep 4; echo kept", tls=tls)).strip()
    wait_for(lambda: "RUNNING" in ok(master.dtsctl("status", job, tls=tls)),
             message="the job to run")
    worker = children(master, "worker")[0]["pid"]

    # Renewed in place: a new key and certificate under the same names.
    for name in ("ca.pem", "ca.key"):
        shutil.copy(pki / name, live / name)
    issue(live, "server", "/CN=localhost renewed",
          "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    new = der(live / "server.pem")
    assert new != old
    result = reload_command(master)
    assert result.returncode == 0, result
    assert served_certificate(master.port) == new
    assert served_certificate(web_port) == new
    assert "restarting server, web ([server] tls_cert, [server] tls_key changed on disk)" \
        in master.log()
    assert [c["pid"] for c in children(master, "worker")] == [worker]
    done = wait_for(lambda: (out := ok(master.dtsctl("-o", "json", "status", job, tls=tls)))
                    and json.loads(out)["jobs"][0]["status"] == "SUCCEEDED" and out,
                    message="the running job to succeed")
    record = json.loads(done)["jobs"][0]
    assert (record["attempts"], record["output"]) == (1, "kept\n")

    # A key that is not the certificate's: refused, and the renewed pair keeps serving.
    shutil.copy(pki / "client.key", live / "server.key")
    servers = [c["pid"] for c in children(master, "server")]
    result = reload_command(master)
    assert result.returncode == 1, result
    assert result.stderr.startswith(
        f"dtsd reload: refused: [server] tls_cert {live / 'server.pem'} with tls_key "
        f"{live / 'server.key'} do not load: "), result.stderr
    assert [c["pid"] for c in children(master, "server")] == servers
    assert served_certificate(master.port) == new
    ok(master.dtsctl("list", tls=tls))
