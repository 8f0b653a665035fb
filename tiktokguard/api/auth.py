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
import secrets
from pathlib import Path

from tiktokguard.devices.model import format_time, now_utc
from tiktokguard.devices.store import Store

ROLES = ("viewer", "admin")
GENERATED_NAME = "admin"
TOKEN_FILE = "admin.token"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenTable:
    def __init__(self, tokens: dict[str, tuple[str, str]]) -> None:
        # name → (role, sha256 hex)
        self.tokens = {name: (role, bytes.fromhex(digest)) for name, (role, digest)
                       in tokens.items()}

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
    """The token table in force, and the path of a newly created admin token file (or None)."""
    if configured:
        return TokenTable(configured), None
    stored = await store.tokens()
    if stored:
        return TokenTable(stored), None
    token = secrets.token_urlsafe(32)
    path = await asyncio.to_thread(_write_token_file, state_dir, token)
    digest = token_hash(token)
    await store.add_token(GENERATED_NAME, "admin", digest, format_time(now_utc()) or "")
    return TokenTable({GENERATED_NAME: ("admin", digest)}), path
