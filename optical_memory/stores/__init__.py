"""Where sessions live: the embedded SQLite file (default) or Redis, behind one interface."""

from __future__ import annotations

import os
from pathlib import Path

from optical_memory.stores.base import (
    CacheLimits,
    NewTurn,
    SessionInfo,
    Store,
    StoreError,
    StoreUnavailableError,
    Turn,
    TurnConflictError,
)

__all__ = [
    "CacheLimits",
    "NewTurn",
    "SessionInfo",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "Turn",
    "TurnConflictError",
    "default_path",
    "open_store",
]


def default_path() -> Path:
    """The embedded store's file: $OPTICAL_MEMORY_HOME, else the XDG data directory."""
    home = os.environ.get("OPTICAL_MEMORY_HOME")
    if home:
        return Path(home).expanduser() / "memory.sqlite3"
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "optical-memory" / "memory.sqlite3"


def open_store(
    store: str | os.PathLike | Store | None = None, cache: CacheLimits | None = None
) -> Store:
    """A store from a URL or path.

    None: the embedded default file. `redis://host:port/db` (or `rediss://`): Redis.
    `sqlite:///path`, or any other string: an SQLite file at that path.
    """
    if isinstance(store, Store):
        return store
    if store is None:
        from optical_memory.stores.sqlite import SQLiteStore

        return SQLiteStore(default_path(), cache=cache)
    text = os.fspath(store)
    if text.startswith(("redis://", "rediss://", "unix://")):
        from optical_memory.stores.redis import RedisStore

        return RedisStore(text, cache=cache)
    from optical_memory.stores.sqlite import SQLiteStore

    return SQLiteStore(text.removeprefix("sqlite://"), cache=cache)
