"""HTTP listener (aiohttp): health, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from tiktokguard.daemon import Daemon

DAEMON = web.AppKey("daemon", "Daemon")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    problems = daemon.readiness_problems()
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    daemon.refresh_gauges()
    body = generate_latest(daemon.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[DAEMON] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
