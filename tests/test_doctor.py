"""`fusion doctor`: every problem in a store, one a line; exit 0 when clean, 3 when not; --fix only what is safe.

Corrupt sessions on every backend are in tests/reliability/test_corrupt.py;
here: clean stores, what only one backend can get wrong, the output shapes,
--fix, and that doctor reads only.
"""

from __future__ import annotations

import base64
import os
import sqlite3
import stat
import time
import uuid
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from fusion_cli.cli import cli
from fusion_cli.doctor import check_store
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage
from tests.conftest import BACKENDS, REDIS_URL, _delete_redis_prefix, require_redis
from tests.test_imports import FORBIDDEN, loaded_modules

U, A = ChatMessage.user, ChatMessage.assistant


def fusion(url: str, *args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, ["--storage", url, *args], env=env)


def filled(url: str) -> str:
    store = open_storage(url)
    store.save("alice", [U("hi"), A("hello")])
    store.save("bob", [U("yo")])
    store.save("empty", [])
    store.close()
    return url


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- every backend ------------------------------------------------------------------

@pytest.mark.parametrize("kind", BACKENDS)
def test_a_clean_store_exits_0(make_url, kind):
    url = make_url(kind)
    if kind != "memory":  # memory: is a new, empty store in each process
        filled(url)
    result = fusion(url, "doctor")
    assert (result.exit_code, result.stdout) == (0, ""), result.output
    sessions, messages = (0, 0) if kind == "memory" else (3, 3)
    assert result.stderr == f"fusion: checked {sessions} sessions ({messages} messages) in " \
                            f"{open_storage(url).location}: no problems\n"
    report = orjson.loads(fusion(url, "doctor", "--json").stdout)
    assert report == {"store": open_storage(url).location, "sessions": sessions, "messages": messages,
                      "undecrypted": 0, "ok": True, "problems": []}
    assert fusion(url, "-q", "doctor").stderr == ""


def test_the_library_checks_a_memory_store_too():
    store = open_storage("memory:")
    store.save("ok", [U("fine")])
    store.save("odd", [U("fine"), ChatMessage("robot", "beep")])  # a program may save anything
    report = check_store(store)
    assert [str(p) for p in report.problems] == [
        "memory: session 'odd': message 2: role 'robot' with str content"]
    assert (report.ok, report.sessions, report.messages) == (False, 2, 3)


def test_check_is_an_alias(tmp_path):
    url = filled(f"file:{tmp_path / 's'}")
    (tmp_path / "s" / "notes.txt").write_text("mine")
    doctor, check = fusion(url, "doctor"), fusion(url, "check")
    assert (check.exit_code, check.stdout) == (doctor.exit_code, doctor.stdout) == (
        3, f"{tmp_path / 's' / 'notes.txt'}: not a session file, so fusion ignores it (sessions are ID.json, "
           "ID being 1-128 of A-Z a-z 0-9 . _ -)\n")
    listed = [line.split()[0] for line in fusion(url, "--help").stdout.split("Commands:")[1].splitlines() if line]
    assert "doctor" in listed and "check" not in listed  # not listed twice


def test_doctor_takes_no_lock(tmp_path):
    url = filled(f"file:{tmp_path / 's'}")
    store = open_storage(url)
    with store.lock("alice"):  # a send in progress, say
        result = fusion(url, "--lock-timeout", "0", "doctor")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_doctor_loads_no_driver_or_model_code(tmp_path, kind):
    url = filled(f"file:{tmp_path / 's'}" if kind == "file" else f"sqlite:{tmp_path / 's.db'}")
    modules = loaded_modules(["--storage", url, "doctor"], tmp_path)
    allowed = {"sqlite3"} if kind == "sqlite" else set()
    assert sorted(m for m in modules for f in FORBIDDEN
                  if f not in allowed and (m == f or m.startswith(f + "."))) == []


def test_an_unreachable_store_is_an_error_not_a_report(tmp_path):
    result = fusion("redis://127.0.0.1:1/0", "doctor")
    assert result.exit_code == 3 and result.stdout == ""
    assert result.stderr.startswith("fusion: error: cannot reach Redis at redis://127.0.0.1:1/0")


