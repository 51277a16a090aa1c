"""Encoding pages as a queue shared by every session: batches of one tier per forward pass.

Two queues with one surface (`submit`-and-wait through `encode`, `depth`, `stats`):

- `LocalEncodeQueue`: in the process. A thread takes the pages that concurrent callers
  (`context()`, `ask()` of any session) are waiting for, up to `batch` pages of one tier
  per forward pass, oldest first; pages arriving while a batch runs make the next one.
  A page asked for twice while queued is encoded once.
- `RedisEncodeQueue`: shared through Redis by any number of `EncodeWorker`s on GPU
  machines (`optical-memory worker`). Pages go into a Redis stream read by a consumer
  group; results land in the vision-token cache; the caller waits for them there.

Redis protocol (P the store's key prefix, T the session's hash tag, E the encoder's
`cache_id`; see `optical_memory.stores.redis` for the rest of the layout):

    P:encode:E        stream of pages to encode; consumer group "workers"
    P:{T}:eq:<key>    set of reply keys waiting for the page whose cache key is <key>;
                      the first caller to create it adds the stream entry (so a page
                      asked for by many callers is queued once); expires after the
                      callers' timeout
    P:{T}:er:<token>  one caller's reply list: a worker pushes each page's cache key
                      (or "!<key> <reason>") when it is in the cache (or cannot be)

A stream entry: v ("1"), sid (session id), key (the page's embedding cache key),
img (cache key of its rendered image, which the caller puts in the cache), mode, w, h
(the page's canvas) and idx (its page index, for messages). A worker takes entries
with XREADGROUP, first claiming those another worker left pending for longer than
`claim_after_s` (XAUTOCLAIM: a dead worker's batch is taken over), skips pages already
in the cache (encoded once, however often queued or claimed), encodes the rest one tier
per forward pass, stores each result, wakes the waiters, then acknowledges and deletes
the entries. Entries are read as hostile: any field out of shape gets the entry dropped
(acknowledged, logged), never decoded beyond its checked fields.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optical_memory.stores.base import StoreError, StoreUnavailableError

if TYPE_CHECKING:
    from optical_memory.stores.redis import RedisStore

log = logging.getLogger(__name__)

GROUP = "workers"
ENTRY_VERSION = "1"
_HEX40 = re.compile(r"[0-9a-f]{40}")
_ENCODER_ID = re.compile(r"[A-Za-z0-9_./:-]{1,200}")
MAX_SESSION_ID_BYTES = 4 * 256  # ids are at most 256 characters (memory.check_id)
MAX_CANVAS_SIDE = 8192  # cache.MAX_IMAGE_SIDE


class EncodeError(RuntimeError):
    """A page could not be encoded (a worker said why, or the forward pass failed)."""


class EncodeTimeoutError(EncodeError, TimeoutError):
    """Pages were not encoded within the timeout; `pages` names them (session, index, tier)."""

    def __init__(self, message: str, pages: Sequence[PageJob] = ()):
        super().__init__(message)
        self.pages = tuple(pages)


@dataclass(frozen=True)
class PageJob:
    """One page to encode: where its result goes (`session_id`, cache `key`) and what it is."""

    session_id: str
    key: str  # the cache key of its vision tokens
    index: int  # its page index in the session (for messages)
    mode: str  # its tier
    image_key: str = ""  # the cache key of its rendered image (what Redis workers read)
    size: tuple[int, int] = (0, 0)  # its canvas (width, height)

    def describe(self) -> str:
        return f"page {self.index} of session {self.session_id!r} ({self.mode})"


def describe_pages(jobs: Sequence[PageJob], most: int = 5) -> str:
    shown = ", ".join(job.describe() for job in jobs[:most])
    return shown + (f" and {len(jobs) - most} more" if len(jobs) > most else "")


@dataclass
class QueueStats:
    """Counters of a queue since it started (read them with `stats()`: a copy)."""

    pages: int = 0  # pages encoded
    batches: int = 0  # forward passes
    largest_batch: int = 0
    most_sessions_in_batch: int = 0  # sessions whose pages shared one forward pass, at most
    deduplicated: int = 0  # requests for a page already queued or in the cache
    failed: int = 0  # pages whose batch failed
    # a worker's seconds in each part of its work (the prepare of the next batch overlaps the
    # encode of this one): reading and preprocessing images, forward passes (with packing
    # the results), storing the results and waking the waiters
    prepare_s: float = 0.0
    encode_s: float = 0.0
    store_s: float = 0.0


# --------------------------------------------------------------------------- in-process
OnResults = Callable[[list[PageJob], list[Any]], None]


@dataclass(eq=False)
class _Item:
    job: PageJob
    payload: Any
    on_results: OnResults | None = None
    future: Future = field(default_factory=Future)


class LocalEncodeQueue:
    """One queue and one encoding thread for every caller in the process.

    `encode_batch(mode, payloads)` runs one forward pass over payloads of one tier and
    returns one result per payload (for DeepSeek-OCR: `Encoder.encode_views`). `batch`: the
    most pages per forward pass. The thread starts on the first `submit` and is a daemon.
    """

    def __init__(self, encode_batch: Callable[[str, list[Any]], list[Any]], batch: int = 8):
        if batch < 1:
            raise ValueError(f"the encode batch must be at least 1 page, got {batch}")
        self.batch = batch
        self._encode_batch = encode_batch
        self._cond = threading.Condition()
        self._waiting: deque[_Item] = deque()
        self._by_key: dict[tuple[str, str], _Item] = {}  # waiting or running
        self._running = 0
        self._holds = 0
        self._thread: threading.Thread | None = None
        self._stats = QueueStats()

    @property
    def depth(self) -> int:
        """Pages submitted and not yet encoded (waiting, or in the forward pass now)."""
        with self._cond:
            return len(self._waiting) + self._running

    def stats(self) -> QueueStats:
        with self._cond:
            return QueueStats(**vars(self._stats))

    def submit(
        self, job: PageJob, payload: Any, on_results: OnResults | None = None
    ) -> tuple[Future, bool]:
        """Queue a page; (its future result, whether this call queued it). A page already
        queued or being encoded (same session and key) is not queued again: its future is
        shared. `on_results(jobs, results)` of the calls that queued pages runs in the
        encoding thread after each forward pass, once per callback with its pages of that
        pass, before their futures are set (e.g. to store the results in the cache in one
        write, whether or not any caller still waits)."""
        return self.submit_many([(job, payload)], on_results)[0]

    def submit_many(
        self,
        pages: Sequence[tuple[PageJob, Any]],
        on_results: OnResults | None = None,
    ) -> list[tuple[Future, bool]]:
        """`submit` for several pages at once (they can share the next forward pass)."""
        out = []
        with self._cond:
            for job, payload in pages:
                item = self._by_key.get((job.session_id, job.key))
                if item is not None:
                    self._stats.deduplicated += 1
                    out.append((item.future, False))
                    continue
                item = _Item(job, payload, on_results)
                self._by_key[(job.session_id, job.key)] = item
                self._waiting.append(item)
                out.append((item.future, True))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="optical-memory-encoder", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        return out

    @contextmanager
    def hold(self) -> Iterable[None]:
        """No new forward pass starts inside this block (pages queue up meanwhile)."""
        with self._cond:
            self._holds += 1
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def _take(self) -> list[_Item]:
        """The oldest waiting page's tier: up to `batch` waiting pages of it, oldest first."""
        with self._cond:
            while not self._waiting or self._holds:
                self._cond.wait()
            mode = self._waiting[0].job.mode
            taken = [item for item in self._waiting if item.job.mode == mode][: self.batch]
            chosen = set(map(id, taken))
            self._waiting = deque(item for item in self._waiting if id(item) not in chosen)
            self._running = len(taken)
            return taken

    def _run(self) -> None:
        while True:
            items = self._take()
            try:
                results = self._encode_batch(items[0].job.mode, [i.payload for i in items])
                if len(results) != len(items):
                    raise EncodeError(f"{len(results)} results for a batch of {len(items)} pages")
            except BaseException as exc:  # noqa: BLE001 (handed to every waiter of the batch)
                error = exc
                results = None
            with self._cond:
                self._running = 0
                for item in items:
                    self._by_key.pop((item.job.session_id, item.job.key), None)
                stats = self._stats
                if results is None:
                    stats.failed += len(items)
                else:
                    stats.pages += len(items)
                    stats.batches += 1
                    stats.largest_batch = max(stats.largest_batch, len(items))
                    sessions = len({item.job.session_id for item in items})
                    stats.most_sessions_in_batch = max(stats.most_sessions_in_batch, sessions)
            # results land in the cache first: a caller that wakes finds them there
            callbacks: dict[int, tuple[OnResults, list[int]]] = {}
            for i, item in enumerate(items if results is not None else ()):
                if item.on_results is not None:
                    callbacks.setdefault(id(item.on_results), (item.on_results, []))[1].append(i)
            for on_results, where in callbacks.values():
                jobs = [items[i].job for i in where]
                try:
                    on_results(jobs, [results[i] for i in where])
                except Exception:
                    log.exception("storing %s failed", describe_pages(jobs))
            for i, item in enumerate(items):
                if results is None:
                    item.future.set_exception(
                        EncodeError(f"encoding {item.job.describe()} failed: {error!r}")
                    )
                else:
                    item.future.set_result(results[i])


