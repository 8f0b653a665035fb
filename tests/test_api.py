"""The HTTP API over real HTTP, with its effect checked over real DNS sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.conftest import DEVICE_IP, Running, running_daemon
from tests.daemons import communicate
from tests.fakes import FakeUpstream
from tiktokguard.api.app import ROUTES

ADMIN, VIEWER = "admin-secret-token", "viewer-secret-token"
TOKENS = (f'[http]\ntokens.it-support = {{ role = "admin", sha256 = '
          f'"{hashlib.sha256(ADMIN.encode()).hexdigest()}" }}\n'
          f'tokens.soc = {{ role = "viewer", sha256 = '
          f'"{hashlib.sha256(VIEWER.encode()).hexdigest()}" }}')
PHONE = {"name": "Comms TikTok phone 1", "addresses": [DEVICE_IP], "macs": [],
         "custodian": "Jane Custodian", "supervisor": "Sam Supervisor", "ticket": "SR-2024-0042",
         "location": "Comms security zone, room B1.23"}


class Api:
    def __init__(self, tg: Running, session: aiohttp.ClientSession) -> None:
        self.tg = tg
        self.base = f"http://127.0.0.1:{tg.http_port}"
        self.session = session

    async def call(self, method: str, path: str, token: str | None = ADMIN,
                   json: Any = None, data: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, self.base + path, json=json, data=data,
                                        headers=all_headers) as response:
            body = await response.json(content_type=None) if response.status != 204 else None
            return response.status, body


@pytest.fixture
async def api(tmp_path: Path, upstream: FakeUpstream, store_dsn: str | None
              ) -> AsyncIterator[Api]:
    """The daemon's API over HTTP, on each store (SQLite, and a PostgreSQL database)."""
    async with running_daemon(tmp_path, [upstream.address], extra=TOKENS, http=True,
                              store_dsn=store_dsn) as tg, aiohttp.ClientSession() as session:
        yield Api(tg, session)


async def blocked(tg: Running, source: str = DEVICE_IP) -> bool:
    reply = await tg.ask("www.tiktok.com", source=source)
    return reply.authority[0].name.to_text() == "tiktok.com."


async def test_device_lifecycle_changes_dns_on_the_next_query(api: Api) -> None:
    assert await blocked(api.tg)
    status, device = await api.call("POST", "/api/v1/devices", json=PHONE)
    assert status == 201, device
    assert device["active"] is True and device["addresses"] == [DEVICE_IP]
    assert not await blocked(api.tg)
    status, same = await api.call("GET", f"/api/v1/devices/{device['id']}", token=VIEWER)
    assert status == 200 and same == device
    status, gone = await api.call("DELETE", f"/api/v1/devices/{device['id']}")
    assert status == 200 and gone["active"] is False
    assert await blocked(api.tg)
    # Deactivation keeps the record.
    status, listing = await api.call("GET", "/api/v1/devices", token=VIEWER)
    assert [d["id"] for d in listing["devices"]] == [device["id"]]
    status, active = await api.call("GET", "/api/v1/devices?active=true", token=VIEWER)
    assert active["devices"] == []


async def test_expired_device_is_blocked_and_expiry_audited_once(api: Api) -> None:
    status, device = await api.call("POST", "/api/v1/devices", json=PHONE)
    assert not await blocked(api.tg)
    status, updated = await api.call("PATCH", f"/api/v1/devices/{device['id']}",
                                     json={"expires_at": "2020-01-01T00:00:00Z"})
    assert status == 200 and updated["expired"] is True and updated["active"] is True
    assert await blocked(api.tg)
    service = api.tg.daemon.devices_service
    assert service is not None
    await service.audit_expiries()
    await service.audit_expiries()
    status, audit = await api.call("GET", f"/api/v1/audit?device_id={device['id']}")
    assert [e["action"] for e in audit["entries"]] == ["create", "update", "expire"]
    assert audit["entries"][2]["actor"] == "system"
    # A new term brings the exemption back.
    await api.call("PATCH", f"/api/v1/devices/{device['id']}",
                   json={"expires_at": "2999-01-01T00:00:00+02:00"})
    assert not await blocked(api.tg)


