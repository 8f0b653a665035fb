"""DNS over HTTPS (RFC 8484) on aiohttp: GET with `?dns=` (base64url, no padding) and POST with
`application/dns-message`, at /dns-query, over HTTP/1.1. Each query goes through the same
pipeline as UDP and TCP (client classes by the peer's address, policy, cache, metrics with
transport "doh", incidents), on the daemon's own loop."""

from __future__ import annotations

import base64
import binascii
import inspect
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tiktokguard.config import HostPort
from tiktokguard.logs import HttpServerLog
from tiktokguard.policy.clients import client_address

PATH = "/dns-query"
CONTENT_TYPE = "application/dns-message"
MAX_MESSAGE = 65_535
Handle = Callable[[bytes, str, str], Any]  # Pipeline.handle


def _error(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n")


def make_app(handle: Handle) -> web.Application:
    async def query(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            encoded = request.query.get("dns")
            if not encoded:
                return _error(400, "expected ?dns= with a base64url DNS query (RFC 8484)")
            try:
                data = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            except (binascii.Error, ValueError):
                return _error(400, "?dns= is not base64url")
        else:
            if request.content_type != CONTENT_TYPE:
                return _error(415, f"expected Content-Type: {CONTENT_TYPE}")
            data = await request.read()
        if not data or len(data) > MAX_MESSAGE:
            return _error(400, "no DNS message")
        result = handle(data, client_address(request.remote or ""), "doh")
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            return _error(400, "not a DNS query")
        return web.Response(body=result, content_type=CONTENT_TYPE,
                            headers={"Cache-Control": "no-store"})

    app = web.Application(client_max_size=MAX_MESSAGE)
    app.router.add_get(PATH, query)
    app.router.add_post(PATH, query)
    return app


async def start(handle: Handle, listen: tuple[HostPort, ...], context: Any,
                on_malformed: Callable[[], None] = lambda: None) -> web.AppRunner:
    """Listen on every address; raises OSError naming the address. A request that cannot be
    read is answered 400 by aiohttp and counted with on_malformed."""
    runner = web.AppRunner(make_app(handle), access_log=None, handle_signals=False,
                           logger=HttpServerLog("doh", on_malformed))
    await runner.setup()
    try:
        for address in listen:
            try:
                await web.TCPSite(runner, address.host, address.port, ssl_context=context,
                                  backlog=1024).start()
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address} (https): "
                                         f"{exc.strerror}") from None
    except BaseException:
        await runner.cleanup()
        raise
    return runner


__all__ = ["CONTENT_TYPE", "PATH", "make_app", "start"]
