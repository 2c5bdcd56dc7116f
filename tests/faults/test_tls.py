"""FAULTS #48: TLS with a wrong CA is a clean connection error at connect; and TLS that works.

The bundled valkey-server has no TLS, so a small TLS-terminating proxy (Python's ``ssl``)
stands in front of a real server: it accepts TLS on a loopback port with a certificate of a
test CA, requires a client certificate of that CA (mutual TLS), and relays plain bytes. Its
handshake is a blocking OpenSSL one, so a refused client gets the alert a TLS-enabled Redis
would send. The CAs and certificates are made by the ``openssl`` command for each run.
"""

from __future__ import annotations

import contextlib
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import redisengines
from redisengines import ConnectionLostError, Settings
from redisengines.config import TLS
from redisengines.connection import TLSVerificationError, connect
from redisengines.server import EmbeddedServer

from ..conftest import TEST_KEY
from ..helpers import interactive, wait_until

pytestmark = pytest.mark.timeout(60)

QUICK = 2.0  # a refused certificate fails within this; the default retries take about 7 s


# --------------------------------------------------------------------------- certificates
OPENSSL_CNF = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
"""


@dataclass(frozen=True)
class PKI:
    """Paths of the PEM files: the test CA, another CA, and certificates the test CA signed."""

    ca: str
    other_ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    stranger_cert: str  # a client certificate signed by the other CA
    stranger_key: str

    def tls(self, **changes: str | None) -> dict[str, str | None]:
        """Settings fields of a client that has everything right, but ``changes``."""
        return {"tls_ca_file": self.ca, "tls_cert_file": self.client_cert,
                "tls_key_file": self.client_key, **changes}


def make_pki(d: Path) -> PKI:
    openssl = shutil.which("openssl")
    assert openssl, "these tests need the openssl command to make their certificates"
    cnf = d / "openssl.cnf"
    cnf.write_text(OPENSSL_CNF)
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30)

    for ca in ("ca", "other_ca"):
        run("req", "-x509", "-config", str(cnf), "-extensions", "ca", *new_key,
            "-keyout", str(d / f"{ca}.key"), "-out", str(d / f"{ca}.pem"), "-days", "2",
            "-subj", f"/CN=redisengines test {ca}")
    for serial, (leaf, ca, kind, name) in enumerate((
            ("server", "ca", "server", "localhost"), ("client", "ca", "client", "client"),
            ("stranger", "other_ca", "client", "stranger")), start=2):
        run("req", "-new", "-config", str(cnf), *new_key, "-keyout", str(d / f"{leaf}.key"),
            "-out", str(d / f"{leaf}.csr"), "-subj", f"/CN={name}")
        run("x509", "-req", "-in", str(d / f"{leaf}.csr"), "-CA", str(d / f"{ca}.pem"),
            "-CAkey", str(d / f"{ca}.key"), "-set_serial", str(serial), "-days", "2",
            "-extfile", str(cnf), "-extensions", kind, "-out", str(d / f"{leaf}.pem"))
    return PKI(*(str(d / name) for name in (
        "ca.pem", "other_ca.pem", "server.pem", "server.key", "client.pem", "client.key",
        "stranger.pem", "stranger.key")))


# --------------------------------------------------------------------------- the proxy
class TLSProxy:
    """Accepts TLS on a free loopback port and relays plain bytes to ``target_port``.

    One thread per connection: a blocking handshake (a refused client gets OpenSSL's alert),
    then both directions relayed with non-blocking sockets (an SSL socket must not be used
    by two threads at once). ``refused`` holds the handshake errors, ``peers`` the common
    names of the client certificates it accepted.
    """

    CHUNK = 1 << 16

    def __init__(self, target_port: int, context: ssl.SSLContext) -> None:
        self.target_port = target_port
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self.refused: list[BaseException] = []
        self.peers: list[str] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def start(self) -> TLSProxy:
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(5)
        self.listener.close()

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="test-tls-proxy", daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            self._spawn(self._serve, raw)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except OSError as exc:  # ssl.SSLError included: the handshake failed
            self.refused.append(exc)
            raw.close()
            return
        with tls:
            subject = dict(item[0] for item in (tls.getpeercert() or {}).get("subject", ()))
            self.peers.append(subject.get("commonName", ""))
            try:
                up = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                return
            with up:
                tls.setblocking(False)
                up.setblocking(False)
                self._relay(tls, up)

    def _relay(self, tls: ssl.SSLSocket, up: socket.socket) -> None:
        to_up = b""  # from the client, not yet sent to the server
        to_client = b""  # from the server, not yet sent to the client (same bytes on retry)
        while not self._stopping.is_set():
            readers = [s for s, held in ((tls, to_up), (up, to_client)) if not held]
            writers = [s for s, held in ((up, to_up), (tls, to_client)) if held]
            if tls in readers and tls.pending():  # decrypted bytes the socket no longer shows
                ready_r, ready_w = [tls], []
            else:
                ready_r, ready_w, _ = select.select(readers, writers, [], 0.1)
            try:
                if tls in ready_r:
                    to_up = tls.recv(self.CHUNK)
                    if not to_up:
                        return
                if up in ready_r:
                    to_client = up.recv(self.CHUNK)
                    if not to_client:
                        return
                if up in ready_w:
                    to_up = to_up[up.send(to_up):]
                if tls in ready_w:
                    to_client = to_client[tls.send(to_client):]
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                continue
            except OSError:  # either side closed or reset
                return


@dataclass
class TLSServer:
    pki: PKI
    proxy: TLSProxy
    tls12: TLSProxy  # the same, but TLS 1.2 at most

    @property
    def url(self) -> str:
        return self.proxy.url

    def settings(self, **changes: Any) -> Settings:
        fields = {"tls_ca_file": self.pki.ca, "tls_cert_file": self.pki.client_cert,
                  "tls_key_file": self.pki.client_key, "redis_url": self.url, **changes}
        return Settings(cluster="t" + uuid.uuid4().hex[:10], key=TEST_KEY, **fields)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    """A real server behind TLS proxies that require a client certificate of the test CA."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))

    def context(maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        context.verify_mode = ssl.CERT_REQUIRED
        context.maximum_version = maximum
        return context

    server = EmbeddedServer().start()
    proxies: list[TLSProxy] = []
    try:
        proxies.append(TLSProxy(server.port, context()).start())
        proxies.append(TLSProxy(server.port, context(ssl.TLSVersion.TLSv1_2)).start())
        yield TLSServer(pki, *proxies)
    finally:
        for proxy in proxies:
            proxy.stop()
        server.stop()


def refused_since(proxy: TLSProxy, before: int) -> int:
    """How many handshakes the proxy saw fail since ``before`` (once they stop coming)."""
    wait_until(lambda: len(proxy.refused) > before, what="the proxy to see the handshake fail")
    time.sleep(0.2)  # a retried attempt would have been accepted by now
    return len(proxy.refused) - before


@contextlib.contextmanager
def quickly(limit: float = QUICK) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    took = time.monotonic() - t0
    assert took < limit, f"took {took:.1f} s: was it retried?"


# --------------------------------------------------------------------------- FAULTS #48
def test_fault_48_wrong_ca_is_a_clean_error_at_connect(tls_server: TLSServer) -> None:
    """A CA file of another CA: connect raises at once (no retry loop: a certificate that
    failed verification fails again) a ConnectionLostError that says TLS verification
    failed and names the CA file."""
    pki = tls_server.pki
    s = tls_server.settings(tls_ca_file=pki.other_ca)
    assert s.retries == 8  # the default budget, about 7 s of backoff, is not what we wait
    before = len(tls_server.proxy.refused)
    with quickly(), pytest.raises(ConnectionLostError) as err:
        redisengines.connect(s.redis_url, cluster=s.cluster, tls_ca_file=pki.other_ca,
                             tls_cert_file=pki.client_cert, tls_key_file=pki.client_key)
    assert isinstance(err.value, TLSVerificationError)
    message = str(err.value)
    assert "TLS verification failed" in message
    assert "certificate" in message and pki.other_ca in message
    assert "REDISENGINES_TLS_CA_FILE" in message
    causes = []
    exc: BaseException | None = err.value
    while exc is not None and len(causes) < 10:
        causes.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(c, ssl.SSLCertVerificationError) for c in causes), causes
    assert refused_since(tls_server.proxy, before) == 1, "the refused handshake was retried"

    # The same through a Cluster joining that server: before any engine is started.
    before = len(tls_server.proxy.refused)
    cluster = redisengines.Cluster(2, url=tls_server.url, settings=s)
    try:
        with quickly(), pytest.raises(TLSVerificationError, match=pki.other_ca):
            cluster.start()
        assert cluster.processes == {}
    finally:
        cluster.stop()
    assert refused_since(tls_server.proxy, before) == 1


@pytest.mark.parametrize("version", ["TLS 1.3", "TLS 1.2"])
def test_fault_48_missing_client_certificate_is_a_clean_error(tls_server: TLSServer,
                                                              version: str) -> None:
    """A server that requires a client certificate and gets none refuses the handshake:
    a clean error at connect that says so, not retried. (With TLS 1.3 the client's side of
    the handshake is over by then: the refusal comes as an alert after it, racing the
    first command.)"""
    proxy = tls_server.proxy if version == "TLS 1.3" else tls_server.tls12
    s = tls_server.settings(tls_cert_file=None, tls_key_file=None, redis_url=proxy.url)
    before = len(proxy.refused)
    with quickly(), pytest.raises(TLSVerificationError) as err:
        redisengines.Client(proxy.url, cluster=s.cluster, settings=s)
    assert isinstance(err.value, ConnectionLostError)
    message = str(err.value)
    assert "TLS verification failed" in message
    assert "client's certificate" in message
    assert "REDISENGINES_TLS_CERT_FILE" in message
    assert refused_since(proxy, before) == 1


def test_fault_48_client_certificate_of_another_ca_is_refused(tls_server: TLSServer) -> None:
    pki = tls_server.pki
    s = tls_server.settings(tls_cert_file=pki.stranger_cert, tls_key_file=pki.stranger_key)
    before = len(tls_server.proxy.refused)
    with quickly(), pytest.raises(TLSVerificationError, match=pki.stranger_cert):
        redisengines.Client(tls_server.url, cluster=s.cluster, settings=s)
    assert refused_since(tls_server.proxy, before) == 1


def test_missing_or_malformed_tls_files_are_clear_errors(tls_server: TLSServer,
                                                         tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-ca.pem")
    with quickly(0.5), pytest.raises(FileNotFoundError) as err:
        redisengines.connect(tls_server.url, tls_ca_file=missing)
    assert missing in str(err.value) and "REDISENGINES_TLS_CA_FILE" in str(err.value)

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with quickly(0.5), pytest.raises(ValueError, match="cannot load the TLS files"):
        redisengines.connect(tls_server.url, tls_ca_file=str(garbage))
    pki = tls_server.pki
    with pytest.raises(ValueError, match="cannot load the TLS files"):  # key of another cert
        connect(tls_server.url, tls=TLS(pki.ca, pki.client_cert, pki.stranger_key))


def test_tls_settings_need_a_rediss_url(tls_server: TLSServer) -> None:
    """TLS files with a URL that is not rediss:// are a ValueError, never ignored."""
    pki = tls_server.pki
    with pytest.raises(ValueError, match="rediss://"):
        Settings(redis_url="redis://127.0.0.1:6379/0", tls_ca_file=pki.ca)
    with pytest.raises(ValueError, match="rediss://"):
        connect("unix:///tmp/redis.sock", tls=TLS(ca_file=pki.ca))
    with pytest.raises(ValueError, match="tls_cert_file"):
        Settings(tls_key_file=pki.client_key)
    # The embedded server has no TLS: a Cluster of its own is refused before it starts one.
    cluster = redisengines.Cluster(0, settings=Settings(tls_ca_file=pki.ca))
    with pytest.raises(ValueError, match="rediss://"):
        cluster.start()
        cluster.client()
    cluster.stop()


def test_tls_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDISENGINES_TLS_CA_FILE", "/etc/ca.pem")
    monkeypatch.setenv("REDISENGINES_TLS_CERT_FILE", "/etc/me.pem")
    monkeypatch.setenv("REDISENGINES_TLS_KEY_FILE", "/etc/me.key")
    s = Settings.from_env(redis_url="rediss://example.invalid:6380/0")
    assert s.tls == TLS("/etc/ca.pem", "/etc/me.pem", "/etc/me.key")
    assert {k: v for k, v in s.to_env().items() if "TLS" in k} == {
        "REDISENGINES_TLS_CA_FILE": "/etc/ca.pem", "REDISENGINES_TLS_CERT_FILE": "/etc/me.pem",
        "REDISENGINES_TLS_KEY_FILE": "/etc/me.key"}
    assert Settings().tls is None


# --------------------------------------------------------------------------- TLS that works
@interactive
def total(name: str) -> float:
    return float(globals()[name].sum())


@contextlib.contextmanager
def closing_bulk(client: redisengines.Client) -> Iterator[redisengines.Client]:
    """The client, and at the end the connections of its page writes (which
    ``Client.close`` leaves to the garbage collector) closed."""
    try:
        yield client
    finally:
        if client.store._bulk is not None:
            client.store._bulk.connection_pool.disconnect()


def test_cluster_through_tls(tls_server: TLSServer) -> None:
    """Engines and client all on rediss:// with mutual TLS: commands, apply and a paged
    object (page writes use a client of their own, which must be TLS too)."""
    s = tls_server.settings(page_size=1 << 20)
    peers_before, refused_before = len(tls_server.proxy.peers), len(tls_server.proxy.refused)
    with redisengines.Cluster(2, url=tls_server.url, settings=s) as cluster, \
            closing_bulk(cluster.client()) as client:
        assert client.execute("x = 1") == {0: None, 1: None}
        assert client.pull("x") == {0: 1, 1: 1}
        assert client.apply(pow, 2, 10) == {0: 1024, 1: 1024}

        big = np.arange(400_000, dtype=np.float64)  # 3.2 MB: four pages of 1 MiB
        client.push({"big": big})
        assert client.apply(total, "big") == {0: float(big.sum()), 1: float(big.sum())}
        back = client.pull("big", targets=1)
        assert isinstance(back, np.ndarray) and np.array_equal(back, big)
        blob = bytes(range(256)) * 8192  # 2 MiB of bytes, back from an engine
        client.push({"blob": blob}, targets=0)
        assert client.pull("blob", targets=0) == blob

        bulk = client.store._bulk
        assert bulk is not None, "no page went through the bulk client"
        assert bulk.connection_pool.connection_kwargs.get("ssl_ca_certs") == tls_server.pki.ca
    peers = tls_server.proxy.peers[peers_before:]
    assert peers and set(peers) == {"client"}, peers  # every connection showed our cert
    assert len(tls_server.proxy.refused) == refused_before

