"""What the PostgreSQL backend promises beyond the shared contract.

Every test gets its own random table prefix (and schema, where it makes one)
in the real server's database and drops them afterwards. The server is
FUSION_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/test);
outside CI a test that cannot reach it is skipped, under CI=true it fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from fusion_cli.errors import (CorruptSession, InvalidStorageURL, LockTimeout, StorageError,
                               StorageUnavailable)
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage
from fusion_cli.storage.postgres import PostgresStorage
from tests.conftest import server_unreachable

PG_URL = os.environ.get("FUSION_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parents[2]
U = ChatMessage.user
A = ChatMessage.assistant

_checked: list[BaseException | None] = []


def _admin() -> "psycopg.Connection":
    if not _checked:
        try:
            psycopg.connect(PG_URL, connect_timeout=3).close()
            _checked.append(None)
        except Exception as exc:
            _checked.append(exc)
    if _checked[0] is not None:
        server_unreachable(f"PostgreSQL at {PG_URL}", _checked[0])
    return psycopg.connect(PG_URL, autocommit=True)


@pytest.fixture
def admin() -> Iterator["psycopg.Connection"]:
    """A plain connection to the test database, to look behind the backend's back."""
    conn = _admin()
    yield conn
    conn.close()


@pytest.fixture
def pg_url(admin) -> Iterator[Callable[..., str]]:
    """pg_url(schema=None) -> the URL of a fresh store with its own table prefix, dropped after."""
    made: list[tuple[str, str]] = []
    schemas: list[str] = []

    def make(schema: str | None = None, prefix: str | None = None) -> str:
        prefix = prefix or f"t{uuid.uuid4().hex[:12]}_"
        made.append((schema or "public", prefix))
        if schema is not None and schema != "public":
            schemas.append(schema)
        query = f"table_prefix={prefix}" + (f"&schema={schema}" if schema else "")
        return f"{PG_URL}{'&' if '?' in PG_URL else '?'}{query}"

    yield make
    for schema, prefix in made:
        tables = [f'"{schema}"."{prefix}{t}"' for t in ("messages", "sessions", "migrations")]
        admin.execute(f"DROP TABLE IF EXISTS {', '.join(tables)}")
    for schema in schemas:
        admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def store(pg_url) -> Iterator[PostgresStorage]:
    s = open_storage(pg_url())
    yield s
    s.close()


def _table(store: PostgresStorage, name: str) -> str:
    return f'"{store.schema}"."{store.table_prefix}{name}"'


def _as_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# ---- the URL (no server needed) ------------------------------------------------


def test_our_parameters_are_stripped_and_others_pass_through(monkeypatch):
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    s = PostgresStorage.from_url("postgresql://u@db.example:6543/app?schema=chat&sslmode=require"
                                 "&table_prefix=bot_&application_name=a+b%20c")
    assert (s.schema, s.table_prefix) == ("chat", "bot_")
    # libpq gets everything else exactly as written, plus a connect timeout.
    assert s.conninfo == ("postgresql://u@db.example:6543/app?sslmode=require"
                          "&application_name=a+b%20c&connect_timeout=5")
    assert s.scheme == "postgresql"


def test_defaults_and_an_explicit_connect_timeout(monkeypatch):
    s = PostgresStorage.from_url("postgres://u@h/db?connect_timeout=30")
    assert (s.schema, s.table_prefix) == ("public", "fusion_")
    assert s.conninfo == "postgres://u@h/db?connect_timeout=30"
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "12")  # libpq's own variable is respected too
    assert PostgresStorage.from_url("postgres://u@h/db").conninfo == "postgres://u@h/db"


def test_both_schemes_open_this_backend():
    for url in ("postgresql://u@h/db", "postgres://u@h/db", "POSTGRESQL://u@h/db"):
        s = open_storage(url)
        assert isinstance(s, PostgresStorage)
        s.close()  # never connected: nothing to do, no error


