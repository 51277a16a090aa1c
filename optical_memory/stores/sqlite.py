"""The embedded default store: one local SQLite file in WAL mode, no server.

Writers serialise on SQLite's write lock (`BEGIN IMMEDIATE`), so several
processes may share one file; each append is committed with `synchronous=FULL`
before it returns. The vision-token cache lives in the same file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optical_memory.stores.base import (
    CacheLimits,
    NewTurn,
    SessionInfo,
    Store,
    StoreError,
    Turn,
    check_batch,
    conflict,
    now,
    same_turn,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    sid TEXT PRIMARY KEY, created REAL NOT NULL, cursor INTEGER NOT NULL DEFAULT 0,
    hits INTEGER NOT NULL DEFAULT 0, misses INTEGER NOT NULL DEFAULT 0, generation TEXT
);
CREATE TABLE IF NOT EXISTS turns (
    sid TEXT NOT NULL, idx INTEGER NOT NULL, turn_id TEXT NOT NULL, role TEXT NOT NULL,
    content TEXT NOT NULL, created REAL NOT NULL, message TEXT,
    PRIMARY KEY (sid, idx), UNIQUE (sid, turn_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pages (
    sid TEXT NOT NULL, idx INTEGER NOT NULL, record TEXT NOT NULL, PRIMARY KEY (sid, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pins (
    sid TEXT NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (sid, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cache (
    sid TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, size INTEGER NOT NULL,
    used REAL NOT NULL, PRIMARY KEY (sid, key)
);
CREATE INDEX IF NOT EXISTS cache_by_use ON cache (sid, used);
"""


# Cache recency (for LRU eviction) kept to this resolution by batch reads.
RECENCY_STEP_S = 60.0

