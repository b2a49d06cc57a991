"""What the Redis backend promises beyond the shared contract.

Against the real server FUSION_TEST_REDIS (default redis://127.0.0.1:6379/0),
never a fake. Each test gets its own random key prefix, and its keys are
deleted afterwards. A test that cannot reach the server is skipped with the
reason, except under CI=true, where it fails.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import orjson
import pytest
import redis

from fusion_cli.errors import (CorruptSession, InvalidSessionId, InvalidStorageURL, LockTimeout,
                               StorageError, StorageUnavailable)
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage
from fusion_cli.storage.redis import RedisStorage

REDIS_URL = os.environ.get("FUSION_TEST_REDIS", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() == "true"
ROOT = Path(__file__).resolve().parents[2]
U = ChatMessage.user
A = ChatMessage.assistant

_reachable: list[BaseException | None] = []


def need_redis() -> None:
    """Skip when the server is unreachable; under CI=true, fail instead (it must be there)."""
    if not _reachable:
        try:
            probe = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
            probe.ping()
            probe.close()
            _reachable.append(None)
        except redis.RedisError as exc:
            _reachable.append(exc)
    if _reachable[0] is not None:
        message = f"Redis at {REDIS_URL} is unreachable ({_reachable[0]})"
        if IN_CI:
            pytest.fail(message + "; under CI=true that is a failure, not a skip", pytrace=False)
        pytest.skip(message)


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    """A plain client, to look behind the backend's back."""
    need_redis()
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def prefix(raw: redis.Redis) -> Iterator[str]:
    p = f"fusion-test-{uuid.uuid4().hex}:"
    yield p
    keys = list(raw.scan_iter(match=p + "*", count=1000))  # the prefix has no glob characters
    if keys:
        raw.delete(*keys)