@pytest.mark.parametrize("query", [
    "schema=a-b", "schema=1abc", "schema=", 'schema=x";drop', "schema=a%20b", "schema=" + "s" * 64,
    "table_prefix=a b", "table_prefix=a.b", "table_prefix=%22", "table_prefix=" + "p" * 54,
    "schema=a&schema=b",
])
def test_bad_identifiers_are_refused(query):
    with pytest.raises(InvalidStorageURL):
        PostgresStorage.from_url(f"postgresql://u@h/db?{query}")


def test_longest_allowed_identifiers():
    s = PostgresStorage.from_url(f"postgresql://u@h/db?schema={'s' * 63}&table_prefix={'p' * 53}")
    assert (len(s.schema), len(s.table_prefix)) == (63, 53)


def test_an_empty_prefix_is_allowed():
    assert PostgresStorage.from_url("postgresql://u@h/db?table_prefix=").table_prefix == ""


def test_the_password_never_shows():
    s = open_storage("postgresql://alice:s3cr%40t@h:5432/db?table_prefix=x_")
    assert "s3cr" not in s.location and "s3cr" not in repr(s)
    assert s.location == "postgresql://alice:***@h:5432/db?table_prefix=x_"
    q = PostgresStorage.from_url("postgresql://h/db?user=bob&password=hunter2&sslmode=disable")
    assert "hunter2" not in q.location
    assert "password=***" in q.location


# ---- errors ------------------------------------------------------------------


@pytest.mark.postgres
def test_an_unreachable_server_is_reported_with_its_address():
    s = open_storage("postgresql://postgres:pw@127.0.0.1:1/test")
    for call in (lambda: s.count("x"), s.list_sessions, lambda: s.save("x", [U("a")])):
        with pytest.raises(StorageUnavailable) as info:
            call()
        text = str(info.value)
        assert "postgresql://postgres:***@127.0.0.1:1/test" in text
        assert "pw@" not in text
        assert "running" in info.value.hint
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
    with pytest.raises(StorageUnavailable):
        with s.lock("x", timeout=0):
            pass
    s.close()


@pytest.mark.postgres
def test_a_missing_database_says_so(admin):
    name = f"fusion_nosuch_{uuid.uuid4().hex[:8]}"
    url = PG_URL.rsplit("/", 1)[0] + "/" + name
    s = open_storage(url)
    with pytest.raises(StorageUnavailable, match=f'database "{name}" does not exist') as info:
        s.load("x")
    assert "createdb" in info.value.hint
    s.close()


@pytest.mark.postgres
def test_an_unknown_user_gets_a_credentials_hint(admin):
    s = open_storage(_as_user(PG_URL, f"nobody_{uuid.uuid4().hex[:8]}", "pw"))
    with pytest.raises(StorageUnavailable) as info:
        s.exists("x")
    assert "password" in info.value.hint and "pw@" not in str(info.value)
    s.close()


@pytest.mark.postgres
def test_a_lost_connection_is_replaced_on_the_next_call(store, admin):
    store.save("s", [U("a")])
    admin.execute("SELECT pg_terminate_backend(%s)", (store._conn.info.backend_pid,))
    with pytest.raises(StorageUnavailable):
        store.load("s")
    assert store.load("s") == [U("a")]  # reconnected


@pytest.mark.postgres
def test_other_server_errors_are_storage_errors(store, admin):
    store.save("s", [U("a")])
    admin.execute(f"DROP TABLE {_table(store, 'messages')}")
    with pytest.raises(StorageError, match="does not exist") as info:
        store.load("s")
    assert not isinstance(info.value, StorageUnavailable)
    assert store.exists("s")  # the connection is still good


# ---- schema ------------------------------------------------------------------


