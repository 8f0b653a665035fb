"""The daemon as systemd runs it: sd_notify, SIGHUP reloads under load, SIGTERM with queries in
flight. Real processes, real signals, a fake NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode

from tests.conftest import write_config
from tests.daemons import DaemonProcess, serve, within
from tests.fakes import FakeUpstream, free_port


class Daemon(DaemonProcess):
    async def ask(self, name: str, tcp: bool = False, seconds: float = 3) -> dns.message.Message:
        q = dns.message.make_query(name, "A")
        send = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
        return await send(q, "127.0.0.1", port=self.port, timeout=seconds)


@asynccontextmanager
async def daemon(tmp_path: Path, upstream: FakeUpstream, extra: str = "",
                 env: dict[str, str] | None = None) -> AsyncIterator[Daemon]:
    """`tiktokguard serve` in a process of its own (tests/daemons.py), once it has started."""
    port = free_port()
    config = write_config(tmp_path, [upstream.address], port, None, extra)
    async with serve("--config", str(config), cwd=tmp_path, env=env, port=port,
                     kind=Daemon) as running:
        yield running


def soa(reply: dns.message.Message) -> str:
    return reply.authority[0].name.to_text()


async def test_sd_notify_ready_watchdog_reloading_stopping(tmp_path: Path,
                                                          upstream: FakeUpstream) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    async def message() -> set[str]:
        async with asyncio.timeout(10):
            return set((await loop.sock_recv(sock, 4096)).decode().splitlines())

    async def until(line: str, seconds: float = 10) -> set[str]:
        """The next message holding line; the watchdog's keep coming, so the bound is on the
        whole wait, not on each message."""
        async def wait() -> set[str]:
            while line not in (fields := await message()):
                pass
            return fields
        return await within(seconds, wait(), f"sd_notify {line}")

    try:
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
        async with daemon(tmp_path, upstream, env=env) as running:
            ready = await until("READY=1")
            assert any(f.startswith("STATUS=serving: ") for f in ready)
            await until("WATCHDOG=1")
            await until("WATCHDOG=1")  # repeatedly, from the event loop
            running.proc.send_signal(signal.SIGHUP)
            reloading = await until("RELOADING=1")
            assert any(f.startswith("MONOTONIC_USEC=") for f in reloading)
            await until("READY=1")
            running.proc.send_signal(signal.SIGTERM)
            await until("STOPPING=1")
            assert await running.exited() == 0
    finally:
        sock.close()


async def test_without_notify_socket_nothing_breaks(tmp_path: Path,
                                                   upstream: FakeUpstream) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock"), "WATCHDOG_USEC": "100000"}
    async with daemon(tmp_path, upstream, env=env) as running:
        assert (await running.ask("a.test")).answer
        running.proc.send_signal(signal.SIGTERM)
        assert await running.exited() == 0


async def test_sighup_under_load_drops_no_query(tmp_path: Path, upstream: FakeUpstream) -> None:
    lists = tmp_path / "l.txt"
    lists.write_text("tiktok.com\n")
    async with daemon(tmp_path, upstream, f'[policy]\nblocklists = ["{lists}"]') as running:
        total, answered, failures = 3000, [0], []
        reloaded = asyncio.Event()
        a_third = asyncio.Event()
        names = ["a.test", "www.tiktok.com", "b.a.test", "www.douyin.com", "missing.test"]

        async def worker(n: int) -> None:
            for i in range(n, total, 40):
                try:
                    reply = await running.ask(names[i % len(names)], tcp=i % 7 == 0, seconds=3)
                    assert reply.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
                    answered[0] += 1
                    if answered[0] >= total // 3:
                        a_third.set()
                except Exception as exc:  # a lost query: the point of this test
                    failures.append(repr(exc))

        async def reloader() -> None:
            await a_third.wait()
            lists.write_text("tiktok.com\ndouyin.com\n")
            running.proc.send_signal(signal.SIGHUP)
            await running.event("blocklists_reloaded")
            reloaded.set()

        await asyncio.gather(reloader(), *(worker(n) for n in range(40)))
        assert failures == [] and answered[0] == total
        assert reloaded.is_set()
        assert soa(await running.ask("www.douyin.com")) == "douyin.com."
        running.proc.send_signal(signal.SIGTERM)
        assert await running.exited() == 0


async def test_sighup_rereads_config_and_names_what_needs_a_restart(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    async with daemon(tmp_path, upstream) as running:
        assert (await running.ask("www.tiktok.com")).rcode() == dns.rcode.NXDOMAIN
        config = tmp_path / "tiktokguard.toml"
        text = config.read_text().replace("[policy]", '[policy]\nblock_mode = "refused"')
        text = text.replace(f"127.0.0.1:{running.port}",
                            f"127.0.0.1:{running.port}\", \"127.0.0.1:{free_port()}")
        config.write_text(text)
        running.proc.send_signal(signal.SIGHUP)
        restart = await running.event("restart_required")
        assert restart["keys"] == ["dns.listen"]
        await running.event("blocklists_reloaded")
        assert (await running.ask("www.tiktok.com")).rcode() == dns.rcode.REFUSED
        # A broken config is refused; what is in force stays.
        config.write_text("[dns]\nlisten = 5\n")
        running.proc.send_signal(signal.SIGHUP)
        failed = await running.event("config_reload_failed")
        assert "[dns] listen" in str(failed["error"])
        assert (await running.ask("www.tiktok.com")).rcode() == dns.rcode.REFUSED
        running.proc.send_signal(signal.SIGTERM)
        assert await running.exited() == 0


async def test_sigterm_answers_queries_in_flight(tmp_path: Path, upstream: FakeUpstream) -> None:
    async with daemon(tmp_path, upstream) as running:
        upstream.hold = True
        pending = [asyncio.ensure_future(running.ask(f"q{i}.a.test", seconds=10))
                   for i in range(5)]
        async with asyncio.timeout(10):
            while len(upstream.held) < 5:
                upstream.held_changed.clear()
                await upstream.held_changed.wait()
        running.proc.send_signal(signal.SIGTERM)
        await running.event("stopping")
        # New queries are no longer taken...
        late = asyncio.ensure_future(running.ask("late.a.test", seconds=1))
        upstream.release()
        # ...but every query in flight is answered before the daemon exits.
        replies = await asyncio.gather(*pending)
        assert all(r.answer[0][0].address == "192.0.2.1" for r in replies)
        assert await running.exited() == 0
        (outcome,) = await asyncio.gather(late, return_exceptions=True)
        assert isinstance(outcome, Exception)