async def test_conflicting_address_or_mac_is_409(api: Api) -> None:
    first = {**PHONE, "addresses": ["127.0.0.96/29"], "macs": ["02:00:5e:00:00:01"]}
    status, device = await api.call("POST", "/api/v1/devices", json=first)
    assert status == 201
    for clash, field in (({"addresses": ["127.0.0.100"]}, "addresses"),
                         ({"addresses": ["127.0.0.0/24"]}, "addresses"),
                         ({"addresses": [], "macs": ["02005E000001"]}, "macs")):
        status, body = await api.call("POST", "/api/v1/devices", json={**PHONE, **clash})
        assert status == 409 and body["field"] == field, body
        assert device["id"] in body["error"]
    # Once the first is deactivated, its address may be given to another device.
    await api.call("DELETE", f"/api/v1/devices/{device['id']}")
    status, _ = await api.call("POST", "/api/v1/devices", json={**PHONE,
                                                               "addresses": ["127.0.0.100"]})
    assert status == 201
    # ...but reactivating the first now conflicts.
    status, body = await api.call("PATCH", f"/api/v1/devices/{device['id']}",
                                  json={"active": True})
    assert status == 409


@pytest.mark.parametrize(("change", "field"), [
    ({"name": ""}, "name"),
    ({"name": 5}, "name"),
    ({"custodian": None}, "custodian"),
    ({"ticket": "   "}, "ticket"),
    ({"addresses": "127.0.0.20"}, "addresses"),
    ({"addresses": ["not-an-ip"]}, "addresses"),
    ({"addresses": ["10.0.0.0/8"]}, "addresses"),
    ({"addresses": ["10.0.0.1/24"]}, "addresses"),
    ({"addresses": [], "macs": []}, "addresses"),
    ({"macs": ["zz:zz:zz:zz:zz:zz"]}, "macs"),
    ({"macs": [1]}, "macs"),
    ({"expires_at": "tomorrow"}, "expires_at"),
    ({"expires_at": "2027-01-01T00:00:00"}, "expires_at"),
    ({"expires_at": "2027-02-30T00:00:00Z"}, "expires_at"),
    ({"active": "yes"}, "active"),
    ({"id": "mine"}, "id"),
    ({"created_at": "2020-01-01T00:00:00Z"}, "created_at"),
    ({"colour": "red"}, "colour"),
    ({"location": "x" * 201}, "location"),
    ({"name": "a\nb"}, "name"),
])
async def test_bad_device_bodies_are_400_naming_the_field(api: Api, change: dict[str, Any],
                                                          field: str) -> None:
    status, body = await api.call("POST", "/api/v1/devices", json={**PHONE, **change})
    assert status == 400, body
    assert body["field"] == field and body["error"]


@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
async def test_non_object_bodies_are_400(api: Api, data: bytes) -> None:
    status, body = await api.call("POST", "/api/v1/devices", data=data,
                                  headers={"Content-Type": "application/json"})
    assert status == 400 and body["field"] is None


