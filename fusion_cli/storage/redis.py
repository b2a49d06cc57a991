"""`redis://[[USER]:PASSWORD@]HOST:PORT/DB?prefix=P&lock_ttl=S&ttl=T` -- a Redis server.

Also `rediss://` (TLS) and `unix:///path/to.sock?db=N`. `prefix` (default
``fusion:``), `lock_ttl` (seconds, default 30) and `ttl` (a duration such as
``30d``, ``12h`` or plain seconds; default none) are ours and are stripped;
every other query parameter goes to redis-py's `Redis.from_url`.

Keys, all under the prefix P:

    {P}session:{id}  LIST    one item per message, compact JSON, oldest first
    {P}meta:{id}     HASH    created, updated: Unix seconds (floats)
    {P}sessions      ZSET    every session id; score 0, or when it expires (see below)
    {P}lock:{id}     STRING  the session's lock (redis-py's Lock), with a TTL

The index is what makes a session exist: Redis drops an empty list, and an
empty history is still a session. With equal scores ZRANGE returns members in
byte order, which is code-point order for our ASCII ids, so listing needs no
KEYS or SCAN. Times are one small hash per session rather than two store-wide
hashes so that a session is exactly its own keys: deleting it is one DEL, and
`HGETALL {P}meta:ID` shows it. Every write is one MULTI/EXEC transaction.

With `ttl`, every write also sets the session's list and hash to expire
`ttl` seconds later (PEXPIRE, so each write refreshes it) and gives its index
entry that moment, in Unix seconds, as its score; a write without `ttl`
makes them permanent again (PERSIST, score 0). Redis expires keys, not the
members of a sorted set, so readers treat an entry whose score has passed
as gone (`exists`, `info`, `list`), and a listing that meets such entries
removes them in one ZREMRANGEBYSCORE over the past scores, which cannot
touch a session written again meanwhile (its score is in the future, or 0).
The score comes from the client's clock and the key's expiry from the
server's: clocks that disagree by more than a moment make a session vanish
from listings a little before or after its keys do, never anything worse.
A session without a TTL sorts first (score 0); listings sort by id anyway.

One Redis server (or a proxy in front of one): not Redis Cluster, where a
transaction could not span a session's keys and the index.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator
from urllib.parse import unquote

import redis
from redis import exceptions as rx
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import CorruptSession, InvalidStorageURL, StorageError, StorageUnavailable, UsageError
from ..messages import ChatMessage, decode_message, encode_message
from ..timespec import parse_duration
from . import redact_url
from .base import ConversationStorage, SessionInfo, is_valid_session_id

DEFAULT_PREFIX = "fusion:"
DEFAULT_LOCK_TTL = 30.0
# Seconds; redis-py's URL parameters of the same names win over these.
SOCKET_TIMEOUT = 5.0

log = logging.getLogger(__name__)


class RedisStorage(ConversationStorage):
    scheme = "redis"

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX,
                 lock_ttl: float = DEFAULT_LOCK_TTL, location: str | None = None,
                 owns_client: bool = False, ttl: float | None = None) -> None:
        """Use `client` (not contacted until the first call); `close()` closes it only if `owns_client`.

        `ttl`: seconds after its last write that a session expires; None keeps it for good.
        """
        super().__init__()
        if not (lock_ttl > 0 and math.isfinite(lock_ttl)):
            raise ValueError(f"lock_ttl must be a positive number of seconds, not {lock_ttl!r}")
        if ttl is not None and not (ttl >= 0.001 and math.isfinite(ttl)):
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        self.ttl = ttl
        self.client = client
        self.prefix = prefix
        self.lock_ttl = float(lock_ttl)
        self.location = location or _describe(client)
        self._owns_client = owns_client
        self._index = f"{prefix}sessions"

    @classmethod
    def from_url(cls, url: str) -> "RedisStorage":
        location = redact_url(url)
        base, _, query = url.partition("?")
        ours: dict[str, str] = {}
        rest: list[str] = []
        # Pieces that are not ours stay as written: redis-py decodes them itself.
        for piece in filter(None, query.split("&")):
            name, _, value = piece.partition("=")
            if name in ("prefix", "lock_ttl", "ttl"):
                if name in ours:
                    raise InvalidStorageURL(f"{name!r} is given twice in {location!r}")
                ours[name] = unquote(value)
            else:
                rest.append(piece)
        lock_ttl = DEFAULT_LOCK_TTL
        if "lock_ttl" in ours:
            try:
                lock_ttl = float(ours["lock_ttl"])
            except ValueError:
                lock_ttl = math.nan
            if not (lock_ttl > 0 and math.isfinite(lock_ttl)):
                raise InvalidStorageURL(f"lock_ttl={ours['lock_ttl']!r} in {location!r} is not a positive "
                                        "number of seconds", hint="e.g. lock_ttl=30")
        ttl = None
        if "ttl" in ours:
            try:
                ttl = parse_duration(ours["ttl"])
            except UsageError:
                ttl = math.nan
            if not (ttl >= 0.001 and math.isfinite(ttl)):
                raise InvalidStorageURL(f"ttl={ours['ttl']!r} in {location!r} is not a positive duration",
                                        hint="e.g. ttl=30d, ttl=12h or ttl=3600 (seconds)")
        _check_path(base, location)
        try:
            client = redis.Redis.from_url(
                base + ("?" + "&".join(rest) if rest else ""),
                socket_connect_timeout=SOCKET_TIMEOUT,
                socket_timeout=SOCKET_TIMEOUT,
                # No silent retries: a retried MULTI/EXEC whose reply was lost would
                # append a turn twice, and an unreachable server should fail at once.
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:  # redis-py's word for a bad scheme, port, db or option
            raise InvalidStorageURL(f"bad Redis URL {location!r}: {exc}",
                                    hint="e.g. redis://:PASSWORD@HOST:6379/0?prefix=fusion:") from exc
        return cls(client, prefix=ours.get("prefix", DEFAULT_PREFIX), lock_ttl=lock_ttl,
                   location=location, owns_client=True, ttl=ttl)

    def close(self) -> None:
        if self._owns_client:
            self.client.connection_pool.disconnect()

    # ---- errors --------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """The one place redis-py's errors become fusion errors."""
        try:
            yield
        except rx.AuthenticationError as exc:  # a ConnectionError too: test it first
            raise StorageUnavailable(
                f"Redis at {self.location} refused the credentials: {_first_line(exc)}",
                hint="check the password in the URL (redis://:PASSWORD@HOST:PORT/DB, or "
                     "redis://USER:PASSWORD@... for an ACL user; percent-encode '@', ':', '/')",
            ) from exc
        except (rx.ConnectionError, rx.TimeoutError) as exc:
            raise StorageUnavailable(
                f"cannot reach Redis at {self.location}: {_first_line(exc)}",
                hint="is redis-server running and reachable from here? "
                     "Check the --storage URL or FUSION_STORAGE",
            ) from exc
        except rx.RedisError as exc:
            raise StorageError(f"Redis at {self.location} failed: {_first_line(exc)}") from exc

    # ---- keys ------------------------------------------------------------------

    def _list_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def _meta_key(self, session_id: str) -> str:
        return f"{self.prefix}meta:{session_id}"

    def _touch(self, tx: Any, session_id: str) -> None:
        """Queue the index entry and the times (created once, updated on every write), and the TTL."""
        # The client's clock, not the server's TIME: a transaction cannot use a
        # reply inside itself, and this keeps every write to one round trip.
        now = time.time()
        meta, key = self._meta_key(session_id), self._list_key(session_id)
        tx.hsetnx(meta, "created", now)
        tx.hset(meta, "updated", now)
        if self.ttl is None:
            tx.zadd(self._index, {session_id: 0})
            tx.persist(key)
            tx.persist(meta)
        else:
            ms = max(1, round(self.ttl * 1000))
            tx.zadd(self._index, {session_id: now + ms / 1000})
            tx.pexpire(key, ms)  # a no-op for an empty history: Redis keeps no empty list
            tx.pexpire(meta, ms)

    # ---- the hooks -----------------------------------------------------------

    def _save(self, session_id: str, history: list[ChatMessage]) -> None:
        self._save_many([(session_id, history)], {})

    def _append(self, session_id: str, messages: list[ChatMessage]) -> None:
        # RPUSH is atomic on its own; no lock and no read of the history.
        with self._errors(), self.client.pipeline(transaction=True) as tx:
            if messages:
                tx.rpush(self._list_key(session_id), *(encode_message(m) for m in messages))
            self._touch(tx, session_id)
            tx.execute()

    def _save_many(self, items: list[tuple[str, list[ChatMessage]]], times: dict) -> None:
        # One MULTI/EXEC for the batch: one round trip instead of one per session.
        with self._errors(), self.client.pipeline(transaction=True) as tx:
            for session_id, history in items:
                key = self._list_key(session_id)
                tx.delete(key)
                if history:  # RPUSH needs at least one value; an empty history is just the index entry
                    tx.rpush(key, *(encode_message(m) for m in history))
                self._touch(tx, session_id)
                if session_id in times:
                    self._queue_times(tx, session_id, *times[session_id])
            tx.execute()

    def _set_times(self, session_id: str, created: float | None, updated: float | None) -> None:
        if not self._exists(session_id):
            return  # HSET would make a hash for a session that is not there
        with self._errors(), self.client.pipeline(transaction=True) as tx:
            self._queue_times(tx, session_id, created, updated)
            tx.execute()

    def _queue_times(self, tx: Any, session_id: str, created: float | None, updated: float | None) -> None:
        # The times only: a ttl still counts from the write, not from the original's time.
        fields = {name: value for name, value in (("created", created), ("updated", updated))
                  if value is not None}
        if fields:
            tx.hset(self._meta_key(session_id), mapping=fields)

    def _load_many(self, session_ids: list[str]) -> list[list[ChatMessage]]:
        # One round trip for the batch; a transaction, so every history is from one instant.
        keys = [self._list_key(session_id) for session_id in session_ids]
        with self._errors(), self.client.pipeline(transaction=True) as tx:
            for key in keys:
                tx.lrange(key, 0, -1)
            replies = tx.execute(raise_on_error=False)
        histories = []
        for key, items in zip(keys, replies):
            if isinstance(items, Exception):  # e.g. WRONGTYPE: what `_load` of this key would say
                with self._errors(), self._expecting(key, "a list"):
                    raise items
            histories.append([decode_message(item, f"{self.location} key {key} index {i}")
                              for i, item in enumerate(items)])
        return histories

    def _load(self, session_id: str) -> list[ChatMessage]:
        key = self._list_key(session_id)
        with self._errors(), self._expecting(key, "a list"):
            items = self.client.lrange(key, 0, -1)
        return [decode_message(item, f"{self.location} key {key} index {i}") for i, item in enumerate(items)]

    def _delete(self, session_id: str) -> None:
        # The lock key stays: deleting it would let a second holder in beside the first.
        with self._errors(), self.client.pipeline(transaction=True) as tx:
            tx.delete(self._list_key(session_id), self._meta_key(session_id))
            tx.zrem(self._index, session_id)
            tx.execute()

    def _exists(self, session_id: str) -> bool:
        with self._errors():
            return _alive(self.client.zscore(self._index, session_id), time.time())

    def _list_sessions(self) -> list[str]:
        with self._errors(), self._expecting(self._index, "a sorted set"):
            members = self.client.zrange(self._index, 0, -1, withscores=True)
        now = time.time()
        if any(not _alive(score, now) for _, score in members):
            self._forget_expired(now)
        # Something else writing into our prefix must not make every command fail.
        return [sid for sid, score in ((_text(m), s) for m, s in members)
                if _alive(score, now) and is_valid_session_id(sid)]

    def _forget_expired(self, now: float) -> None:
        """Drop index entries whose TTL has passed (their keys are gone, or about to go)."""
        # Only scores in (0, now]: a session written again since has a later score, or 0.
        with self._errors():
            self.client.zremrangebyscore(self._index, "(0", now)

    def _count(self, session_id: str) -> int:
        key = self._list_key(session_id)
        with self._errors(), self._expecting(key, "a list"):
            return self.client.llen(key)

    @contextmanager
    def _expecting(self, key: str, kind: str) -> Iterator[None]:
        """Around a read of `key`: one of another type (something else wrote a string or a
        hash there) is corrupt data, named by its key, rather than a bare Redis error."""
        try:
            yield
        except rx.ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            raise CorruptSession(f"{self.location} key {key}", f"not {kind} (WRONGTYPE)") from exc

    def _get_times(self, session_id: str):
        return self._times_many([session_id])[0]

    def _times_many(self, session_ids: list[str]):
        # One round trip for the batch (migrate asks it of every session it copies).
        with self._errors(), self.client.pipeline(transaction=True) as tx:
            for session_id in session_ids:
                tx.zscore(self._index, session_id)
                tx.hmget(self._meta_key(session_id), "created", "updated")
            replies = tx.execute()
        now = time.time()
        return [(_float(created), _float(updated)) if _alive(score, now) else None
                for score, (created, updated) in zip(replies[::2], replies[1::2])]

    def _info(self, session_id: str) -> SessionInfo | None:
        with self._errors(), self.client.pipeline(transaction=True) as tx:
            tx.zscore(self._index, session_id)
            tx.llen(self._list_key(session_id))
            tx.hmget(self._meta_key(session_id), "created", "updated")
            score, count, (created, updated) = tx.execute()
        if not _alive(score, time.time()):
            return None
        return SessionInfo(session_id, count, _float(created), _float(updated))

    def _list_info(self) -> Iterable[SessionInfo]:
        ids = self._list_sessions()
        if not ids:
            return []
        # One round trip for all of them, and a transaction so that each session's
        # count and times come from the same instant.
        with self._errors(), self.client.pipeline(transaction=True) as tx:
            for sid in ids:
                tx.zscore(self._index, sid)
                tx.llen(self._list_key(sid))
                tx.hmget(self._meta_key(sid), "created", "updated")
            replies = tx.execute(raise_on_error=False)
        infos = []
        now = time.time()
        for n, sid in enumerate(ids):
            score, count, times = replies[3 * n: 3 * n + 3]
            if not _alive(score, now):
                continue  # deleted or expired since the ZRANGE
            error = next((r for r in (count, times) if isinstance(r, Exception)), None)
            if error is not None:  # e.g. WRONGTYPE: a key we did not write
                infos.append(SessionInfo(sid, None, error=f"Redis at {self.location}: {_first_line(error)}"))
            else:
                infos.append(SessionInfo(sid, count, _float(times[0]), _float(times[1])))
        return infos

    def _try_lock(self, session_id: str) -> Any:
        # thread_local=False: the keeper thread must see the token this thread got.
        lock = self.client.lock(f"{self.prefix}lock:{session_id}", timeout=self.lock_ttl,
                                blocking=False, thread_local=False)
        with self._errors():
            if not lock.acquire(blocking=False):
                return None
        return _LockKeeper(lock, self.lock_ttl / 3)

    def _unlock(self, session_id: str, handle: Any) -> None:
        handle.stop()
        # Errors here are logged, not raised: the work done under the lock is
        # already committed (every write is atomic), so raising now would report a
        # failed turn that succeeded and invite sending it again, and while an
        # exception is already propagating it would hide the real one. A lock we
        # could not release expires on its own within lock_ttl.
        try:
            handle.lock.release()
        except rx.LockNotOwnedError:
            handle.lost = True  # the TTL ran out first: a stall, or the server was out of reach
        except rx.RedisError as exc:
            log.warning("could not release the lock of session %r in %s (%s); it expires in %g s",
                        session_id, self.location, _first_line(exc), self.lock_ttl)
        if handle.lost:
            log.warning("the lock of session %r in %s expired while held (a stall longer than "
                        "lock_ttl=%g s?); another process may have changed the session meanwhile",
                        session_id, self.location, self.lock_ttl)


