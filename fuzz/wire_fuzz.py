#!/usr/bin/env python3
"""Fuzz target: the query reader, the reader of upstream answers, TCP framing and the whole
synchronous query pipeline, on arbitrary bytes.

    python3 fuzz/wire_fuzz.py -max_total_time=60          # atheris (coverage-guided)
    python3 fuzz/wire_fuzz.py -runs=1000000 corpus/       # a longer run, keeping a corpus

`check(data)` is the property: only the documented exceptions (DropPacket, QueryError,
ValueError) ever leave the readers, TCP framing hands over exactly the frames that are complete,
and the pipeline never reaches its catch-all (which would answer SERVFAIL and hide the bug).
tests/test_fuzz.py runs the same `check` under hypothesis, and this script for a bounded time.
"""

from __future__ import annotations

import contextlib
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.5", 5353) if name == "peername" else None


class _Pipeline:
    """Records the frames TCP framing hands over; answers each at once."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        from tiktokguard.dns.runtime import TcpLimits
        from tiktokguard.metrics import QueryStats

        self.frames: list[bytes] = []
        self.runtime = SimpleNamespace(tcp=TcpLimits(10.0, 10))
        self.stats = QueryStats()

    def handle(self, data: bytes, client_ip: str, transport: str) -> bytes:
        self.frames.append(data)
        return b"\x00" * 12


_PIPELINE: Any = None


def _pipeline() -> Any:
    """A real Pipeline (embedded default config, bundled lists) whose catch-all raises."""
    global _PIPELINE
    if _PIPELINE is None:
        from tiktokguard.config import Overrides, load_config
        from tiktokguard.core import DnsCore
        from tiktokguard.dns.cache import CacheEntry, cache_key
        from tiktokguard.dns.wire import parse_query
        from tiktokguard.metrics import Metrics
        from tiktokguard.policy.clients import DeviceIndex

        core = DnsCore(load_config(None, Overrides(upstreams=("127.0.0.1:9",))), Metrics(),
                       DeviceIndex(), None, None, time.time)
        pipeline = core.pipeline

        def fail(query: Any, data: bytes, transport: str, started: float,
                 exc: Exception) -> None:
            raise exc

        pipeline._failed = fail  # type: ignore[method-assign]
        # One cached answer, so that cache hits are exercised too.
        question = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x04test\x00"
                    b"\x00\x01\x00\x01")
        answer = (b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x01a\x04test\x00\x00\x01"
                  b"\x00\x01\xc0\x0c\x00\x01\x00\x01\x00\x00\x0e\x10\x00\x04\xc0\x00\x02\x01")
        now = time.time()
        pipeline.cache.put(cache_key(parse_query(question)),
                           CacheEntry(answer, (len(answer) - 10,), now, now + 3600, 25))
        _PIPELINE = pipeline
    return _PIPELINE


def check_query(data: bytes) -> None:
    from tiktokguard.dns.wire import DropPacket, QueryError, error_response, parse_query

    try:
        query = parse_query(data)
    except DropPacket:
        return
    except QueryError as err:
        assert error_response(err)[:2] == data[:2]
        return
    assert query.qname == query.qname.lower() and query.qname.endswith(b"\x00")
    assert data[12:12 + len(query.question)] == query.question
    # The whole synchronous path: a coroutine (cache miss) is closed unawaited.
    result = _pipeline().handle(data, "127.0.0.5", "udp")
    if result is not None and not isinstance(result, bytes):
        result.close()
    elif isinstance(result, bytes):
        assert result[:2] == data[:2] and result[2] & 0x80


def check_answer(data: bytes) -> None:
    from tiktokguard.dns.cache import CacheEntry
    from tiktokguard.dns.wire import (
        additional_that_fits,
        answer_addresses,
        chain_names,
        index_response,
        parse_query,
        question_addresses,
        strip_opt,
    )

    try:
        index = index_response(data)
    except ValueError:
        return
    for reader in (chain_names, answer_addresses):
        with contextlib.suppress(ValueError):
            reader(data, index)
    if not index.other_names:
        question_addresses(data, index)
    wire, stripped = strip_opt(data, index)
    with contextlib.suppress(ValueError):
        additional_that_fits(wire, stripped.additional_at, stripped.arcount, 512)
    query = parse_query(b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01"
                        b"\x00\x01")
    if stripped.question_end <= len(wire):
        entry = CacheEntry(wire, stripped.ttl_offsets, 0.0, 60.0, stripped.question_end,
                           additional_at=stripped.additional_at, ede=stripped.ede)
        out = entry.answer(query, 1.0, udp=True)
        assert len(out) <= 512


def check_tcp(data: bytes) -> None:
    from tiktokguard.dns.server import ServerState, TcpProtocol

    pipeline = _Pipeline()
    state = ServerState(pipeline)  # type: ignore[arg-type]
    protocol = TcpProtocol(state)
    transport = _Transport()
    protocol.transport = transport  # type: ignore[assignment]
    protocol.client_ip = "127.0.0.5"
    # Chunk the stream at the positions the first byte picks, as a network might.
    step = (data[0] % 7 + 1) if data else 1
    for at in range(0, len(data), step):
        protocol.data_received(data[at:at + step])
        if transport.closed:
            return
    expected, pos = [], 0
    while pos + 2 <= len(data):
        length = struct.unpack_from("!H", data, pos)[0]
        if pos + 2 + length > len(data):
            break
        expected.append(data[pos + 2:pos + 2 + length])
        pos += 2 + length
    assert pipeline.frames == expected
    assert bytes(protocol.buffer) == data[pos:]


def check(data: bytes) -> None:
    if not data:
        return
    kind, body = data[0] % 3, data[1:]
    (check_query, check_answer, check_tcp)[kind](body)


def main() -> None:
    import atheris

    with atheris.instrument_imports():
        import tiktokguard.dns.cache
        import tiktokguard.dns.pipeline
        import tiktokguard.dns.server
        import tiktokguard.dns.wire  # noqa: F401
    _pipeline()
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
