"""Lists from URLs (fetched, refreshed with conditional GETs, the last good copy kept), third-party
list syntax, and exceptions below a blocked suffix."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import dns.edns
import dns.message
import dns.rcode
import pytest
from aiohttp import web

from tests.conftest import MANAGED, Running, running_daemon
from tests.fakes import FakeUpstream, free_port
from tiktokguard.dns.wire import text_to_wire
from tiktokguard.policy.domains import (
    DomainMatcher,
    ListError,
    ListSource,
    load_lists,
    parse_list,
    read_line,
)

THIRD_PARTY = """[Adblock Plus 2.0]
! Title: a third-party list
||listed-one.example^
@@||ok.listed-one.example^
||tracker.example^$third-party
0.0.0.0 hosts-style.example
this is not a list line!
"""


# -- parsing --------------------------------------------------------------------------------------


def test_read_line_knows_exceptions_headers_and_comments() -> None:
    assert read_line("@@||cdn.tiktok.com^") == ("cdn.tiktok.com", True)
    assert read_line("||tiktok.com^") == ("tiktok.com", False)
    assert read_line("[Adblock Plus 2.0]") is None
    assert read_line("! Expires: 1 day") is None


def test_a_remote_list_skips_and_counts_what_it_cannot_use() -> None:
    parsed = parse_list(THIRD_PARTY, "https://lists.example/x.txt", "remote")
    assert parsed.blocks == ["listed-one.example", "hosts-style.example"]
    assert parsed.allows == ["ok.listed-one.example"]
    assert parsed.skipped == 2  # the $modifier rule and the line that is no list syntax
    assert parsed.examples[0].startswith("https://lists.example/x.txt:5: ")


def test_a_local_list_skips_modifiers_but_refuses_a_typo() -> None:
    parsed = parse_list("||a.example^$important\nb.example\n", "mine.txt", "local")
    assert parsed.blocks == ["b.example"] and parsed.skipped == 1
    with pytest.raises(ListError, match=r"^mine\.txt:2: "):
        parse_list("a.example\nb..example\n", "mine.txt", "local")


@pytest.mark.parametrize("line", ["||a.example^$third-party", "@@||a.example^", "bad name!"])
def test_the_bundled_list_is_read_strictly(line: str) -> None:
    with pytest.raises(ListError, match=r"^bundled\.txt:1: "):
        parse_list(line, "bundled.txt", "strict")


def test_the_most_specific_entry_wins_and_an_exception_allows() -> None:
    m = DomainMatcher.from_domains(["tiktok.com", "ads.cdn.tiktok.com"],
                                   exceptions=["cdn.tiktok.com"])
    assert m.match(text_to_wire("www.tiktok.com")) == "tiktok.com"
    assert m.match(text_to_wire("cdn.tiktok.com")) is None
    assert m.match(text_to_wire("img.cdn.tiktok.com")) is None
    assert m.match(text_to_wire("x.ads.cdn.tiktok.com")) == "ads.cdn.tiktok.com"
    assert m.exception_for(text_to_wire("img.cdn.tiktok.com")) == "cdn.tiktok.com"
    assert m.exception_for(text_to_wire("www.tiktok.com")) is None
    assert len(m) == 2  # exceptions are not rules


def test_exceptions_from_config_and_from_lists_are_one(tmp_path: Path) -> None:
    path = tmp_path / "third.txt"
    path.write_text(THIRD_PARTY)
    matcher = load_lists([ListSource("third.txt", path, "remote")], ("www.listed-one.example",))
    assert matcher.exceptions.keys() == {text_to_wire("ok.listed-one.example"),
                                         text_to_wire("www.listed-one.example")}
    assert matcher.skipped == {"third.txt": 2}


async def test_policy_exceptions_allow_a_false_positive_and_say_so(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    extra = '[policy]\nexceptions = ["cdn.a.test"]\nblocklists = ["%s"]\n'
    listed = tmp_path / "mine.txt"
    listed.write_text("a.test\n")
    async with running_daemon(tmp_path, [upstream.address], extra=extra % listed,
                              http=True) as tg:
        assert blocked(await tg.ask("www.a.test"))
        assert (await tg.ask("img.cdn.a.test")).answer[0][0].address == "192.0.2.1"
        token = (tmp_path / "state" / "admin.token").read_text().strip()
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{tg.http_port}/api/v1/decision",
                params={"client": MANAGED, "name": "img.cdn.a.test"},
                headers={"Authorization": f"Bearer {token}"}) as response:
            decision = await response.json()
        assert response.status == 200, decision
        assert decision["decision"] == "allowed" and decision["exception"] == "cdn.a.test"
        assert "exception=cdn.a.test" in decision["explanation"]


# -- lists from URLs ------------------------------------------------------------------------------


@dataclass
class ListServer:
    """A list over HTTP on loopback, with an ETag, answering 304 to a matching If-None-Match."""

    body: str = THIRD_PARTY
    version: int = 1
    requests: list[tuple[str | None, int]] = field(default_factory=list)  # (If-None-Match, status)
    moved_to: str = "/list.txt"  # where /moved.txt redirects
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/list.txt"

    async def handle(self, request: web.Request) -> web.Response:
        etag = f'"v{self.version}"'
        asked = request.headers.get("If-None-Match")
        status = 304 if asked == etag else 200
        self.requests.append((asked, status))
        if status == 304:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(text=self.body, headers={"ETag": etag})

    async def moved(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": self.moved_to})

    async def start(self) -> ListServer:
        app = web.Application()
        app.router.add_get("/list.txt", self.handle)
        app.router.add_get("/moved.txt", self.moved)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        self.port = self.port or free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def list_server() -> AsyncIterator[ListServer]:
    server = await ListServer().start()
    yield server
    await server.stop()


def blocked(reply: dns.message.Message) -> bool:
    """A block answer (EDE 15 "Blocked"), not the upstream's own NXDOMAIN."""
    return any(isinstance(o, dns.edns.EDEOption) and o.code == dns.edns.EDECode.BLOCKED
               for o in reply.options)