class _LockKeeper:
    """A held redis-py Lock, whose TTL a daemon thread resets every `interval` seconds.

    The TTL frees the lock of a holder that died; the thread keeps a live
    holder's lock through a model call of any length. A daemon thread dies
    with its process, so a dead holder's lock expires within one TTL.
    """

    def __init__(self, lock: Any, interval: float) -> None:
        self.lock = lock
        self.lost = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._keep, args=(interval,), daemon=True,
                                        name=f"fusion-lock-keeper {_text(lock.name)}")
        self._thread.start()

    def _keep(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            try:
                self.lock.reacquire()  # back to the full TTL
            except rx.LockNotOwnedError:
                self.lost = True  # it expired and may be someone else's: nothing left to keep
                return
            except rx.RedisError:
                pass  # a blip: two more tries before the TTL runs out

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()  # never release while a reacquire is in flight



def _check_path(base: str, location: str) -> None:
    """Refuse what redis-py would silently misread: `/notadb` (db 0), `/1/2` (db 12), `unix://` alone."""
    scheme, _, rest = base.partition("://")
    path = rest[rest.find("/"):] if "/" in rest else ""
    if scheme.lower() == "unix":
        if not path:
            raise InvalidStorageURL(f"storage URL {location!r} names no socket",
                                    hint="use unix:///path/to/redis.sock?db=0")
    elif path.strip("/") and not set(path.strip("/")) <= set("0123456789"):
        # The path is not echoed: with an unencoded '/' in a password it holds part of it.
        raise InvalidStorageURL(f"bad Redis URL {location!r}: the path must be a database number",
                                hint="e.g. redis://HOST:6379/0, or none for database 0; "
                                     "percent-encode a '/' in the password as %2F")


def _describe(client: redis.Redis) -> str:
    """A location for a client we were handed: its address, never its password."""
    pool = client.connection_pool
    kw = pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    scheme = "rediss" if issubclass(pool.connection_class, redis.SSLConnection) else "redis"
    return f"{scheme}://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value  # bytes unless decode_responses


def _alive(score: float | None, now: float) -> bool:
    """Whether an index entry with this score (None: no entry) is a live session."""
    return score is not None and (score == 0 or score > now)


def _float(value: bytes | str | None) -> float | None:
    return None if value is None else float(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."  # a failed RPUSH quotes its arguments