# ---- file: ---------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path) -> tuple[str, Path]:
    directory = tmp_path / "sessions"
    return filled(f"file:{directory}"), directory


def _tmp_file(directory: Path, sid: str, age: float) -> Path:
    path = directory / f".{sid}.{os.urandom(6).hex()}.tmp"  # as FileStorage names them
    path.write_bytes(b'[{"role": "user", "con')
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_stale_temporary_files_are_reported_and_fixed(files):
    url, directory = files
    stale = _tmp_file(directory, "alice", age=600)
    fresh = _tmp_file(directory, "bob", age=0)  # may be a write in flight: left alone
    before = (directory / "alice.json").read_bytes()
    result = fusion(url, "doctor")
    assert result.exit_code == 3
    assert result.stdout.startswith(f"{stale}: a temporary file left by an interrupted write (6")
    assert len(result.stdout.splitlines()) == 1
    assert stale.exists() and fresh.exists()  # read-only without --fix

    fixed = fusion(url, "doctor", "--fix")
    assert fixed.exit_code == 0, fixed.output
    assert fixed.stdout.endswith("(fixed)\n") and fixed.stderr.endswith("1 problem, 1 fixed\n")
    assert not stale.exists() and fresh.exists()
    assert (directory / "alice.json").read_bytes() == before
    assert fusion(url, "doctor").exit_code == 0


def test_loose_permissions_are_reported_and_fixed(files):
    url, directory = files
    os.chmod(directory, 0o755)
    os.chmod(directory / "bob.json", 0o644)
    os.chmod(directory / "alice.json", 0o640)
    result = fusion(url, "doctor")
    assert result.exit_code == 3
    assert result.stdout.splitlines() == [
        f"{directory}: mode 0755, expected 0700: other users can list the sessions",
        f"{directory / 'alice.json'}: mode 0640, expected 0600: other users can read it",
        f"{directory / 'bob.json'}: mode 0644, expected 0600: other users can read it",
    ]
    assert mode(directory) == 0o755  # read-only without --fix
    report = orjson.loads(fusion(url, "doctor", "--fix", "--json").stdout)
    assert report["ok"] and [(p["fixable"], p["fixed"]) for p in report["problems"]] == [(True, True)] * 3
    assert (mode(directory), mode(directory / "alice.json"), mode(directory / "bob.json")) == (0o700, 0o600, 0o600)
    assert open_storage(url).load("alice") == [U("hi"), A("hello")]
    assert fusion(url, "doctor").exit_code == 0


def test_a_fix_that_fails_says_why_and_the_problem_stays(files):
    url, directory = files
    os.chmod(directory / "bob.json", 0o644)
    report = check_store(open_storage(url))
    (directory / "bob.json").unlink()  # cleared before the fix ran
    report.apply_fixes()
    assert [str(p) for p in report.problems] == [
        f"{directory / 'bob.json'}: mode 0644, expected 0600: other users can read it "
        "(could not fix: No such file or directory)"]
    assert not report.ok


def test_entries_that_are_not_sessions(files):
    url, directory = files
    (directory / "notes.txt").write_text("mine")
    (directory / "a b.json").write_text("[]")
    (directory / "CON.json").write_text("[]")
    (directory / "dir.json").mkdir(mode=0o700)
    (directory / ".DS_Store").write_bytes(b"\0")
    os.symlink(directory / "alice.json", directory / "linked.json")
    weird = os.fsencode(directory) + b"/caf\xe9\n.json"  # not UTF-8, and a newline
    with open(weird, "wb") as f:
        f.write(b"[]")
    result = fusion(url, "doctor", "--fix")  # nothing here is safe to fix
    assert result.exit_code == 3
    lines = result.stdout.splitlines()
    not_session = "not a session file, so fusion ignores it"
    assert [line.split(": ", 1)[0] for line in lines] == [
        str(directory / n) for n in (".DS_Store", "CON.json", "a b.json", "caf\\xe9\\n.json", "dir.json",
                                     "linked.json", "notes.txt")]
    assert all(not_session in line for n, line in enumerate(lines) if n != 5)
    assert "a symbolic link: the next write to this session replaces the link" in lines[5]
    assert os.path.exists(weird) and (directory / "notes.txt").exists() and (directory / "linked.json").is_symlink()
    assert result.stderr.endswith("7 problems\n")