def _create_private(path: Path) -> None:
    """Make what is missing of `path`: its directories 0700, the file 0600 (empty: SQLite takes
    it for a new database, and its -wal and -shm files get the same mode)."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by another process
            pass
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _wal(db: sqlite3.Connection, timeout_s: float) -> None:
    """Switch `db` to WAL mode. The switch takes an exclusive lock without waiting on the
    busy timeout, so two processes opening a new file at once may find it locked: retry
    until the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SQLiteStore(Store):
    """A store in the SQLite file at `path`, created if missing: the file private to its
    owner (0600), as is each directory made for it (0700); existing ones are left as they are."""

    def __init__(self, path: str | Path, cache: CacheLimits | None = None, timeout_s: float = 60.0):
        self.path = Path(path).expanduser()
        self.url = f"sqlite:///{self.path.resolve()}"
        self.limits = cache or CacheLimits()
        self._lock = threading.RLock()
        try:
            _create_private(self.path)
            self._db = sqlite3.connect(
                self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
            _wal(self._db, timeout_s)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._migrate_turns()
            self._migrate_sessions()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc

    def _migrate_turns(self) -> None:
        """Files made before messages were kept whole get the `message` column (NULL: the
        message is {"role": role, "content": content}, as such turns read back)."""

        def columns() -> set[str]:
            return {row[1] for row in self._db.execute("PRAGMA table_info(turns)")}

        if "message" not in columns():
            with self._write() as db:
                if "message" not in columns():  # another process may have got there first
                    db.execute("ALTER TABLE turns ADD COLUMN message TEXT")

    def _migrate_sessions(self) -> None:
        """Files made before session generations get the column (NULL: set on first use)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        if "generation" not in columns:
            with self._write() as db:
                db.execute("ALTER TABLE sessions ADD COLUMN generation TEXT")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock from the start."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path}: {exc}") from exc
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):  # e.g. "database or disk is full"
                    raise StoreError(
                        f"SQLite store {self.path}: {exc}; nothing of this write was stored"
                    ) from exc
                raise

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path}: {exc}") from exc

    # --- turn log -------------------------------------------------------------------
    def append(self, session_id: str, turns: Sequence[NewTurn]) -> list[Turn]:
        check_batch(session_id, turns)
        out: list[Turn] = []
        with self._write() as db:
            (count,) = db.execute(
                "SELECT COALESCE(MAX(idx) + 1, 0) FROM turns WHERE sid = ?", (session_id,)
            ).fetchone()
            if count == 0:
                db.execute(
                    "INSERT OR IGNORE INTO sessions (sid, created) VALUES (?, ?)",
                    (session_id, now()),
                )
            pending: dict[str, Turn] = {}
            for new in turns:
                stored = pending.get(new.turn_id) or self._by_id(db, session_id, new.turn_id)
                if stored is not None:
                    if not same_turn(stored, new):
                        raise conflict(session_id, stored)
                    out.append(stored)
                    continue
                created = new.created if new.created is not None else now()
                turn = Turn(count, new.turn_id, new.role, new.content, created, new.message_json)
                db.execute(
                    "INSERT INTO turns (sid, idx, turn_id, role, content, created, message) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        session_id,
                        turn.index,
                        turn.turn_id,
                        turn.role,
                        turn.content,
                        turn.created,
                        None if new.plain else new.message_json,
                    ),
                )
                pending[new.turn_id] = turn
                out.append(turn)
                count += 1
        return out

    @staticmethod
    def _by_id(db: sqlite3.Connection, session_id: str, turn_id: str) -> Turn | None:
        row = db.execute(
            "SELECT idx, turn_id, role, content, created, message FROM turns "
            "WHERE sid = ? AND turn_id = ?",
            (session_id, turn_id),
        ).fetchone()
        return Turn(*row) if row else None

    def turns(self, session_id: str, start: int = 0, stop: int | None = None) -> list[Turn]:
        rows = self._read(
            "SELECT idx, turn_id, role, content, created, message FROM turns "
            "WHERE sid = ? AND idx >= ? AND idx < ? ORDER BY idx",
            (session_id, start, stop if stop is not None else 2**62),
        )
        return [Turn(*row) for row in rows]

    def turn_count(self, session_id: str) -> int:
        (count,) = self._read(
            "SELECT COALESCE(MAX(idx) + 1, 0) FROM turns WHERE sid = ?", (session_id,)
        )[0]
        return count

    def sessions(self) -> list[str]:
        return [sid for (sid,) in self._read("SELECT DISTINCT sid FROM turns ORDER BY sid")]

    def delete(self, session_id: str) -> bool:
        with self._write() as db:
            existed = db.execute("DELETE FROM turns WHERE sid = ?", (session_id,)).rowcount > 0
            for table in ("pages", "pins", "cache", "sessions"):
                db.execute(f"DELETE FROM {table} WHERE sid = ?", (session_id,))
        return existed

    def index_of(self, session_id: str, turn_id: str) -> int | None:
        rows = self._read(
            "SELECT idx FROM turns WHERE sid = ? AND turn_id = ?", (session_id, turn_id)
        )
        return rows[0][0] if rows else None

    # --- pins -----------------------------------------------------------------------
    def set_pinned(self, session_id: str, index: int, pinned: bool) -> None:
        with self._write() as db:
            if pinned:
                db.execute("INSERT OR IGNORE INTO pins (sid, idx) VALUES (?, ?)", (session_id, index))
            else:
                db.execute("DELETE FROM pins WHERE sid = ? AND idx = ?", (session_id, index))

    def pinned(self, session_id: str) -> list[int]:
        rows = self._read("SELECT idx FROM pins WHERE sid = ? ORDER BY idx", (session_id,))
        return [idx for (idx,) in rows]

    # --- pages ----------------------------------------------------------------------
    def pages(self, session_id: str) -> list[dict[str, Any]]:
        rows = self._read("SELECT record FROM pages WHERE sid = ? ORDER BY idx", (session_id,))
        return [json.loads(record) for (record,) in rows]

    def generation(self, session_id: str) -> str:
        rows = self._read("SELECT generation FROM sessions WHERE sid = ?", (session_id,))
        if rows and rows[0][0]:
            return rows[0][0]
        with self._write() as db:  # first use: set it (a session deleted meanwhile gets none)
            db.execute(
                "UPDATE sessions SET generation = ? WHERE sid = ? AND generation IS NULL",
                (uuid.uuid4().hex, session_id),
            )
            row = db.execute(
                "SELECT generation FROM sessions WHERE sid = ?", (session_id,)
            ).fetchone()
        return row[0] if row and row[0] else ""

    def add_pages(
        self,
        session_id: str,
        expected: int,
        pages: Sequence[dict[str, Any]],
        cursor: int,
        generation: str,
    ) -> bool:
        with self._write() as db:
            row = db.execute(
                "SELECT generation FROM sessions WHERE sid = ?", (session_id,)
            ).fetchone()
            if row is None or row[0] != generation:
                return False
            (count,) = db.execute("SELECT COUNT(*) FROM pages WHERE sid = ?", (session_id,)).fetchone()
            if count != expected:
                return False
            db.executemany(
                "INSERT INTO pages (sid, idx, record) VALUES (?, ?, ?)",
                [(session_id, expected + i, json.dumps(p, sort_keys=True)) for i, p in enumerate(pages)],
            )
            db.execute("UPDATE sessions SET cursor = ? WHERE sid = ?", (cursor, session_id))
        return True

    # --- vision-token cache ---------------------------------------------------------
    def cache_get(self, session_id: str, key: str) -> bytes | None:
        t = now()
        with self._write() as db:
            row = db.execute(
                "SELECT value, used FROM cache WHERE sid = ? AND key = ?", (session_id, key)
            ).fetchone()
            if row is None:
                return None
            if self.limits.ttl_s is not None and t - row[1] > self.limits.ttl_s:
                db.execute("DELETE FROM cache WHERE sid = ? AND key = ?", (session_id, key))
                return None
            db.execute("UPDATE cache SET used = ? WHERE sid = ? AND key = ?", (t, session_id, key))
            return bytes(row[0])

    def cache_get_many(self, session_id: str, keys: Sequence[str]) -> dict[str, bytes]:
        """One transaction for all reads; recency is refreshed only where it is older than
        RECENCY_STEP_S, so reading the same pages again writes (and syncs) nothing."""
        t = now()
        ttl = self.limits.ttl_s
        found: dict[str, bytes] = {}
        recent: set[str] = set()
        unique = list(dict.fromkeys(keys))
        with self._write() as db:
            for start in range(0, len(unique), 500):  # within SQLite's bound on parameters
                chunk = unique[start : start + 500]
                rows = db.execute(
                    f"SELECT key, value, used FROM cache WHERE sid = ? AND key IN "
                    f"({', '.join('?' * len(chunk))})",
                    (session_id, *chunk),
                ).fetchall()
                found.update(
                    (key, bytes(value)) for key, value, used in rows
                    if ttl is None or t - used <= ttl
                )
                recent.update(key for key, _, used in rows if t - used < RECENCY_STEP_S)
            db.executemany(  # recency moves in steps, so repeated reads write nothing
                "UPDATE cache SET used = ? WHERE sid = ? AND key = ?",
                [(t, session_id, key) for key in found if key not in recent],
            )
        return found

    def cache_put(self, session_id: str, key: str, value: bytes) -> None:
        self.cache_put_many(session_id, [(key, value)])

    def cache_put_many(self, session_id: str, items: Sequence[tuple[str, bytes]]) -> None:
        """One transaction (one sync) for all the values, then one eviction pass."""
        if not items:
            return
        t = now()
        with self._write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO cache (sid, key, value, size, used) VALUES (?, ?, ?, ?, ?)",
                [(session_id, key, value, len(value), t) for key, value in items],
            )
            if self.limits.ttl_s is not None:
                db.execute(
                    "DELETE FROM cache WHERE sid = ? AND used < ?",
                    (session_id, t - self.limits.ttl_s),
                )
            total = 0
            evict = []
            for k, size in db.execute(
                "SELECT key, size FROM cache WHERE sid = ? ORDER BY used DESC, key", (session_id,)
            ).fetchall():
                total += size
                if total > self.limits.max_bytes:
                    evict.append((session_id, k))
            db.executemany("DELETE FROM cache WHERE sid = ? AND key = ?", evict)

    def cache_delete(self, session_id: str, key: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM cache WHERE sid = ? AND key = ?", (session_id, key))

    def count_cache(self, session_id: str, hits: int = 0, misses: int = 0) -> None:
        with self._write() as db:
            db.execute(
                # an update only: counting for a session deleted meanwhile leaves no row
                "UPDATE sessions SET hits = hits + ?, misses = misses + ? WHERE sid = ?",
                (hits, misses, session_id),
            )

    # --- sizes ----------------------------------------------------------------------
    def info(self, session_id: str) -> SessionInfo:
        turns, turn_bytes = self._read(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(content AS BLOB))), 0) FROM turns "
            "WHERE sid = ?",
            (session_id,),
        )[0]
        (pages,) = self._read("SELECT COUNT(*) FROM pages WHERE sid = ?", (session_id,))[0]
        entries, cache_bytes = self._read(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM cache WHERE sid = ?", (session_id,)
        )[0]
        row = self._read("SELECT cursor, hits, misses FROM sessions WHERE sid = ?", (session_id,))
        cursor, hits, misses = row[0] if row else (0, 0, 0)
        return SessionInfo(turns, pages, cursor, entries, cache_bytes, hits, misses, turn_bytes)

    def close(self) -> None:
        with self._lock:
            self._db.close()
