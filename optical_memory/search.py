"""Lexical retrieval over a session's turn log: BM25 through SQLite FTS5.

The embedded store keeps its index in its own file (`FTS_SCHEMA`, written in the
same transaction as the turns). Any other store gets `TurnIndex`: an in-memory
FTS5 index per session in this process, caught up from the turn log on each
search (only the turns appended since the last one are read), and rebuilt when
the session's generation changes (deleted and created again). Both score with
FTS5's `bm25()`; a query is its words (lower-cased, common English words left
out) joined with OR, each quoted, so no query text is read as FTS5 syntax.

    >>> match_expression("When did Maya move to Lisbon?")
    '"maya" OR "move" OR "lisbon"'
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

# One table for every session: `tag` is a token naming the session, so a search
# intersects the session's postings with the query's instead of filtering rows.
FTS_SCHEMA = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS turns_fts USING fts5("
    "tag, content, idx UNINDEXED, tokenize = 'porter unicode61 remove_diacritics 2')"
)
FTS_INSERT = "INSERT INTO turns_fts (tag, content, idx) VALUES (?, ?, ?)"
FTS_SEARCH = (
    "SELECT idx, -bm25(turns_fts, 0.0, 1.0) AS score FROM turns_fts "
    "WHERE turns_fts MATCH ? ORDER BY score DESC, idx DESC LIMIT ?"
)
FTS_DELETE = "DELETE FROM turns_fts WHERE rowid IN (SELECT rowid FROM turns_fts WHERE turns_fts MATCH ?)"

MAX_QUERY_WORDS = 64
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    s t don tell said say says told ok okay yes yeah hi hello thanks thank please""".split()  # noqa: SIM905
)
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Hit:
    """A turn that matches a query, with its BM25 score (higher is better)."""

    turn: int
    score: float


def query_words(query: str) -> list[str]:
    """The query's distinct words in order, lower-cased, without common English words."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(query.lower()):
        if word not in STOPWORDS and word not in seen:
            seen[word] = None
    return list(seen)[:MAX_QUERY_WORDS]


def match_expression(query: str) -> str | None:
    """An FTS5 MATCH expression for `query` (None when it has no searchable words)."""
    words = query_words(query)
    return " OR ".join(f'"{w}"' for w in words) if words else None


def session_tag(session_id: str) -> str:
    """The token that names a session in the index (a hash: any id becomes one word)."""
    return "s" + hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def session_match(session_id: str, query: str) -> str | None:
    """MATCH expression for `query` within one session's turns."""
    words = match_expression(query)
    return f'tag : "{session_tag(session_id)}" AND content : ({words})' if words else None


def search_index(
    db: sqlite3.Connection, session_id: str, query: str, limit: int
) -> list[Hit]:
    """The best `limit` turns of a session for `query` in an FTS5 index made by FTS_SCHEMA."""
    expression = session_match(session_id, query)
    if expression is None or limit <= 0:
        return []
    return [Hit(int(idx), float(score)) for idx, score in db.execute(FTS_SEARCH, (expression, limit))]


def index_rows(session_id: str, turns: Sequence[tuple[int, str]]) -> list[tuple[str, str, int]]:
    """Rows for FTS_INSERT from (turn index, content) pairs."""
    tag = session_tag(session_id)
    return [(tag, content, index) for index, content in turns]


class TurnIndex:
    """In-memory FTS5 indexes of the sessions this process searched, kept for the `capacity`
    most recently searched sessions; for stores that keep no index of their own."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(FTS_SCHEMA)
        # session -> (generation, turns indexed)
        self._state: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def search(self, store: object, session_id: str, query: str, limit: int) -> list[Hit]:
        """Catch the session's index up with `store` (a `Store`), then search it."""
        generation = store.generation(session_id)  # type: ignore[attr-defined]
        count = store.turn_count(session_id)  # type: ignore[attr-defined]
        with self._lock:
            known, done = self._state.get(session_id, (None, 0))
            if known != generation or done > count:
                self._drop(session_id)
                done = 0
            if done < count:
                turns = store.turns(session_id, done, count)  # type: ignore[attr-defined]
                self._db.executemany(
                    FTS_INSERT, index_rows(session_id, [(t.index, t.content) for t in turns])
                )
            self._state[session_id] = (generation, count)
            self._state.move_to_end(session_id)
            while len(self._state) > self.capacity:
                self._drop(next(iter(self._state)))
            return search_index(self._db, session_id, query, limit)

    def _drop(self, session_id: str) -> None:
        self._db.execute(FTS_DELETE, (f'tag : "{session_tag(session_id)}"',))
        self._state.pop(session_id, None)
