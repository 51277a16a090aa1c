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
    P:sessions     set of session ids (outside the sessions' slots)
    P:store        hash: the store's marker: a random id, its creation time and a write
                   counter (`seq`, bumped by every append), written at the first append
    P:{T}:eq:<key> set of reply keys waiting for a page's encoding; P:{T}:er:<id> a
                   waiter's reply list (both with a TTL; see `optical_memory.encode_queue`)
    P:encode:<id>  stream of pages to encode for encoder <id>, group "workers" (outside
                   the sessions' slots: one stream for every session)

Redis Cluster (`redis+cluster://host:port`, any node as the seed): every key of a
session carries its tag, so it lives in one slot; a script or a transaction only
ever names keys of one session, or a global key alone. Redis refuses anything else
(CROSSSLOT), and the cluster tests run the whole store suite on a three-master
cluster. Pipelines of scripts are not available on a cluster (redis-py blocks them):
there those calls are sent one by one. The key names are those of the versions
before clusters were supported: existing data reads unchanged.

Appends are one Lua script: conflicts are checked before anything is written, so
a failed append writes nothing. Durability is the server's (AOF `appendfsync`).

The cache keys (lru, csize, c:) live on the cache's server and database when one
is given (`cache_url`, `?cache=` in the URL), the others always beside the turn log.
Nothing guards the turn log from eviction but the server's `maxmemory-policy`: it
is read at first use and an `allkeys-*` policy is refused. The marker is how a
client notices that data it saw has vanished (a flush, a restart without
persistence, an older snapshot): it is checked on every new connection and before
every append, and a marker gone, replaced or gone back is a DataLossError.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.cluster import RedisCluster

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
if redis.call('HGET', KEYS[2], 'gen') ~= ARGV[3] then return 0 end
if redis.call('LLEN', KEYS[1]) ~= tonumber(ARGV[1]) then return 0 end
for i = 4, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('HSET', KEYS[2], 'cursor', ARGV[2])
return 1
"""

# KEYS: turns, meta. ARGV: a fresh token. The session's generation, set on first use; '' when
# the session holds no turns (a session deleted meanwhile gets no orphan meta).
_GENERATION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return '' end
redis.call('HSETNX', KEYS[2], 'gen', ARGV[1])
return redis.call('HGET', KEYS[2], 'gen')
"""

# KEYS: turns, meta. ARGV: hits, misses. Only for a live session: no orphan meta after a delete.
_COUNT_CACHE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], 'hits', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'misses', ARGV[2])
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


def _split_cache_url(url: str) -> tuple[str, str | None]:
    """`url` without its `cache=` query parameter, and that parameter (None: none given)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    found = [value for key, value in query if key == "cache"]
    if not found:
        return url, None
    if len(found) > 1:
        raise ValueError("a Redis store URL may give 'cache=' once only")
    rest = urlencode([(key, value) for key, value in query if key != "cache"])
    return urlunsplit(parts._replace(query=rest)), found[0]


def _with_db(url: str, db: int) -> str:
    """The URL of database `db` on the server of `url`."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "db"]
    if parts.scheme == "unix":
        return urlunsplit(parts._replace(query=urlencode([*query, ("db", str(db))])))
    return urlunsplit(parts._replace(path=f"/{db}", query=urlencode(query)))


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def is_cluster_url(url: str) -> bool:
    """Whether `url` names a Redis Cluster (`redis+cluster://` or `rediss+cluster://`)."""
    return urlsplit(url).scheme.lower() in CLUSTER_SCHEMES


def _client(url: str, options: dict[str, Any]) -> redis.Redis | RedisCluster:
    """A client for a server or, for a cluster URL, a cluster (the URL names one seed node;
    the others are discovered)."""
    if is_cluster_url(url):
        parts = urlsplit(url)
        plain = urlunsplit(parts._replace(scheme=parts.scheme.lower().split("+")[0]))
        return RedisCluster.from_url(plain, **options)
    return redis.Redis.from_url(url, **options)