def url_config(url: str) -> str:
    return f'[policy]\nblocklists = ["blocklists/tiktok-bytedance.txt", "{url}"]\n'


async def readyz(tg: Running) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{tg.http_port}/readyz") as response:
        return response.status, await response.json()


async def test_a_url_list_is_fetched_refreshed_and_kept_when_its_source_is_gone(
        tmp_path: Path, upstream: FakeUpstream, list_server: ListServer) -> None:
    extra = url_config(list_server.url)
    async with running_daemon(tmp_path, [upstream.address], extra=extra, http=True) as tg:
        # Fetched before serving: in force from the first query.
        assert blocked(await tg.ask("www.listed-one.example"))
        assert not blocked(await tg.ask("ok.listed-one.example"))  # the list's @@ exception
        assert blocked(await tg.ask("www.tiktok.com"))  # the bundled list is still in force
        skipped = tg.metrics.sample("tiktokguard_blocklist_skipped_lines", list=list_server.url)
        assert skipped == 2
        # Unchanged at the source: a conditional GET, answered 304.
        assert not await tg.daemon.lists.fetch_all()
        assert list_server.requests[-1] == ('"v1"', 304)
        # Changed at the source: the next refresh replaces the copy and the rules.
        list_server.body, list_server.version = "||listed-two.example^\n", 2
        status, _ = await api_reload(tg)
        assert status == 200
        assert blocked(await tg.ask("www.listed-two.example"))
        assert not blocked(await tg.ask("www.listed-one.example"))

    await list_server.stop()  # the source is gone; the daemon starts again from its copy
    async with running_daemon(tmp_path, [upstream.address], extra=extra, http=True) as tg:
        assert not await tg.daemon.lists.fetch_all()  # fails: connection refused
        assert blocked(await tg.ask("www.listed-two.example"))
        status, body = await readyz(tg)
        assert status == 200, body
        lists = body["components"]["lists"]  # type: ignore[index]
        assert "last good copy in force" in lists["state"] and list_server.url in lists["state"]
        errors = tg.metrics.sample("tiktokguard_blocklist_fetch_errors_total",
                                   list=list_server.url)
        assert errors >= 1


