"""HTTP API (aiohttp, docs/design.md §3): health, metrics, devices, audit, incidents, decisions,
reload.

Errors are JSON `{"error", "field"}`: 400 bad input, 401 no or unknown token, 403 wrong role,
404, 409 (address or MAC on another active device). Bad input never yields a 500.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from tiktokguard import __version__
from tiktokguard.api.auth import role_allows
from tiktokguard.api.openapi import openapi_document, query_parameters
from tiktokguard.api.server import dispatch
from tiktokguard.devices.model import ValidationError, format_time, parse_time
from tiktokguard.devices.service import Conflict, NotFound
from tiktokguard.devices.store import StoreUnavailable
from tiktokguard.logs import get_logger
from tiktokguard.policy.clients import normalise_mac

if TYPE_CHECKING:
    from tiktokguard.api.auth import TokenAdmin, TokenTable
    from tiktokguard.config import HttpConfig
    from tiktokguard.devices.service import DeviceService
    from tiktokguard.devices.store import Store
    from tiktokguard.policy.engine import Decision

Readiness = dict[str, tuple[bool, str]]  # component → (ready, state)
# What a list reload did: (done, rules in force, why not).
ReloadResult = tuple[bool, int, str | None]

# One typed key per service the handlers use, each given to make_app by name: the API sees
# these and nothing else of the daemon. (The store and the device service exist before the API
# starts, so they are never None here.)
DEVICES: web.AppKey[DeviceService] = web.AppKey("devices")
STORE: web.AppKey[Store] = web.AppKey("store")
TOKENS: web.AppKey[Callable[[], TokenTable]] = web.AppKey("tokens")  # the table in force
HTTP_SETTINGS: web.AppKey[Callable[[], HttpConfig]] = web.AppKey("http_settings")
READINESS: web.AppKey[Callable[[], Readiness]] = web.AppKey("readiness")
# Brings the stored incidents up to date (the workers' blocked queries, counts in memory).
SYNC_INCIDENTS: web.AppKey[Callable[[], Awaitable[None]]] = web.AppKey("sync_incidents")
# (client, name, mac) → the decision a query would get now
DECIDE: web.AppKey[Callable[[str, str, str | None], Decision]] = web.AppKey("decide")
TOKEN_ADMIN: web.AppKey[TokenAdmin] = web.AppKey("token_admin")
RELOAD_LISTS: web.AppKey[Callable[[str], Awaitable[ReloadResult]]] = web.AppKey("reload_lists")
ACTOR = web.RequestKey("actor", str)
AUTH_FAILED: web.AppKey[Callable[[], None]] = web.AppKey("auth_failed")  # counts a failed sign-in
MAX_BODY = 64 * 1024
METRICS_INTERVAL = 1.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_ROLE: dict[Handler, str | None] = {}
_QUERY = query_parameters()
log = get_logger("tiktokguard.api")


def needs(role: str | None) -> Callable[[Handler], Handler]:
    """Mark a handler with the role it needs (None: open)."""
    def mark(handler: Handler) -> Handler:
        _ROLE[handler] = role
        return handler
    return mark


def error(status: int, message: str, field: str | None = None) -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status)


@web.middleware
async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await _handle(request, handler)
        status = response.status
        return response
    except web.HTTPException as exc:  # (passed on as it is: a redirect, an empty 4xx)
        status = exc.status
        raise
    finally:
        if request.path.startswith("/api/"):
            log.info("api_request", method=request.method, path=request.path,
                     actor=request.get(ACTOR), status=status, client=request.remote,
                     ms=round((time.perf_counter() - started) * 1000, 2))


def _auth_failed(request: web.Request, reason: str) -> None:
    """A request with no usable token: counted, and said with the client's address (the SOC
    sees guessing), never with the token."""
    request.app[AUTH_FAILED]()
    log.warning("api_auth_failed", method=request.method, path=request.path,
                client=request.remote, reason=reason)


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        route_handler = request.match_info.route.handler
        needed = _ROLE.get(route_handler)
        if needed is not None:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                _auth_failed(request, "no bearer token")
                response = error(401, "missing bearer token")
                response.headers["WWW-Authenticate"] = 'Bearer realm="tiktokguard"'
                return response
            identity = request.app[TOKENS]().authenticate(token.strip())
            if identity is None:
                _auth_failed(request, "unknown token")
                response = error(401, "unknown token")
                response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
                return response
            actor, role = identity
            request[ACTOR] = actor
            if not role_allows(role, needed):
                return error(403, f"token {actor!r} has role {role}; this needs {needed}")
        resource = request.match_info.route.resource
        if resource is not None and request.query:
            allowed = _QUERY.get((request.method, resource.canonical), frozenset())
            for name in request.query:
                if name not in allowed:
                    # A typo in a script (?devce_id=) must not silently list everything.
                    raise ValidationError(name, f"unknown query parameter {name!r}")
        return await dispatch(request, handler)
    except ValidationError as exc:
        return error(400, exc.message, exc.field)
    except NotFound as exc:
        text = str(exc)
        return error(404, f"no {text}" if text.startswith("token ") else f"no device {text}")
    except Conflict as exc:
        return error(409, exc.message, exc.field)
    except StoreUnavailable as exc:
        response = error(503, f"the device store is unavailable ({exc}); nothing was changed. "
                              "DNS goes on deciding from the last known devices; try again "
                              "when the database is back")
        response.headers["Retry-After"] = "10"
        return response
    except web.HTTPException as exc:
        if exc.status == 413:
            return error(413, f"request body larger than {MAX_BODY} bytes")
        if exc.empty_body or exc.status < 400:
            raise
        response = error(exc.status, exc.reason)
        for name in ("Allow", "WWW-Authenticate"):  # RFC 9110 wants Allow on a 405
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response


async def _body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise ValidationError(None, "expected Content-Type: application/json")
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, over 4300 digits
        raise ValidationError(None, f"invalid JSON: {exc}") from None
    except RecursionError:
        raise ValidationError(None, "invalid JSON: nested too deeply") from None


_DIGITS = re.compile(r"[0-9]{1,12}")


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    # ASCII digits only, and few of them: str.isdigit() also takes "²" (which int() refuses)
    # and other scripts' digits (which int() reads), and int() refuses over 4 300 digits.
    if not _DIGITS.fullmatch(text) or not low <= int(text) <= high:
        raise ValidationError(name, f"expected a whole number from {low} to {high}")
    return int(text)


def _since(request: web.Request) -> str | None:
    """`since` in the one form every stored time has (tiktokguard.rfc3339), since the store
    compares them as text."""
    text = request.query.get("since")
    if text is None:
        return None
    return format_time(parse_time(text, "since"))


# -- open ------------------------------------------------------------------------------------------


@needs(None)
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


@needs(None)
async def readyz(request: web.Request) -> web.Response:
    readiness = request.app[READINESS]()
    components = {name: {"ready": ok, "state": state} for name, (ok, state) in readiness.items()}
    problems = [f"{name}: {state}" for name, (ok, state) in readiness.items() if not ok]
    if problems:
        return web.json_response({"status": "not ready", "problems": problems,
                                  "components": components}, status=503)
    degraded = any(state.startswith("degraded") for _ok, state in readiness.values())
    return web.json_response({"status": "degraded" if degraded else "ready",
                              "components": components})


@needs(None)
async def metrics(request: web.Request) -> web.Response:
    if request.app[HTTP_SETTINGS]().metrics_token:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or request.app[TOKENS]().authenticate(
                token.strip()) is None:
            return error(401, "metrics need a viewer token ([http] metrics_token = true)")
    body = await request.app[METRICS_PAGE].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class MetricsPage:
    """The metrics page, rendered at most once every METRICS_INTERVAL seconds however often
    it is asked for, and never stale: a request that comes sooner waits for the next rendering,
    and every request waiting then shares it. A scraper in a loop costs the main loop one
    rendering a second, not one a request."""

    def __init__(self, collect: Callable[[], Awaitable[bytes]]) -> None:
        self.collect = collect  # every DNS process's counts as of now, in the exposition format
        self.rendered_at = float("-inf")
        self.pending: asyncio.Task[bytes] | None = None

    async def render(self) -> bytes:
        # A task of its own: a client that goes away cancels its wait, not the rendering.
        pending = self.pending
        if pending is None:
            pending = self.pending = asyncio.get_running_loop().create_task(self._render())
        return await asyncio.shield(pending)

    async def _render(self) -> bytes:
        try:
            wait = self.rendered_at + METRICS_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            return await self.collect()
        finally:
            self.rendered_at = time.monotonic()
            self.pending = None


METRICS_PAGE = web.AppKey("metrics_page", MetricsPage)


@needs(None)
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


# -- devices ---------------------------------------------------------------------------------------


@needs("viewer")
async def list_devices(request: web.Request) -> web.Response:
    active_text = request.query.get("active")
    if active_text not in (None, "true", "false"):
        raise ValidationError("active", "expected true or false")
    active = None if active_text is None else active_text == "true"
    service = request.app[DEVICES]
    records = service.list(active)
    return web.json_response({"devices": [r.to_json() for r in records]})


@needs("viewer")
async def get_device(request: web.Request) -> web.Response:
    service = request.app[DEVICES]
    return web.json_response(service.get(request.match_info["id"]).to_json())


@needs("admin")
async def create_device(request: web.Request) -> web.Response:
    service = request.app[DEVICES]
    record = await service.create(await _body(request), request[ACTOR])
    return web.json_response(record.to_json(), status=201,
                             headers={"Location": f"/api/v1/devices/{record.id}"})


@needs("admin")
async def update_device(request: web.Request) -> web.Response:
    service = request.app[DEVICES]
    record = await service.update(request.match_info["id"], await _body(request),
                                  request[ACTOR])
    return web.json_response(record.to_json())


@needs("admin")
async def deactivate_device(request: web.Request) -> web.Response:
    service = request.app[DEVICES]
    record = await service.deactivate(request.match_info["id"], request[ACTOR])
    return web.json_response(record.to_json())


@needs("viewer")
async def audit(request: web.Request) -> web.Response:
    store = request.app[STORE]
    entries = await store.audit(request.query.get("device_id"), _since(request),
                                _int_param(request, "limit", 100, 1, 1000),
                                _int_param(request, "offset", 0, 0, 10**9))
    return web.json_response({"entries": entries})


@needs("viewer")
async def incidents(request: web.Request) -> web.Response:
    await request.app[SYNC_INCIDENTS]()
    rows = await request.app[STORE].incidents(_since(request),
                                              request.query.get("client"),
                                              request.query.get("rule"),
                                              _int_param(request, "limit", 100, 1, 1000),
                                              _int_param(request, "offset", 0, 0, 10**9))
    return web.json_response({"incidents": rows})


@needs("viewer")
async def decision(request: web.Request) -> web.Response:
    client = request.query.get("client", "")
    name = request.query.get("name", "")
    try:
        ipaddress.ip_address(client)
    except ValueError:
        raise ValidationError("client", "expected an IP address") from None
    if not name:
        raise ValidationError("name", "expected a query name")
    if not name.isascii() or not name.isprintable():
        raise ValidationError("name", "expected a name in ASCII (IDNs in their xn-- form)")
    mac_text = request.query.get("mac")
    try:
        mac = normalise_mac(mac_text) if mac_text is not None else None
    except ValueError as exc:
        raise ValidationError("mac", str(exc)) from None
    try:
        result = request.app[DECIDE](client, name, mac)
    except ValueError as exc:
        raise ValidationError("name", f"invalid name: {exc}") from None
    device = result.device
    return web.json_response({
        "client": client, "name": name, "mac": mac,
        "decision": result.verdict,
        "client_class": result.client_class.value,
        "rule": result.rule,
        "exception": result.exception,
        "device": {"id": device.id, "name": device.name} if device else None,
        "explanation": result.explain(),
    })


@needs("admin")
async def reload(request: web.Request) -> web.Response:
    ok, rules, why = await request.app[RELOAD_LISTS]("api")
    if not ok:
        return error(422, f"lists not reloaded, previous lists kept: {why}", "blocklists")
    return web.json_response({"status": "reloaded", "rules": rules})


# -- tokens ----------------------------------------------------------------------------------------


@needs("admin")
async def list_tokens(request: web.Request) -> web.Response:
    return web.json_response({"tokens": await request.app[TOKEN_ADMIN].list()})


@needs("admin")
async def create_token(request: web.Request) -> web.Response:
    body = await _body(request)
    if not isinstance(body, dict) or set(body) - {"name", "role"}:
        raise ValidationError(None, "expected {\"name\": ..., \"role\": \"admin\" | "
                                    "\"viewer\"}")
    token = await request.app[TOKEN_ADMIN].create(body.get("name"), body.get("role"),
                                                  request[ACTOR])
    return web.json_response({"name": body["name"], "role": body["role"], "token": token,
                              "note": "shown once: only its SHA-256 is kept"}, status=201)


@needs("admin")
async def revoke_token(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await request.app[TOKEN_ADMIN].revoke(name, request[ACTOR])
    return web.json_response({"name": name, "revoked": True})


# -- the IT support page -----------------------------------------------------------------------

ADMIN_FILES = {"index.html": "text/html", "admin.js": "text/javascript",
               "admin.css": "text/css"}
# Only this origin's own files; no inline script or style, no framing, no form posts elsewhere.
ADMIN_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
             "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@needs(None)
async def admin_page(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("file", "index.html")
    content_type = ADMIN_FILES.get(name)
    if content_type is None:
        raise web.HTTPNotFound()
    body = (resources.files("tiktokguard") / "admin" / name).read_bytes()
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers={
        "Content-Security-Policy": ADMIN_CSP, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})


ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", metrics),
    ("GET", "/openapi.json", openapi),
    ("GET", "/api/v1/devices", list_devices),
    ("POST", "/api/v1/devices", create_device),
    ("GET", "/api/v1/devices/{id}", get_device),
    ("PATCH", "/api/v1/devices/{id}", update_device),
    ("DELETE", "/api/v1/devices/{id}", deactivate_device),
    ("GET", "/api/v1/audit", audit),
    ("GET", "/api/v1/incidents", incidents),
    ("GET", "/api/v1/decision", decision),
    ("POST", "/api/v1/reload", reload),
    ("GET", "/api/v1/tokens", list_tokens),
    ("POST", "/api/v1/tokens", create_token),
    ("DELETE", "/api/v1/tokens/{name}", revoke_token),
]


def make_app(*, devices: DeviceService, store: Store, tokens: Callable[[], TokenTable],
             auth_failed: Callable[[], None], token_admin: TokenAdmin,
             http_settings: Callable[[], HttpConfig], readiness: Callable[[], Readiness],
             collect_metrics: Callable[[], Awaitable[bytes]],
             sync_incidents: Callable[[], Awaitable[None]],
             decide: Callable[[str, str, str | None], Decision],
             reload_lists: Callable[[str], Awaitable[ReloadResult]]) -> web.Application:
    """The API over the services it is given (each under its key above)."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[errors_and_auth])
    app[DEVICES] = devices
    app[STORE] = store
    app[TOKENS] = tokens
    app[AUTH_FAILED] = auth_failed
    app[TOKEN_ADMIN] = token_admin
    app[HTTP_SETTINGS] = http_settings
    app[READINESS] = readiness
    app[SYNC_INCIDENTS] = sync_incidents
    app[DECIDE] = decide
    app[RELOAD_LISTS] = reload_lists
    app[METRICS_PAGE] = MetricsPage(collect_metrics)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.router.add_get("/admin", admin_page)
    app.router.add_get("/admin/{file}", admin_page)
    return app
