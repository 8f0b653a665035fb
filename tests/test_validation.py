"""Bad input gets an answer that names the field or key, and nothing is stored."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.fakes import FakeUpstream
from tests.test_api import PHONE, Api, api  # noqa: F401  (the api fixture)
from tiktokguard.config import ConfigError, load_config


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at", "has passed"),
    ({"macs": ["01:00:5e:00:00:01"], "addresses": []}, "macs", "multicast"),
    ({"macs": ["ff:ff:ff:ff:ff:ff"], "addresses": []}, "macs", "multicast"),
    ({"macs": ["00:00:00:00:00:00"], "addresses": []}, "macs", "no device"),
    ({"addresses": ["10.20.30.40"]}, "addresses", "dns.allow_clients"),
])
async def test_a_device_that_could_never_be_exempt_is_refused(
        api: Api, change: dict[str, object], field: str, words: str) -> None:  # noqa: F811
    status, body = await api.call("POST", "/api/v1/devices", json={**PHONE, **change})
    assert status == 400 and body["field"] == field and words in body["error"], body
    _status, listing = await api.call("GET", "/api/v1/devices")
    assert listing["devices"] == []  # nothing stored


@pytest.mark.parametrize("path", ["/api/v1/incidents", "/api/v1/audit"])
@pytest.mark.parametrize(("param", "value"), [
    ("limit", "%C2%B2"),  # "²": str.isdigit() says yes, int() says no
    ("limit", "9" * 5000),  # int() refuses more than 4 300 digits
    ("offset", "%D9%A1"),  # an Arabic-Indic one
    ("limit", "-1"), ("limit", "1.5"), ("limit", "0"), ("limit", "1001"), ("offset", ""),
    ("offset", "1e3"), ("limit", "%201"),
])
async def test_numeric_query_parameters_are_400_naming_the_field(
        api: Api, path: str, param: str, value: str) -> None:  # noqa: F811
    status, body = await api.call("GET", f"{path}?{param}={value}")
    assert status == 400 and body["field"] == param, body


async def test_decision_refuses_a_url_with_a_hint(api: Api) -> None:  # noqa: F811
    status, body = await api.call(
        "GET", "/api/v1/decision?client=127.0.0.5&name=https%3A%2F%2Fwww.tiktok.com%2F%40u")
    assert status == 400 and body["field"] == "name"
    assert "'www.tiktok.com'" in body["error"]


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tg.toml"
    path.write_text(text)
    return path


UPSTREAM = '[dns]\nupstreams = ["192.0.2.1"]\n'


@pytest.mark.parametrize(("text", "words"), [
    (UPSTREAM + '[policy]\nmanaged_networks = ["10.0.0.0/8"]\n',
     r"\[policy\] managed_networks\[0\]: 10\.0\.0\.0/8 is not inside \[dns\] allow_clients"),
    (UPSTREAM + 'listen = ["127.0.0.1:5300", "127.0.0.1:5300"]\n',
     r"\[dns\] listen\[1\]: 127\.0\.0\.1:5300 is listen\[0\] again"),
    (UPSTREAM + '[http]\ntokens.it = { role = "admin", sha256 = "' + "0" * 64 + '" }\n',
     r"\[http\] tokens: \.it\.sha256: 00000000\.\.\. is a placeholder"),
])
def test_config_mistakes_are_errors_naming_the_key(tmp_path: Path, text: str,
                                                    words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(config(tmp_path, text))


def test_a_real_token_hash_is_accepted(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"a real token").hexdigest()
    path = config(tmp_path, UPSTREAM + f'[http]\ntokens.it = {{ role = "admin", '
                            f'sha256 = "{digest}" }}\n')
    assert load_config(path).http.tokens["it"].sha256 == digest


async def test_personal_tokens_are_shown_once_and_revoked_everywhere(
        api: Api, upstream: FakeUpstream) -> None:  # noqa: F811
    status, created = await api.call("POST", "/api/v1/tokens",
                                     json={"name": "jane.doe", "role": "viewer"})
    assert status == 201 and len(created["token"]) > 30
    status, listing = await api.call("GET", "/api/v1/tokens")
    names = {t["name"]: t for t in listing["tokens"]}
    assert names["jane.doe"]["source"] == "store" and "token" not in names["jane.doe"]
    assert names["it-support"]["source"] == "config"
    status, _ = await api.call("GET", "/api/v1/devices", token=created["token"])
    assert status == 200  # works at once
    status, body = await api.call("POST", "/api/v1/tokens",
                                  json={"name": "jane.doe", "role": "admin"})
    assert status == 409 and body["field"] == "name"
    status, body = await api.call("DELETE", "/api/v1/tokens/it-support")
    assert status == 409 and "configured in the file" in body["error"]
    status, _ = await api.call("DELETE", "/api/v1/tokens/jane.doe")
    assert status == 200
    status, _ = await api.call("GET", "/api/v1/devices", token=created["token"])
    assert status == 401  # revoked at once
    assert api.tg.metrics.sample("tiktokguard_api_auth_failures_total") >= 1