@pytest.mark.postgres
def test_first_use_records_the_schema_steps_once(store, pg_url, admin):
    assert store.list_sessions() == []
    query = f"SELECT name, applied FROM {_table(store, 'migrations')}"
    rows = admin.execute(query).fetchall()
    assert [r[0] for r in rows] == ["0001_sessions_and_messages"]
    again = open_storage(store.url)
    again.save("s", [U("a")])
    again.close()
    assert admin.execute(query).fetchall() == rows


@pytest.mark.postgres
def test_tables_from_a_newer_fusion_are_refused(store, admin):
    store.save("s", [U("a")])
    migrations = _table(store, "migrations")
    admin.execute(f"INSERT INTO {migrations} (name) VALUES ('9999_from_the_future')")
    newer = open_storage(store.url)
    with pytest.raises(StorageUnavailable, match="newer fusion") as info:
        newer.load("s")
    assert "upgrade" in info.value.hint
    newer.close()


@pytest.mark.postgres
def test_a_missing_schema_is_created(pg_url, admin):
    schema = f"fs_{uuid.uuid4().hex[:10]}"
    s = open_storage(pg_url(schema=schema))
    s.save("s", [U("a")])
    tables = {r[0] for r in admin.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,))}
    assert tables == {s.table_prefix + t for t in ("sessions", "messages", "migrations")}
    s.close()


