#!/usr/bin/env python3
"""The Python cost of one query on the hot path, without sockets: Pipeline.handle() for a blocked
name and for a cache hit, in µs per query (the best of BATCHES batches: the least disturbed by
whatever else the machine is doing), and the top of a cProfile of both.

    python3 bench/hotpath.py [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dns.message
import dns.rrset

from tiktokguard.config import Overrides, load_config
from tiktokguard.daemon import Daemon
from tiktokguard.dns.cache import CacheEntry, cache_key
from tiktokguard.dns.wire import index_response, parse_query, strip_opt

N = 200_000
BATCHES = 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    daemon = Daemon(load_config(None, Overrides(upstreams=("127.0.0.1:9",))))
    pipeline = daemon.pipeline
    blocked = dns.message.make_query("www.tiktok.com", "A").to_wire()
    hit = dns.message.make_query("n1.bench.test", "A").to_wire()
    response = dns.message.make_response(dns.message.make_query("n1.bench.test", "A"))
    response.answer.append(dns.rrset.from_text("n1.bench.test.", 3600, "IN", "A", "198.18.0.2"))
    wire, index = strip_opt(*(lambda w: (w, index_response(w)))(response.to_wire()))
    query = parse_query(hit)
    now = time.time()
    pipeline.cache.put(cache_key(query),
                      CacheEntry(wire, index.ttl_offsets, now, now + 3600, index.question_end))
    for name, packet in (("blocked", blocked), ("cache hit", hit)):
        best = float("inf")
        for _ in range(BATCHES):
            started = time.perf_counter()
            for _ in range(N // BATCHES):
                pipeline.handle(packet, "127.0.0.1", "udp")
            best = min(best, (time.perf_counter() - started) / (N // BATCHES))
        print(f"{name:10} {best * 1e6:.2f} µs/query")
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(N):
            pipeline.handle(blocked, "127.0.0.1", "udp")
            pipeline.handle(hit, "127.0.0.1", "udp")
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
