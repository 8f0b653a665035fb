"""List parsing and the suffix matcher."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiktokguard.config import BUNDLED_LISTS
from tiktokguard.dns.wire import text_to_wire
from tiktokguard.policy.domains import DomainMatcher, ListError, load_lists, parse_line, parse_list


@pytest.mark.parametrize(("line", "expected"), [
    ("tiktok.com", "tiktok.com"),
    ("  TikTok.COM.  ", "tiktok.com"),
    ("tiktok.com # the app", "tiktok.com"),
    ("# a comment", None),
    ("", None),
    ("! adblock comment", None),
    ("0.0.0.0 tiktokv.com", "tiktokv.com"),
    ("127.0.0.1\tbytedance.com", "bytedance.com"),
    (":: douyin.com", "douyin.com"),
    ("||capcut.com^", "capcut.com"),
    ("*.byteimg.com", "byteimg.com"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("_dns.resolver.arpa", "_dns.resolver.arpa"),
])
def test_parse_line_formats(line: str, expected: str | None) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize("line", [
    "192.168.1.1 tiktok.com",  # a hosts line that points somewhere is not a block entry
    "0.0.0.0 a.com b.com",
    "||tiktok.com^$third-party",
    "-bad-.com",
    "tik tok.com",
    "a..com",
    "https://tiktok.com/",
    "x" * 64 + ".com",
])
def test_parse_line_rejects(line: str) -> None:
    with pytest.raises(ValueError):
        parse_line(line)


def test_parse_list_names_file_and_line() -> None:
    with pytest.raises(ListError, match=r"^lists/x\.txt:3: .*'bad name!'"):
        parse_list("tiktok.com\n# ok\nbad name!\n", "lists/x.txt")


def test_load_lists_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ListError, match=r"missing\.txt: cannot read list"):
        load_lists([tmp_path / "missing.txt"])


def test_matcher_suffix_semantics() -> None:
    m = DomainMatcher.from_domains(["tiktok.com", "www.bytedance.com"])
    assert m.match(text_to_wire("tiktok.com")) == "tiktok.com"
    assert m.match(text_to_wire("a.b.c.tiktok.com")) == "tiktok.com"
    assert m.match(text_to_wire("nottiktok.com")) is None
    assert m.match(text_to_wire("tiktok.com.evil.example")) is None
    assert m.match(text_to_wire("com")) is None
    assert m.match(text_to_wire("bytedance.com")) is None
    assert m.match(text_to_wire("x.www.bytedance.com")) == "www.bytedance.com"
    assert m.match(b"\x00") is None
    assert m.match_text("WWW.TIKTOK.COM.") == "tiktok.com"
    assert m.match_text("not a name..") is None


def test_longest_rule_wins() -> None:
    m = DomainMatcher.from_domains(["tiktok.com", "ads.tiktok.com"])
    assert m.match(text_to_wire("x.ads.tiktok.com")) == "ads.tiktok.com"
    assert m.match(text_to_wire("www.tiktok.com")) == "tiktok.com"


@given(st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), min_size=1, max_size=5),
       st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), max_size=4))
def test_matcher_agrees_with_a_naive_suffix_check(rule_labels: list[str],
                                                  prefix: list[str]) -> None:
    rule = ".".join(rule_labels)
    name = ".".join([*prefix, rule])
    m = DomainMatcher.from_domains([rule])
    assert m.match(text_to_wire(name)) == rule
    other = "x" + name
    naive = other == rule or other.endswith("." + rule)
    assert (m.match(text_to_wire(other)) == rule) == naive


def test_bundled_list_loads_and_covers_the_policy() -> None:
    matcher = load_lists([BUNDLED_LISTS / "tiktok-bytedance.txt"])
    assert len(matcher) > 100
    for name in ("www.tiktok.com", "v16-webapp.tiktokcdn.com", "api.tiktokv.com",
                 "mon.byteoversea.com", "p16-sign.byteimg.com", "www.douyin.com",
                 "www.capcut.com", "www.toutiao.com", "www.lemon8-app.com", "www.musical.ly"):
        assert matcher.match_text(name), name
    # Shared third-party infrastructure must never be listed at the registrable level.
    for name in ("akamaized.net", "fastly.net", "cloudfront.net", "amazonaws.com",
                 "akamaihd.net", "edgekey.net", "googleusercontent.com", "cloudflare.net"):
        assert matcher.match_text("x." + name) is None, name