async def api_reload(tg: Running) -> tuple[int, object]:
    token = (tg.config_path.parent / "state" / "admin.token").read_text().strip()
    async with aiohttp.ClientSession() as http, \
            http.post(f"http://127.0.0.1:{tg.http_port}/api/v1/reload",
                      headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status, await response.json()


async def test_a_url_list_never_fetched_is_not_ready_but_dns_goes_on(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    url = f"http://127.0.0.1:{free_port()}/list.txt"  # nothing listens there
    async with running_daemon(tmp_path, [upstream.address], extra=url_config(url),
                              http=True) as tg:
        assert blocked(await tg.ask("www.tiktok.com"))
        status, body = await readyz(tg)
        assert status == 503
        assert any(p.startswith("lists: never fetched") and url in p
                   for p in body["problems"])  # type: ignore[union-attr]


async def test_an_error_page_never_replaces_a_good_copy(
        tmp_path: Path, upstream: FakeUpstream, list_server: ListServer) -> None:
    async with running_daemon(tmp_path, [upstream.address],
                              extra=url_config(list_server.url)) as tg:
        list_server.body = "<html><body>502 Bad Gateway</body></html>\n"
        list_server.version = 3
        assert not await tg.daemon.lists.fetch_all()
        assert list_server.url in tg.daemon.lists.errors()
        assert blocked(await tg.ask("www.listed-one.example"))


@pytest.mark.parametrize(("source", "target", "why"), [
    ("https://lists.example/a.txt", "https://lists.example/b.txt", None),
    ("http://127.0.0.1:8000/a.txt", "https://127.0.0.1/a.txt", None),  # up to TLS: fine
    ("https://lists.example/a.txt", "http://lists.example/a.txt", "from https:// to clear"),
    ("https://lists.example/a.txt", "https://cdn.example/a.txt", "another host"),
    ("https://lists.example/a.txt", "https://LISTS.example/b.txt", None),
    ("https://lists.example/a.txt", "https://lists.example:8443/a.txt", "another port"),
    ("https://lists.example/a.txt", "ftp://lists.example/a.txt", "not an http(s) URL"),
])
def test_a_lists_redirect_stays_with_its_origin(source: str, target: str,
                                                why: str | None) -> None:
    import yarl

    from tiktokguard.listfetch import redirect_refused

    refused = redirect_refused(yarl.URL(source), yarl.URL(target))
    assert (refused is None) if why is None else (refused is not None and why in refused)


async def test_a_redirect_to_another_host_is_refused_and_the_copy_kept(
        tmp_path: Path, upstream: FakeUpstream, list_server: ListServer) -> None:
    """The list's URL redirects: within its origin it is followed; to another host (here
    localhost for 127.0.0.1, where the same list would be served) it is refused, counted and
    logged, and the copy in force stays."""
    from structlog.testing import capture_logs

    url = list_server.url.replace("/list.txt", "/moved.txt")  # → /list.txt, the same origin
    async with running_daemon(tmp_path, [upstream.address], extra=url_config(url),
                              http=True) as tg:
        assert blocked(await tg.ask("www.listed-one.example"))
        list_server.body, list_server.version = "||listed-two.example^\n", 2
        list_server.moved_to = list_server.url.replace("127.0.0.1", "localhost")
        with capture_logs() as logs:
            assert not await tg.daemon.lists.fetch_all()
        assert blocked(await tg.ask("www.listed-one.example"))  # the copy in force
        assert not blocked(await tg.ask("www.listed-two.example"))
        (failed,) = [e for e in logs if e["event"] == "blocklist_fetch_failed"]
        assert "refused: another host" in failed["error"] and failed["list"] == url
        assert tg.metrics.sample("tiktokguard_blocklist_fetch_errors_total", list=url) == 1
        assert "refused" in tg.daemon.lists.errors()[url]


def test_a_url_list_is_due_at_its_refresh_and_retried_sooner_after_a_failure(
        tmp_path: Path) -> None:
    from tiktokguard.listfetch import RETRY_SECONDS, ListFetcher
    from tiktokguard.metrics import Metrics

    async def changed(reason: str) -> None:
        return None

    source = ListSource("https://lists.example/x.txt", tmp_path / "x.txt", "remote",
                        "https://lists.example/x.txt")
    now = [1000.0]
    fetcher = ListFetcher(lambda: (source,), lambda: 86_400, Metrics(), changed,
                          clock=lambda: now[0])
    assert fetcher._due(source) == 0.0  # no copy: at once
    source.path.write_text("a.example\n")
    fetcher.state[source.url].checked_at = 1000.0
    assert fetcher._due(source) == 1000.0 + 86_400
    fetcher._failed(source, fetcher.state[source.url], "HTTP 502")
    assert fetcher._due(source) == 1000.0 + RETRY_SECONDS  # sooner than the refresh
    assert fetcher.errors() == {source.url: "HTTP 502"}


@pytest.mark.parametrize("entry", ["http://192.0.2.1/list.txt", "ftp://127.0.0.1/x.txt",
                                   "https://"])
def test_list_urls_are_https_or_a_loopback_mirror(tmp_path: Path, entry: str) -> None:
    from tiktokguard.config import ConfigError, load_config

    path = tmp_path / "tg.toml"
    path.write_text(f'[dns]\nupstreams = ["192.0.2.1"]\n[policy]\nblocklists = ["{entry}"]\n')
    with pytest.raises(ConfigError, match=r"\[policy\] blocklists"):
        load_config(path)
