"""The connection governor (dns/governor.py) on its own: prefix keys, caps, shedding order."""

from __future__ import annotations

from dataclasses import dataclass, field

from tiktokguard.dns.governor import Governor, prefix_key
from tiktokguard.dns.runtime import TcpLimits


@dataclass(eq=False)
class Conn:
    client_ip: str
    label: str = "dot"
    inflight: int = 0
    client_key: str | bytes = ""
    closed: bool = field(default=False)

    def close(self) -> None:
        self.closed = True


def governor(**limits: int) -> tuple[Governor, dict[str, TcpLimits]]:
    settings = {"limits": TcpLimits(10.0, limits.pop("max_connections", 100), **limits)}
    blocked = {"127.2.0.1"}
    return Governor(lambda: settings["limits"], lambda ip: ip not in blocked), settings


def test_ipv6_hosts_of_one_64_share_their_slots() -> None:
    gov, _ = governor(max_per_client=2)
    assert gov.refusal(Conn("2001:db8:1:2::1")) is None
    assert gov.refusal(Conn("2001:db8:1:2:ffff::9")) is None
    assert gov.refusal(Conn("2001:db8:1:2:abcd::1")) == "per_client"  # the same /64
    assert gov.refusal(Conn("2001:db8:1:3::1")) is None  # the next /64
    assert gov.refused[("dot", "per_client")] == 1


def test_ipv4_is_per_address_unless_told_otherwise_and_a_reload_recounts() -> None:
    gov, settings = governor(max_per_client=1)
    assert gov.refusal(Conn("192.0.2.1")) is None
    assert gov.refusal(Conn("192.0.2.2")) is None
    settings["limits"] = TcpLimits(10.0, 100, 1, prefix_v4=24)
    assert gov.refusal(Conn("192.0.2.3")) == "per_client"  # the /24 holds two already
    assert gov.per_client == {prefix_key("192.0.2.1", 24, 64): 2}
    assert gov.key("192.0.2.9") == gov.key("192.0.2.200") != gov.key("192.0.3.1")


def test_a_release_gives_the_slot_back_once() -> None:
    gov, _ = governor(max_per_client=1)
    first = Conn("192.0.2.1")
    assert gov.refusal(first) is None
    gov.release(first)
    gov.release(first)  # a second release is nothing
    assert gov.refusal(Conn("192.0.2.1")) is None
    assert gov.refusal(Conn("192.0.2.1")) == "per_client"
    assert gov.per_client == {"192.0.2.1": 1}


def test_a_full_table_sheds_the_longest_idle_and_keeps_busy_ones() -> None:
    gov, _ = governor(max_connections=3)
    a, b, c = Conn("192.0.2.1"), Conn("192.0.2.2"), Conn("192.0.2.3")
    for conn in (a, b, c):
        assert gov.refusal(conn) is None
    a.inflight = 1  # idle longest, but busy
    gov.touch(b)  # b is now the most recent: c is the longest idle
    assert gov.refusal(Conn("192.0.2.4")) is None
    assert (a.closed, b.closed, c.closed) == (False, False, True)
    assert gov.closed[("dot", "shed")] == 1 and len(gov) == 3
    for conn in gov.connections:
        conn.inflight = 1  # type: ignore[attr-defined]
    assert gov.refusal(Conn("192.0.2.5", label="tcp")) == "full"
    assert gov.refused[("tcp", "full")] == 1 and len(gov) == 3


def test_outsiders_and_shutdown_are_refused_first() -> None:
    gov, _ = governor()
    assert gov.refusal(Conn("127.2.0.1")) == "not_allowed"
    gov.stopping = True
    assert gov.refusal(Conn("192.0.2.1")) == "stopping"
    assert len(gov) == 0 and gov.per_client == {}
    assert gov.refused[("dot", "not_allowed")] == gov.refused[("dot", "stopping")] == 1


def test_every_counter_exists_from_the_start() -> None:
    gov, _ = governor()
    assert len(gov.refused) == 3 * 4 and set(gov.refused.values()) == {0}
    assert len(gov.closed) == 3 * 4


def test_the_key_memo_is_bounded() -> None:
    gov, _ = governor(prefix_v6=48)
    for i in range(70_000):
        gov.key(f"2001:db8:{i % 65536:x}::{i:x}")
    assert len(gov._keys) <= 65_536
