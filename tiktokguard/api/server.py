"""The HTTP API's own thread and event loop: no HTTP client (slow, many, or scraping /metrics in
a loop) can delay a DNS answer.

The API thread accepts connections, reads and times out headers and bodies, and checks tokens;
each handler then runs on the main loop (`dispatch`), where the store, the device index and the
policy engine live, so that no state is shared between threads. The main loop only ever sees
complete, authenticated requests, one handler call each.

Bounds: `MAX_CONNECTIONS` open at once (more are closed at once and counted); a connection
must begin a request within `HEADER_SECONDS` of opening or of its previous request (so bytes
trickled into a header keep nothing open); a body must arrive within `BODY_SECONDS`; idle
keep-alive connections close after `KEEPALIVE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web

from tiktokguard.config import HostPort
from tiktokguard.logs import HttpServerLog, get_logger

MAX_CONNECTIONS = 256
HEADER_SECONDS = 10.0
BODY_SECONDS = 10.0
KEEPALIVE_SECONDS = 5.0
log = get_logger("tiktokguard.api")


class _Refuse(asyncio.Protocol):
    """Over the connection cap: close at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class ConnectionGuard:
    """The listening socket's protocol factory: aiohttp's, behind a cap and a deadline."""

    def __init__(self, on_refused: Callable[[], None], max_connections: int | None = None,
                 header_seconds: float | None = None) -> None:
        self.server: web.Server | None = None  # set once the runner has made it
        self.on_refused = on_refused
        self.max_connections = MAX_CONNECTIONS if max_connections is None else max_connections
        self.header_seconds = HEADER_SECONDS if header_seconds is None else header_seconds
        # Per connection: when it opened or last finished a request, and requests in progress.
        # (aiohttp's handlers take no weak references; sweep() forgets the closed ones.)
        self.progress: dict[Any, list[float]] = {}

    def __call__(self) -> asyncio.BaseProtocol:
        assert self.server is not None
        if len(self.server.connections) >= self.max_connections:
            self.on_refused()
            return _Refuse()
        handler = self.server()
        self.progress[handler] = [time.monotonic(), 0]
        return handler

    def request_started(self, protocol: Any) -> None:
        entry = self.progress.get(protocol)
        if entry is not None:
            entry[1] += 1

    def request_finished(self, protocol: Any) -> None:
        entry = self.progress.get(protocol)
        if entry is not None:
            entry[0] = time.monotonic()
            entry[1] -= 1

    def sweep(self) -> int:
        """Close connections that have not begun a request in time; how many were closed."""
        assert self.server is not None
        now = time.monotonic()
        closed = 0
        live = set(self.server.connections)
        for handler in [h for h in self.progress if h not in live]:
            del self.progress[handler]
        for handler in live:
            entry = self.progress.get(handler)
            if entry is None or entry[1] or now - entry[0] < self.header_seconds:
                continue
            transport = handler.transport
            if transport is not None:
                transport.close()
                closed += 1
        return closed


GUARD = web.AppKey("guard", ConnectionGuard)
MAIN_LOOP = web.AppKey("main_loop", asyncio.AbstractEventLoop)


async def dispatch(request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
    """Run one handler on the main loop, its body read here first (bounded in time; the size
    bound is aiohttp's client_max_size), so that the handler never touches this loop's
    stream."""
    guard = request.app.get(GUARD)
    main_loop = request.app.get(MAIN_LOOP)
    if guard is not None:
        guard.request_started(request.protocol)
    try:
        if request.body_exists:
            try:
                async with asyncio.timeout(BODY_SECONDS):
                    await request.read()
            except TimeoutError:
                raise web.HTTPRequestTimeout() from None
        if main_loop is None or main_loop is asyncio.get_running_loop():
            return await handler(request)
        coroutine: Coroutine[Any, Any, web.StreamResponse] = handler(request)  # type: ignore[assignment]
        future = asyncio.run_coroutine_threadsafe(coroutine, main_loop)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the client went away: stop the handler on the main loop too
            raise
    finally:
        if guard is not None:
            guard.request_finished(request.protocol)


class ApiServer:
    """Runs an aiohttp application on its own thread; start() returns once it is bound."""

    def __init__(self, app: web.Application, address: HostPort,
                 on_refused: Callable[[], None] = lambda: None,
                 on_malformed: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self.address = address
        self.on_refused = on_refused
        self.on_malformed = on_malformed
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._bound: concurrent.futures.Future[None] = concurrent.futures.Future()

    async def start(self) -> None:
        """Bind in the API thread; raises OSError naming the address when it cannot."""
        self.app[MAIN_LOOP] = asyncio.get_running_loop()
        self.app[GUARD] = self.guard = ConnectionGuard(self.on_refused)
        self._thread = threading.Thread(target=self._run, name="tiktokguard-http", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(self._bound)

    def _run(self) -> None:
        try:
            import uvloop

            runner: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run
        except ImportError:  # pragma: no cover - uvloop is a Linux dependency
            runner = asyncio.run
        try:
            runner(self._main())
        except BaseException as exc:
            if not self._bound.done():
                self._bound.set_exception(exc)
            else:
                log.error("http_thread_failed", error=repr(exc))

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.app, access_log=None, keepalive_timeout=KEEPALIVE_SECONDS,
                               logger=HttpServerLog("api", self.on_malformed))
        await runner.setup()
        server = None
        try:
            assert runner.server is not None
            guard = self.guard
            guard.server = runner.server
            address = self.address
            try:
                server = await self._loop.create_server(guard, address.host, address.port,
                                                        reuse_address=True, backlog=128)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address} (http): "
                                         f"{exc.strerror}") from None
            self._bound.set_result(None)
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._stop.wait()
                guard.sweep()
        finally:
            if server is not None:
                server.close()
            await runner.cleanup()

    async def stop(self) -> None:
        """Stop serving and wait (without blocking the caller's loop) for the thread."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # its loop already gone
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
