"""What the SQLite backend promises beyond the shared contract."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fusion_cli.errors import (CorruptSession, InvalidStorageURL, LockTimeout, StorageError,
                               StorageUnavailable)
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage
from fusion_cli.storage.sqlite import _INFO, _LOAD, SCHEMA_VERSION, SqliteStorage

ROOT = Path(__file__).resolve().parents[2]
U, A = ChatMessage.user, ChatMessage.assistant


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "fusion.db"


@pytest.fixture
def store(db: Path):
    s = SqliteStorage(db)
    yield s
    s.close()


def raw(path: Path) -> sqlite3.Connection:
    """A connection of our own, as another program (or a user with sqlite3) would open it."""
    return sqlite3.connect(path, isolation_level=None)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def statements(store: SqliteStorage, action) -> list[str]:
    """The SQL statements `action()` runs on the store's connection."""
    seen: list[str] = []
    store._conn.set_trace_callback(seen.append)
    try:
        action()
    finally:
        store._conn.set_trace_callback(None)
    return seen


# ---- URLs -----------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("sqlite:fusion.db", "fusion.db"),
    ("sqlite:dir/fusion.db", "dir/fusion.db"),
    ("sqlite:/abs/dir/fusion.db", "/abs/dir/fusion.db"),
    ("sqlite:///dir/fusion.db", "dir/fusion.db"),      # SQLAlchemy, relative
    ("sqlite:////abs/dir/fusion.db", "/abs/dir/fusion.db"),  # SQLAlchemy, absolute
    ("SQLite:////abs/fusion.db", "/abs/fusion.db"),
    ("sqlite:with space?and#odd%chars.db", "with space?and#odd%chars.db"),
])
def test_url_forms(url, expected):
    s = open_storage(url)
    assert isinstance(s, SqliteStorage)
    assert s.location == expected
    assert s.url == url


@pytest.mark.parametrize("url", ["sqlite:~/fusion.db", "sqlite:///~/fusion.db"])
def test_home_is_expanded(url, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    s = open_storage(url)
    assert s.location == str(tmp_path / "fusion.db")
    s.save("s", [U("x")])
    assert (tmp_path / "fusion.db").is_file()


@pytest.mark.parametrize("url", ["sqlite://fusion.db", "sqlite://", "sqlite://host/fusion.db"])
def test_two_slashes_are_refused_as_ambiguous(url):
    with pytest.raises(InvalidStorageURL, match="ambiguous") as info:
        open_storage(url)
    assert "sqlite:////" in info.value.hint and "sqlite:///" in info.value.hint


@pytest.mark.parametrize("url", ["sqlite:", "sqlite:///"])
def test_an_empty_path_is_refused(url):
    with pytest.raises(InvalidStorageURL, match="names no database"):
        open_storage(url)


def test_relative_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url, name in [("sqlite:///three.db", "three.db"), ("sqlite:bare.db", "bare.db")]:
        s = open_storage(url)
        s.save("s", [U("x")])
        s.close()
        assert (tmp_path / name).is_file()


def test_odd_characters_in_the_path_name_one_file(tmp_path):
    # The connection goes through an SQLite URI, where ?, # and % are special.
    path = tmp_path / "a b?mode=ro#x%41.db"
    s = open_storage(f"sqlite:{path}")
    s.save("s", [U("x")])
    s.close()
    names = [p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))]
    assert names == [path.name]
    assert open_storage(f"sqlite:{path}").load("s") == [U("x")]


# ---- the file: mode, pragmas, schema --------------------------------------------

