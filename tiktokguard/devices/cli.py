"""`tiktokguard devices|tokens|audit|incidents ...`: clients of the HTTP API for IT user support
and the SOC.

The token comes from `--token-file`, else $TIKTOKGUARD_TOKEN, else the admin token file in the
state folder of `--config` (or of the embedded default, ./tiktokguard-state, so a local try-out
needs no set-up). The API's address from `--api`, else $TIKTOKGUARD_API, else `--config`'s
`http.listen`. Tables for people, `--json` for scripts. Exit status: 0 success, 1 the API said
no (4xx/5xx), 2 usage or connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import unicodedata
from pathlib import Path
from typing import Any

import aiohttp

from tiktokguard import rfc3339

DEFAULT_API = "http://127.0.0.1:8053"
TOKEN_ENV = "TIKTOKGUARD_TOKEN"
TABLE_COLUMNS = ("id", "name", "state", "addresses", "macs", "custodian", "supervisor",
                 "ticket", "expires_at")
COMMANDS = ("devices", "tokens", "audit", "incidents")


def _common(parser: argparse.ArgumentParser, again: bool = False) -> None:
    """The options every API command shares. again: on an action's own parser, so that they
    may come after the action too (`devices list --config F`); their defaults there are
    suppressed, or an action would overwrite what was given before it."""
    default: Any = argparse.SUPPRESS if again else None
    parser.add_argument("--api", default=default,
                        help=f"API base URL (default: $TIKTOKGUARD_API, --config's http.listen, "
                             f"or {DEFAULT_API})")
    parser.add_argument("--token-file", metavar="FILE", default=default,
                        help=f"a file holding the API token (default: ${TOKEN_ENV}, or the "
                             "admin token in the state folder)")
    parser.add_argument("--config", default=default,
                        help="the daemon's TOML config: its API address and state folder")
    parser.add_argument("--json", action="store_true",
                        default=argparse.SUPPRESS if again else False,
                        help="print JSON (for scripts)")


def _action(actions: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(name, **kwargs)
    _common(parser, again=True)
    return parser


def add_parser(sub: Any) -> None:
    devices = sub.add_parser("devices", help="manage allowlisted social media devices (HTTP API)")
    _common(devices)
    _add_tokens(sub)
    audit = sub.add_parser("audit", help="the audit trail of device changes (HTTP API)")
    _common(audit)
    audit.add_argument("--device", metavar="ID", help="one device's entries")
    audit.add_argument("--since", type=_time_arg, help="RFC 3339 time: entries at or after it")
    audit.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    incidents = sub.add_parser("incidents", help="policy incidents, newest first (HTTP API)")
    _common(incidents)
    incidents.add_argument("--client", metavar="IP", help="one client's incidents")
    incidents.add_argument("--rule", help="one rule's incidents")
    incidents.add_argument("--since", type=_time_arg, help="RFC 3339 time: opened at or after")
    incidents.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    actions = devices.add_subparsers(dest="action", required=True)
    listing = _action(actions, "list", help="list devices")
    listing.add_argument("--all", action="store_true", help="include deactivated devices")
    show = _action(actions, "show", help="one device and its audit trail")
    show.add_argument("id")
    for name in ("add", "update"):
        parser = _action(actions, name, help=f"{name} a device")
        if name == "update":
            parser.add_argument("id")
        parser.add_argument("--name")
        parser.add_argument("--address", action="append", dest="addresses",
                            help="IP or CIDR; repeatable (update: replaces the list)")
        parser.add_argument("--mac", action="append", dest="macs",
                            help="MAC address; repeatable (update: replaces the list)")
        parser.add_argument("--custodian")
        parser.add_argument("--supervisor")
        parser.add_argument("--ticket", help="service-request ticket")
        parser.add_argument("--location", help="storage location (security zone)")
        parser.add_argument("--expires-at", dest="expires_at", type=_expires_at,
                            help=f'RFC 3339 time (e.g. {rfc3339.EXAMPLE}), or "never"')
        if name == "update":
            parser.add_argument("--activate", action="store_true",
                                help="reactivate a deactivated device")
    deactivate = _action(actions, "deactivate", help="deactivate a device (history stays)")
    deactivate.add_argument("id")


def _add_tokens(sub: Any) -> None:
    tokens = sub.add_parser("tokens", help="personal API tokens (admin; HTTP API)")
    _common(tokens)
    actions = tokens.add_subparsers(dest="action", required=True)
    create = _action(actions, "create", help="create a token (printed once)")
    create.add_argument("name", help="the person (the `actor` of what they change)")
    create.add_argument("--role", choices=("admin", "viewer"), required=True)
    _action(actions, "list", help="list tokens (never the tokens themselves)")
    revoke = _action(actions, "revoke", help="revoke a personal token")
    revoke.add_argument("name")


def _time_arg(text: str) -> str:
    try:
        return rfc3339.format_time(rfc3339.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _expires_at(text: str) -> str:
    """--expires-at, checked before anything is sent (argparse prints the reason, exit 2)."""
    if text == "never":
        return text
    try:
        return rfc3339.format_time(rfc3339.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class UsageError(Exception):
    pass


def _settings(args: argparse.Namespace, env: dict[str, str]) -> tuple[str, str]:
    """(API base URL, token) from the flags, the environment and --config. UsageError."""
    api, state_dir = args.api or env.get("TIKTOKGUARD_API"), Path("tiktokguard-state")
    if args.config:
        from tiktokguard.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        state_dir = config.state.dir
        if api is None and config.http.listen is not None:
            host = config.http.listen.host
            host = "127.0.0.1" if host == "0.0.0.0" else "::1" if host == "::" else host
            api = f"http://{f'[{host}]' if ':' in host else host}:{config.http.listen.port}"
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"--token-file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise UsageError(f"--token-file {args.token_file}: the file is empty")
        return api or DEFAULT_API, token
    token = env.get(TOKEN_ENV, "").strip()
    if token:
        return api or DEFAULT_API, token
    local = state_dir / "admin.token"
    try:
        token = local.read_text().strip()
    except OSError as exc:
        raise UsageError(f"no API token: give --token-file, set ${TOKEN_ENV}, or run where "
                         f"{local} is readable ({exc.strerror})") from None
    return api or DEFAULT_API, token


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for field in ("name", "custodian", "supervisor", "ticket", "location", "addresses", "macs"):
        value = getattr(args, field)
        if value is not None:
            body[field] = value
    if args.expires_at is not None:
        body["expires_at"] = None if args.expires_at == "never" else args.expires_at
    if getattr(args, "activate", False):
        body["active"] = True
    return body


def printable(text: str) -> str:
    """Text as a terminal may show it: control, format (bidi) and surrogate characters as
    \\uXXXX escapes. The API rejects them now; records stored before may still have them, and
    a U+202E in a device name must not make a listing read otherwise than it is."""
    return "".join(ch if unicodedata.category(ch) not in ("Cc", "Cf", "Cs")
                   else f"\\u{ord(ch):04x}" for ch in text)


def state(device: dict[str, Any]) -> str:
    """What the page shows: deactivated, expired (active but past expires_at: filtered again),
    or active. The API's `expired` is computed at the time of the request."""
    if not device.get("active"):
        return "deactivated"
    return "expired" if device.get("expired") else "active"


