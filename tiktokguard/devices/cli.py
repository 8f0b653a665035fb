"""`tiktokguard devices ...`: a client of the HTTP API for IT user support.

The token comes from $TIKTOKGUARD_TOKEN, or else from the admin token file that the embedded
default writes into ./tiktokguard-state (so a local try-out needs no set-up). Tables for people,
`--json` for scripts. Exit status: 0 success, 1 the API said no (4xx/5xx), 2 usage or connection.
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
TABLE_COLUMNS = ("id", "name", "active", "addresses", "macs", "custodian", "ticket", "expires_at")


def add_parser(sub: Any) -> None:
    devices = sub.add_parser("devices", help="manage allowlisted social media devices (HTTP API)")
    devices.add_argument("--api", default=os.environ.get("TIKTOKGUARD_API", DEFAULT_API),
                         help=f"API base URL (default {DEFAULT_API}, or $TIKTOKGUARD_API)")
    devices.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    actions = devices.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list devices")
    listing.add_argument("--all", action="store_true", help="include deactivated devices")
    show = actions.add_parser("show", help="one device and its audit trail")
    show.add_argument("id")
    for name in ("add", "update"):
        parser = actions.add_parser(name, help=f"{name} a device")
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
    deactivate = actions.add_parser("deactivate", help="deactivate a device (history stays)")
    deactivate.add_argument("id")


def _expires_at(text: str) -> str:
    """--expires-at, checked before anything is sent (argparse prints the reason, exit 2)."""
    if text == "never":
        return text
    try:
        return rfc3339.format_time(rfc3339.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _token(env: dict[str, str]) -> str | None:
    token = env.get(TOKEN_ENV)
    if token:
        return token.strip()
    local = Path("tiktokguard-state") / "admin.token"
    try:
        return local.read_text().strip() or None
    except OSError:
        return None


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


def _table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, list):
            return printable(",".join(value)) or "-"
        if value is None:
            return "-"
        return printable(str(value))
    grid = [list(TABLE_COLUMNS)] + [[cell(r.get(c)) for c in TABLE_COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
                     for row in grid)


def _details(device: dict[str, Any], audit: list[dict[str, Any]]) -> str:
    lines = [f"{key:11} {printable(', '.join(v) if isinstance(v, list) else str(v))}"
             for key, v in device.items()]
    lines.append("")
    lines.append("audit:")
    for entry in audit:
        lines.append(f"  {entry['at']}  {printable(entry['actor']):12} {entry['action']}")
    return "\n".join(lines)


async def _call(args: argparse.Namespace, token: str) -> tuple[int, Any]:
    base = args.api.rstrip("/") + "/api/v1"
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        async def request(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            async with http.request(method, base + path, json=body) as response:
                try:
                    data = await response.json(content_type=None)
                except (json.JSONDecodeError, aiohttp.ContentTypeError):
                    data = {"error": await response.text(), "field": None}
                return response.status, data

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


def run(args: argparse.Namespace) -> int:
    token = _token(dict(os.environ))
    if token is None:
        print(f"tiktokguard: no API token: set ${TOKEN_ENV} (or run where "
              "tiktokguard-state/admin.token is readable)", file=sys.stderr)
        return 2
    try:
        status, data = asyncio.run(_call(args, token))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(f"tiktokguard: cannot reach the API at {args.api}: {exc}", file=sys.stderr)
        return 2
    if status >= 400:
        field = f" (field: {data.get('field')})" if data.get("field") else ""
        print(f"tiktokguard: {status}: {data.get('error')}{field}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    elif args.action == "list":
        print(_table(data))
    elif args.action == "show":
        print(_details(data["device"], data["audit"]))
    else:
        print(_table([data]))
    return 0
