"""The Redis store, through redis-py: shared by many backend replicas.

Key layout (P is the key prefix, T the session's key: a hash of the session id,
so no id can reach another tenant's keys whatever its characters). Every key of
a session carries the hash tag `{T}`, so Redis Cluster keeps a session on one
shard and the Lua scripts below touch one slot only:

    P:{T}:meta     hash: session id, paging cursor, cache hits/misses, turn bytes
    P:{T}:turns    list of turn records (JSON: turn_id, role, content, created, and
                   "message", the message's JSON text, unless it is just role and
                   content); the list position is the turn index
    P:{T}:ids      hash: turn id -> "index:digest of role, content and message"
    P:{T}:pages    list of page records (JSON)
    P:{T}:lru      sorted set: cache key -> last use; P:{T}:csize hash: cache key -> bytes
    P:{T}:c:<key>  one cache value
    P:sessions     set of session ids (the only key outside a session's slot)

Appends are one Lua script: conflicts are checked before anything is written, so
a failed append writes nothing. Durability is the server's (AOF `appendfsync`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis

from optical_memory.stores.base import (
    CacheLimits,
    NewTurn,
    SessionInfo,
    Store,
    StoreError,
    StoreUnavailableError,
    Turn,
    check_batch,
    conflict,
    message_identity,
    now,
    session_key,
)

T = TypeVar("T")

# `_call` names of the calls that only read, besides those named "read ...": their errors give
# no advice about retrying writes. Any other name is taken for a write.
_READS = frozenset({"count turns", "list sessions", "cache read", "session info"})

# KEYS: turns, ids, meta. ARGV: session id, then per turn: turn id, digest, record, bytes.
_APPEND = """
local n = redis.call('LLEN', KEYS[1])
local idx, fresh, batch = {}, {}, {}
for i = 2, #ARGV, 4 do
  local tid, dig = ARGV[i], ARGV[i + 1]
  local have = batch[tid] or redis.call('HGET', KEYS[2], tid)
  if have then
    local sep = string.find(have, ':', 1, true)
    if string.sub(have, sep + 1) ~= dig then
      return redis.error_reply('TURNCONFLICT ' .. string.sub(have, 1, sep - 1))
    end
    idx[#idx + 1] = tonumber(string.sub(have, 1, sep - 1))
    idx[#idx + 1] = 0
  else
    batch[tid] = n .. ':' .. dig
    idx[#idx + 1] = n
    idx[#idx + 1] = 1
    fresh[#fresh + 1] = i
    n = n + 1
  end
end
if #fresh > 0 then
  redis.call('HSETNX', KEYS[3], 'sid', ARGV[1])
  for _, i in ipairs(fresh) do
    redis.call('RPUSH', KEYS[1], ARGV[i + 2])
    redis.call('HSET', KEYS[2], ARGV[i], batch[ARGV[i]])
    redis.call('HINCRBY', KEYS[3], 'turn_bytes', ARGV[i + 3])
  end
end
return idx
"""

# KEYS: pages, meta. ARGV: expected count, cursor, records...
_ADD_PAGES = """
if redis.call('LLEN', KEYS[1]) ~= tonumber(ARGV[1]) then return 0 end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('HSET', KEYS[2], 'cursor', ARGV[2])
return 1
"""

# KEYS: lru, csize. ARGV: value key prefix, key, now, ttl ms (0: none).
_CACHE_GET = """
local vkey = ARGV[1] .. ARGV[2]
local v = redis.call('GET', vkey)
if not v then
  redis.call('ZREM', KEYS[1], ARGV[2])
  redis.call('HDEL', KEYS[2], ARGV[2])
  return false
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', vkey, ARGV[4]) end
return v
"""

# KEYS: lru, csize. ARGV: value key prefix, key, now, ttl ms (0: none), max bytes, value.
_CACHE_PUT = """
local vkey = ARGV[1] .. ARGV[2]
if tonumber(ARGV[4]) > 0 then
  redis.call('SET', vkey, ARGV[6], 'PX', ARGV[4])
else
  redis.call('SET', vkey, ARGV[6])
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], string.len(ARGV[6]))
local total = 0
local sizes = redis.call('HGETALL', KEYS[2])
for i = 1, #sizes, 2 do
  if redis.call('EXISTS', ARGV[1] .. sizes[i]) == 1 then
    total = total + tonumber(sizes[i + 1])
  else  -- expired by its TTL: forget it
    redis.call('ZREM', KEYS[1], sizes[i])
    redis.call('HDEL', KEYS[2], sizes[i])
  end
end
local limit = tonumber(ARGV[5])
while total > limit do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if not oldest then break end
  total = total - tonumber(redis.call('HGET', KEYS[2], oldest) or 0)
  redis.call('DEL', ARGV[1] .. oldest)
  redis.call('ZREM', KEYS[1], oldest)
  redis.call('HDEL', KEYS[2], oldest)
end
return 1
"""


def _digest(role: str, content: str, message_json: str) -> str:
    """What an id's turn is compared by: a plain message digests as before messages were kept
    whole (role and content), so retries of turns stored then still match."""
    identity = message_identity(role, content, message_json)
    text = f"{role}\0{content}" if identity is None else f"{role}\0{content}\0{identity}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class RedisStore(Store):
    """A store in the Redis server at `url` (redis://host:port/db), or on a given client."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "om",
        cache: CacheLimits | None = None,
        client: redis.Redis | None = None,
        timeout_s: float = 5.0,
    ):
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"Redis key prefix must be non-empty and free of braces, got {prefix!r}")
        self.url = url
        self.prefix = prefix
        self.limits = cache or CacheLimits()
        self._r = client or redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._append = self._r.register_script(_APPEND)
        self._add_pages = self._r.register_script(_ADD_PAGES)
        self._cache_get = self._r.register_script(_CACHE_GET)
        self._cache_put = self._r.register_script(_CACHE_PUT)

    def _key(self, session_id: str, part: str) -> str:
        return f"{self.prefix}:{{{session_key(session_id)}}}:{part}"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if what in _READS or what.startswith("read "):
                raise StoreUnavailableError(
                    f"Redis at {self.url} is unreachable during a read ({what}): nothing could "
                    f"be read; a read changes nothing, so try again when it is back ({exc})"
                ) from exc
            raise StoreUnavailableError(
                f"Redis at {self.url} is unreachable during a write ({what}); nothing of it is "
                f"reported stored, retry with the same turn ids when it is back ({exc})"
            ) from exc
        except redis.ResponseError as exc:
            if "TURNCONFLICT" in str(exc):
                raise
            raise StoreError(f"Redis at {self.url} refused {what}: {exc}") from exc
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {self.url} failed during {what}: {exc}") from exc

    # --- turn log -------------------------------------------------------------------
    def append(self, session_id: str, turns: Sequence[NewTurn]) -> list[Turn]:
        if not turns:
            return []
        check_batch(session_id, turns)
        created = now()
        args: list[Any] = [session_id]
        for new in turns:
            record: dict[str, Any] = {
                "turn_id": new.turn_id,
                "role": new.role,
                "content": new.content,
                "created": created,
            }
            if not new.plain:
                record["message"] = new.message_json
            args += [
                new.turn_id,
                _digest(new.role, new.content, new.message_json),
                json.dumps(record, ensure_ascii=False, separators=(",", ":")),
                len(new.content.encode()),
            ]
        keys = [self._key(session_id, p) for p in ("turns", "ids", "meta")]

        def run() -> list[int]:  # one round trip: register the id, then the append script
            pipe = self._r.pipeline(transaction=False)
            pipe.sadd(f"{self.prefix}:sessions", session_id)
            self._append(keys=keys, args=args, client=pipe)
            return pipe.execute()[1]

        try:
            indices = self._call("append", run)
        except redis.ResponseError as exc:
            index = int(re.search(r"TURNCONFLICT (\d+)", str(exc)).group(1))
            (stored,) = self.turns(session_id, index, index + 1)
            raise conflict(session_id, stored) from None
        out: list[Turn] = []
        for new, index, fresh in zip(turns, indices[::2], indices[1::2]):
            if fresh:
                out.append(
                    Turn(int(index), new.turn_id, new.role, new.content, created, new.message_json)
                )
            else:  # a retry: its first stored record
                out.extend(self.turns(session_id, int(index), int(index) + 1))
        return out

    def turns(self, session_id: str, start: int = 0, stop: int | None = None) -> list[Turn]:
        key = self._key(session_id, "turns")
        raw = self._call(
            "read turns", lambda: self._r.lrange(key, start, -1 if stop is None else stop - 1)
        )
        out = []
        for offset, item in enumerate(raw):
            rec = json.loads(item)
            out.append(
                Turn(
                    start + offset,
                    rec["turn_id"],
                    rec["role"],
                    rec["content"],
                    rec["created"],
                    rec.get("message"),
                )
            )
        return out

    def turn_count(self, session_id: str) -> int:
        key = self._key(session_id, "turns")
        return int(self._call("count turns", lambda: self._r.llen(key)))

    def sessions(self) -> list[str]:
        def run() -> list[tuple[str, int]]:
            ids = sorted(m.decode() for m in self._r.smembers(f"{self.prefix}:sessions"))
            pipe = self._r.pipeline(transaction=False)
            for sid in ids:
                pipe.llen(self._key(sid, "turns"))
            return list(zip(ids, pipe.execute()))

        # an id whose first append failed after registering it holds no turns: not listed
        return [sid for sid, count in self._call("list sessions", run) if count > 0]

    def delete(self, session_id: str) -> bool:
        existed = self.turn_count(session_id) > 0
        lru = self._key(session_id, "lru")
        cached = self._call("delete", lambda: self._r.zrange(lru, 0, -1))
        parts = ("meta", "turns", "ids", "pages", "pins", "lru", "csize")
        keys = [self._key(session_id, p) for p in parts]
        keys += [self._key(session_id, "c:" + k.decode()) for k in cached]

        def run() -> None:
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(*keys)
            pipe.execute()
            self._r.srem(f"{self.prefix}:sessions", session_id)

        self._call("delete", run)
        return existed

    def index_of(self, session_id: str, turn_id: str) -> int | None:
        key = self._key(session_id, "ids")
        entry = self._call("read turn id", lambda: self._r.hget(key, turn_id))
        return int(entry.split(b":", 1)[0]) if entry else None

    # --- pins -----------------------------------------------------------------------
    def set_pinned(self, session_id: str, index: int, pinned: bool) -> None:
        key = self._key(session_id, "pins")
        command = self._r.sadd if pinned else self._r.srem
        self._call("pin", lambda: command(key, index))

    def pinned(self, session_id: str) -> list[int]:
        key = self._key(session_id, "pins")
        return sorted(int(i) for i in self._call("read pins", lambda: self._r.smembers(key)))

    # --- pages ----------------------------------------------------------------------
    def pages(self, session_id: str) -> list[dict[str, Any]]:
        key = self._key(session_id, "pages")
        return [json.loads(p) for p in self._call("read pages", lambda: self._r.lrange(key, 0, -1))]

    def add_pages(
        self, session_id: str, expected: int, pages: Sequence[dict[str, Any]], cursor: int
    ) -> bool:
        keys = [self._key(session_id, "pages"), self._key(session_id, "meta")]
        args = [expected, cursor, *(json.dumps(p, sort_keys=True) for p in pages)]
        return bool(self._call("add pages", lambda: self._add_pages(keys=keys, args=args)))

    # --- vision-token cache ---------------------------------------------------------
    def _cache_args(self, session_id: str, key: str) -> tuple[list[str], list[Any]]:
        keys = [self._key(session_id, "lru"), self._key(session_id, "csize")]
        ttl_ms = int(self.limits.ttl_s * 1000) if self.limits.ttl_s else 0
        return keys, [self._key(session_id, "c:"), key, now(), ttl_ms]

    def cache_get(self, session_id: str, key: str) -> bytes | None:
        keys, args = self._cache_args(session_id, key)
        value = self._call("cache read", lambda: self._cache_get(keys=keys, args=args))
        return bytes(value) if value else None

    def cache_get_many(self, session_id: str, keys: Sequence[str]) -> dict[str, bytes]:
        """The reads pipelined: one round trip for all keys."""
        unique = list(dict.fromkeys(keys))

        def run() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            for key in unique:
                script_keys, args = self._cache_args(session_id, key)
                self._cache_get(keys=script_keys, args=args, client=pipe)
            return pipe.execute()

        values = self._call("cache read", run) if unique else []
        return {key: bytes(v) for key, v in zip(unique, values) if v}

    def cache_put(self, session_id: str, key: str, value: bytes) -> None:
        keys, args = self._cache_args(session_id, key)
        args += [self.limits.max_bytes, value]
        self._call("cache write", lambda: self._cache_put(keys=keys, args=args))

    def cache_delete(self, session_id: str, key: str) -> None:
        def run() -> None:
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(self._key(session_id, "c:" + key))
            pipe.zrem(self._key(session_id, "lru"), key)
            pipe.hdel(self._key(session_id, "csize"), key)
            pipe.execute()

        self._call("cache delete", run)

    def count_cache(self, session_id: str, hits: int = 0, misses: int = 0) -> None:
        def run() -> None:
            pipe = self._r.pipeline(transaction=True)
            meta = self._key(session_id, "meta")
            pipe.hincrby(meta, "hits", hits)
            pipe.hincrby(meta, "misses", misses)
            pipe.execute()

        self._call("cache counters", run)

    # --- sizes ----------------------------------------------------------------------
    def info(self, session_id: str) -> SessionInfo:
        def run() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            pipe.llen(self._key(session_id, "turns"))
            pipe.llen(self._key(session_id, "pages"))
            pipe.hmget(self._key(session_id, "meta"), "cursor", "hits", "misses", "turn_bytes")
            pipe.hvals(self._key(session_id, "csize"))
            return pipe.execute()

        turns, pages, meta, sizes = self._call("session info", run)
        cursor, hits, misses, turn_bytes = (int(v or 0) for v in meta)
        return SessionInfo(
            turns, pages, cursor, len(sizes), sum(int(s) for s in sizes), hits, misses, turn_bytes
        )

    def close(self) -> None:
        self._r.close()
