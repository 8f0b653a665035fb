"""schemathesis against /openapi.json: generated requests (valid and invalid) never get a 500 and
every response conforms to the documented schema. Runs against a real daemon over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from tests.conftest import running_daemon  # noqa: E402
from tests.fakes import FakeUpstream  # noqa: E402
from tests.test_api import ADMIN, TOKENS  # noqa: E402
from tiktokguard.api.openapi import openapi_document  # noqa: E402

schema = schemathesis.openapi.from_dict(openapi_document())
SECURED = {(method.upper(), path): bool(op.get("security"))
           for path, item in openapi_document()["paths"].items() for method, op in item.items()}


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A daemon with its HTTP API on its own event loop in a thread (schemathesis is sync)."""
    ready = threading.Event()
    stop: list[asyncio.Event] = []
    url: list[str] = []
    errors: list[BaseException] = []
    tmp_path: Path = tmp_path_factory.mktemp("schema")

    async def serve() -> None:
        upstream = await FakeUpstream().start()
        try:
            async with running_daemon(tmp_path, [upstream.address], extra=TOKENS,
                                      http=True) as tg:
                stop.append(asyncio.Event())
                url.append(f"http://127.0.0.1:{tg.http_port}")
                ready.set()
                await stop[0].wait()
        finally:
            upstream.close()

    def thread_main() -> None:
        try:
            loop = asyncio.new_event_loop()
            loop.run_until_complete(serve())
            loop.close()
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    assert ready.wait(30), "daemon did not start"
    if errors:
        raise errors[0]
    yield url[0]
    loop_stop = stop[0]
    with contextlib.suppress(RuntimeError):
        loop_stop._loop.call_soon_threadsafe(loop_stop.set)  # type: ignore[attr-defined]
    thread.join(30)


@schema.parametrize()
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_schema(case: schemathesis.Case, live_api: str) -> None:
    excluded = []
    if case.operation.path.startswith("/api/v1/devices") and case.method in ("POST", "PATCH"):
        # A device body that fits the schema may still be refused on purpose: a CIDR with host
        # bits set or wider than /16, or a second device on the same address (409). JSON
        # Schema cannot say that; every other check (no 500, responses as documented, invalid
        # input rejected) still runs here.
        excluded.append(positive_data_acceptance)
    # A generated bearer token is swapped for a real one; a case that leaves the header out on
    # purpose (a negative case for a secured route) is sent without one and must get a 401.
    headers = {}
    secured = SECURED.get((case.method.upper(), case.operation.path), False)
    if "Authorization" in (case.headers or {}) or not secured:
        headers["Authorization"] = f"Bearer {ADMIN}"
    case.call_and_validate(base_url=live_api, headers=headers, excluded_checks=excluded)