# --------------------------------------------------------------------------- Redis
# KEYS: the claim sets (eq:<key>) of one session. ARGV: reply key, ttl ms. Per key: 1 when
# this call created the set (it queues the page), else 0.
_REGISTER = """
local out = {}
for i, k in ipairs(KEYS) do
  local fresh = redis.call('EXISTS', k) == 0
  redis.call('SADD', k, ARGV[1])
  redis.call('PEXPIRE', k, ARGV[2])
  out[i] = fresh and 1 or 0
end
return out
"""

# KEYS: a page's claim set (eq:<key>). ARGV: reply key prefix (P:{T}:er:), message, ttl ms.
# Wakes every waiter of the page; reply keys of any other shape are ignored.
_NOTIFY = """
local waiters = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
local n = 0
for _, r in ipairs(waiters) do
  local token = string.sub(r, #ARGV[1] + 1)
  if string.sub(r, 1, #ARGV[1]) == ARGV[1] and #token == 32 and string.match(token, '^%x+$') then
    redis.call('RPUSH', r, ARGV[2])
    redis.call('PEXPIRE', r, ARGV[3])
    n = n + 1
  end
end
return n
"""


def stream_key(store: RedisStore, encoder_id: str) -> str:
    """The stream of pages to encode for the encoder whose `cache_id` is `encoder_id`."""
    if not _ENCODER_ID.fullmatch(encoder_id):
        raise ValueError(f"encoder id {encoder_id[:80]!r} cannot name a stream")
    return store.global_key(f"encode:{encoder_id}")


