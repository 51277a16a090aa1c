"""The store interface shared by the embedded SQLite store and the Redis store.

A store keeps three kinds of data per session:

- the turn log, the source of truth: turns in append order, each with a turn id
  that makes retries idempotent;
- page records: the immutable grouping of old turns into pages (JSON objects
  owned by `optical_memory.pages`), appended with a compare-and-set so that two
  writers can never seal overlapping pages;
- the vision-token cache: opaque byte values (framed by `optical_memory.cache`),
  bounded per session by bytes (least recently used first) and optionally by age.

Everything but the turn log is derived data and may be dropped at any time.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class StoreError(RuntimeError):
    """A store operation failed."""


class StoreUnavailableError(StoreError):
    """The store's server cannot be reached; nothing of the failed call is reported stored."""


class TurnConflictError(StoreError, ValueError):
    """A turn id was reused for a different turn."""


@dataclass(frozen=True)
class NewTurn:
    """A turn to append: the caller's message plus the id that makes a retry idempotent."""

    turn_id: str
    role: str
    content: str


@dataclass(frozen=True)
class Turn:
    """A stored turn. `index` is its position in the session (0-based, gap-free)."""

    index: int
    turn_id: str
    role: str
    content: str
    created: float

    def to_message(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}

    def to_json(self) -> dict[str, Any]:
        return {
            "turn_id": self.turn_id,
            "role": self.role,
            "content": self.content,
            "created": self.created,
        }


@dataclass(frozen=True)
class CacheLimits:
    """Bounds of the vision-token cache, per session.

    `max_bytes`: least recently used entries are evicted beyond this size.
    `ttl_s`: entries not used for this many seconds expire (None: never).
    """

    max_bytes: int = 256 * 1024 * 1024
    ttl_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"cache max_bytes must be positive, got {self.max_bytes}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError(f"cache ttl_s must be positive or None, got {self.ttl_s}")


@dataclass(frozen=True)
class SessionInfo:
    """Sizes and counters of one session."""

    turns: int
    pages: int
    cursor: int  # turns already considered for paging
    cache_entries: int
    cache_bytes: int
    cache_hits: int
    cache_misses: int
    turn_bytes: int


def same_turn(stored: Turn, new: NewTurn) -> bool:
    return stored.role == new.role and stored.content == new.content


def conflict(session_id: str, stored: Turn) -> TurnConflictError:
    return TurnConflictError(
        f"turn id {stored.turn_id!r} of session {session_id!r} is already stored "
        f"(turn {stored.index}, role {stored.role!r}) with different content"
    )


def session_key(session_id: str) -> str:
    """A fixed-length key for a session id: any id, whatever its characters, maps to its own key."""
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()[:32]


def now() -> float:
    return time.time()


class Store(ABC):
    """Persistent storage of sessions. Implementations are safe to share between threads."""

    url: str

    # --- turn log -------------------------------------------------------------------
    @abstractmethod
    def append(self, session_id: str, turns: Sequence[NewTurn]) -> list[Turn]:
        """Append `turns` atomically and durably, in order.

        A turn whose id is already stored is not stored again: its stored record is
        returned in its place (TurnConflictError if role or content differ).
        Returns the stored record of every turn passed, in order.
        """

    @abstractmethod
    def turns(self, session_id: str, start: int = 0, stop: int | None = None) -> list[Turn]:
        """Turns with start <= index < stop (stop None: to the end)."""

    @abstractmethod
    def turn_count(self, session_id: str) -> int: ...

    @abstractmethod
    def sessions(self) -> list[str]:
        """Ids of the sessions that hold at least one turn, sorted."""

    @abstractmethod
    def delete(self, session_id: str) -> bool:
        """Remove a session and everything derived from it; False if it did not exist."""

    # --- pages ----------------------------------------------------------------------
    @abstractmethod
    def pages(self, session_id: str) -> list[dict[str, Any]]:
        """Page records in order."""

    @abstractmethod
    def add_pages(
        self, session_id: str, expected: int, pages: Sequence[dict[str, Any]], cursor: int
    ) -> bool:
        """Append page records and set the paging cursor, only if exactly `expected` pages exist.

        Returns False (and changes nothing) when another writer got there first.
        """

    # --- vision-token cache ---------------------------------------------------------
    @abstractmethod
    def cache_get(self, session_id: str, key: str) -> bytes | None:
        """The cached value, refreshing its recency; None if absent or expired."""

    def cache_get_many(self, session_id: str, keys: Sequence[str]) -> dict[str, bytes]:
        """The cached values of `keys` that are present (one round trip where the store can)."""
        found = {key: self.cache_get(session_id, key) for key in keys}
        return {key: value for key, value in found.items() if value is not None}

    @abstractmethod
    def cache_put(self, session_id: str, key: str, value: bytes) -> None:
        """Store a value, then evict least recently used entries beyond the size bound."""

    @abstractmethod
    def cache_delete(self, session_id: str, key: str) -> None: ...

    @abstractmethod
    def count_cache(self, session_id: str, hits: int = 0, misses: int = 0) -> None:
        """Add to the session's cache hit and miss counters."""

    # --- sizes ----------------------------------------------------------------------
    @abstractmethod
    def info(self, session_id: str) -> SessionInfo: ...

    @abstractmethod
    def close(self) -> None: ...