def test_every_problem_at_once_one_line_each(files):
    url, directory = files
    (directory / "broken.json").write_bytes(b"[{")
    os.chmod(directory / "broken.json", 0o600)
    (directory / "robot.json").write_bytes(b'[{"role": "robot", "content": "x"}]')
    os.chmod(directory / "bob.json", 0o604)
    tmp = _tmp_file(directory, "bob", age=3600)
    result = fusion(url, "doctor", "--json")
    report = orjson.loads(result.stdout)
    assert result.exit_code == 3 and not report["ok"] and report["sessions"] == 5
    where = [(Path(p["location"]).name, p["fixable"]) for p in report["problems"]]
    assert where == [("broken.json", False), ("robot.json", False),  # the sessions first, then the files
                     (tmp.name, True), ("bob.json", True), ("robot.json", True)]
    text = fusion(url, "doctor").stdout.splitlines()
    assert text == [f"{p['location']}: {p['problem']}" for p in report["problems"]]


def test_a_store_that_does_not_exist_yet_is_clean_and_stays_absent(tmp_path):
    result = fusion(f"file:{tmp_path / 'none'}", "doctor")
    assert result.exit_code == 0 and not (tmp_path / "none").exists()


# ---- sqlite: -----------------------------------------------------------------------

@pytest.fixture
def db(tmp_path) -> tuple[str, Path]:
    path = tmp_path / "fusion.db"
    return filled(f"sqlite:{path}"), path


def test_sqlite_integrity_check_failures_are_reported(db):
    url, path = db
    conn = sqlite3.connect(path)
    # The index's declared column no longer matches its entries: what a damaged page does.
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_schema SET sql = 'CREATE INDEX messages_by_session ON messages (role)' "
                 "WHERE name = 'messages_by_session'")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    result = fusion(url, "doctor")
    assert result.exit_code == 3
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith(f"{path}: integrity_check: ") for line in lines)
    assert any("messages_by_session" in line for line in lines)
    assert path.read_bytes() == before


def test_sqlite_orphans_ids_and_modes(db):
    url, path = db
    os.chmod(path, 0o644)  # and SQLite gives its -wal and -shm files the database's mode
    conn = sqlite3.connect(path)  # kept open, so the WAL stays
    with conn:
        conn.execute("INSERT INTO messages (session_id, role, content) VALUES ('ghost', 'user', 'boo')")
        conn.execute("INSERT INTO sessions VALUES ('../etc', 0, 0)")
    try:
        result = fusion(url, "doctor", "--fix")
    finally:
        conn.close()
    assert result.exit_code == 3  # the modes are fixed; the rows need a person
    assert result.stdout.splitlines() == [
        f"{path}: session '../etc': not a valid session id, so no command can name it "
        "(rename or remove it with the backend's own tools)",
        f"{path}: mode 0644, expected 0600: other users can read the sessions (fixed)",
        f"{path}-wal: mode 0644, expected 0600: other users can read the sessions (fixed)",
        f"{path}-shm: mode 0644, expected 0600: other users can read the sessions (fixed)",
        f"{path} messages of session 'ghost': 1 row with no row in sessions: no command lists, shows "
        "or clears them",
    ]
    assert mode(path) == 0o600
    assert open_storage(url).count("ghost") == 1  # doctor deleted nothing


# ---- redis:// ------------------------------------------------------------------------

@pytest.fixture
def redis_store():
    """A store whose prefix holds glob characters, and a neighbour the unescaped glob would match."""
    require_redis()
    import redis

    base = f"fusion-test-{uuid.uuid4().hex[:12]}"
    prefix = base + "[ab]*:"
    url = filled(f"{REDIS_URL}?prefix={prefix}")
    client = redis.Redis.from_url(REDIS_URL)
    client.set(base + "a:session:x", "another store's key")  # matches the glob [ab]*, not the prefix
    yield url, prefix, client
    client.close()
    _delete_redis_prefix(base)