def _table(rows: list[dict[str, Any]]) -> str:
    return _rows([{**row, "state": state(row)} for row in rows], TABLE_COLUMNS)


def _details(device: dict[str, Any], audit: list[dict[str, Any]]) -> str:
    lines = [f"{key:11} {printable(', '.join(v) if isinstance(v, list) else str(v))}"
             for key, v in {"state": state(device), **device}.items()]
    lines.append("")
    lines.append("audit:")
    for entry in audit:
        changed = "; ".join(_changed(entry))
        lines.append(f"  {entry['at']}  {printable(entry['actor']):12} {entry['action']}"
                     + (f"  {changed}" if changed else ""))
    return "\n".join(lines)


async def _call(args: argparse.Namespace, api: str, token: str) -> tuple[int, Any]:
    base = api.rstrip("/") + "/api/v1"
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        async def request(method: str, path: str, body: Any = None,
                          params: dict[str, str] | None = None) -> tuple[int, Any]:
            async with http.request(method, base + path, json=body, params=params) as response:
                try:
                    data = await response.json(content_type=None)
                except (json.JSONDecodeError, aiohttp.ContentTypeError):
                    data = {"error": await response.text(), "field": None}
                return response.status, data

        if args.command == "audit":
            params = {k: v for k, v in (("device_id", args.device), ("since", args.since),
                                        ("limit", str(args.limit))) if v}
            status, data = await request("GET", "/audit", params=params)
            return status, data.get("entries", data) if status == 200 else data
        if args.command == "incidents":
            params = {k: v for k, v in (("client", args.client), ("rule", args.rule),
                                        ("since", args.since), ("limit", str(args.limit))) if v}
            status, data = await request("GET", "/incidents", params=params)
            return status, data.get("incidents", data) if status == 200 else data
        if args.command == "tokens":
            if args.action == "create":
                return await request("POST", "/tokens", {"name": args.name, "role": args.role})
            if args.action == "list":
                status, data = await request("GET", "/tokens")
                return status, data.get("tokens", data) if status == 200 else data
            return await request("DELETE", f"/tokens/{args.name}")
        if args.action == "list":
            status, data = await request("GET", "/devices" + ("" if args.all else "?active=true"))
            return status, data.get("devices", data) if status == 200 else data
        if args.action == "show":
            status, device = await request("GET", f"/devices/{args.id}")
            if status != 200:
                return status, device
            status, audit = await request("GET", f"/audit?device_id={args.id}&limit=1000")
            return status, {"device": device, "audit": audit.get("entries", [])}
        if args.action == "add":
            return await request("POST", "/devices", _body(args))
        if args.action == "update":
            return await request("PATCH", f"/devices/{args.id}", _body(args))
        return await request("DELETE", f"/devices/{args.id}")