def test_wal_mode_and_pragmas(store, db):
    store.save("s", [U("x")])
    assert raw(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # stored in the file
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000


def test_files_are_0600_and_directories_0700_whatever_the_umask(tmp_path):
    db = tmp_path / "new" / "deeper" / "fusion.db"
    old = os.umask(0)
    try:
        s = SqliteStorage(db)
        s.save("s", [U("x")])
        with s.lock("s"):
            assert mode(db.parent / "fusion.db.locks" / "s.lock") == 0o600
        for name in ("fusion.db", "fusion.db-wal", "fusion.db-shm"):
            assert mode(db.parent / name) == 0o600, name
        s.close()
    finally:
        os.umask(old)
    assert mode(tmp_path / "new") == 0o700
    assert mode(tmp_path / "new" / "deeper") == 0o700
    assert mode(db.parent / "fusion.db.locks") == 0o700


def test_reads_of_a_missing_database_create_nothing(tmp_path):
    s = SqliteStorage(tmp_path / "sub" / "fusion.db")
    assert s.load("s") == []
    assert s.count("s") == 0
    assert s.exists("s") is False
    assert s.info("s") is None
    assert s.list_sessions() == []
    assert s.list_info() == []
    s.delete("s")
    s.close()
    assert list(tmp_path.iterdir()) == []


def test_reads_of_a_missing_database_do_not_even_import_sqlite3(tmp_path):
    code = textwrap.dedent("""
        import sys
        from fusion_cli.storage import open_storage
        s = open_storage(sys.argv[1])
        assert s.count("s") == 0 and s.load("s") == [] and s.list_info() == []
        print("sqlite3" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code, f"sqlite:{tmp_path / 'none.db'}"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "False\n"


def test_an_empty_file_reads_as_an_empty_store(db):
    # What a reader sees between a writer creating the file and making the tables.
    db.touch()
    s = SqliteStorage(db)
    assert s.list_sessions() == [] and s.load("s") == [] and s.count("s") == 0
    s.save("s", [U("x")])
    assert s.load("s") == [U("x")]


def test_schema_version_is_recorded(store, db):
    store.save("s", [U("x")])
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"sessions", "messages"} <= tables


def test_a_database_from_a_newer_fusion_is_refused_and_left_alone(store, db):
    store.save("s", [U("x")])
    store.close()
    raw(db).execute("PRAGMA user_version = 99")
    s = SqliteStorage(db)
    for call in (lambda: s.load("s"), lambda: s.count("s"), lambda: s.save("s", [U("y")]),
                 lambda: s.append("s", [U("y")]), lambda: s.delete("s")):
        with pytest.raises(StorageUnavailable, match="newer fusion") as info:
            call()
        assert str(db) in str(info.value) and "upgrade" in info.value.hint
    assert raw(db).execute("SELECT content FROM messages").fetchall() == [("x",)]


def test_the_indexes_make_count_and_listing_index_only(store):
    store.save("s", [U("x")])
    def plan(sql: str, *args: str) -> str:
        return " | ".join(r[3] for r in store._conn.execute("EXPLAIN QUERY PLAN " + sql, args))

    assert "COVERING INDEX" in plan("SELECT count(*) FROM messages WHERE session_id = ?", "s")
    assert "TEMP B-TREE" not in plan(_LOAD, "s")  # ORDER BY comes from the index
    listing = plan(_INFO + "GROUP BY s.id ORDER BY s.id")
    assert "COVERING INDEX" in listing and "TEMP B-TREE" not in listing


# ---- writes and reads ------------------------------------------------------------

def test_append_inserts_and_rewrites_nothing(store, db):
    store.save("s", [U("one"), A("two"), U("three")])
    before = raw(db).execute("SELECT id, content FROM messages ORDER BY id").fetchall()
    run = statements(store, lambda: store.append("s", [A("four"), U("five")]))
    after = raw(db).execute("SELECT id, content FROM messages ORDER BY id").fetchall()
    assert after[:3] == before  # the earlier rows are the same rows
    assert [c for _, c in after[3:]] == ["four", "five"]
    verbs = [sql.split()[0].upper() for sql in run]
    assert not {"DELETE", "UPDATE", "SELECT"} & set(verbs), run
    assert run[0] == "BEGIN IMMEDIATE" and run[-1] == "COMMIT"


def test_a_failed_write_changes_nothing(store, db):
    store.save("s", [U("kept")])
    # A trigger of ours makes the second insert fail inside the transaction.
    raw(db).execute("CREATE TRIGGER no_bad BEFORE INSERT ON messages WHEN NEW.content = 'bad' "
                    "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    for call in (lambda: store.append("s", [U("fine"), U("bad")]),
                 lambda: store.save("s", [U("fine"), U("bad")])):
        with pytest.raises(StorageError, match="refused"):
            call()
        assert store.load("s") == [U("kept")]
    store.append("s", [U("later")])  # the connection is still usable
    assert store.load("s") == [U("kept"), U("later")]


def test_save_keeps_created_and_moves_updated(store):
    store.save("s", [U("a")])
    first = store.info("s")
    time.sleep(0.02)
    store.save("s", [U("b")])
    second = store.info("s")
    assert second.created == first.created
    assert second.updated > first.updated
    time.sleep(0.02)
    store.append("s", [A("c")])
    assert store.info("s").updated > second.updated


@pytest.mark.parametrize("role, content", [
    ("'user'", "CAST(x'c3' AS TEXT)"),  # text that is not UTF-8
    ("'user'", "x'6869'"),               # a BLOB, even one holding valid UTF-8
    ("x'75736572'", "'hi'"),             # a BLOB role
])
def test_count_never_decodes_but_load_reports_a_bad_row(store, db, role, content):
    store.save("s", [U("a"), A("b")])
    conn = raw(db)
    conn.execute(f"INSERT INTO messages (session_id, role, content) "
                 f"VALUES ('s', {role}, {content})")
    bad_id = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
    assert store.count("s") == 3
    assert store.info("s").messages == 3
    assert [(i.id, i.messages) for i in store.list_info()] == [("s", 3)]
    with pytest.raises(CorruptSession) as info:
        store.load("s")
    assert info.value.location == str(db)
    assert f"row {bad_id}" in str(info.value) and "'s'" in str(info.value)


def test_list_info_is_one_query_with_counts_and_times(store):
    start = time.time()
    store.save("empty", [])
    store.save("two", [U("a"), A("b")])
    store.append("five", [U(str(n)) for n in range(5)])
    end = time.time()
    run = statements(store, lambda: store.list_info())
    infos = store.list_info()
    assert len(run) == 1 and run[0].lstrip().upper().startswith("SELECT")
    assert [(i.id, i.messages) for i in infos] == [("empty", 0), ("five", 5), ("two", 2)]
    for i in infos:
        assert start <= i.created <= i.updated <= end
        assert i.error is None
    assert store.info("two") == infos[2]


def test_non_ascii_and_nul_round_trip(store):
    history = [U("nul \x00 inside"), A("ünïcödé 你好 🎉"), U("")]
    store.save("s", history)
    assert store.load("s") == history


def test_a_utf16_database_of_another_program_is_shared(db):
    conn = raw(db)
    conn.execute("PRAGMA encoding = 'UTF-16le'")
    conn.execute("CREATE TABLE notes (x TEXT)")
    conn.execute("INSERT INTO notes VALUES ('mine')")
    s = SqliteStorage(db)
    history = [U("héllo 你好 🎉"), A("nul \x00")]
    s.save("s", history)
    assert s.load("s") == history
    assert conn.execute("SELECT x FROM notes").fetchall() == [("mine",)]


def test_a_foreign_sessions_table_is_not_touched(db):
    conn = raw(db)
    conn.execute("CREATE TABLE sessions (token TEXT)")
    conn.execute("INSERT INTO sessions VALUES ('abc')")
    s = SqliteStorage(db)
    assert s.list_sessions() == []  # user_version 0: not ours, nothing to read
    with pytest.raises(StorageUnavailable, match="cannot create fusion's tables") as info:
        s.save("s", [U("x")])
    assert "another program" in info.value.hint
    assert conn.execute("SELECT * FROM sessions").fetchall() == [("abc",)]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0


def test_many_threads_share_one_store_object(store):
    def worker(n: int) -> None:
        for i in range(25):
            store.append("shared", [U(f"{n}:{i}")])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count("shared") == 200
    contents = [m.content for m in store.load("shared")]
    assert [c for c in contents if c.startswith("3:")] == [f"3:{i}" for i in range(25)]


# ---- errors -------------------------------------------------------------------------

def test_a_file_that_is_not_a_database_is_corrupt_and_left_untouched(db):
    junk = b"this is not a database\n" * 300
    db.write_bytes(junk)
    s = SqliteStorage(db)
    for call in (lambda: s.load("s"), lambda: s.count("s"), lambda: s.list_info(),
                 lambda: s.save("s", [U("x")]), lambda: s.append("s", [U("x")]),
                 lambda: s.delete("s")):
        with pytest.raises(CorruptSession) as info:
            call()
        assert info.value.location == str(db) and str(db) in str(info.value)
        assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    s.close()
    assert db.read_bytes() == junk
    assert sorted(p.name for p in db.parent.iterdir()) == [db.name]


def test_a_busy_database_is_unavailable_after_the_busy_timeout(db):
    s = SqliteStorage(db, busy_timeout=0.2)
    s.save("s", [U("old")])
    other = raw(db)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO messages (session_id, role, content) "
                  "VALUES ('s', 'user', 'uncommitted')")
    try:
        assert s.load("s") == [U("old")]  # WAL: a reader does not wait for the writer
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="locked") as info:
            s.append("s", [U("new")])
        assert time.monotonic() - started >= 0.15
        assert str(db) in str(info.value) and info.value.hint
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    finally:
        other.execute("ROLLBACK")
    s.append("s", [U("new")])
    assert s.load("s") == [U("old"), U("new")]


def test_switching_to_wal_waits_for_a_writer_it_would_deadlock_with(db):
    # Switching a rollback-journal file to WAL while another connection writes
    # is a deadlock to SQLite, which then answers BUSY at once, ignoring its busy
    # timeout (processes opening a new store together hit this): we retry.
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE notes (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO notes VALUES (1)")
    with pytest.raises(StorageUnavailable, match="locked"):
        SqliteStorage(db, busy_timeout=0.1).save("s", [U("x")])
    timer = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    timer.start()
    try:
        started = time.monotonic()
        s = SqliteStorage(db, busy_timeout=10)
        s.save("s", [U("x")])
        assert time.monotonic() - started >= 0.25
    finally:
        timer.join()
    assert s.load("s") == [U("x")]
    assert raw(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_directory_in_place_of_the_database_is_unavailable(db):
    db.mkdir()
    s = SqliteStorage(db)
    for call in (lambda: s.load("s"), lambda: s.save("s", [U("x")])):
        with pytest.raises(StorageUnavailable) as info:
            call()
        assert str(db) in str(info.value) and info.value.hint


def test_a_file_in_place_of_the_directory_is_unavailable(tmp_path):
    (tmp_path / "file").write_text("x")
    s = SqliteStorage(tmp_path / "file" / "fusion.db")
    with pytest.raises(StorageUnavailable, match="Not a directory"):
        s.save("s", [U("x")])
    with pytest.raises(StorageUnavailable, match="Not a directory"):
        with s.lock("s", timeout=0):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_an_unwritable_directory_is_unavailable(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    s = SqliteStorage(locked / "fusion.db")
    try:
        assert s.load("s") == []
        with pytest.raises(StorageUnavailable, match="Permission denied") as info:
            s.save("s", [U("x")])
        assert str(locked / "fusion.db") in str(info.value)
    finally:
        locked.chmod(0o700)


def test_a_read_only_database_is_unavailable(store):
    # PRAGMA query_only fails writes with SQLITE_READONLY, as a read-only file
    # does, even for root (who ignores file permissions).
    store.save("s", [U("kept")])
    store._conn.execute("PRAGMA query_only = 1")
    with pytest.raises(StorageUnavailable, match="readonly") as info:
        store.append("s", [U("x")])
    assert "read and write" in info.value.hint
    assert store.load("s") == [U("kept")]


def test_a_full_disk_is_unavailable_and_the_old_history_intact(store):
    # max_page_count makes SQLite answer SQLITE_FULL, as a full disk does.
    store.save("s", [U("kept")])
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    with pytest.raises(StorageUnavailable, match="full") as info:
        store.save("s", [U("x" * 1_000_000)])
    assert "disk space" in info.value.hint
    assert store.load("s") == [U("kept")]


# ---- the lock -------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from fusion_cli.storage import open_storage
    s = open_storage(sys.argv[1])
    with s.lock("s", timeout=10):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_lock_file_stays_and_a_dead_holder_releases_its_lock(db):
    url = f"sqlite:{db}"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline() == b"held\n"
        s = SqliteStorage(db)
        with pytest.raises(LockTimeout):
            with s.lock("s", timeout=0.2):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    with s.lock("s", timeout=2):
        s.append("s", [U("after")])
    assert (db.parent / "fusion.db.locks" / "s.lock").is_file()  # never deleted
    assert not db.with_name("fusion.db.locks").joinpath("other.lock").exists()
    assert s.load("s") == [U("after")]