def test_redis_clean_even_beside_keys_the_raw_glob_would_match(redis_store):
    url, _, _ = redis_store
    result = fusion(url, "doctor")
    assert (result.exit_code, result.stdout) == (0, ""), result.output


def test_redis_index_against_keys(redis_store):
    url, p, client = redis_store
    client.rpush(p + "session:lost", b'{"role": "user", "content": "not indexed"}')  # invisible to list
    client.rpush(p + "session:going", b'{"role": "user", "content": "expiring"}')
    client.expire(p + "session:going", 3600)  # an orphan with a TTL is on its way out: fine
    client.set(p + "meta:bob", "not a hash")
    client.set(p + "lock:alice", "stuck")  # no TTL: alice busy for ever
    client.set(p + "lock:bob", "held", ex=30)  # an ordinary held lock
    client.set(p + "other", "x")
    client.zadd(p + "sessions", {"bad id!": 0, "nometa": 0})
    result = fusion(url, "doctor")
    assert result.exit_code == 3
    loc = f"{url.split('?')[0]}?prefix={p} key {p}"
    assert result.stdout.splitlines() == [
        f"{loc}sessions: member 'bad id!' is not a valid session id, so fusion does not list it",
        f"{loc}lock:alice: a lock with no TTL: the session stays busy until the key is deleted",
        f"{loc}meta:bob: a string, expected a hash",
        f"{loc}other: not a key fusion writes, under its prefix",
        f"{loc}session:lost: session 'lost' is not in the index {p}sessions, so no command lists, "
        "shows or clears it",
        f"{loc}meta:nometa: missing: the session is indexed but has no times (list shows none)",
    ]


def test_redis_index_of_the_wrong_type(redis_store):
    url, p, client = redis_store
    client.delete(p + "sessions")
    client.set(p + "sessions", "oops")
    result = fusion(url, "doctor")
    assert result.exit_code == 3, result.output
    assert result.stdout == f"{url.split('?')[0]}?prefix={p} key {p}sessions: not a sorted set (WRONGTYPE)\n"
    listing = fusion(url, "list")  # every command says the same, in one line
    assert listing.exit_code == 3 and "key " + p + "sessions: not a sorted set" in listing.stderr


# ---- an encrypted store -----------------------------------------------------------

def test_encrypted_sessions_are_checked_without_the_key(tmp_path):
    url = f"file:{tmp_path / 's'}"
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    wrong = base64.urlsafe_b64encode(os.urandom(32)).decode()
    sent = fusion(url, "send", "-s", "secret", "hush", env={"FUSION_PROVIDER": "echo", "FUSION_ENCRYPTION_KEY": key})
    assert sent.exit_code == 0, sent.output
    without = fusion(url, "doctor")
    assert (without.exit_code, without.stdout) == (0, ""), without.output
    assert "1 encrypted session checked without decrypting (no key set)" in without.stderr
    assert fusion(url, "doctor", env={"FUSION_ENCRYPTION_KEY": key}).exit_code == 0
    other = fusion(url, "doctor", env={"FUSION_ENCRYPTION_KEY": wrong})
    assert other.exit_code == 3 and "session 'secret'" in other.stdout and "another key" in other.stdout


# ---- postgresql:// --------------------------------------------------------------------

def test_postgres_ids_no_command_can_name(make_url):
    import psycopg

    url = filled(make_url("postgres"))
    prefix = url.split("table_prefix=")[1]
    with psycopg.connect(url.split("?")[0], autocommit=True) as conn:
        conn.execute(f'INSERT INTO "{prefix}sessions" (id) VALUES (%s)', ("a/b",))
    result = fusion(url, "doctor")
    assert result.exit_code == 3
    assert result.stdout == (f"{open_storage(url).location}: session 'a/b': not a valid session id, so no "
                             "command can name it (rename or remove it with the backend's own tools)\n")
    assert "checked 4 sessions (3 messages)" in result.stderr