@pytest.mark.postgres
def test_many_processes_starting_on_a_new_store_at_once(pg_url, admin):
    # First use creates the schema; the advisory lock lets exactly one process do it.
    schema = f"fs_{uuid.uuid4().hex[:10]}"
    url = pg_url(schema=schema)
    code = "import sys; from fusion_cli.storage import open_storage as o; o(sys.argv[1]).count('x')"
    procs = [subprocess.Popen([sys.executable, "-c", code, url], env=_env()) for _ in range(6)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 6
    s = open_storage(url)
    applied = admin.execute(f'SELECT name FROM "{schema}"."{s.table_prefix}migrations"').fetchall()
    assert applied == [("0001_sessions_and_messages",)]
    s.close()


@pytest.mark.postgres
def test_two_prefixes_in_one_database_are_separate(pg_url):
    a, b = open_storage(pg_url()), open_storage(pg_url())
    a.save("s", [U("from a")])
    b.save("t", [U("from b")])
    assert a.list_sessions() == ["s"] and b.list_sessions() == ["t"]
    assert b.load("s") == [] and not b.exists("s")
    # The same session id, locked in both: different stores, different locks.
    with a.lock("same", timeout=0), b.lock("same", timeout=0):
        pass
    a.close()
    b.close()


# ---- rows ----------------------------------------------------------------------


@pytest.mark.postgres
def test_append_inserts_and_leaves_earlier_rows_alone(store, admin):
    store.save("s", [U("a"), A("b")])
    query = f"SELECT seq, xmin::text, ctid::text FROM {_table(store, 'messages')} ORDER BY seq"
    before = admin.execute(query).fetchall()
    store.append("s", [U("c"), A("d")])
    after = admin.execute(query).fetchall()
    assert after[:2] == before  # same seq, never rewritten (same xmin and ctid)
    assert [r[0] for r in after] == [0, 1, 2, 3]
    assert store.load("s") == [U("a"), A("b"), U("c"), A("d")]


@pytest.mark.postgres
def test_count_and_list_info_never_decode(store, admin):
    store.save("s", [U("fine")])
    garbage = "'\\xfffe00'::bytea"  # not UTF-8
    admin.execute(f"INSERT INTO {_table(store, 'messages')} VALUES ('s', 1, 'user', {garbage})")
    assert store.count("s") == 2
    assert store.info("s").messages == 2
    assert [(i.id, i.messages) for i in store.list_info()] == [("s", 2)]
    with pytest.raises(CorruptSession, match="seq 1"):
        store.load("s")


@pytest.mark.postgres
def test_nul_and_every_other_character_round_trip(store, admin):
    tricky = "a\x00b\x00\x00 é 🎉 \\x00 \\\\ \x01"
    store.save("s", [U(tricky), A("\x00")])
    store.append("s", [U("\x00tail")])
    assert store.load("s") == [U(tricky), A("\x00"), U("\x00tail")]
    raw = admin.execute(f"SELECT content FROM {_table(store, 'messages')} ORDER BY seq").fetchall()
    assert [bytes(r[0]) for r in raw] == [tricky.encode(), b"\x00", b"\x00tail"]


@pytest.mark.postgres
def test_save_replaces_rows_and_delete_cascades(store, admin):
    store.save("s", [U("1"), U("2"), U("3")])
    store.save("s", [U("only")])
    messages = _table(store, "messages")
    assert admin.execute(f"SELECT seq, role FROM {messages}").fetchall() == [(0, "user")]
    store.save("empty", [])
    assert store.exists("empty") and store.count("empty") == 0 and store.info("empty").messages == 0
    created = store.info("s").created
    store.save("s", [U("again")])
    assert store.info("s").created == created  # a save keeps the creation time
    assert store.info("s").updated >= created
    store.delete("s")
    assert admin.execute(f"SELECT * FROM {messages} WHERE session_id = 's'").fetchall() == []


@pytest.mark.postgres
def test_list_info_is_one_query(store, monkeypatch):
    for sid in ("b", "a", "c", "B"):
        store.save(sid, [U(sid)] * (ord(sid[0]) % 4))
    queries = []
    execute = store._conn.execute

    def spy(query, *args, **kwargs):
        queries.append(query)
        return execute(query, *args, **kwargs)

    monkeypatch.setattr(store._conn, "execute", spy)
    infos = store.list_info()
    assert len(queries) == 1
    assert [(i.id, i.messages) for i in infos] == [("B", 2), ("a", 1), ("b", 2), ("c", 3)]
    assert all(i.created is not None and i.updated is not None for i in infos)


@pytest.mark.postgres
def test_concurrent_appends_without_a_lock_never_collide(store):
    url = store.url
    code = textwrap.dedent("""
        import sys
        from fusion_cli.messages import ChatMessage
        from fusion_cli.storage import open_storage
        s = open_storage(sys.argv[1])
        for i in range(30):
            turn = [ChatMessage.user(f"{sys.argv[2]}:{i}"), ChatMessage.assistant("ok")]
            s.append("shared", turn)
        s.close()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, url, f"p{w}"], env=_env())
             for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    history = store.load("shared")
    assert len(history) == 240
    for k in range(0, 240, 2):  # each append stayed in one piece
        assert history[k].role == "user" and history[k + 1] == A("ok")


# ---- the lock ------------------------------------------------------------------


@pytest.mark.postgres
def test_the_lock_is_a_session_advisory_lock_on_the_one_connection(store, admin):
    # A bigint key shows in pg_locks as its two halves, objsubid 1.
    key = store.lock_key("s")
    holders = ("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
               "AND classid::bigint = %s AND objid::bigint = %s "
               "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
    halves = ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)
    store.save("s", [U("a")])
    with store.lock("s", timeout=1):
        [(pid,)] = admin.execute(holders, halves).fetchall()
        assert pid == store._conn.info.backend_pid  # one server slot per fusion process
    assert admin.execute(holders, halves).fetchall() == []


def test_lock_keys_are_stable_and_differ_by_store():
    a = PostgresStorage.from_url("postgresql://h/db?table_prefix=a_")
    b = PostgresStorage.from_url("postgresql://h/db?table_prefix=b_")
    elsewhere = PostgresStorage.from_url("postgresql://other/db?table_prefix=a_")
    assert a.lock_key("s") == elsewhere.lock_key("s")  # the key depends on the store, not the host
    assert len({a.lock_key("s"), a.lock_key("t"), b.lock_key("s")}) == 3
    assert -(2 ** 63) <= a.lock_key("s") < 2 ** 63


@pytest.mark.postgres
def test_a_dead_holders_lock_is_released(store, admin):
    other = open_storage(store.url)
    try:
        holding = store.lock("s", timeout=1)
        holding.__enter__()
        with pytest.raises(LockTimeout):
            with other.lock("s", timeout=0.2):
                pass
        # The holder's connection dies (a crashed host, a killed backend): the server frees it.
        admin.execute("SELECT pg_terminate_backend(%s)", (store._conn.info.backend_pid,))
        with other.lock("s", timeout=10):
            other.append("s", [U("taken over")])
        holding.__exit__(None, None, None)  # the old holder finishing raises nothing
        with store.lock("s", timeout=1):  # and it can lock again, on a new connection
            pass
    finally:
        other.close()


@pytest.mark.postgres
def test_writes_stop_when_the_connection_holding_the_lock_dies(store, admin):
    store.save("s", [U("a")])
    other = open_storage(store.url)
    try:
        with store.lock("s", timeout=1):
            admin.execute("SELECT pg_terminate_backend(%s)", (store._conn.info.backend_pid,))
            with other.lock("s", timeout=10):  # the server freed the lock: someone else may take it
                pass
            with pytest.raises(StorageUnavailable):  # the write that finds the dead connection
                store.append("s", [U("b")])
            # ...and every later one under this lock, rather than writing unlocked on a new connection
            with pytest.raises(StorageUnavailable, match="while holding the lock of session 's'"):
                store.append("s", [U("c")])
        assert store.load("s") == [U("a")]
        with store.lock("s", timeout=1):  # once the block is left, the store works again
            store.append("s", [U("d")])
        assert store.load("s") == [U("a"), U("d")]
    finally:
        other.close()


@pytest.mark.postgres
def test_a_killed_holder_process_releases_the_lock(store):
    code = textwrap.dedent("""
        import sys, time
        from fusion_cli.storage import open_storage
        s = open_storage(sys.argv[1])
        with s.lock("s", timeout=5):
            print("held", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, store.url], env=_env(),
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"held\n"
        with pytest.raises(LockTimeout):
            with store.lock("s", timeout=0.2):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with store.lock("s", timeout=30):
            store.save("s", [U("mine")])
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert store.load("s") == [U("mine")]


@pytest.mark.postgres
def test_threads_of_one_store_exclude_each_other(store):
    # One lock connection serves the whole object, where the server would let a
    # second lock in as re-entry: the object itself must keep the threads apart.
    inside, peak, errors = [0], [0], []
    guard = threading.Lock()

    def worker():
        try:
            for _ in range(20):
                with store.lock("s", timeout=30):
                    with guard:
                        inside[0] += 1
                        peak[0] = max(peak[0], inside[0])
                    store.append("s", [U("x")])
                    with guard:
                        inside[0] -= 1
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and peak[0] == 1
    assert store.count("s") == 80


WORKER = textwrap.dedent("""
    import sys
    from fusion_cli.messages import ChatMessage
    from fusion_cli.storage import open_storage
    url, worker, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = open_storage(url)
    for i in range(n):
        with store.lock("shared", timeout=60):
            history = store.load("shared")
            store.save("shared", history + [ChatMessage.user(f"{worker}:{i}")])
    store.close()
""")


@pytest.mark.postgres
@pytest.mark.slow
def test_eight_processes_of_read_modify_write_lose_nothing(store):
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, store.url, f"w{w}", "25"], env=_env())
             for w in range(8)]
    assert [p.wait(timeout=240) for p in procs] == [0] * 8
    contents = [m.content for m in store.load("shared")]
    assert sorted(contents) == sorted(f"w{w}:{i}" for w in range(8) for i in range(25))
    for w in range(8):
        assert [c for c in contents if c.startswith(f"w{w}:")] == [f"w{w}:{i}" for i in range(25)]