async def test_wrong_content_type_and_huge_body(api: Api) -> None:
    status, body = await api.call("POST", "/api/v1/devices", data=b"name=x",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400
    status, body = await api.call("POST", "/api/v1/devices", data=b"[" + b"1," * 40000 + b"1]",
                                  headers={"Content-Type": "application/json"})
    assert status == 413 and "larger than" in body["error"]


async def test_empty_patch_and_unknown_device(api: Api) -> None:
    status, device = await api.call("POST", "/api/v1/devices", json=PHONE)
    status, body = await api.call("PATCH", f"/api/v1/devices/{device['id']}", json={})
    assert status == 400
    for method in ("GET", "PATCH", "DELETE"):
        status, body = await api.call(method, "/api/v1/devices/dev-nope",
                                      json={"name": "x"} if method == "PATCH" else None)
        assert status == 404 and "dev-nope" in body["error"]


async def test_authentication_and_roles(api: Api) -> None:
    status, body = await api.call("GET", "/api/v1/devices", token=None)
    assert status == 401 and body["error"] == "missing bearer token"
    status, body = await api.call("GET", "/api/v1/devices", token="wrong")
    assert status == 401 and body["error"] == "unknown token"
    status, body = await api.call("GET", "/api/v1/devices", token=None,
                                  headers={"Authorization": f"Basic {ADMIN}"})
    assert status == 401
    status, body = await api.call("POST", "/api/v1/devices", token=VIEWER, json=PHONE)
    assert status == 403 and "viewer" in body["error"]
    for method, path in (("DELETE", "/api/v1/devices/x"), ("POST", "/api/v1/reload"),
                         ("PATCH", "/api/v1/devices/x")):
        status, _ = await api.call(method, path, token=VIEWER, json={})
        assert status == 403
    for path in ("/api/v1/devices", "/api/v1/audit", "/api/v1/incidents",
                 "/api/v1/decision?client=127.0.0.5&name=tiktok.com"):
        status, _ = await api.call("GET", path, token=VIEWER)
        assert status == 200, path
    for path in ("/healthz", "/readyz", "/openapi.json"):
        status, _ = await api.call("GET", path, token=None)
        assert status == 200, path


async def test_audit_records_actor_action_before_and_after(api: Api) -> None:
    with capture_logs() as logs:
        status, device = await api.call("POST", "/api/v1/devices", json=PHONE)
        assert status == 201
        await api.call("PATCH", f"/api/v1/devices/{device['id']}",
                       json={"custodian": "New Custodian", "macs": ["02:00:5e:00:00:09"]})
        await api.call("DELETE", f"/api/v1/devices/{device['id']}")
        await api.call("DELETE", f"/api/v1/devices/{device['id']}")  # no-op, not audited
    _status, audit = await api.call("GET", "/api/v1/audit", token=VIEWER)
    entries = audit["entries"]
    assert [(e["actor"], e["action"]) for e in entries] == [
        ("it-support", "create"), ("it-support", "update"), ("it-support", "deactivate")]
    assert entries[0]["before"] is None and entries[0]["after"]["custodian"] == "Jane Custodian"
    assert entries[1]["before"]["custodian"] == "Jane Custodian"
    assert entries[1]["after"]["custodian"] == "New Custodian"
    assert entries[1]["after"]["macs"] == ["02:00:5e:00:00:09"]
    assert entries[2]["before"]["active"] is True and entries[2]["after"]["active"] is False
    # Request logs name the actor, never the token.
    requests = [e for e in logs if e["event"] == "api_request"]
    assert {e["actor"] for e in requests} == {"it-support"}
    assert ADMIN not in repr(logs)


async def test_devices_survive_a_restart(tmp_path: Path, upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address], extra=TOKENS, http=True) as tg, \
            aiohttp.ClientSession() as session:
        status, device = await Api(tg, session).call("POST", "/api/v1/devices", json=PHONE)
        assert status == 201
    async with running_daemon(tmp_path, [upstream.address], extra=TOKENS, http=True) as tg, \
            aiohttp.ClientSession() as session:
        status, again = await Api(tg, session).call("GET", f"/api/v1/devices/{device['id']}")
        assert status == 200 and again == device
        assert not await blocked(tg)
        status, audit = await Api(tg, session).call("GET", "/api/v1/audit")
        assert len(audit["entries"]) == 1


async def test_decision_explains(api: Api) -> None:
    status, device = await api.call("POST", "/api/v1/devices", json=PHONE)
    assert status == 201
    status, body = await api.call("GET", f"/api/v1/decision?client={DEVICE_IP}&name=WWW.tiktok.com")
    assert body["decision"] == "allowlisted" and body["rule"] == "tiktok.com"
    assert body["device"] == {"id": device["id"], "name": PHONE["name"]}
    status, body = await api.call("GET", "/api/v1/decision?client=127.0.0.5&name=cdn.douyin.com")
    assert (body["decision"], body["client_class"], body["rule"]) == ("blocked", "managed",
                                                                     "douyin.com")
    for query, field in (("client=nope&name=a", "client"), ("client=127.0.0.5", "name"),
                         ("client=127.0.0.5&name=a..b", "name"),
                         ("client=127.0.0.5&name=a&mac=zz", "mac"),
                         ("client=127.0.0.5&name=a&mac=", "mac")):  # (st run found it)
        status, body = await api.call("GET", f"/api/v1/decision?{query}")
        assert status == 400 and body["field"] == field


async def test_reload_endpoint(tmp_path: Path, upstream: FakeUpstream) -> None:
    lists = tmp_path / "l.txt"
    lists.write_text("tiktok.com\n")
    extra = TOKENS + f'\n[policy]\nblocklists = ["{lists}"]'
    async with running_daemon(tmp_path, [upstream.address], extra=extra, http=True) as tg, \
            aiohttp.ClientSession() as session:
        api = Api(tg, session)
        lists.write_text("tiktok.com\ncapcut.com\n")
        status, body = await api.call("POST", "/api/v1/reload")
        assert status == 200 and body["rules"] == 2
        lists.write_text("nonsense here\n")
        status, body = await api.call("POST", "/api/v1/reload")
        assert status == 422 and "l.txt:1" in body["error"]
        status, body = await api.call("GET", "/readyz", token=None)
        assert status == 503


async def test_paging_parameters_are_validated(api: Api) -> None:
    for query in ("limit=0", "limit=abc", "offset=-1", "since=yesterday"):
        status, body = await api.call("GET", f"/api/v1/audit?{query}")
        assert status == 400, query
    status, body = await api.call("GET", "/api/v1/devices?active=maybe")
    assert status == 400 and body["field"] == "active"


