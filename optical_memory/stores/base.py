"""The store interface shared by the embedded SQLite store and the Redis store.

A store keeps three kinds of data per session:

- the turn log, the source of truth: turns in append order, each with a turn id
  that makes retries idempotent;
- page records: the immutable grouping of old turns into pages (JSON objects
  owned by `optical_memory.pages`), appended with a compare-and-set so that two
  writers can never seal overlapping pages;
- pins: indexes of turns the caller pinned (kept as text; system and developer
  turns are pinned by their role and need no entry);
- the vision-token cache: opaque byte values (framed by `optical_memory.cache`),
  bounded per session by bytes (least recently used first) and optionally by age.

Everything but the turn log is derived data and may be dropped at any time.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optical_memory.messages import dump_json
from optical_memory.search import Hit, TurnIndex


class StoreError(RuntimeError):
    """A store operation failed."""


class StoreUnavailableError(StoreError):
    """The store's server cannot be reached or did not answer in time.

    After a read nothing changed. After a write the outcome is unknown: the server may have
    done it (a command sent before a timeout still runs when the server wakes). `turn_ids`:
    for a failed append, the ids of its turns, one per turn in order (also those generated
    for turns given without one); retrying with them stores each turn exactly once.
    """

    def __init__(self, message: str, turn_ids: Sequence[str] = ()):
        super().__init__(message)
        self.turn_ids: tuple[str, ...] = tuple(turn_ids)


class DataLossError(StoreError):
    """The store's data vanished or went back in time under a client that had seen it: a
    server flushed, or restarted without persistence, or from an older snapshot. The store
    refuses to go on as if it were new; nothing of the failed call was read or written."""


class StoreConfigError(StoreError):
    """The store's server is configured so that it could drop turns silently (a Redis
    `maxmemory-policy` that may evict the turn log); nothing was read or written."""


class StoreWarning(UserWarning):
    """A store could not check something it checks at connect (e.g. Redis refuses CONFIG)."""


class TurnConflictError(StoreError, ValueError):
    """A turn id was reused for a different turn."""


class InvalidTurnError(StoreError, ValueError):
    """A turn that cannot be stored (text that is not valid Unicode); nothing was stored."""


def plain_json(role: str, content: str) -> str:
    """The stored JSON text of the message {"role": role, "content": content}."""
    return dump_json({"role": role, "content": content})


@dataclass(frozen=True)
class NewTurn:
    """A turn to append: the caller's message plus the id that makes a retry idempotent.

    `message_json` is the message as given, as JSON text in `dump_json`'s style (the
    source of truth, returned byte for byte); `content` is its render text (what pages
    lay out and counters count). Without `message_json` the message is
    {"role": role, "content": content}.
    """

    turn_id: str
    role: str
    content: str
    message_json: str = ""
    created: float | None = None  # the message's own time (Unix seconds); None: the append's

    def __post_init__(self) -> None:
        if not self.message_json:
            object.__setattr__(self, "message_json", plain_json(self.role, self.content))

    @property
    def plain(self) -> bool:
        """Whether the message is exactly {"role": role, "content": content} (stores keep
        no second copy of such a message)."""
        return self.message_json == plain_json(self.role, self.content)


@dataclass(frozen=True)
class Turn:
    """A stored turn. `index` is its position in the session (0-based, gap-free).

    `message_json` is the message as given (JSON text, see `NewTurn`); a turn stored
    before messages were kept whole reads back as {"role": role, "content": content}.
    """

    index: int
    turn_id: str
    role: str
    content: str
    created: float
    message_json: str | None = None

    def __post_init__(self) -> None:
        if not self.message_json:
            object.__setattr__(self, "message_json", plain_json(self.role, self.content))

    def to_message(self) -> dict[str, Any]:
        """The message exactly as it was given (less its "turn_id"), a fresh dict."""
        return json.loads(self.message_json)

    def to_json(self) -> dict[str, Any]:
        return {
            "turn_id": self.turn_id,
            "role": self.role,
            "content": self.content,
            "created": self.created,
            "message": self.to_message(),
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


def message_identity(role: str, content: str, message_json: str) -> str | None:
    """What tells messages apart beyond role and render text: None for a plain message
    (or one that differs from it only in key order), else its JSON with sorted keys."""
    if message_json == plain_json(role, content):
        return None
    canonical = json.dumps(
        json.loads(message_json), ensure_ascii=False, separators=(",", ":"), sort_keys=True
    )
    plain = json.dumps(
        {"content": content, "role": role}, ensure_ascii=False, separators=(",", ":")
    )
    return None if canonical == plain else canonical


def same_turn(stored: Turn, new: NewTurn) -> bool:
    """Whether `new` is a retry of `stored`: the same message (key order aside)."""
    if stored.role != new.role or stored.content != new.content:
        return False
    return stored.message_json == new.message_json or message_identity(
        stored.role, stored.content, stored.message_json
    ) == message_identity(new.role, new.content, new.message_json)


def check_batch(session_id: str, turns: Sequence[NewTurn]) -> None:
    """Refuse, before anything is written, a batch that cannot be stored as a whole: text
    that is not valid Unicode (a lone surrogate cannot be encoded as UTF-8), or one turn id
    given twice with different turns (the same turn twice is stored once)."""
    first: dict[str, int] = {}
    for i, new in enumerate(turns):
        for what, text in (
            ("turn id", new.turn_id),
            ("role", new.role),
            ("content", new.content),
            ("message", new.message_json),
        ):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidTurnError(
                    f"turn {i} of the batch for session {session_id!r}: its {what} contains a "
                    f"lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}, "
                    "which is not valid Unicode text; nothing was stored"
                ) from None
        j = first.setdefault(new.turn_id, i)
        if j != i and not same_turn(Turn(j, *_fields(turns[j])), new):
            raise TurnConflictError(
                f"turn id {new.turn_id!r} is given twice in one batch for session "
                f"{session_id!r} (turns {j} and {i} of the batch) with different content; "
                "nothing was stored"
            )


def _fields(new: NewTurn) -> tuple[str, str, str, float, str]:
    return new.turn_id, new.role, new.content, 0.0, new.message_json


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

    def search(self, session_id: str, query: str, limit: int = 10) -> list[Hit]:
        """The session's turns that best match `query` by BM25, best first (ties: newer first):
        an SQLite FTS5 index of the session in this process's memory, caught up from the turn
        log on each call (`optical_memory.search.TurnIndex`)."""
        index = self.__dict__.get("_turn_index")
        if index is None:
            index = self.__dict__.setdefault("_turn_index", TurnIndex())
        return index.search(self, session_id, query, limit)

    # --- pages ----------------------------------------------------------------------
    @abstractmethod
    def index_of(self, session_id: str, turn_id: str) -> int | None:
        """The index of the turn with this id, None if the session has none."""

    # --- pins: turns kept as text at the start of every context -------------------------
    @abstractmethod
    def set_pinned(self, session_id: str, index: int, pinned: bool) -> None:
        """Pin (or unpin) the turn at `index`."""

    @abstractmethod
    def pinned(self, session_id: str) -> list[int]:
        """Indexes of the session's explicitly pinned turns, ascending."""

    @abstractmethod
    def pages(self, session_id: str) -> list[dict[str, Any]]:
        """Page records in order."""

    @abstractmethod
    def generation(self, session_id: str) -> str:
        """A token naming this life of the session: a delete ends it, and a session created
        again under the same id gets another. Every page write is conditional on it."""

    @abstractmethod
    def add_pages(
        self,
        session_id: str,
        expected: int,
        pages: Sequence[dict[str, Any]],
        cursor: int,
        generation: str,
    ) -> bool:
        """Append page records and set the paging cursor, only if exactly `expected` pages exist
        and the session is still in `generation`.

        Returns False (and changes nothing) when another writer got there first or the session
        was deleted (and perhaps created again) since.
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

    def cache_put_many(self, session_id: str, items: Sequence[tuple[str, bytes]]) -> None:
        """`cache_put` of each (key, value), in order (one transaction where the store can)."""
        for key, value in items:
            self.cache_put(session_id, key, value)

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