def _per_node(reply: Any) -> list[dict[str, Any]]:
    """A cluster command's reply sent to every primary: one dict per node (redis-py returns
    the node's own reply when only one node answered)."""
    if reply and all(isinstance(v, dict) for v in reply.values()):
        return list(reply.values())
    return [reply]


class RedisStore(Store):
    """A store in the Redis server at `url` (redis://host:port/db), or on a given client.

    `cache_url`: where the vision-token cache lives when not beside the turn log: a Redis
    URL, or a database number on the same server; in a store URL `?cache=URL` or
    `?cache=DB` (e.g. `redis://10.0.0.5:6379/0?cache=redis://10.0.0.6:6379/0`). Another
    database of the same server shares that server's memory and eviction policy: to let
    the cache be evicted, give it a server of its own (with `allkeys-lru` there).

    At first use the store reads the turn log's server's `maxmemory-policy` (CONFIG GET,
    else INFO) and refuses an `allkeys-*` policy, which may evict the turn log
    (`StoreConfigError`); when the server answers neither, a `StoreWarning` says so.
    A client that saw the store's marker (key `P:store`) and finds it gone, replaced or
    gone back raises `DataLossError`, now and on every later call, instead of starting over;
    it checks on every new connection and before every append. With `client=` or on a
    cluster the connection check is not installed: appends still check, reads do not.

    `redis+cluster://host:port` (`rediss+cluster://` with TLS): a Redis Cluster through
    redis-py's `RedisCluster`, seeded by that node; its only database is 0. Every primary's
    `maxmemory-policy` is checked. The cache may live on a cluster too (`?cache=` a cluster
    URL) or on a plain server beside a cluster.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "om",
        cache: CacheLimits | None = None,
        client: redis.Redis | None = None,
        timeout_s: float = 5.0,
        cache_url: str | None = None,
    ):
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"Redis key prefix must be non-empty and free of braces, got {prefix!r}")
        url, in_url = _split_cache_url(url)
        if in_url is not None and cache_url is not None:
            raise ValueError("the cache's URL is given twice: cache_url= and ?cache= in the URL")
        cache_url = in_url if cache_url is None else cache_url
        if cache_url is not None and cache_url.isdigit():
            if is_cluster_url(url):
                raise ValueError(
                    "a Redis Cluster has one database: give ?cache= (cache_url=) a URL, not "
                    f"a database number ({cache_url})"
                )
            cache_url = _with_db(url, int(cache_url))
        self.url = url
        self.cache_url = cache_url  # None: the cache lives beside the turn log
        self.prefix = prefix
        self.limits = cache or CacheLimits()
        self.eviction_policy: str | None = None  # the server's maxmemory-policy, once read
        self._marker = f"{prefix}:store"
        self._state = threading.RLock()  # guards what this client knows of the marker
        self._checked = False  # the first-use checks passed
        self._lost: str | None = None  # why the store lost data (every call raises it)
        self._store_id: str | None = None  # the marker's id, once seen
        self._seq = 0  # the highest write counter seen
        options: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
        }
        if client is None and not is_cluster_url(url):
            client = redis.Redis.from_url(url, redis_connect_func=self._on_connect, **options)
        self._r = client or _client(url, options)
        self._c = self._r if cache_url is None else _client(cache_url, options)
        # pipelines of scripts are refused by redis-py on a cluster: those calls go one by one
        self.cluster = isinstance(self._r, RedisCluster)
        self._cache_cluster = isinstance(self._c, RedisCluster)
        self._append = self._r.register_script(_APPEND)
        self._add_pages = self._r.register_script(_ADD_PAGES)
        self._cache_get = self._c.register_script(_CACHE_GET)
        self._cache_put = self._c.register_script(_CACHE_PUT)

    def _key(self, session_id: str, part: str) -> str:
        return f"{self.prefix}:{{{session_key(session_id)}}}:{part}"

    def key(self, session_id: str, part: str) -> str:
        """The name of a key of the session (`P:{T}:part`), in the session's slot."""
        return self._key(session_id, part)

    def global_key(self, part: str) -> str:
        """The name of a key of the store outside any session (`P:part`)."""
        return f"{self.prefix}:{part}"

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """The redis-py client of the turn log's server (or cluster)."""
        return self._r

    def _call(self, what: str, fn: Callable[[], T], url: str | None = None) -> T:
        """Run `fn` (on the server at `url`, default the turn log's) after the first-use checks;
        Redis errors become store errors saying whether a read or a write failed."""
        if self._lost:
            raise DataLossError(self._lost)
        server = self.url
        try:
            self._ready()
            server = url or self.url
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if what in _READS or what.startswith("read "):
                raise StoreUnavailableError(
                    f"Redis at {server} is unreachable during a read ({what}): nothing could "
                    f"be read; a read changes nothing, so try again when it is back ({exc})"
                ) from exc
            advice = (
                "the turns may have been stored; retry with the same turn ids when it is back "
                "(a retry stores nothing twice)"
                if what == "append"
                else "it may have been done"
            )
            raise StoreUnavailableError(
                f"Redis at {server} is unreachable during a write ({what}): its outcome is "
                f"unknown, {advice} ({exc})"
            ) from exc
        except redis.ResponseError as exc:
            if "TURNCONFLICT" in str(exc):
                raise
            raise StoreError(f"Redis at {server} refused {what}: {exc}") from exc
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {server} failed during {what}: {exc}") from exc

    # --- first use, connections and the marker --------------------------------------
    def _ready(self) -> None:
        """The first-use checks: an eviction policy that spares the turn log, then the marker."""
        if self._checked:
            return
        with self._state:
            if not self._checked:
                self._check_eviction()
                self._check_marker(create=False)
                self._checked = True

    def _check_eviction(self) -> None:
        """Refuse a server whose `maxmemory-policy` may evict the turn log (`allkeys-*`)."""
        policy, limit, unknown = self._eviction_settings()
        self.eviction_policy = policy
        if policy is None:
            warnings.warn(
                StoreWarning(
                    f"Redis at {self.url}: cannot check maxmemory-policy: {unknown}; it is not "
                    "assumed either way. The turn log is safe from eviction only under "
                    "noeviction or a volatile-* policy (its keys carry no TTL): make sure the "
                    "server uses one"
                ),
                stacklevel=5,
            )
            return
        if policy.startswith("allkeys-"):
            at = f"maxmemory, {limit:,} bytes now" if limit else "maxmemory (unset now)"
            raise StoreConfigError(
                f"Redis at {self.url} has maxmemory-policy {policy}: at {at} it may evict any "
                "key, the turn log included, and turns would vanish silently; not using it. "
                "Set noeviction (or a volatile-* policy: it evicts only keys with a TTL, and "
                "the turn log has none) on this server, with CONFIG SET maxmemory-policy "
                "noeviction and in redis.conf. To let the vision cache be evicted, give it a "
                "server of its own (allkeys-lru there): cache_url= or ?cache=redis://HOST:PORT/DB "
                "(another database of this server shares its memory and its eviction)"
            )

    def _eviction_settings(self) -> tuple[str | None, int, str]:
        """(maxmemory-policy, maxmemory) from CONFIG GET, else INFO memory; (None, 0, why)
        when the server gives neither (CONFIG renamed away or refused by an ACL)."""
        # on a cluster every primary answers; the first that may evict the turn log counts
        nodes = {"target_nodes": RedisCluster.PRIMARIES} if self.cluster else {}

        def worst(found: list[tuple[str, int]]) -> tuple[str, int]:
            return next((f for f in found if f[0].startswith("allkeys-")), found[0])

        try:
            replies = self._r.config_get("maxmemory*", **nodes)
            got = [{_text(k): _text(v) for k, v in r.items()} for r in _per_node(replies)]
            if all(g.get("maxmemory-policy") for g in got):
                policy, limit = worst(
                    [(g["maxmemory-policy"], int(g.get("maxmemory") or 0)) for g in got]
                )
                return policy, limit, ""
            refused = "CONFIG GET gives no maxmemory-policy"
        except redis.ResponseError as exc:
            refused = f"CONFIG GET is refused ({exc})"
        try:
            infos = _per_node(self._r.info("memory", **nodes))
        except redis.ResponseError as exc:
            return None, 0, f"{refused}, and so is INFO ({exc})"
        if all(info.get("maxmemory_policy") for info in infos):
            policy, limit = worst(
                [(str(i["maxmemory_policy"]), int(i.get("maxmemory") or 0)) for i in infos]
            )
            return policy, limit, ""
        return None, 0, f"{refused}, and INFO memory gives no maxmemory_policy"

    def _on_connect(self, connection: Any) -> None:
        """redis-py runs this on every new connection to the turn log's server, before any
        command of ours: a server that came back empty or from an older snapshot is caught
        before anything is read or written through it."""
        connection.on_connect()
        seen = self._seen()  # before the read: other threads may write meanwhile
        connection.send_command("HMGET", self._marker, "id", "seq")
        found_id, found_seq = connection.read_response()
        try:
            self._verify(found_id, found_seq, seen)
        except DataLossError:
            connection.disconnect()
            raise

    def _seen(self) -> tuple[str | None, int]:
        """The marker as this client has seen it so far: (store id, write counter)."""
        with self._state:
            return self._store_id, self._seq

    def _verify(
        self,
        found_id: bytes | str | None,
        found_seq: bytes | str | None,
        seen: tuple[str | None, int] | None = None,
    ) -> None:
        """Compare the marker as found with what this client saw before reading it (`seen`,
        default: now); remember it the first time. A read that started before another thread's
        write finished may find the marker older than that write: only what was seen before
        the read began counts."""
        store_id, seq = _text(found_id), int(found_seq or 0)
        with self._state:
            if self._lost:
                raise DataLossError(self._lost)
            seen_id, seen_seq = seen if seen is not None else (self._store_id, self._seq)
            if seen_id is None:
                if store_id is not None and self._store_id is None:
                    self._store_id, self._seq = store_id, seq
                if store_id is None or store_id == self._store_id:
                    if store_id is not None:
                        self._seq = max(self._seq, seq)
                    return
            if store_id is None:
                why = (
                    f"its marker {self._marker!r} is gone: the server was flushed or restarted "
                    "without persistence, or the key was deleted"
                )
            elif store_id != self._store_id:
                why = (
                    f"its marker names another store ({store_id}, not {self._store_id}): the "
                    "data was wiped and the store created again"
                )
            elif seq < seen_seq:
                why = (
                    f"its write counter went back from {seen_seq} to {seq}: the server came "
                    "back from an older snapshot (RDB only, or an AOF not synced before a "
                    "crash) or failed over to a replica that was behind"
                )
            else:
                self._seq = max(self._seq, seq)
                return
            self._lose(why)

    def _lose(self, why: str) -> None:
        self._lost = (
            f"Redis at {self.url} lost acknowledged turns: {why}. This store refuses to read "
            "or write as if it were new: restore the data (a backup, the AOF) or accept the "
            "loss, then open a new store"
        )
        raise DataLossError(self._lost)

    def _check_marker(self, create: bool, script: Any = None) -> None:
        """Check the marker; where there is none, adopt sessions of a version without markers,
        refuse sessions written under a marker, or (`create`) write the marker of a new store.
        In the same round trip, load `script` (a registered Script) if the server lacks it."""
        seen = self._seen()
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(self._marker, "id", "seq")
        pipe.exists(f"{self.prefix}:sessions")
        if script is not None and not self.cluster:  # a cluster: NOSCRIPT loads it (append)
            pipe.script_exists(script.sha)
        (found_id, found_seq), has_data, *loaded = pipe.execute()
        if loaded and not loaded[0][0]:
            self._r.script_load(script.script)
        self._verify(found_id, found_seq, seen)  # no marker where this client saw one: loss
        if found_id is not None:
            return
        if has_data:
            self._adopt_or_refuse()
        elif create:
            self._create_marker()

    def _adopt_or_refuse(self) -> None:
        """Sessions but no marker. Sessions record the marker they were written under: any
        such session means the marker was lost (DataLossError); none, an earlier version wrote
        them, and the marker is written now."""
        ids = [_text(sid) for sid in self._r.sscan_iter(f"{self.prefix}:sessions", count=1000)]
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            pipe = self._r.pipeline(transaction=False)
            for sid in chunk:
                pipe.hget(self._key(sid, "meta"), "store")
            for sid, owner in zip(chunk, pipe.execute()):
                if owner is not None:
                    with self._state:
                        self._lose(
                            f"it holds sessions written under store {_text(owner)} (e.g. "
                            f"{sid!r}) but its marker {self._marker!r} is gone"
                        )
        self._create_marker(adopted=True)

    def _create_marker(self, adopted: bool = False) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.hsetnx(self._marker, "id", uuid.uuid4().hex)
        pipe.hsetnx(self._marker, "created", repr(now()))
        pipe.hsetnx(self._marker, "seq", 0)
        if adopted:
            pipe.hsetnx(self._marker, "adopted", "sessions of a version without a marker")
        pipe.hmget(self._marker, "id", "seq")
        seen = self._seen()
        self._verify(*pipe.execute()[-1], seen)  # another client's marker if it came first

    def _saw_seq(self, seq: int) -> None:
        with self._state:
            self._seq = max(self._seq, int(seq))

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
                "created": new.created if new.created is not None else created,
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

        def send() -> list[Any]:  # one round trip, the only one that writes
            if self.cluster:  # no scripts in a cluster's pipelines: four calls, in this order
                return [
                    self._r.sadd(f"{self.prefix}:sessions", session_id),
                    self._r.evalsha(self._append.sha, len(keys), *keys, *args),
                    self._r.hsetnx(self._key(session_id, "meta"), "store", self._store_id),
                    self._r.hincrby(self._marker, "seq", 1),
                ]
            pipe = self._r.pipeline(transaction=False)
            pipe.sadd(f"{self.prefix}:sessions", session_id)
            pipe.evalsha(self._append.sha, len(keys), *keys, *args)
            pipe.hsetnx(self._key(session_id, "meta"), "store", self._store_id)
            pipe.hincrby(self._marker, "seq", 1)
            return pipe.execute()

        def run() -> list[int]:
            # first the marker (a store that lost data gets nothing written) and the script
            self._check_marker(create=True, script=self._append)
            try:
                done = send()
            except redis.exceptions.NoScriptError:  # the server's scripts flushed meanwhile
                self._r.script_load(_APPEND)
                done = send()
            self._saw_seq(done[3])
            return done[1]

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
        cached = self._call("delete", lambda: self._c.zrange(lru, 0, -1), self.cache_url)
        parts = ("meta", "turns", "ids", "pages", "pins")
        keys = [self._key(session_id, p) for p in parts]
        cache_keys = [lru, self._key(session_id, "csize")]
        cache_keys += [self._key(session_id, "c:" + _text(k)) for k in cached]
        if self._c is self._r:  # one transaction for all
            keys += cache_keys
        else:  # the cache first: derived data, and an error here leaves the turns in place
            self._call("delete", lambda: self._c.delete(*cache_keys), self.cache_url)

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

    def generation(self, session_id: str) -> str:
        keys = [self._key(session_id, "turns"), self._key(session_id, "meta")]
        gen = self._call(
            "read generation", lambda: self._r.eval(_GENERATION, 2, *keys, uuid.uuid4().hex)
        )
        return gen.decode() if gen else ""

    def add_pages(
        self,
        session_id: str,
        expected: int,
        pages: Sequence[dict[str, Any]],
        cursor: int,
        generation: str,
    ) -> bool:
        keys = [self._key(session_id, "pages"), self._key(session_id, "meta")]
        args = [expected, cursor, generation, *(json.dumps(p, sort_keys=True) for p in pages)]
        return bool(self._call("add pages", lambda: self._add_pages(keys=keys, args=args)))

    # --- vision-token cache ---------------------------------------------------------
    def _cache_args(self, session_id: str, key: str) -> tuple[list[str], list[Any]]:
        keys = [self._key(session_id, "lru"), self._key(session_id, "csize")]
        ttl_ms = int(self.limits.ttl_s * 1000) if self.limits.ttl_s else 0
        return keys, [self._key(session_id, "c:"), key, now(), ttl_ms]

    def cache_get(self, session_id: str, key: str) -> bytes | None:
        keys, args = self._cache_args(session_id, key)
        value = self._call(
            "cache read", lambda: self._cache_get(keys=keys, args=args), self.cache_url
        )
        return bytes(value) if value else None

    def cache_get_many(self, session_id: str, keys: Sequence[str]) -> dict[str, bytes]:
        """The reads pipelined: one round trip for all keys."""
        unique = list(dict.fromkeys(keys))

        def run() -> list[Any]:
            if self._cache_cluster:  # no scripts in a cluster's pipelines
                return [self._cache_get(*self._cache_args(session_id, key)) for key in unique]
            pipe = self._c.pipeline(transaction=False)
            for key in unique:
                script_keys, args = self._cache_args(session_id, key)
                self._cache_get(keys=script_keys, args=args, client=pipe)
            return pipe.execute()

        values = self._call("cache read", run, self.cache_url) if unique else []
        return {key: bytes(v) for key, v in zip(unique, values) if v}

    def cache_contains(self, session_id: str, keys: Sequence[str]) -> set[str]:
        """Which of `keys` the session's cache holds, without reading the values (one round
        trip; recency unchanged)."""
        unique = list(dict.fromkeys(keys))

        def run() -> list[Any]:
            pipe = self._c.pipeline(transaction=False)
            for key in unique:
                pipe.exists(self._key(session_id, "c:" + key))
            return pipe.execute()

        found = self._call("cache read", run, self.cache_url) if unique else []
        return {key for key, n in zip(unique, found) if n}

    def cache_put(self, session_id: str, key: str, value: bytes) -> None:
        keys, args = self._cache_args(session_id, key)
        args += [self.limits.max_bytes, value]
        self._call("cache write", lambda: self._cache_put(keys=keys, args=args), self.cache_url)

    def cache_delete(self, session_id: str, key: str) -> None:
        def run() -> None:
            pipe = self._c.pipeline(transaction=True)
            pipe.delete(self._key(session_id, "c:" + key))
            pipe.zrem(self._key(session_id, "lru"), key)
            pipe.hdel(self._key(session_id, "csize"), key)
            pipe.execute()

        self._call("cache delete", run, self.cache_url)

    def count_cache(self, session_id: str, hits: int = 0, misses: int = 0) -> None:
        keys = [self._key(session_id, "turns"), self._key(session_id, "meta")]
        self._call("cache counters", lambda: self._r.eval(_COUNT_CACHE, 2, *keys, hits, misses))

    # --- sizes ----------------------------------------------------------------------
    def info(self, session_id: str) -> SessionInfo:
        def run() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            pipe.llen(self._key(session_id, "turns"))
            pipe.llen(self._key(session_id, "pages"))
            pipe.hmget(self._key(session_id, "meta"), "cursor", "hits", "misses", "turn_bytes")
            if self._c is self._r:
                pipe.hvals(csize)
            return pipe.execute()

        csize = self._key(session_id, "csize")
        turns, pages, meta, *sizes = self._call("session info", run)
        if not sizes:  # the cache on a server of its own
            sizes = [self._call("session info", lambda: self._c.hvals(csize), self.cache_url)]
        sizes = sizes[0]
        cursor, hits, misses, turn_bytes = (int(v or 0) for v in meta)
        return SessionInfo(
            turns, pages, cursor, len(sizes), sum(int(s) for s in sizes), hits, misses, turn_bytes
        )

    def close(self) -> None:
        self._r.close()
        if self._c is not self._r:
            self._c.close()
