"""Lists from URLs: fetched with aiohttp, refreshed on a schedule with conditional GETs, and kept
in the state folder so that the last good copy is in force at start even when the source is down.

Each URL list has two files under `<state dir>/lists/`: its copy (`<hash>.txt`, what the list
loader reads, see config.url_list) and its metadata (`<hash>.json`: ETag, Last-Modified, when it
was fetched and checked). A fetch that fails, or whose body is not a usable list (too large, not
UTF-8, no entries at all: an HTML error page), keeps the copy in force; it is logged when the
state changes, counted, and shown by /readyz. So does a redirect away from the list's origin
(`redirect_refused`): to clear text, or to another host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yarl

from tiktokguard.logs import get_logger
from tiktokguard.metrics import Metrics
from tiktokguard.policy.domains import ListSource, parse_list

MAX_LIST_BYTES = 64 * 1024 * 1024
FETCH_TIMEOUT = 30.0
RETRY_SECONDS = 300.0  # after a failure, tried again this soon (or at the refresh, if sooner)
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
log = get_logger("tiktokguard.lists")


@dataclass(slots=True)
class _State:
    checked_at: float = 0.0  # last successful fetch or 304
    failed_at: float = 0.0
    error: str | None = None


class ListFetcher:
    """Keeps every URL list's copy current. `changed` is awaited after a copy was replaced (the
    daemon reloads the lists then)."""

    def __init__(self, sources: Callable[[], tuple[ListSource, ...]],
                 refresh: Callable[[], int], metrics: Metrics,
                 changed: Callable[[str], Awaitable[object]],
                 clock: Callable[[], float] = time.time) -> None:
        self.sources = sources
        self.refresh = refresh
        self.metrics = metrics
        self.changed = changed
        self.clock = clock
        self.state: dict[str, _State] = {}
        self.wake = asyncio.Event()

    def errors(self) -> dict[str, str]:
        """URL → why its last fetch failed, for the URLs whose last fetch failed."""
        urls = {s.url for s in self.sources() if s.url}
        return {url: st.error for url, st in self.state.items() if st.error and url in urls}

    def _urls(self) -> list[ListSource]:
        return [s for s in self.sources() if s.url]

    @staticmethod
    def _session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT))

    async def fetch_all(self, missing_only: bool = False) -> bool:
        """Fetch every URL list now (or only those with no copy yet); True if any changed.
        Does not call `changed`: the caller loads the lists."""
        changed = False
        async with self._session() as http:
            for source in self._urls():
                if not missing_only or not source.path.exists():
                    changed |= await self.fetch(http, source, notify=False)
        return changed

    async def run(self) -> None:
        async with self._session() as http:
            while True:
                now = self.clock()
                wait = 3600.0
                for source in self._urls():
                    due = self._due(source)
                    if due <= now:
                        try:
                            await self.fetch(http, source)
                        except Exception as exc:  # never a refresher that dies silently
                            self._failed(source, self.state.setdefault(source.url, _State()),
                                         f"{type(exc).__name__}: {exc}")
                        due = self._due(source)
                    wait = min(wait, max(1.0, due - self.clock()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self.wake.wait()  # (a reload may have added URLs)
                self.wake.clear()

    def _due(self, source: ListSource) -> float:
        """When the list is to be fetched next: at once when there is no copy (or, after a
        failure, RETRY_SECONDS later), else at its refresh, or sooner after a failure."""
        state = self.state.get(source.url)
        if state is None:
            state = self.state[source.url] = _State(
                checked_at=float(_meta(source).get("checked_at", 0.0)))
        if not source.path.exists():
            return state.failed_at + RETRY_SECONDS if state.error is not None else 0.0
        due = state.checked_at + self.refresh()
        if state.error is not None:
            due = min(due, state.failed_at + RETRY_SECONDS)
        return due

    async def fetch(self, http: aiohttp.ClientSession, source: ListSource,
                    notify: bool = True) -> bool:
        """Fetch one list now; True when its copy was replaced (then `changed` is awaited,
        unless notify is False)."""
        state = self.state.setdefault(source.url, _State())
        meta = _meta(source)
        headers = {}
        if source.path.exists():  # conditional only when there is a copy to keep
            if meta.get("etag"):
                headers["If-None-Match"] = meta["etag"]
            if meta.get("last_modified"):
                headers["If-Modified-Since"] = meta["last_modified"]
        try:
            url = yarl.URL(source.url)
            for _hop in range(MAX_REDIRECTS + 1):
                async with http.get(url, headers=headers, allow_redirects=False) as response:
                    if response.status in REDIRECTS and "Location" in response.headers:
                        target = url.join(yarl.URL(response.headers["Location"]))
                        refused = redirect_refused(url, target)
                        if refused is not None:
                            raise ListFetchError(f"redirect to {target} refused: {refused}")
                        url = target
                        continue
                    if response.status == 304:
                        body = None
                    elif response.status == 200:
                        body = await _read_capped(response)
                    else:
                        raise ListFetchError(f"HTTP {response.status}")
                    etag = response.headers.get("ETag")
                    last_modified = response.headers.get("Last-Modified")
                    break
            else:
                raise ListFetchError(f"more than {MAX_REDIRECTS} redirects")
            if body is not None:
                await asyncio.to_thread(_store, source, body)
        except (ListFetchError, aiohttp.ClientError, TimeoutError, OSError,
                UnicodeDecodeError) as exc:
            self._failed(source, state, _describe(exc))
            return False
        now = self.clock()
        meta.update(checked_at=now)
        if body is not None:
            meta.update(etag=etag, last_modified=last_modified, fetched_at=now)
        await asyncio.to_thread(_write_meta, source, meta)
        state.checked_at, state.error = now, None
        if body is None:
            return False
        log.info("blocklist_fetched", list=source.url, bytes=len(body))
        if notify:
            await self.changed(f"list fetched: {source.url}")
        return True

    def _failed(self, source: ListSource, state: _State, error: str) -> None:
        self.metrics.list_fetch_errors.labels(source.url).inc()
        if error != state.error:  # said when it changes, not at every retry
            log.error("blocklist_fetch_failed", list=source.url, error=error,
                      kept="the last good copy" if source.path.exists() else "nothing yet",
                      retry_seconds=RETRY_SECONDS)
        state.error, state.failed_at = error, self.clock()


class ListFetchError(Exception):
    pass


def redirect_refused(current: yarl.URL, target: yarl.URL) -> str | None:
    """Why a list's redirect is not followed, or None. Only within the same origin (scheme,
    host, port), or from http:// up to https:// on the same host: a list asked for over TLS
    never arrives in the clear, nor from a host the admin did not name."""
    if target.scheme not in ("http", "https"):
        return "not an http(s) URL"
    if (target.host or "").lower() != (current.host or "").lower():
        return f"another host than {current.host}"
    if current.scheme == "https" and target.scheme != "https":
        return "from https:// to clear text"
    if target.scheme == current.scheme and target.port != current.port:
        return "another port"
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {FETCH_TIMEOUT:g} s"
    return str(exc) or type(exc).__name__


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    length = response.content_length
    if length is not None and length > MAX_LIST_BYTES:
        raise ListFetchError(f"list larger than {MAX_LIST_BYTES} bytes")
    chunks = []
    size = 0
    async for chunk in response.content.iter_chunked(256 * 1024):
        size += len(chunk)
        if size > MAX_LIST_BYTES:
            raise ListFetchError(f"list larger than {MAX_LIST_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _store(source: ListSource, body: bytes) -> None:
    """Check the body is a usable list, then replace the copy atomically (a crash leaves the
    old copy or the new one, never half of one)."""
    parsed = parse_list(body.decode("utf-8"), source.url, "remote")
    if not parsed.blocks and not parsed.allows:
        raise ListFetchError("no list entries in the response (an error page?); copy kept")
    source.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _atomic_write(source.path, body)


def _meta_path(source: ListSource) -> Path:
    return source.path.with_suffix(".json")


def _meta(source: ListSource) -> dict[str, Any]:
    try:
        data = json.loads(_meta_path(source).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("url") == source.url else {}


def _write_meta(source: ListSource, meta: dict[str, Any]) -> None:
    meta["url"] = source.url
    source.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _atomic_write(_meta_path(source), json.dumps(meta).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


__all__ = ["MAX_LIST_BYTES", "ListFetcher"]
