"""DNS over TLS and over HTTPS, and Discovery of Designated Resolvers, against a certificate
authority made at test time (openssl)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.edns
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.conftest import MANAGED, UNMANAGED, Running, running_daemon
from tests.daemons import within
from tests.fakes import FakeUpstream, free_port
from tiktokguard.config import ConfigError, load_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@dataclass
class Pki:
    ca: Path
    certificate: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, and a certificate it signed for dns.test and 127.0.0.1."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=tiktokguard test CA", cwd=folder)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=dns.test", cwd=folder)
    (folder / "ext.cnf").write_text("subjectAltName=DNS:dns.test,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
             cwd=folder)
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key")


@dataclass
class Encrypted:
    tg: Running
    dot: int
    doh: int


@pytest.fixture
async def encrypted(tmp_path: Path, upstream: FakeUpstream, pki: Pki
                    ) -> AsyncIterator[Encrypted]:
    dot, doh = free_port(), free_port()
    extra = (f'[dns]\ntls_listen = ["127.0.0.1:{dot}"]\nhttps_listen = ["127.0.0.1:{doh}"]\n'
             f'tls_certificate = "{pki.certificate}"\ntls_private_key = "{pki.key}"\n'
             'tls_name = "dns.test"\ntcp_idle_timeout_ms = 500\n'
             'tls_handshake_timeout_ms = 500\n')
    async with running_daemon(tmp_path, [upstream.address], extra=extra) as tg:
        yield Encrypted(tg, dot, doh)


def blocked(reply: dns.message.Message) -> bool:
    return any(isinstance(o, dns.edns.EDEOption) and o.code == dns.edns.EDECode.BLOCKED
               for o in reply.options)


async def test_dot_answers_as_udp_does(encrypted: Encrypted, pki: Pki) -> None:
    for name, source in (("www.a.test", MANAGED), ("www.tiktok.com", MANAGED),
                         ("www.tiktok.com", UNMANAGED)):
        query = dns.message.make_query(name, "A", use_edns=0)
        over_tls = await dns.asyncquery.tls(query, "127.0.0.1", port=encrypted.dot,
                                            source=source, ssl_context=pki.client_context(),
                                            server_hostname="dns.test", timeout=5)
        over_udp = await encrypted.tg.ask(name, source=source)
        assert over_tls.rcode() == over_udp.rcode()
        assert [str(r) for r in over_tls.answer] == [str(r) for r in over_udp.answer]
        assert blocked(over_tls) == blocked(over_udp) == (name == "www.tiktok.com"
                                                           and source == MANAGED)
    assert encrypted.tg.metrics.sample("tiktokguard_dns_queries_total", transport="dot",
                                       decision="blocked") == 1


async def doh_get(port: int, pki: Pki, wire: str, **headers: str) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as http:
        response = await http.get(f"https://127.0.0.1:{port}/dns-query", params={"dns": wire},
                                  ssl=pki.client_context(), headers=headers)
        await response.read()
        return response


async def test_doh_get_and_post(encrypted: Encrypted, pki: Pki) -> None:
    query = dns.message.make_query("www.tiktok.com", "A", use_edns=0)
    query.id = 0  # RFC 8484 §4.1: cache-friendly
    wire = base64.urlsafe_b64encode(query.to_wire()).rstrip(b"=").decode()
    async with aiohttp.ClientSession() as http:
        url = f"https://127.0.0.1:{encrypted.doh}/dns-query"
        async with http.get(url, params={"dns": wire}, ssl=pki.client_context()) as response:
            assert response.status == 200
            assert response.content_type == "application/dns-message"
            reply = dns.message.from_wire(await response.read())
        assert reply.rcode() == dns.rcode.NXDOMAIN and blocked(reply)  # 127.0.0.1: managed
        async with http.post(url, data=query.to_wire(), ssl=pki.client_context(),
                             headers={"Content-Type": "application/dns-message"}) as response:
            assert response.status == 200
            assert blocked(dns.message.from_wire(await response.read()))
        async with http.get(url, params={"dns": "!!!not base64"},
                            ssl=pki.client_context()) as response:
            assert response.status == 400
        async with http.post(url, data=b"x", ssl=pki.client_context(),
                             headers={"Content-Type": "text/plain"}) as response:
            assert response.status == 415
    assert encrypted.tg.metrics.sample("tiktokguard_dns_queries_total", transport="doh",
                                       decision="blocked") == 2


async def test_ddr_names_our_own_encrypted_endpoints(encrypted: Encrypted) -> None:
    for source in (MANAGED, UNMANAGED):
        reply = await encrypted.tg.ask("_dns.resolver.arpa", "SVCB", source=source)
        assert reply.rcode() == dns.rcode.NOERROR
        records = sorted(str(r) for rrset in reply.answer for r in rrset)
        assert any("alpn=\"dot\"" in r and f"port=\"{encrypted.dot}\"" in r
                   and "dns.test." in r for r in records), records
        assert any("key7" in r or "dohpath" in r for r in records), records
    nodata = await encrypted.tg.ask("_dns.resolver.arpa", "A")
    assert nodata.rcode() == dns.rcode.NOERROR and nodata.answer == []


async def test_a_client_that_never_finishes_the_handshake_is_dropped(
        encrypted: Encrypted, pki: Pki) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", encrypted.dot)
    try:
        query = dns.message.make_query("www.a.test", "A")
        started = asyncio.get_running_loop().time()
        reply = await dns.asyncquery.tls(query, "127.0.0.1", port=encrypted.dot,
                                         ssl_context=pki.client_context(),
                                         server_hostname="dns.test", timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR  # others are served meanwhile
        assert asyncio.get_running_loop().time() - started < 0.5
        async with asyncio.timeout(5):  # dropped after the handshake timeout (0.5 s here)
            assert await reader.read() == b""
        assert encrypted.tg.metrics.sample("tiktokguard_stream_connections_closed_total",
                                           transport="dot", reason="handshake_timeout") == 1
    finally:
        writer.close()


async def test_dot_over_its_share_is_closed_before_any_tls(encrypted: Encrypted,
                                                           pki: Pki) -> None:
    """The governor decides on the plain socket: the 65th connection of one address is closed
    without a TLS object being made, while the 64 before it wait for their handshake."""
    held = [await asyncio.open_connection("127.0.0.1", encrypted.dot, local_addr=("127.0.0.9", 0))
            for _ in range(65)]
    try:
        async with asyncio.timeout(5):
            assert await held[-1][0].read() == b""
        assert encrypted.tg.metrics.sample("tiktokguard_stream_connections_refused_total",
                                           transport="dot", reason="per_client") == 1
        assert len(encrypted.tg.daemon.server.governor) == 64
        reply = await dns.asyncquery.tls(dns.message.make_query("www.a.test", "A"), "127.0.0.1",
                                         port=encrypted.dot, source=MANAGED,
                                         ssl_context=pki.client_context(),
                                         server_hostname="dns.test", timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR  # another address is served meanwhile
    finally:
        for _reader, writer in held:
            writer.close()


def test_a_bad_certificate_is_a_config_error_naming_the_key(tmp_path: Path,
                                                             pki: Pki) -> None:
    path = tmp_path / "tg.toml"
    path.write_text(f'[dns]\nupstreams = ["192.0.2.1"]\ntls_listen = ["127.0.0.1:8853"]\n'
                    f'tls_certificate = "{pki.ca}"\ntls_private_key = "{pki.key}"\n'
                    'tls_name = "dns.test"\n')
    with pytest.raises(ConfigError, match=r"\[dns\] tls_certificate: .*not a usable"):
        load_config(path)
    path.write_text(f'[dns]\nupstreams = ["192.0.2.1"]\ntls_listen = ["127.0.0.1:8853"]\n'
                    f'tls_certificate = "{tmp_path / "none.pem"}"\n'
                    f'tls_private_key = "{pki.key}"\ntls_name = "dns.test"\n')
    with pytest.raises(ConfigError, match=r"none\.pem"):
        load_config(path)


async def test_kdig_over_tls(encrypted: Encrypted, pki: Pki) -> None:
    if shutil.which("kdig") is None:
        pytest.skip("needs kdig (apt-get install knot-dnsutils)")
    done = await asyncio.to_thread(
        subprocess.run, ["kdig", "@127.0.0.1", "-p", str(encrypted.dot), "+tls",
                         f"+tls-ca={pki.ca}", "+tls-hostname=dns.test", "www.tiktok.com"],
        capture_output=True, text=True, timeout=20)
    assert "NXDOMAIN" in done.stdout and "EDE: 15" in done.stdout, done.stdout + done.stderr


# -- DoT upstreams ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tls_upstream(pki: Pki) -> AsyncIterator[tuple[int, list[int]]]:
    """A DoT upstream on loopback answering as tests/fakes.py does; yields its port and the
    number of queries each connection carried (pipelining reuses one)."""
    fake = FakeUpstream()
    connections: list[int] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.certificate, pki.key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(0)
        index = len(connections) - 1
        try:
            while True:
                length = int.from_bytes(await reader.readexactly(2), "big")
                query = await reader.readexactly(length)
                connections[index] += 1
                for answer in fake.answer(query, tcp=True):
                    writer.write(len(answer).to_bytes(2, "big") + answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1], connections
    finally:
        server.close()


async def test_a_dot_upstream_answers_over_one_reused_connection(
        tmp_path: Path, pki: Pki) -> None:
    async with tls_upstream(pki) as (port, connections):
        extra = f'[dns]\nupstream_tls_ca = "{pki.ca}"\n'
        async with running_daemon(tmp_path, [f"tls://127.0.0.1:{port}#dns.test"],
                                  extra=extra) as tg:
            replies = await asyncio.gather(*(tg.ask(f"n{i}.a.test", source=UNMANAGED)
                                             for i in range(10)))
            assert all(r.answer[0][0].address == "192.0.2.1" for r in replies)
            assert (await tg.ask("www.tiktok.com")).rcode() == dns.rcode.NXDOMAIN  # policy
        assert sum(connections) == 10 and len(connections) == 1  # pipelined, reused


async def test_a_dot_upstream_with_the_wrong_name_is_refused_and_counted(
        tmp_path: Path, pki: Pki) -> None:
    async with tls_upstream(pki) as (port, connections):
        upstream = f"tls://127.0.0.1:{port}#not-the-name.test"
        extra = f'[dns]\nupstream_tls_ca = "{pki.ca}"\nupstream_timeout_ms = 500\n'
        async with running_daemon(tmp_path, [upstream], extra=extra) as tg:
            reply = await tg.ask("www.a.test", source=UNMANAGED)
            assert reply.rcode() == dns.rcode.SERVFAIL
            assert tg.metrics.sample("tiktokguard_upstream_errors_total", upstream=upstream,
                                     kind="tls") == 1
        assert sum(connections) == 0  # not one query went to it


async def test_a_renewed_certificate_is_used_after_a_reload_without_dropping_connections(
        tmp_path: Path, upstream: FakeUpstream, pki: Pki) -> None:
    cert, key = tmp_path / "dns.pem", tmp_path / "dns.key"
    shutil.copy(pki.certificate, cert)
    shutil.copy(pki.key, key)
    dot = free_port()
    extra = (f'[dns]\ntls_listen = ["127.0.0.1:{dot}"]\ntls_certificate = "{cert}"\n'
             f'tls_private_key = "{key}"\ntls_name = "dns.test"\n')
    async with running_daemon(tmp_path, [upstream.address], extra=extra) as tg:
        async def serial() -> int:
            _reader, writer = await within(5, asyncio.open_connection(
                "127.0.0.1", dot, ssl=pki.client_context(), server_hostname="dns.test"),
                "a DoT handshake")
            peer = writer.get_extra_info("ssl_object").getpeercert()
            writer.close()
            return int(peer["serialNumber"], 16)

        first = await serial()
        reader, writer = await within(5, asyncio.open_connection(  # one that stays open
            "127.0.0.1", dot, ssl=pki.client_context(), server_hostname="dns.test"),
            "a DoT handshake")
        # The CA signs a new certificate for the same key; the files are replaced, SIGHUP.
        _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", "ext.cnf",
                 cwd=pki.ca.parent)
        assert await tg.daemon.reload("SIGHUP")
        assert await serial() != first  # new handshakes: the renewed certificate
        query = dns.message.make_query("www.a.test", "A").to_wire()
        writer.write(len(query).to_bytes(2, "big") + query)  # the old connection still works
        async def answer() -> dns.message.Message:
            length = int.from_bytes(await reader.readexactly(2), "big")
            return dns.message.from_wire(await reader.readexactly(length))
        assert (await within(5, answer(), "an answer on the old connection")).rcode() == 0
        writer.close()


async def test_a_doh_request_that_cannot_be_read_is_counted_not_logged(
        encrypted: Encrypted, pki: Pki, capfd: pytest.CaptureFixture[str]) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", encrypted.doh, ssl=pki.client_context(), server_hostname="dns.test")
    writer.write(b"GET /dns-query?dns=AAA HTTP/1.1\r\nHost: dns.test\r\nX-Probe: \x00\r\n\r\n")
    async with asyncio.timeout(5):
        reply = await reader.read(100)
    writer.close()
    assert reply.split(b" ")[1] == b"400", reply
    assert encrypted.tg.metrics.sample("tiktokguard_http_malformed_requests_total",
                                       listener="doh") == 1
    output = capfd.readouterr()
    assert "Traceback" not in output.out + output.err