async def test_unknown_route_and_method_are_json(api: Api) -> None:
    status, body = await api.call("GET", "/api/v1/nope")
    assert status == 404 and body["error"]
    status, body = await api.call("PUT", "/api/v1/devices")
    assert status == 405 and body["error"]


async def test_openapi_document_matches_routes(api: Api) -> None:
    _status, doc = await api.call("GET", "/openapi.json", token=None)
    assert doc["openapi"].startswith("3.")
    documented = {(method.upper(), path) for path, item in doc["paths"].items()
                  for method in item}
    served = {(method, path) for method, path, _handler in ROUTES}
    assert documented == served
    from openapi_spec_validator import validate
    validate(doc)


async def test_metrics_can_require_a_token(tmp_path: Path, upstream: FakeUpstream) -> None:
    extra = TOKENS + "\nmetrics_token = true"
    async with running_daemon(tmp_path, [upstream.address], extra=extra, http=True) as tg, \
            aiohttp.ClientSession() as session:
        api = Api(tg, session)
        status, _ = await api.call("GET", "/metrics", token=None)
        assert status == 401
        async with session.get(api.base + "/metrics",
                               headers={"Authorization": f"Bearer {VIEWER}"}) as response:
            assert response.status == 200
            assert "tiktokguard_dns_queries_total" in await response.text()


async def test_embedded_default_creates_an_admin_token_once(tmp_path: Path,
                                                            upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address], http=True) as tg, \
            aiohttp.ClientSession() as session:
        path = tg.daemon.token_file
        assert path == tmp_path / "state" / "admin.token"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        token = path.read_text().strip()
        status, _ = await Api(tg, session).call("POST", "/api/v1/devices", token=token,
                                                json=PHONE)
        assert status == 201
        stored = await tg.daemon.store.tokens()  # type: ignore[union-attr]
        assert token not in repr(stored)  # only the hash is kept
    async with running_daemon(tmp_path, [upstream.address], http=True) as tg, \
            aiohttp.ClientSession() as session:
        assert tg.daemon.token_file is None  # not created (nor printed) again
        status, _ = await Api(tg, session).call("GET", "/api/v1/devices", token=token)
        assert status == 200


async def run_cli(*args: str, token: str, cwd: Path) -> tuple[int, str, str]:
    env = dict(os.environ, TIKTOKGUARD_TOKEN=token)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tiktokguard", "devices", *args, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await communicate(proc, what=f"tiktokguard devices {' '.join(args)}")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_devices_cli(api: Api, tmp_path: Path) -> None:
    base = ["--api", api.base]
    code, out, err = await run_cli(*base, "--json", "add", "--name", "Phone 7", "--address",
                                   DEVICE_IP, "--mac", "02-00-5E-00-00-07", "--custodian", "Jo",
                                   "--supervisor", "Sam", "--ticket", "SR-7", token=ADMIN,
                                   cwd=tmp_path)
    assert code == 0, err
    import json
    device = json.loads(out)
    assert device["macs"] == ["02:00:5e:00:00:07"]
    assert not await blocked(api.tg)
    code, out, _ = await run_cli(*base, "list", token=VIEWER, cwd=tmp_path)
    assert code == 0 and device["id"] in out and "Phone 7" in out
    assert out.splitlines()[0].split()[:3] == ["id", "name", "state"]
    assert "  active  " in out.splitlines()[1]
    code, out, _ = await run_cli(*base, "update", device["id"], "--custodian", "Kim",
                                 token=ADMIN, cwd=tmp_path)
    assert code == 0
    code, out, _ = await run_cli(*base, "show", device["id"], token=VIEWER, cwd=tmp_path)
    assert "custodian   Kim" in out and "update" in out
    code, out, err = await run_cli(*base, "deactivate", device["id"], token=VIEWER, cwd=tmp_path)
    assert code == 1 and "403" in err
    code, out, _ = await run_cli(*base, "deactivate", device["id"], token=ADMIN, cwd=tmp_path)
    assert code == 0 and await blocked(api.tg)
    code, out, err = await run_cli(*base, "add", "--name", "x", token=ADMIN, cwd=tmp_path)
    assert code == 1 and "400" in err and "field" in err
    code, out, err = await run_cli("--api", "http://127.0.0.1:9", "list", token=ADMIN,
                                   cwd=tmp_path)
    assert code == 2 and "cannot reach" in err
