#!/usr/bin/env python3
"""Every response frame parses: mutated queries over TCP against a running daemon.

    python3 fuzz/tcp_responses.py                # 2 000 mutated queries, seed 1
    python3 fuzz/tcp_responses.py -n 20000 --seed 7

A daemon on loopback ports (tests/conftest.running_daemon, the in-process upstream of
tests/fakes.py) gets valid queries for blocked, allowed and unknown names, with and without
EDNS (ECS, cookies, a MAC option), each mutated: octets flipped, the message cut short,
octets inserted, header counts set to 0/1/2/255/65535, flags and opcode scrambled. Every
response frame must be read by dnspython. A query that gets no answer must be one the daemon
drops on purpose (docs/behaviour.md, "errors"): with QR set (a response is never answered), or
shorter than a header (over TCP the connection is then closed, RFC 7766 §8). Prints the
counts; exits 1 when a frame does not parse, is not the answer to the query just sent (its ID),
or a query goes unanswered for any other reason.
tests/test_wire.py keeps the cases an earlier run found.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import random
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dns.edns
import dns.message

from tests.conftest import running_daemon
from tests.fakes import FakeUpstream
from tiktokguard import logs

NAMES = ("www.tiktok.com", "a.test", "example.org", "x.y.z.test", "mask.icloud.com",
         "nodata.test")
TYPES = ("A", "AAAA", "TXT", "ANY", "HTTPS")
# Seconds to wait for one answer (the test config's upstream timeout is 0.3 s), and for the
# silence of a query that is dropped on purpose (the connection is then opened anew, so a late
# answer could not be taken for the next query's).
WAIT, SILENCE = 1.5, 0.3


def seeds() -> list[bytes]:
    out = []
    for name in NAMES:
        for rdtype in TYPES:
            for edns in (False, True):
                query = dns.message.make_query(name, rdtype, use_edns=0 if edns else False,
                                               want_dnssec=edns and rdtype == "A")
                query.id = len(out)  # (not random: a seed gives the same run every time)
                if edns and rdtype == "TXT":
                    query.use_edns(0, options=[
                        dns.edns.GenericOption(65001, b"\x02\x00\x5e\x00\x00\x01"),
                        dns.edns.GenericOption(10, b"12345678")])
                out.append(query.to_wire())
    return out


def mutate(rng: random.Random, wire: bytes) -> bytes:
    out = bytearray(wire)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.5 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op < 0.65:
            out = out[:rng.randrange(max(1, len(out)))]
        elif op < 0.8:
            at = rng.randrange(len(out) + 1)
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op < 0.9 and len(out) >= 12:
            struct.pack_into("!H", out, rng.choice([4, 6, 8, 10]),
                             rng.choice([0, 1, 2, 255, 65535]))
        elif len(out) > 3:
            out[2], out[3] = rng.randrange(256), rng.randrange(256)
    return bytes(out)


def expected_silence(query: bytes) -> str | None:
    """Why the daemon rightly sends nothing for this query, or None."""
    if len(query) < 12:
        return "shorter than a header: connection closed"
    if query[2] & 0x80:
        return "QR set: dropped"
    return None


async def run(count: int, seed: int) -> int:
    rng = random.Random(seed)
    upstream = await FakeUpstream().start()
    kinds: collections.Counter[str] = collections.Counter()
    unparseable: list[tuple[bytes, bytes, str]] = []  # (query, response, error)
    unanswered: list[tuple[bytes, str]] = []  # (query, why the wait ended)
    mismatched: list[tuple[bytes, bytes, str]] = []
    frames = 0
    try:
        with tempfile.TemporaryDirectory(prefix="tiktokguard-tcpfuzz-") as folder:
            async with running_daemon(Path(folder), [upstream.address]) as tg:
                corpus = seeds()
                reader = writer = None
                for _ in range(count):
                    query = mutate(rng, rng.choice(corpus))
                    if writer is None:
                        reader, writer = await asyncio.open_connection("127.0.0.1", tg.port)
                    assert reader is not None
                    writer.write(struct.pack("!H", len(query)) + query)
                    try:
                        async with asyncio.timeout(SILENCE if expected_silence(query)
                                                   else WAIT):
                            (length,) = struct.unpack("!H", await reader.readexactly(2))
                            response = await reader.readexactly(length)
                    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError) as exc:
                        why = expected_silence(query)
                        kinds[f"no answer ({why})" if why else
                              f"no answer, unexpected: {type(exc).__name__}"] += 1
                        if why is None:
                            unanswered.append((query, type(exc).__name__))
                        writer.close()
                        writer = None
                        continue
                    frames += 1
                    if response[:2] != query[:2] or expected_silence(query):
                        kinds["answered, but not this query (ID) or not to be answered"] += 1
                        mismatched.append((query, response, "answer to another query"))
                    try:
                        dns.message.from_wire(response)
                    except Exception as exc:  # (every kind is counted)
                        kinds[f"unparseable: {type(exc).__name__}"] += 1
                        unparseable.append((query, response, repr(exc)))
                if writer is not None:
                    writer.close()
    finally:
        upstream.close()
    print(f"queries {count}, response frames {frames}, unparseable {len(unparseable)}, "
          f"unexpectedly unanswered {len(unanswered)}, mismatched {len(mismatched)}")
    for kind, n in kinds.most_common():
        print(f"  {n:6d} {kind}")
    for query, response, error in (unparseable + mismatched)[:10]:
        print(f"Q {query.hex()}\nR {response.hex()}\nE {error}")
    for query, error in unanswered[:10]:
        print(f"Q {query.hex()}\nno answer: {error}")
    return 1 if unparseable or unanswered or mismatched else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    # Quiet: the daemon's incidents, and the stand-in upstream's complaints about the mutated
    # names the daemon forwards (it cannot read some, so the daemon answers SERVFAIL).
    logs.configure(json=True, level=logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    return asyncio.run(run(args.count, args.seed))


if __name__ == "__main__":
    sys.exit(main())