def _ensure_group(client: Any, stream: str) -> None:
    import redis

    try:
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _redis_errors(what: str, store: RedisStore) -> Any:
    """A context manager turning redis-py errors into store errors."""
    import redis

    @contextmanager
    def guard() -> Iterable[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailableError(
                f"Redis at {store.url} is unreachable during {what}: {exc}"
            ) from exc
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted: the worker creates it again
                raise
            raise StoreError(f"Redis at {store.url} failed during {what}: {exc}") from exc
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {store.url} failed during {what}: {exc}") from exc

    return guard()


def queue_depth(store: RedisStore, stream: str) -> int:
    """Entries of the stream not yet acknowledged by a worker: waiting (the group's lag)
    plus taken and not done (pending)."""
    with _redis_errors("reading the encode queue's depth", store):
        try:
            groups = store.client.xinfo_groups(stream)
        except Exception as exc:
            if "no such key" in str(exc).lower():
                return 0
            raise
    for group in groups:
        if _text(group.get("name")) == GROUP:
            lag = group.get("lag")
            if lag is None:  # an entry deleted since: count the stream instead
                lag = max(0, int(store.client.xlen(stream)) - int(group.get("pending") or 0))
            return int(lag) + int(group.get("pending") or 0)
    return 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisEncodeQueue:
    """Pages queued in a Redis stream for `EncodeWorker`s, results read from the cache.

    `store`: the RedisStore of the sessions (plain or cluster). `encoder_id`: the encoder's
    `cache_id`, which names the stream: only workers with the same weights and dtype serve
    it. `timeout_s`: how long `encode` waits for its pages before `EncodeTimeoutError`.
    """

    def __init__(self, store: RedisStore, encoder_id: str, timeout_s: float = 300.0):
        if timeout_s <= 0:
            raise ValueError(f"the encode timeout must be positive, got {timeout_s}")
        self.store = store
        self.encoder_id = encoder_id
        self.stream = stream_key(store, encoder_id)
        self.timeout_s = timeout_s
        self._register = store.client.register_script(_REGISTER)
        self._group_ready = False
        self._stats = QueueStats()
        self._lock = threading.Lock()

    @property
    def depth(self) -> int:
        """Pages in the stream not yet done by a worker (every caller's, not only ours)."""
        return queue_depth(self.store, self.stream)

    def stats(self) -> QueueStats:
        with self._lock:
            return QueueStats(**vars(self._stats))

    def workers(self) -> int:
        """Consumers the group has seen (a dead worker stays listed until deleted)."""
        with _redis_errors("reading the encode queue's workers", self.store):
            try:
                groups = self.store.client.xinfo_groups(self.stream)
            except Exception:  # noqa: BLE001 (no stream yet)
                return 0
        return next((int(g["consumers"]) for g in groups if _text(g["name"]) == GROUP), 0)

    def encode(self, jobs: Sequence[PageJob]) -> set[str]:
        """Queue `jobs` (pages of one session whose images are in the cache) and wait until
        every one's vision tokens are in the cache; returns their keys. A page already
        queued by another caller is not queued again. `EncodeTimeoutError` after
        `timeout_s`; `EncodeError` when a worker could not encode a page."""
        if not jobs:
            return set()
        sid = jobs[0].session_id
        if any(job.session_id != sid for job in jobs):
            raise ValueError("one encode call takes pages of one session")
        store, client = self.store, self.store.client
        reply = store.key(sid, "er:" + uuid.uuid4().hex)
        ttl_ms = int(self.timeout_s * 1000) + 60_000
        deadline = time.monotonic() + self.timeout_s
        by_key = {job.key: job for job in jobs}
        with _redis_errors("queueing pages to encode", store):
            if not self._group_ready:
                _ensure_group(client, self.stream)
                self._group_ready = True
            claims = [store.key(sid, "eq:" + key) for key in by_key]
            fresh = self._register(keys=claims, args=[reply, ttl_ms])
            pipe = client.pipeline(transaction=False)  # one stream: one slot on a cluster
            queued = [job for job, new in zip(by_key.values(), fresh) if int(new)]
            for job in queued:
                pipe.xadd(self.stream, _entry(job))
            pipe.execute()
        with self._lock:
            self._stats.pages += len(queued)
            self._stats.deduplicated += len(by_key) - len(queued)
        waiting = set(by_key)
        errors: dict[str, str] = {}
        try:
            waiting -= self._cached(sid, waiting)  # done before we registered
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._timeout(sorted((by_key[k] for k in waiting), key=_order))
                with _redis_errors("waiting for encoded pages", store):
                    got = client.blpop([reply], timeout=min(1.0, left))
                if got is None:  # a notice lost or expired: the cache says what is done
                    waiting -= self._cached(sid, waiting)
                    continue
                message = _text(got[1])
                if message.startswith("!"):
                    key, _, why = message[1:].partition(" ")
                    if key in waiting:
                        errors[key] = why[:500]
                        waiting.discard(key)
                else:
                    waiting.discard(message)
        finally:
            with _redis_errors("cleaning up a wait", store):
                client.delete(reply)
        if errors:
            failed = sorted((by_key[k] for k in errors), key=_order)
            reasons = "; ".join(f"{job.describe()}: {errors[job.key]}" for job in failed)
            raise EncodeError(
                f"the encode workers could not encode {len(failed)} page(s): {reasons}"
            )
        return set(by_key)

    def _cached(self, sid: str, keys: set[str]) -> set[str]:
        return self.store.cache_contains(sid, list(keys)) if keys else set()

    def _timeout(self, jobs: list[PageJob]) -> EncodeTimeoutError:
        workers = self.workers()
        prefix = f" --prefix {self.store.prefix}" if self.store.prefix != "om" else ""
        hint = (
            f"no worker has ever read the stream {self.stream!r}: start one with "
            f"`optical-memory worker --store URL{prefix} --model DIR` (the same weights and "
            f"dtype: encoder {self.encoder_id})"
            if workers == 0
            else f"{workers} worker(s) registered on {self.stream!r}, {self.depth} page(s) queued"
        )
        return EncodeTimeoutError(
            f"{len(jobs)} page(s) not encoded within the {self.timeout_s:g} s encode timeout: "
            f"{describe_pages(jobs)}; {hint}",
            jobs,
        )


def _order(job: PageJob) -> tuple[str, int]:
    return job.session_id, job.index


def _entry(job: PageJob) -> dict[str, str]:
    width, height = job.size
    return {
        "v": ENTRY_VERSION,
        "sid": job.session_id,
        "key": job.key,
        "img": job.image_key,
        "mode": job.mode,
        "w": str(width),
        "h": str(height),
        "idx": str(job.index),
    }


def parse_entry(fields: Any, modes: Iterable[str]) -> PageJob:
    """The page of a stream entry, every field checked (ValueError naming what is off)."""
    if not isinstance(fields, dict) or len(fields) > 16:
        raise ValueError("not a map of at most 16 fields")
    got: dict[str, str] = {}
    for name, value in fields.items():
        if not isinstance(name, bytes | str) or not isinstance(value, bytes | str):
            raise ValueError("a field that is not a string")  # noqa: TRY004 (hostile data)
        if len(value) > MAX_SESSION_ID_BYTES:
            raise ValueError(f"field {str(name)[:20]!r} is too long")
        try:
            got[_text(name)] = _text(value)
        except UnicodeDecodeError:
            raise ValueError(f"field {str(name)[:20]!r} is not UTF-8") from None
    if got.get("v") != ENTRY_VERSION:
        raise ValueError(f"entry version {got.get('v', '')[:10]!r}, not {ENTRY_VERSION}")
    sid, key, img, mode = (got.get(n, "") for n in ("sid", "key", "img", "mode"))
    if not sid or any(ord(c) < 32 for c in sid):
        raise ValueError("bad session id")
    if not _HEX40.fullmatch(key) or not _HEX40.fullmatch(img):
        raise ValueError("bad cache key")
    if mode not in set(modes):
        raise ValueError(f"unknown tier {mode[:20]!r}")
    try:
        width, height, index = int(got.get("w", "")), int(got.get("h", "")), int(got.get("idx", ""))
    except ValueError:
        raise ValueError("canvas or page index is not a number") from None
    if not (0 < width <= MAX_CANVAS_SIDE and 0 < height <= MAX_CANVAS_SIDE and index >= 0):
        raise ValueError(f"canvas {width}x{height} or page index {index} out of range")
    return PageJob(sid, key, index, mode, img, (width, height))


@dataclass
class _Work:
    """One read of the stream, planned: the entries, their checked pages, what is already
    decided (entry id -> "" done or an error), the forward passes to run (tier, entry ids,
    what `prepare` made of them) and duplicates (entry id -> the entry id it repeats)."""

    entries: list[tuple[Any, Any]]
    jobs: dict[Any, PageJob] = field(default_factory=dict)
    done: dict[Any, str] = field(default_factory=dict)
    passes: list[tuple[str, list[Any], Any]] = field(default_factory=list)
    repeats: dict[Any, Any] = field(default_factory=dict)
    cached: int = 0  # pages found in the cache already


class EncodeWorker:
    """Takes pages from the stream of one encoder and encodes them into the cache.

    `store`: the RedisStore of the sessions. `encoder_id`: the encoder's `cache_id`.
    `encode(mode, jobs, prepared) -> list[(bytes | None, error)]` is given the checked pages
    of one tier (at most `batch`) and returns, per page, the packed cache value to store (see
    `optical_memory.cache.tensor_to_bytes`) or an error message. `prepare(mode, jobs)`, when
    given, does the CPU part beforehand (reading and preprocessing the images): `run` then
    reads and prepares the next batch in a thread while the current one is encoded, and
    `encode` gets what it returned (else `prepared` is None). `claim_after_s`: entries
    another consumer took and left unacknowledged that long are claimed (its process died).
    `name`: this consumer's name in the group (default: host, pid and a random suffix).
    """

    def __init__(
        self,
        store: RedisStore,
        encoder_id: str,
        encode: Callable[[str, list[PageJob], Any], list[tuple[bytes | None, str]]],
        *,
        modes: Iterable[str],
        prepare: Callable[[str, list[PageJob]], Any] | None = None,
        batch: int = 8,
        claim_after_s: float = 60.0,
        block_s: float = 1.0,
        name: str | None = None,
    ):
        import os
        import socket

        if batch < 1:
            raise ValueError(f"the worker batch must be at least 1 page, got {batch}")
        self.store = store
        self.stream = stream_key(store, encoder_id)
        self.batch = batch
        self.claim_after_ms = int(claim_after_s * 1000)
        self.block_ms = max(1, int(block_s * 1000))
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.modes = tuple(modes)
        self._encode = encode
        self._prepare = prepare
        self._notify = store.client.register_script(_NOTIFY)
        self.stats = QueueStats()
        with _redis_errors("creating the encode stream's group", store):
            _ensure_group(store.client, self.stream)

    def run(self, stop: threading.Event | None = None, max_pages: int | None = None,
            idle_exit_s: float | None = None) -> QueueStats:
        """Work until `stop` is set, `max_pages` pages are encoded, or (with `idle_exit_s`)
        the stream stayed empty that long. What was read is finished before returning."""
        from concurrent.futures import ThreadPoolExecutor

        def wait() -> None:
            (stop.wait if stop is not None else time.sleep)(1.0)

        idle_since = time.monotonic()
        ahead = None
        if self._prepare is not None:
            ahead = ThreadPoolExecutor(1, thread_name_prefix="encode-fetch")
        following = ahead.submit(self._next) if ahead else None
        try:
            while True:
                try:
                    work = following.result() if following else self._next()
                except StoreUnavailableError as exc:  # Redis away: wait for it, keep nothing
                    log.warning("%s; trying again in 1 s", exc)
                    work = None
                    wait()
                stopping = (
                    (stop is not None and stop.is_set())
                    or (max_pages is not None and self.stats.pages >= max_pages)
                    or (idle_exit_s is not None and not work
                        and time.monotonic() - idle_since >= idle_exit_s)
                )
                following = ahead.submit(self._next) if ahead and not stopping else None
                if work:
                    try:
                        self._finish(work)
                    except StoreUnavailableError as exc:  # left pending: claimed again later
                        log.warning("%s; its pages stay pending", exc)
                        wait()
                    idle_since = time.monotonic()
                if stopping:
                    break
        finally:
            if ahead is not None:
                ahead.shutdown(wait=True)
        return self.stats

    def step(self) -> int:
        """Take up to `batch` entries (claimed from dead workers first, else new ones,
        waiting up to `block_s`) and do them; the number of entries done."""
        work = self._next()
        if work:
            self._finish(work)
        return len(work.entries) if work else 0

    def _next(self) -> _Work | None:
        """The next entries, planned (and prepared, with `prepare`); None when none came."""
        entries = self._read()
        return self._plan(entries) if entries else None

    def _read(self) -> list[tuple[Any, Any]]:
        import redis

        client = self.store.client
        try:
            with _redis_errors("reading the encode stream", self.store):
                _, entries, *_ = client.xautoclaim(
                    self.stream, GROUP, self.name, self.claim_after_ms, start_id="0-0",
                    count=self.batch,
                )
                if entries:
                    log.info("claimed %d page(s) left pending by another worker", len(entries))
                    return entries
                read = client.xreadgroup(
                    GROUP, self.name, {self.stream: ">"}, count=self.batch, block=self.block_ms
                )
                return read[0][1] if read else []
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("the encode stream or its group vanished (flushed?): created again")
            with _redis_errors("creating the encode stream's group", self.store):
                _ensure_group(client, self.stream)
            return []

    def _plan(self, entries: list[tuple[Any, Any]]) -> _Work:
        work = _Work(entries)
        for entry_id, fields in entries:
            try:
                work.jobs[entry_id] = parse_entry(fields, self.modes)
            except ValueError as exc:
                log.warning("dropping stream entry %s: %s", _text(entry_id), exc)
        # pages already in the cache (queued twice, or done by a worker that died before
        # acknowledging) are not encoded again
        for entry_id in self._cached(work, list(work.jobs)):
            work.done[entry_id] = ""
            work.cached += 1
        first: dict[tuple[str, str], Any] = {}  # one forward pass input per page
        todo: dict[str, list[Any]] = {}
        for entry_id, job in work.jobs.items():
            if entry_id in work.done:
                continue
            seen = first.setdefault((job.session_id, job.key), entry_id)
            if seen is not entry_id:
                work.repeats[entry_id] = seen
            else:
                todo.setdefault(job.mode, []).append(entry_id)
        for mode, ids in todo.items():
            for start in range(0, len(ids), self.batch):
                chunk = ids[start : start + self.batch]
                prepared = None
                if self._prepare is not None:
                    started = time.perf_counter()
                    try:
                        prepared = self._prepare(mode, [work.jobs[i] for i in chunk])
                    except Exception:  # the forward pass prepares again, and reports
                        log.exception("preparing %d %s page(s) failed", len(chunk), mode)
                    self.stats.prepare_s += time.perf_counter() - started
                work.passes.append((mode, chunk, prepared))
        return work

    def _cached(self, work: _Work, ids: list[Any]) -> set[Any]:
        """The entries among `ids` whose page is in the cache already."""
        by_session: dict[str, list[Any]] = {}
        for entry_id in ids:
            by_session.setdefault(work.jobs[entry_id].session_id, []).append(entry_id)
        found = set()
        for sid, group in by_session.items():
            have = self.store.cache_contains(sid, [work.jobs[i].key for i in group])
            found.update(i for i in group if work.jobs[i].key in have)
        return found

    def _finish(self, work: _Work) -> None:
        """Run the planned forward passes, store the results, wake the waiters, acknowledge."""
        self.stats.deduplicated += work.cached
        for mode, planned, prepared in work.passes:
            if self._prepare is not None:  # planned ahead: a page may have been stored since
                stored = self._cached(work, planned)
                for entry_id in stored:
                    work.done[entry_id] = ""
                    self.stats.deduplicated += 1
                if stored:
                    planned, prepared = [i for i in planned if i not in stored], None
                if not planned:
                    continue
            jobs = [work.jobs[i] for i in planned]
            started = time.perf_counter()
            try:
                results = self._encode(mode, jobs, prepared)
            except Exception as exc:
                log.exception("encoding %d %s page(s) failed", len(jobs), mode)
                results = [(None, f"the worker failed: {exc!r}"[:300])] * len(jobs)
            stored = time.perf_counter()
            self.stats.encode_s += stored - started
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
            sessions = len({job.session_id for job in jobs})
            self.stats.most_sessions_in_batch = max(self.stats.most_sessions_in_batch, sessions)
            for entry_id, job, (value, error) in zip(planned, jobs, results):
                if value is not None:
                    self.store.cache_put(job.session_id, job.key, value)
                    self.stats.pages += 1
                    log.info("stored %s key %s", job.describe(), job.key)
                    work.done[entry_id] = ""
                else:
                    self.stats.failed += 1
                    work.done[entry_id] = error or "unknown error"
            self.stats.store_s += time.perf_counter() - stored
        for entry_id, seen in work.repeats.items():  # a page twice in one read: one outcome
            work.done[entry_id] = work.done.get(seen, "not done")
        started = time.perf_counter()
        with _redis_errors("finishing encoded pages", self.store):
            for entry_id, job in work.jobs.items():
                error = work.done.get(entry_id, "not done")
                message = job.key if not error else f"!{job.key} {error}"
                self._notify(
                    keys=[self.store.key(job.session_id, "eq:" + job.key)],
                    args=[self.store.key(job.session_id, "er:"), message, 120_000],
                )
            ids = [entry_id for entry_id, _ in work.entries]
            pipe = self.store.client.pipeline(transaction=False)
            pipe.xack(self.stream, GROUP, *ids)
            pipe.xdel(self.stream, *ids)
            pipe.execute()
        self.stats.store_s += time.perf_counter() - started
