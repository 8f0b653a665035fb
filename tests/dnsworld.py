"""A loopback DNS world for differential tests: NSD serving test zones, a validating unbound
on top of it. Everything is made at test time in a temporary folder and bound to 127.0.0.1 on
free ports; nothing leaves the machine (unbound's only servers are NSD's stub zones, and "."
is stubbed to NSD too, so no name is ever looked up on the Internet).

Zones:
  signed.test.  signed (ECDSA P-256, NSEC), its DS given to unbound as a trust anchor: answers
                are validated (AD). CNAME chains, a DNAME, a wildcard, a 5 KB TXT set, an MX
                with a large additional section, odd labels.
  bogus.test.   signed, trust anchor given, then one record altered after signing: validation
                fails (SERVFAIL + EDE 6 "DNSSEC Bogus" for CD=0; the data itself for CD=1).
  plain.test.   unsigned: answered without AD.

Debian packages: nsd, unbound, bind9-utils (dnssec-keygen, dnssec-signzone).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests import reaper
from tests.fakes import free_port

TOOLS = ("nsd", "unbound", "dnssec-keygen", "dnssec-signzone")


def missing_tools() -> list[str]:
    found = []
    for tool in TOOLS:
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            found.append(tool)
    return found


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


_BIG_TXT = "\n".join(f'big TXT "chunk {i:02d} {"x" * 240}"' for i in range(20))
_MAIL = "\n".join(f"mail{i} A 192.0.2.{100 + i}\nmail{i} AAAA 2001:db8::{100 + i:x}"
                  for i in range(12))
_MX = "\n".join(f"mx MX {10 * (i + 1)} mail{i}" for i in range(12))

SIGNED = f"""$TTL 3600
@ SOA ns.signed.test. hostmaster.signed.test. 1 3600 600 86400 300
@ NS ns
ns A 192.0.2.53
www A 192.0.2.10
www AAAA 2001:db8::10
c1 CNAME c2
c2 CNAME c3
c3 CNAME www
out CNAME www.plain.test.
d DNAME t
x.t A 192.0.2.11
y.t TXT "below the DNAME target"
*.wild A 192.0.2.12
*.wild TXT "wildcard"
{_BIG_TXT}
{_MX}
{_MAIL}
odd\\.dot A 192.0.2.13
sp\\032ace A 192.0.2.14
\\000null A 192.0.2.15
{"l" * 63} A 192.0.2.16
MiXeD A 192.0.2.17
srv SRV 0 5 443 www
"""

BOGUS = """$TTL 3600
@ SOA ns.bogus.test. hostmaster.bogus.test. 1 3600 600 86400 300
@ NS ns
ns A 192.0.2.53
www A 192.0.2.20
txt TXT "altered after signing"
"""

PLAIN = f"""$TTL 3600
@ SOA ns.plain.test. hostmaster.plain.test. 1 3600 600 86400 300
@ NS ns
ns A 192.0.2.53
www A 192.0.2.30
c CNAME www.signed.test.
{_BIG_TXT}
"""


@dataclass
class World:
    folder: Path
    nsd_port: int
    unbound_port: int
    processes: list[subprocess.Popen[bytes]]

    @property
    def unbound(self) -> str:
        return f"127.0.0.1:{self.unbound_port}"


def _sign(folder: Path, zone: str, text: str) -> Path:
    source = folder / f"{zone}.zone"
    source.write_text(text)
    for flags in (["-f", "KSK"], []):
        subprocess.run([_tool("dnssec-keygen"), "-q", "-K", str(folder), "-a", "ECDSAP256SHA256",
                        *flags, "-n", "ZONE", zone], check=True, capture_output=True, timeout=60)
    signed = folder / f"{zone}.signed"
    subprocess.run([_tool("dnssec-signzone"), "-q", "-S", "-K", str(folder), "-d", str(folder),
                    "-O", "full", "-o", zone, "-f", str(signed), str(source)],
                   check=True, capture_output=True, timeout=60)
    return signed


def _wait_for(port: int, name: bytes, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll with a plain query until the server answers (bounded)."""
    query = (b"\x12\x34\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x06\x00\x01")
    deadline = time.monotonic() + 15
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text() if log.exists() else ''}")
            sock.sendto(query, ("127.0.0.1", port))
            try:
                if sock.recv(4096)[:2] == b"\x12\x34":
                    return
            except TimeoutError:
                continue
    raise RuntimeError(f"server on port {port} did not answer: "
                       f"{log.read_text() if log.exists() else ''}")


@contextlib.contextmanager
def dns_world(folder: Path) -> Iterator[World]:
    folder.mkdir(parents=True, exist_ok=True)
    signed = _sign(folder, "signed.test", SIGNED)
    bogus = _sign(folder, "bogus.test", BOGUS)
    # Alter a signed record: its RRSIG no longer verifies (RFC 4035 §5.3: bogus).
    text = bogus.read_text()
    assert "192.0.2.20" in text
    bogus.write_text(text.replace("192.0.2.20", "192.0.2.99"))
    (folder / "plain.test.zone").write_text(PLAIN)
    nsd_port, unbound_port = free_port(), free_port()
    zones = [("signed.test", signed.name), ("bogus.test", bogus.name),
             ("plain.test", "plain.test.zone")]
    zone_conf = "".join(f"zone:\n    name: {name}\n    zonefile: {file}\n"
                        for name, file in zones)
    (folder / "nsd.conf").write_text(f"""server:
    ip-address: 127.0.0.1@{nsd_port}
    port: {nsd_port}
    username: ""
    chroot: ""
    zonesdir: "{folder}"
    zonelistfile: "{folder}/zone.list"
    database: ""
    pidfile: "{folder}/nsd.pid"
    xfrdfile: "{folder}/xfrd.state"
    xfrdir: "{folder}"
    logfile: "{folder}/nsd.log"
    server-count: 1
    hide-version: yes
    verbosity: 1
remote-control:
    control-enable: no
{zone_conf}""")
    stubs = "".join(f'stub-zone:\n    name: "{name}"\n    stub-addr: 127.0.0.1@{nsd_port}\n'
                    for name in (".", "signed.test", "bogus.test", "plain.test"))
    (folder / "unbound.conf").write_text(f"""server:
    interface: 127.0.0.1@{unbound_port}
    port: {unbound_port}
    do-ip6: no
    username: ""
    chroot: ""
    directory: "{folder}"
    pidfile: "{folder}/unbound.pid"
    use-syslog: no
    logfile: "{folder}/unbound.log"
    verbosity: 1
    num-threads: 1
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    module-config: "validator iterator"
    trust-anchor-file: "{folder}/dsset-signed.test."
    trust-anchor-file: "{folder}/dsset-bogus.test."
    local-zone: "test." nodefault
    ede: yes
    qname-minimisation: no
    rrset-roundrobin: no
    minimal-responses: no
    prefetch: no
    hide-version: yes
    hide-identity: yes
    target-fetch-policy: "0 0 0 0 0"
remote-control:
    control-enable: no
{stubs}""")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        nsd = reaper.popen([_tool("nsd"), "-d", "-c", str(folder / "nsd.conf")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(nsd)
        _wait_for(nsd_port, b"\x06signed\x04test\x00", nsd, folder / "nsd.log")
        unbound = reaper.popen([_tool("unbound"), "-d", "-c", str(folder / "unbound.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(unbound)
        _wait_for(unbound_port, b"\x06signed\x04test\x00", unbound, folder / "unbound.log")
        yield World(folder, nsd_port, unbound_port, processes)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