def with_params(url: str, params: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{params}"


@pytest.fixture
def url(prefix: str) -> str:
    return with_params(REDIS_URL, f"prefix={prefix}")


@pytest.fixture
def rs(url: str) -> Iterator[RedisStorage]:
    s = RedisStorage.from_url(url)
    yield s
    s.close()


def keys_of(raw: redis.Redis, prefix: str) -> set[str]:
    return {k.decode()[len(prefix):] for k in raw.scan_iter(match=prefix + "*")}


# ---- URLs (no server needed) ---------------------------------------------------


def test_url_parameters_are_ours_or_redis_pys():
    s = RedisStorage.from_url("redis://:s3cret@db.example:6380/2?prefix=app%3Afusion:&lock_ttl=2.5"
                              "&health_check_interval=7")
    kw = s.client.connection_pool.connection_kwargs
    assert (s.prefix, s.lock_ttl) == ("app:fusion:", 2.5)
    assert (kw["host"], kw["port"], kw["db"], kw["password"]) == ("db.example", 6380, 2, "s3cret")
    assert kw["health_check_interval"] == 7  # not ours: passed through
    assert "prefix" not in kw and "lock_ttl" not in kw
    assert kw["socket_connect_timeout"] == kw["socket_timeout"] == 5.0
    assert "s3cret" not in s.location and "s3cret" not in repr(s)
    assert s.location == ("redis://:***@db.example:6380/2?prefix=app%3Afusion:&lock_ttl=2.5"
                          "&health_check_interval=7")


def test_url_defaults_and_other_schemes():
    s = RedisStorage.from_url("redis://127.0.0.1")
    assert (s.prefix, s.lock_ttl, s.location) == ("fusion:", 30.0, "redis://127.0.0.1")
    u = RedisStorage.from_url("unix:///run/redis/redis.sock?db=3&password=pw&prefix=x:")
    kw = u.client.connection_pool.connection_kwargs
    assert (kw["path"], kw["db"], kw["password"], u.prefix) == ("/run/redis/redis.sock", 3, "pw", "x:")
    assert "pw" not in u.location.replace("/run", "")
    assert RedisStorage.from_url("redis://h?socket_timeout=9").client.connection_pool.connection_kwargs[
        "socket_timeout"] == 9  # the URL's own timeouts win over our defaults
    t = RedisStorage.from_url("rediss://user:pw@h:6390/0")
    assert issubclass(t.client.connection_pool.connection_class, redis.SSLConnection)
    assert t.location == "rediss://user:***@h:6390/0"


def test_the_registry_opens_every_redis_scheme():
    for url in ("redis://h/0", "rediss://h/0", "unix:///tmp/r.sock"):
        s = open_storage(url)
        assert isinstance(s, RedisStorage) and s.url == url


@pytest.mark.parametrize("bad", ["redis://h?lock_ttl=0", "redis://h?lock_ttl=-1", "redis://h?lock_ttl=abc",
                                 "redis://h?lock_ttl=inf", "redis://h?prefix=a&prefix=b",
                                 "redis://h:notaport/0", "redis://h/0?db=x"])
def test_bad_urls_are_usage_errors(bad):
    with pytest.raises(InvalidStorageURL):
        RedisStorage.from_url(bad)


def test_bad_ids_never_reach_the_server():
    s = RedisStorage.from_url("redis://127.0.0.1:1/0")  # nothing listens there
    for call in (lambda: s.load("../x"), lambda: s.save("a/b", []), lambda: s.count("")):
        with pytest.raises(InvalidSessionId):
            call()


# ---- errors ------------------------------------------------------------------


@pytest.mark.parametrize("bad_url", ["redis://127.0.0.1:1/0", "unix:///nonexistent/redis.sock"])
def test_an_unreachable_server_fails_fast_and_says_where(bad_url):
    s = RedisStorage.from_url(bad_url)  # constructing never connects
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as info:
        s.count("x")
    assert time.monotonic() - started < 2
    where = "127.0.0.1:1" if "127" in bad_url else "/nonexistent/redis.sock"
    assert where in str(info.value) and "redis-server" in str(info.value)
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    with pytest.raises(StorageUnavailable):  # a lock attempt too: not a LockTimeout
        with s.lock("x", timeout=5):
            pass


def test_a_wrong_password_says_to_check_it(raw):
    s = RedisStorage.from_url(REDIS_URL.replace("://", f"://nouser-{uuid.uuid4().hex[:8]}:wrong-pw@", 1))
    with pytest.raises(StorageUnavailable) as info:
        s.exists("x")
    message = str(info.value)
    assert "password in the URL" in message and "***" in message and "wrong-pw" not in message
    assert isinstance(info.value.__cause__, redis.AuthenticationError)


def test_a_key_of_the_wrong_type_is_a_storage_error(rs, raw, prefix):
    raw.set(prefix + "session:s", "not a list")
    with pytest.raises(StorageError) as info:
        rs.count("s")
    assert not isinstance(info.value, StorageUnavailable) and "WRONGTYPE" in str(info.value)


# ---- data layout -------------------------------------------------------------


def test_layout_is_a_list_a_hash_and_a_sorted_set_index(rs, raw, prefix):
    before = time.time()
    rs.save("s", [U("hi"), A("hello")])
    assert keys_of(raw, prefix) == {"session:s", "meta:s", "sessions"}
    assert raw.type(prefix + "session:s") == b"list"
    assert raw.lrange(prefix + "session:s", 0, -1) == [b'{"role":"user","content":"hi"}',
                                                       b'{"role":"assistant","content":"hello"}']
    meta = raw.hgetall(prefix + "meta:s")
    assert set(meta) == {b"created", b"updated"}
    assert before <= float(meta[b"created"]) <= float(meta[b"updated"]) <= time.time()
    assert raw.zrange(prefix + "sessions", 0, -1, withscores=True) == [(b"s", 0.0)]


def test_the_index_lists_ids_in_code_point_order(rs, raw, prefix):
    ids = ["b", "B", "a.1", "a-1", "a_1", "0", "Z", "_x", "a"]
    for sid in ids:
        rs.save(sid, [])
    # Read straight from the index (no KEYS, no SCAN): already in code-point order.
    assert [m.decode() for m in raw.zrange(prefix + "sessions", 0, -1)] == sorted(ids)
    assert rs.list_sessions() == sorted(ids)


def test_foreign_index_members_are_not_listed(rs, raw, prefix):
    rs.save("ok", [])
    raw.zadd(prefix + "sessions", {"../bad": 0, "a b": 0})
    assert rs.list_sessions() == ["ok"]


def test_an_empty_history_is_an_index_entry_and_times(rs, raw, prefix):
    rs.save("e", [])
    assert keys_of(raw, prefix) == {"meta:e", "sessions"}  # Redis keeps no empty list
    assert (rs.exists("e"), rs.count("e"), rs.load("e"), rs.list_sessions()) == (True, 0, [], ["e"])
    rs.append("e2", [])
    assert rs.exists("e2") and rs.count("e2") == 0


def test_delete_removes_every_key_of_the_session_but_not_its_lock(rs, raw, prefix):
    rs.save("d", [U("x")])
    rs.save("keep", [U("y")])
    with rs.lock("d"):
        rs.delete("d")
        assert keys_of(raw, prefix) == {"session:keep", "meta:keep", "sessions", "lock:d"}
    assert not rs.exists("d") and rs.list_sessions() == ["keep"]
    rs.delete("d")  # absent: no error


# ---- append, count, save -------------------------------------------------------


def test_append_is_an_rpush_that_leaves_earlier_items_alone(rs, raw, prefix):
    key = prefix + "session:s"
    rs.save("s", [U("one")])
    # Valid but not as we would write it: a rewrite of the history would normalise it.
    raw.rpush(key, b'{ "content" : "two",  "role" : "assistant" }')
    before = raw.lrange(key, 0, -1)
    rs.append("s", [U("three"), A("four")])
    after = raw.lrange(key, 0, -1)
    assert after[:2] == before and raw.llen(key) == 4
    assert after[2:] == [b'{"role":"user","content":"three"}', b'{"role":"assistant","content":"four"}']
    assert rs.load("s") == [U("one"), A("two"), U("three"), A("four")]


def test_append_creates_the_session_and_keeps_created(rs, raw, prefix):
    rs.append("n", [U("a")])
    created = raw.hget(prefix + "meta:n", "created")
    time.sleep(0.01)
    rs.append("n", [A("b")])
    rs.save("n", [U("c")])
    assert raw.hget(prefix + "meta:n", "created") == created  # HSETNX: kept across writes
    assert float(raw.hget(prefix + "meta:n", "updated")) > float(created)
    assert rs.list_sessions() == ["n"]


def test_count_never_decodes_but_load_names_the_bad_key(rs, raw, prefix):
    rs.save("c", [U("fine"), A("also fine")])
    raw.rpush(prefix + "session:c", b"\xff not json")
    assert rs.count("c") == 3
    assert rs.info("c").messages == 3
    with pytest.raises(CorruptSession) as info:
        rs.load("c")
    assert f"key {prefix}session:c index 2" in str(info.value)
    assert info.value.location.startswith(rs.location)
    assert raw.llen(prefix + "session:c") == 3  # left untouched


def test_a_json_item_that_is_not_a_message_is_corrupt(rs, raw, prefix):
    raw.rpush(prefix + "session:j", orjson.dumps([1, 2]))
    raw.zadd(prefix + "sessions", {"j": 0})
    with pytest.raises(CorruptSession, match="expected a message object"):
        rs.load("j")


def test_save_replaces_in_one_transaction(rs, raw, prefix, url):
    rs.save("s", [U(str(i)) for i in range(5)])
    rs.save("s", [A("only")])
    assert raw.lrange(prefix + "session:s", 0, -1) == [b'{"role":"assistant","content":"only"}']
    # A reader racing the writer sees one whole history or the other, never a mix.
    short, long = [U("s1"), A("s2")], [U(f"l{i}") for i in range(30)]
    stop = threading.Event()
    seen: list[list[ChatMessage]] = []

    def reader() -> None:
        other = RedisStorage.from_url(url)
        while not stop.is_set():
            seen.append(other.load("s"))
        other.close()

    t = threading.Thread(target=reader)
    t.start()
    for i in range(150):
        rs.save("s", short if i % 2 else long)
    stop.set()
    t.join()
    assert seen and all(h in ([A("only")], short, long) for h in seen)
    assert any(h == short for h in seen) or any(h == long for h in seen)


# ---- info in one round trip ----------------------------------------------------


class CountingRedis(redis.Redis):
    """Records each round trip: a command sent alone, or one pipeline (a MULTI/EXEC or not)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trips: list[str] = []

    def execute_command(self, *args, **options):
        self.trips.append(str(args[0]))
        return super().execute_command(*args, **options)

    def pipeline(self, transaction=True, shard_hint=None):
        self.trips.append("multi" if transaction else "pipeline")
        return super().pipeline(transaction, shard_hint)


@pytest.fixture
def counting(prefix: str) -> Iterator[tuple[RedisStorage, CountingRedis]]:
    client = CountingRedis.from_url(REDIS_URL)
    yield RedisStorage(client, prefix=prefix), client
    client.close()


def test_every_write_is_one_multi_exec(counting):
    s, client = counting
    writes = [lambda: s.save("w", [U("a"), A("b")]), lambda: s.append("w", [U("c")]),
              lambda: s.save("w", []), lambda: s.delete("w")]
    for write in writes:
        client.trips.clear()
        write()
        assert client.trips == ["multi"]
    client.trips.clear()
    assert (s.count("w"), s.exists("w")) == (0, False)
    assert client.trips == ["LLEN", "ZSCORE"]


def test_list_info_is_one_zrange_and_one_pipeline(raw, prefix):
    client = CountingRedis.from_url(REDIS_URL)
    s = RedisStorage(client, prefix=prefix)
    kw = client.connection_pool.connection_kwargs
    assert s.location == f"redis://{kw['host']}:{kw['port']}/{kw['db']}"  # never a password
    before = time.time()
    for n, sid in enumerate(["c", "a", "b", "d", "e"]):
        s.save(sid, [U(str(i)) for i in range(n)])
    after = time.time()
    client.trips.clear()
    infos = s.list_info()
    assert client.trips == ["ZRANGE", "multi"]
    assert [(i.id, i.messages) for i in infos] == [("a", 1), ("b", 2), ("c", 0), ("d", 3), ("e", 4)]
    for i in infos:
        assert before <= i.created <= i.updated <= after and i.error is None
    client.trips.clear()
    info = s.info("d")
    assert client.trips == ["multi"] and (info.messages, info.created) == (3, infos[3].created)
    assert s.info("nobody") is None
    s.close()
    assert client.ping()  # a client we were handed stays open
    client.close()


def test_list_info_reports_an_unreadable_session_and_goes_on(rs, raw, prefix):
    rs.save("good", [U("x")])
    raw.set(prefix + "session:bad", "a string, not a list")
    raw.zadd(prefix + "sessions", {"bad": 0})
    bad, good = rs.list_info()
    assert bad.id == "bad" and bad.messages is None and "WRONGTYPE" in bad.error
    assert (good.id, good.messages, good.error) == ("good", 1, None)


# ---- locks -------------------------------------------------------------------


def test_a_held_lock_outlives_its_ttl(url, raw, prefix):
    holder = RedisStorage.from_url(with_params(url, "lock_ttl=1"))
    other = RedisStorage.from_url(url)
    with holder.lock("s"):
        for _ in range(5):  # 2.5 s in all, 2.5 TTLs
            time.sleep(0.5)
            assert 0 < raw.pttl(prefix + "lock:s") <= 1000
            with pytest.raises(LockTimeout):
                with other.lock("s", timeout=0):
                    pass
    assert raw.exists(prefix + "lock:s") == 0  # released at the end of the block
    with other.lock("s", timeout=0):
        pass
    holder.close()
    other.close()


def test_a_lock_whose_holder_died_is_taken_after_its_ttl(rs, raw, prefix):
    dead = raw.lock(prefix + "lock:s", timeout=1)
    assert dead.acquire(blocking=False)  # and never released or extended
    waited: list[int] = []
    started = time.monotonic()
    with rs.lock("s", timeout=5, on_wait=lambda: waited.append(1)):
        elapsed = time.monotonic() - started
    assert waited == [1] and 0.5 < elapsed < 2


def test_a_killed_process_stops_renewing_its_lock(url, raw, prefix):
    holder = textwrap.dedent("""
        import sys, time
        from fusion_cli.storage import open_storage
        store = open_storage(sys.argv[1])
        with store.lock("s", timeout=5):
            print("locked", flush=True)
            time.sleep(60)
    """)
    with subprocess.Popen([sys.executable, "-c", holder, with_params(url, "lock_ttl=1")], stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}) as proc:
        try:
            assert proc.stdout.readline().strip() == "locked"
            time.sleep(1.5)  # past one TTL: the holder's thread keeps it
            assert raw.exists(prefix + "lock:s") == 1
        finally:
            proc.send_signal(signal.SIGKILL)
    started = time.monotonic()
    s = RedisStorage.from_url(url)
    with s.lock("s", timeout=5):
        assert time.monotonic() - started < 2
    s.close()


def test_a_lock_lost_while_held_is_logged_not_raised(rs, raw, prefix, caplog):
    caplog.set_level(logging.WARNING, logger="fusion_cli.storage.redis")
    with rs.lock("s"):
        raw.delete(prefix + "lock:s")  # as if the TTL had run out during a stall
        rs.append("s", [U("committed")])
    assert rs.load("s") == [U("committed")]
    assert "expired while held" in caplog.text


def test_close_disconnects_only_a_client_it_made(url, raw):
    name = f"fusion-test-{uuid.uuid4().hex[:8]}"
    s = RedisStorage.from_url(with_params(url, f"client_name={name}"))
    s.count("x")

    def connected() -> int:
        return sum(c.get("name") == name for c in raw.client_list())

    assert connected() == 1
    s.close()
    assert connected() == 0
