"""Lexical retrieval over a session's turn log: BM25 through SQLite FTS5.

Each session searched in this process gets an FTS5 index of its own, in memory,
filled from the store's turn log and caught up on each search (only the turns
appended since the last search are read); a new generation of the session (it
was deleted and created again) starts a new index. One index per session keeps
the scores of a session independent of every other session's text (BM25's
inverse document frequency counts within the session, so no tenant's words
weigh on another's ranking), and nothing derived from a deleted session stays
on disk. A query is its words (lower-cased, common English words left out)
joined with OR, each quoted, so no query text is read as FTS5 syntax.

    >>> match_expression("When did Maya move to Lisbon?")
    '"maya" OR "move" OR "lisbon"'
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol


class TurnLog(Protocol):
    """What the index reads of a store (`optical_memory.stores.Store`)."""

    def generation(self, session_id: str) -> str: ...

    def turn_count(self, session_id: str) -> int: ...

    def turns(self, session_id: str, start: int = 0, stop: int | None = None) -> list[Any]: ...

FTS_SCHEMA = (
    "CREATE VIRTUAL TABLE turns USING fts5("
    "content, idx UNINDEXED, tokenize = 'porter unicode61 remove_diacritics 2')"
)
FTS_SEARCH = (
    "SELECT idx, -bm25(turns) AS score FROM turns WHERE turns MATCH ? "
    "ORDER BY score DESC, idx DESC LIMIT ?"
)
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


class _SessionIndex:
    """One session's FTS5 index in memory and how far the turn log it holds goes."""

    def __init__(self, generation: str) -> None:
        self.generation = generation
        self.turns = 0
        self.db = sqlite3.connect(":memory:", check_same_thread=False)
        self.db.execute(FTS_SCHEMA)


class TurnIndex:
    """The FTS5 indexes of the sessions this process searched, kept for the `capacity` most
    recently searched sessions."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, _SessionIndex] = OrderedDict()

    def search(self, store: TurnLog, session_id: str, query: str, limit: int) -> list[Hit]:
        """Catch the session's index up with `store`, then its best `limit` turns for `query`,
        best first (ties: newer first)."""
        expression = match_expression(query)
        if expression is None or limit <= 0:
            return []
        generation = store.generation(session_id)
        count = store.turn_count(session_id)
        with self._lock:
            index = self._sessions.get(session_id)
            if index is None or index.generation != generation or index.turns > count:
                index = _SessionIndex(generation)
                self._sessions[session_id] = index
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > self.capacity:
                self._sessions.popitem(last=False)
            if index.turns < count:
                turns = store.turns(session_id, index.turns, count)
                index.db.executemany(
                    "INSERT INTO turns (content, idx) VALUES (?, ?)",
                    [(t.content, t.index) for t in turns],
                )
                index.turns = count
            rows = index.db.execute(FTS_SEARCH, (expression, limit)).fetchall()
        return [Hit(int(idx), float(score)) for idx, score in rows]