def _rows(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    grid = [list(columns)] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
                     for row in grid)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return printable(",".join(value)) or "-"
    if value is None:
        return "-"
    return printable(str(value))


def run(args: argparse.Namespace) -> int:
    try:
        api, token = _settings(args, dict(os.environ))
    except UsageError as exc:
        print(f"tiktokguard: {exc}", file=sys.stderr)
        return 2
    try:
        status, data = asyncio.run(_call(args, api, token))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(f"tiktokguard: cannot reach the API at {api}: {exc}", file=sys.stderr)
        return 2
    if status >= 400:
        field = f" (field: {data.get('field')})" if data.get("field") else ""
        print(f"tiktokguard: {status}: {data.get('error')}{field}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    elif args.command == "audit":
        print(_rows([{**e, "changed": ", ".join(_changed(e))} for e in data],
                    ("at", "actor", "action", "device_id", "changed", "instance")))
    elif args.command == "incidents":
        print(_rows(data, ("first_seen", "client_ip", "client_mac", "rule", "name", "count",
                           "instance")))
    elif args.command == "tokens":
        if args.action == "create":
            print(data["token"])
            print(f"(token {data['name']!r}, role {data['role']}: shown once, keep it safe; "
                  "only its SHA-256 is kept)", file=sys.stderr)
        elif args.action == "list":
            print(_rows(data, ("name", "role", "source", "created_at")))
        else:
            print(f"revoked {data['name']!r}")
    elif args.action == "list":
        print(_table(data))
    elif args.action == "show":
        print(_details(data["device"], data["audit"]))
    else:
        print(_table([data]))
    return 0


def _changed(entry: dict[str, Any]) -> list[str]:
    """What an audit entry changed: the fields whose values differ, before → after."""
    before, after = entry.get("before") or {}, entry.get("after") or {}
    out = []
    for key in ("name", "addresses", "macs", "custodian", "supervisor", "ticket", "location",
                "expires_at", "active"):
        if before and before.get(key) != after.get(key):
            out.append(f"{key}: {_cell(before.get(key))} -> {_cell(after.get(key))}")
    return out
