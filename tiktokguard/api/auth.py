"""API bearer tokens: only their SHA-256 is kept; comparisons are constant-time.

Tokens come from the config (`[http.tokens.NAME]`, role and sha256). With none configured, the
first start creates an admin token: its hash goes into the store, the token itself into a 0600
file in the state folder, whose path is printed once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tiktokguard.devices.model import ValidationError, format_time, now_utc
from tiktokguard.devices.service import Conflict, NotFound
from tiktokguard.devices.store import Store
from tiktokguard.logs import get_logger

ROLES = ("viewer", "admin")
GENERATED_NAME = "admin"
TOKEN_FILE = "admin.token"
TOKEN_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
log = get_logger("tiktokguard.api")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenTable:
    def __init__(self, tokens: dict[str, tuple[str, str]]) -> None:
        # name → (role, sha256 hex)
        self.tokens = {name: (role, bytes.fromhex(digest)) for name, (role, digest)
                       in tokens.items()}

    @classmethod
    def merged(cls, table: TokenTable, configured: dict[str, tuple[str, str]]) -> TokenTable:
        """table's tokens with the configured ones (which win on a name)."""
        merged = cls(configured)
        for name, entry in table.tokens.items():
            merged.tokens.setdefault(name, entry)
        return merged

    def authenticate(self, token: str) -> tuple[str, str] | None:
        """(name, role) of the token, or None. Every entry is compared, match or not."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for name, (role, expected) in self.tokens.items():
            if hmac.compare_digest(digest, expected):
                found = (name, role)
        return found


def role_allows(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


def _write_token_file(state_dir: Path, token: str) -> Path:
    """Write the token readable by its owner only (0600, never through a symlink)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / TOKEN_FILE
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    return path


async def ensure_tokens(store: Store, configured: dict[str, tuple[str, str]], state_dir: Path
                        ) -> tuple[TokenTable, Path | None]:
    """The token table in force (configured and stored tokens; a name in both is the
    configured one), and the path of a newly created admin token file (or None): an admin token
    is generated only when there is no token at all."""
    stored = await store.tokens()
    if configured or stored:
        return TokenTable({**stored, **configured}), None
    token = secrets.token_urlsafe(32)
    path = await asyncio.to_thread(_write_token_file, state_dir, token)
    digest = token_hash(token)
    await store.add_token(GENERATED_NAME, "admin", digest, format_time(now_utc()) or "")
    return TokenTable({GENERATED_NAME: ("admin", digest)}), path


def new_token() -> tuple[str, str]:
    """A new token and its SHA-256 (only the latter is ever stored)."""
    token = secrets.token_urlsafe(32)
    return token, token_hash(token)


class TokenAdmin:
    """Personal tokens kept in the store (`tiktokguard tokens`, the API's /api/v1/tokens): the
    token is shown once, only its hash is kept; the token's name is the `actor` of every change
    made with it. Tokens in the config file are listed, but changed only there."""

    def __init__(self, store: Store, configured: Callable[[], dict[str, tuple[str, str]]],
                 reload: Callable[[], Awaitable[None]]) -> None:
        self.store = store
        self.configured = configured
        self.reload = reload

    async def list(self) -> list[dict[str, str | None]]:
        stored: list[dict[str, str | None]] = [{**t, "source": "store"}
                                               for t in await self.store.token_list()]
        configured = self.configured()
        stored = [t for t in stored if t["name"] not in configured]
        return sorted(stored + [{"name": n, "role": role, "created_at": None,
                                 "source": "config"} for n, (role, _h) in configured.items()],
                      key=lambda t: str(t["name"]))

    async def create(self, name: Any, role: Any, actor: str) -> str:
        """The new token (shown once). ValidationError, Conflict."""
        if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
            raise ValidationError("name", "token names are 1-64 letters, digits or _.@- "
                                          "(a person's name: it is the actor in the audit)")
        if role not in ROLES:
            raise ValidationError("role", f"expected one of {', '.join(ROLES)}")
        if name in self.configured():
            raise Conflict("name", f"token {name!r} is configured in the file")
        token, digest = new_token()
        if not await self.store.add_token(name, role, digest, format_time(now_utc()) or ""):
            raise Conflict("name", f"a token named {name!r} exists; revoke it first")
        await self.reload()
        log.info("token_created", name=name, role=role, actor=actor)
        return token

    async def revoke(self, name: str, actor: str) -> None:
        """NotFound, Conflict (configured in the file; the last admin token)."""
        if name in self.configured():
            raise Conflict("name", f"token {name!r} is configured in the file: remove it there")
        tokens = {t["name"]: t for t in await self.list()}
        if name not in tokens:
            raise NotFound(f"token {name}")
        admins = [n for n, t in tokens.items() if t["role"] == "admin"]
        if admins == [name]:
            raise Conflict("name", f"{name!r} is the last admin token: create another first")
        if not await self.store.delete_token(name):
            raise NotFound(f"token {name}")
        await self.reload()
        log.info("token_revoked", name=name, actor=actor)
