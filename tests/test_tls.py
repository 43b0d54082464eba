"""TLS for the native session's main and multifd channels (certificates made here with the
openssl CLI), mutual authentication, and the TLS path of sockio."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from netkit import IN_CI, PS, FlipProxy, Served, assert_no_engine_threads

from multifd_core.engine import sockio
from multifd_core.engine.ram import RamBlock
from multifd_core.errors import MultiFDError, TransportError
from multifd_core.image import fill_mixed
from multifd_core.session import send_session
from multifd_core.session.transport import client_context, server_context

CLI = [sys.executable, "-m", "multifd_core.cli"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}-key.pem", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign", cwd=d)


def _make_leaf(d: Path, name: str, ca: str, san: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
             f"{ca}-key.pem", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        why = "the openssl CLI is needed to make test certificates: apt-get install openssl"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "otherca")
    _make_leaf(d, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    _make_leaf(d, "client", "ca", "DNS:client")
    _make_leaf(d, "rogue", "otherca", "DNS:localhost,IP:127.0.0.1")
    return d


def _server(pki: Path, verify_peer: bool = False, name: str = "server") -> ssl.SSLContext:
    return server_context(str(pki / f"{name}.pem"), str(pki / f"{name}-key.pem"),
                          str(pki / "ca.pem"), verify_peer=verify_peer)


def _client(pki: Path, cert: bool = False, ca: str = "ca") -> ssl.SSLContext:
    return client_context(str(pki / f"{ca}.pem"), str(pki / "client.pem") if cert else None,
                          str(pki / "client-key.pem") if cert else None)


def _block(mib: int = 8) -> RamBlock:
    buf = np.zeros(mib << 20, dtype=np.uint8)
    fill_mixed(buf.reshape(-1, PS), seed=4)
    return RamBlock("pc.ram", buf)


# --------------------------------------------------------------------------- sockio over TLS


def _tls_pair(pki: Path) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    out: dict[str, ssl.SSLSocket] = {}

    def serve() -> None:
        s, _ = lst.accept()
        out["server"] = _server(pki).wrap_socket(s, server_side=True)

    t = threading.Thread(target=serve)
    t.start()
    client = _client(pki).wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                      server_hostname="localhost")
    t.join(10)
    lst.close()
    return client, out["server"]


def test_sockio_tls_path(pki: Path) -> None:
    a, b = _tls_pair(pki)
    with a, b:
        sockio.set_timeout(a, 5)
        sockio.set_timeout(b, 0.3)
        payload = [b"head", memoryview(bytes(range(256)) * 64), bytearray(b"tail" * 1000)]
        total = sum(len(p) for p in payload)
        assert sockio.sendmsg_all(a, payload, total) == total
        head = bytearray(4)
        sockio.recv_into_all(b, head)
        parts = [bytearray(10000), bytearray(16384 + 4000 - 10000)]
        sockio.recvmsg_into_all(b, parts, sum(len(p) for p in parts))
        assert bytes(head) == b"head" and bytes(parts[0] + parts[1]) == b"".join(
            bytes(p) for p in payload[1:])
        t = time.monotonic()
        with pytest.raises(TimeoutError):
            sockio.recv_into_all(b, bytearray(1))
        assert time.monotonic() - t < 2
        a.sendall(b"xy")
        a.close()
        with pytest.raises(sockio.PeerClosed) as err:
            sockio.recv_into_all(b, bytearray(5), "a test item")
        assert "after 2 of 5 bytes of a test item" in str(err.value)


# --------------------------------------------------------------------------- sessions


@pytest.mark.parametrize("mutual", [False, True])
def test_session_over_tls(pki: Path, mutual: bool) -> None:
    src = _block()
    served = Served({"tls": _server(pki, verify_peer=mutual)})
    stats = send_session([src], served.addr, method="none", channels=3, timeout=10,
                         tls=_client(pki, cert=mutual), tls_hostname="localhost")
    assert served.wait() is None
    assert (served.session.blocks[0].array == src.array).all()
    assert stats.normal_pages + stats.zero_pages == src.n_pages
    assert_no_engine_threads()


def test_tls_hides_the_pages_from_the_wire(pki: Path) -> None:
    marker = b"multifd-secret-page-marker-" * 100
    buf = bytearray(64 * PS)
    for i in range(0, 64, 3):
        buf[i * PS:i * PS + len(marker)] = marker
    src = RamBlock("ram", buf)
    served = Served({"tls": _server(pki)})
    upstream = served.addr
    proxy = FlipProxy(upstream, flip_at=None)
    try:
        send_session([src], proxy.addr, method="none", channels=2, timeout=10,
                     tls=_client(pki), tls_hostname="localhost")
    finally:
        proxy.close()
    assert served.wait() is None
    assert len(proxy.captured) > 20 * PS  # 22 marked pages went through, encrypted
    assert marker[:27] not in proxy.captured
    assert b"MFDS" not in proxy.captured and b'"uuid"' not in proxy.captured


def test_client_without_certificate_is_refused_when_peer_verification_is_on(
        pki: Path) -> None:
    served = Served({"tls": _server(pki, verify_peer=True), "timeout": 1.5})
    t = time.monotonic()
    with pytest.raises(TransportError):
        send_session([_block(1)], served.addr, method="none", timeout=2,
                     tls=_client(pki, cert=False), tls_hostname="localhost")
    err = served.wait()
    assert time.monotonic() - t < 6
    assert isinstance(err, TransportError) and "no sender connected" in str(err)
    assert any("TLS handshake failed" in r or "certificate" in r
               for r in served.session.rejected), served.session.rejected


@pytest.mark.parametrize("case", ["rogue_server", "wrong_hostname"])
def test_client_refuses_an_unverified_server(pki: Path, case: str) -> None:
    name = "rogue" if case == "rogue_server" else "server"
    served = Served({"tls": _server(pki, name=name), "timeout": 1.5})
    hostname = "localhost" if case == "rogue_server" else "not-the-receiver"
    with pytest.raises(TransportError, match="TLS handshake with .* failed: .*(certificate|"
                                             "hostname)"):
        send_session([_block(1)], served.addr, method="none", timeout=2,
                     tls=_client(pki), tls_hostname=hostname)
    assert isinstance(served.wait(), TransportError)


def test_plain_client_to_tls_receiver_fails_fast(pki: Path) -> None:
    served = Served({"tls": _server(pki), "timeout": 1.5, "handshake_timeout": 0.5})
    t = time.monotonic()
    with pytest.raises(TransportError):
        send_session([_block(1)], served.addr, method="none", timeout=2)
    assert time.monotonic() - t < 5
    assert isinstance(served.wait(), TransportError)


def test_bad_credentials_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MultiFDError, match="cannot load TLS credentials"):
        server_context(str(tmp_path / "missing.pem"))
    with pytest.raises(MultiFDError, match="--tls-verify-peer needs --tls-ca"):
        server_context(str(tmp_path / "missing.pem"), verify_peer=True)


def test_cli_over_mutual_tls(pki: Path, tmp_path: Path) -> None:
    image = tmp_path / "ram.img"
    image.write_bytes(bytes(_block(2).array))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"tcp:127.0.0.1:{port}"
    out = tmp_path / "out"
    recv = subprocess.Popen([*CLI, "recv", "--listen", addr, "--out", str(out), "--timeout",
                             "10", "--tls-cert", str(pki / "server.pem"), "--tls-key",
                             str(pki / "server-key.pem"), "--tls-ca", str(pki / "ca.pem"),
                             "--tls-verify-peer", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    send = subprocess.run([*CLI, "send", f"ram={image}", addr, "--tls-ca", str(pki / "ca.pem"),
                           "--tls-cert", str(pki / "client.pem"), "--tls-key",
                           str(pki / "client-key.pem"), "--json"],
                          capture_output=True, text=True, timeout=60)
    r_out, r_err = recv.communicate(timeout=30)
    assert send.returncode == 0, send.stderr
    assert recv.returncode == 0, r_err
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / manifest["blocks"][0]["file"]).read_bytes() == image.read_bytes()


def test_cli_recv_tls_flags_need_a_certificate(tmp_path: Path) -> None:
    proc = subprocess.run([*CLI, "recv", "--listen", "tcp:127.0.0.1:0", "--out",
                           str(tmp_path / "o"), "--tls-verify-peer"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "needs --tls-cert" in proc.stderr
