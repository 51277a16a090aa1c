"""Where sessions live: the embedded SQLite file (default) or Redis, behind one interface."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from optical_memory.stores.base import (
    CacheLimits,
    DataLossError,
    NewTurn,
    SessionInfo,
    Store,
    StoreConfigError,
    StoreError,
    StoreUnavailableError,
    StoreWarning,
    Turn,
    TurnConflictError,
)

__all__ = [
    "STORE_ENV",
    "STORE_FORMS",
    "CacheLimits",
    "DataLossError",
    "NewTurn",
    "SessionInfo",
    "Store",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailableError",
    "StoreWarning",
    "Turn",
    "TurnConflictError",
    "default_path",
    "open_store",
    "parse_store_url",
]


def default_path() -> Path:
    """The embedded store's file: $OPTICAL_MEMORY_HOME, else the XDG data directory."""
    home = os.environ.get("OPTICAL_MEMORY_HOME")
    if home:
        return Path(home).expanduser() / "memory.sqlite3"
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "optical-memory" / "memory.sqlite3"


STORE_ENV = "OPTICAL_MEMORY_STORE"
STORE_FORMS = (
    "redis://[:password@]host[:port][/db][?cache=DB|URL], rediss://... (TLS), "
    "redis+cluster://[:password@]host:port[?cache=URL] (a Redis Cluster, any node), "
    "unix:///path/to/redis.sock, "
    "sqlite:///absolute/path, sqlite://relative/path, or a file path"
)
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_NEAR_SCHEME = re.compile(
    r"(redis|rediss|unix|sqlite|redis\+cluster|rediss\+cluster):(?!//)", re.IGNORECASE
)


def parse_store_url(store: str | os.PathLike) -> tuple[str, str]:
    """("redis", url) or ("sqlite", path) for a store URL or path; ValueError naming the URL
    and the valid forms for anything else (an unknown scheme, `redis:host:6379/0` without
    the `//`, a bad port or database number, an empty path)."""
    if not isinstance(store, str):  # a path object is a path, whatever its characters
        return "sqlite", os.fspath(store)

    def bad(why: str) -> ValueError:
        shown = re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", store)  # no password in messages
        return ValueError(f"invalid store URL {shown!r}: {why}; valid forms: {STORE_FORMS}")

    if not store.strip():
        raise bad("it is empty")
    match = _SCHEME.match(store)
    if match is None:
        near = _NEAR_SCHEME.match(store)
        if near:
            raise bad(f"'{near.group(1)}:' must be followed by '//'")
        return "sqlite", store
    scheme = match.group(1).lower()
    rest = store[match.end() :]
    store = f"{scheme}://{rest}"
    if scheme == "sqlite":
        if not rest or rest == "/":
            raise bad("no file path after 'sqlite://'")
        return "sqlite", rest
    if scheme not in _REDIS_SCHEMES:
        raise bad(f"unknown scheme {scheme + '://'!r}")
    parts = urlsplit(store)
    if scheme == "unix":
        if not parts.path or parts.path == "/":
            raise bad("no socket path after 'unix://'")
    else:
        try:
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
        except ValueError:
            raise bad("the port must be a number from 0 to 65535") from None
        if not re.fullmatch(r"/?(\d+/?)?", parts.path):
            raise bad(f"the database must be a number, got {parts.path.lstrip('/')!r}")
        if scheme.endswith("+cluster") and parts.path.strip("/") not in ("", "0"):
            raise bad("a Redis Cluster has database 0 only")
    query = parse_qsl(parts.query, keep_blank_values=True)
    caches = [value for key, value in query if key == "cache"]
    if len(caches) > 1:
        raise bad("'cache=' is given more than once")
    if caches and caches[0].isdigit() and scheme.endswith("+cluster"):
        raise bad("'cache=' of a Redis Cluster takes a URL: a cluster has database 0 only")
    if caches and not caches[0].isdigit():
        try:
            kind, _ = parse_store_url(caches[0])
        except ValueError:
            kind = ""
        if kind != "redis" or "cache=" in urlsplit(caches[0]).query:
            raise bad(
                "'cache=' takes a database number or a redis://, rediss://, unix:// or "
                "redis+cluster:// URL "
                "(percent-encoded if it has a query of its own), without a cache of its own"
            )
    return "redis", store


def open_store(
    store: str | os.PathLike | Store | None = None,
    cache: CacheLimits | None = None,
    cache_url: str | None = None,
) -> Store:
    """A store from a URL or path; see `parse_store_url` (nothing is created for a bad one).

    None: $OPTICAL_MEMORY_STORE if set, else the embedded default file (`default_path`).
    `redis://host:port/db`, `rediss://...` or `unix:///socket`: Redis;
    `redis+cluster://host:port`: a Redis Cluster (see `RedisStore`). `sqlite:///abs/path`,
    `sqlite://relative/path` or a plain path: an SQLite file there.

    `cache_url` (Redis only; in a URL also `?cache=...`): where the vision-token cache lives
    when not beside the turn log, a Redis URL or a database number on the same server; see
    `RedisStore`.
    """
    if isinstance(store, Store):
        if cache_url is not None:
            raise ValueError("cache_url= applies to a store opened from a URL, not to a Store")
        return store
    if store is None:
        store = os.environ.get(STORE_ENV) or None
        if store is None:
            if cache_url is not None:
                raise ValueError("cache_url= is for Redis stores; the default store is SQLite")
            from optical_memory.stores.sqlite import SQLiteStore

            return SQLiteStore(default_path(), cache=cache)
        try:
            kind, target = parse_store_url(store)
        except ValueError as exc:
            raise ValueError(f"${STORE_ENV}: {exc}") from None
    else:
        kind, target = parse_store_url(store)
    if kind == "redis":
        from optical_memory.stores.redis import RedisStore

        return RedisStore(target, cache=cache, cache_url=cache_url)
    if cache_url is not None:
        raise ValueError("cache_url= is for Redis stores: an SQLite store keeps its cache inside")
    from optical_memory.stores.sqlite import SQLiteStore

    return SQLiteStore(target, cache=cache)
