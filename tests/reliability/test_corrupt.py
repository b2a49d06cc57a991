"""Corrupt data, planted with each backend's own client, as a hand edit, a bad copy or another program would.

For every case: the corrupt session is reported as corrupt with its location
(exit 3, one line), the other sessions keep working, `list` (plain, --json,
--long) still lists it, no command changes the stored bytes (a failed `send`
and `doctor` included), `doctor` names it, and `clear` -- an explicit
request to forget it -- removes it and leaves a clean store.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import orjson
import pytest
from click.testing import CliRunner

from fusion_cli.cli import cli
from fusion_cli.errors import CorruptSession
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage

U, A = ChatMessage.user, ChatMessage.assistant
GOOD = {"alice": [U("hi"), A("hello")], "bob": [U("yo")]}
FIRST = '{"role": "user", "content": "a fine first message"}'


def fusion(url: str, *args: str):
    return CliRunner().invoke(cli, ["--storage", url, *args], env={"FUSION_PROVIDER": "echo"})


# ---- planting corrupt data, backend by backend -------------------------------------

@dataclass
class Backend:
    plant: Callable[[str, Any], None]  # (url, payload) -> the session "bad" holds the payload
    raw: Callable[[str], Any]  # (url) -> the bad session exactly as stored
    where: Callable[[str], list[str]]  # (url) -> what the error must name
    count_reads_messages: bool  # count/list --json decode the history (so they report it too)


def _file_path(url: str) -> Path:
    return Path(url.removeprefix("file:")) / "bad.json"


def _file_plant(url: str, data: bytes) -> None:
    fd = os.open(_file_path(url), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # as fusion would
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:")


def _sqlite_plant(url: str, rows: list[tuple[str, str]]) -> None:
    # rows: (role, content) as SQL literals, so that blobs and bad text go in as they are
    with sqlite3.connect(_sqlite_path(url)) as conn:
        conn.execute("INSERT INTO sessions VALUES ('bad', ?1, ?1)", (time.time(),))
        conn.execute("INSERT INTO messages (session_id, role, content) VALUES ('bad', 'user', 'fine')")
        for role, content in rows:
            conn.execute(f"INSERT INTO messages (session_id, role, content) VALUES ('bad', {role}, {content})")
    conn.close()


def _sqlite_raw(url: str) -> list[tuple]:
    conn = sqlite3.connect(_sqlite_path(url))
    try:
        return conn.execute("SELECT id, typeof(role), hex(role), typeof(content), hex(content) "
                            "FROM messages WHERE session_id = 'bad' ORDER BY id").fetchall()
    finally:
        conn.close()


def _redis(url: str):
    import redis

    return redis.Redis.from_url(url.split("?")[0]), url.split("prefix=")[1]


def _redis_plant(url: str, items: list[bytes] | str) -> None:
    client, prefix = _redis(url)
    key = prefix + "session:bad"
    if isinstance(items, str):
        client.set(key, items)  # a string where a list belongs
    else:
        client.rpush(key, FIRST.encode(), *items)
    client.hset(prefix + "meta:bad", mapping={"created": time.time(), "updated": time.time()})
    client.zadd(prefix + "sessions", {"bad": 0})
    client.close()


def _redis_raw(url: str) -> bytes | None:
    client, prefix = _redis(url)
    try:
        return client.dump(prefix + "session:bad")  # type and value, whatever the type
    finally:
        client.close()


def _pg(url: str):
    import psycopg

    prefix = url.split("table_prefix=")[1]
    return psycopg.connect(url.split("?")[0], autocommit=True), f'"{prefix}sessions"', f'"{prefix}messages"'


def _pg_plant(url: str, rows: list[tuple[str, bytes]]) -> None:
    conn, sessions, messages = _pg(url)
    with conn:
        conn.execute(f"INSERT INTO {sessions} (id) VALUES ('bad')")
        for seq, (role, content) in enumerate([("user", b"fine"), *rows]):
            conn.execute(f"INSERT INTO {messages} (session_id, seq, role, content) VALUES ('bad', %s, %s, %s)",
                         (seq, role, content))


def _pg_raw(url: str) -> list[tuple]:
    conn, _, messages = _pg(url)
    with conn:
        return conn.execute(f"SELECT seq, role, content FROM {messages} WHERE session_id = 'bad' "
                            "ORDER BY seq").fetchall()


BACKEND = {
    "file": Backend(_file_plant, lambda url: _file_path(url).read_bytes(),
                    lambda url: [str(_file_path(url))], count_reads_messages=True),
    "sqlite": Backend(_sqlite_plant, _sqlite_raw,
                      lambda url: [_sqlite_path(url), f"session 'bad', messages row {_sqlite_raw(url)[1][0]}:"],
                      count_reads_messages=False),
    "redis": Backend(_redis_plant, _redis_raw,
                     lambda url: [f"key {url.split('prefix=')[1]}session:bad"], count_reads_messages=False),
    "postgres": Backend(_pg_plant, _pg_raw, lambda url: ["session 'bad' message seq 1"],
                        count_reads_messages=False),
}

# (backend, case, payload, what the reason says)
CASES = [
    ("file", "truncated", b'[{"role": "user", "content": "hi"}, {"role": "assi', "not valid JSON"),
    ("file", "empty-file", b"", "not valid JSON"),
    ("file", "not-json", b"hello, world\n", "not valid JSON"),
    ("file", "nul-bytes", b"\0" * 64, "not valid JSON"),
    ("file", "invalid-utf8", b'[{"role": "user", "content": "caf\xe9"}]', "not valid UTF-8"),
    ("file", "object-not-list", b'{"role": "user", "content": "hi"}', "expected a JSON array"),
    ("file", "string-not-list", b'"hi"', "expected a JSON array"),
    ("file", "item-not-object", f'[{FIRST}, "hi"]'.encode(), "message 2: expected a message object"),
    ("file", "no-role", f'[{FIRST}, {{"content": "hi"}}]'.encode(), "message 2 lacks a string 'role'"),
    ("file", "bad-role", f'[{FIRST}, {{"role": "robot", "content": "hi"}}]'.encode(),
     "message 2 has an unknown role 'robot'"),
    ("file", "null-content", f'[{FIRST}, {{"role": "user", "content": null}}]'.encode(), "lacks a string"),
    ("file", "number-content", b'[{"role": "user", "content": 42}]', "message 1 lacks a string"),
    ("sqlite", "bad-role", [("'robot'", "'hi'")], "unknown role 'robot'"),
    ("sqlite", "blob-role", [("x'75736572'", "'hi'")], "not text"),
    ("sqlite", "invalid-utf8", [("'user'", "x'cafe'")], "not text"),
    ("redis", "not-json", [b"hello"], "not valid JSON"),
    ("redis", "invalid-utf8", [b'{"role": "user", "content": "caf\xe9"}'], "not valid UTF-8"),
    ("redis", "no-role", [b'{"content": "hi"}'], "lacks a string 'role'"),
    ("redis", "bad-role", [b'{"role": "robot", "content": "hi"}'], "unknown role 'robot'"),
    ("redis", "number-content", [b'{"role": "user", "content": 42}'], "lacks a string"),
    ("redis", "list-item", [b"[1, 2]"], "expected a message object"),
    ("redis", "wrong-type", "a string, not a list", "WRONGTYPE"),
    ("postgres", "bad-role", [("robot", b"hi")], "unknown role 'robot'"),
    ("postgres", "empty-role", [("", b"hi")], "unknown role ''"),
    ("postgres", "invalid-utf8", [("user", b"caf\xe9")], "not UTF-8"),
]


@pytest.fixture
def good_store(make_url, request):
    """make(kind) -> the URL of a store holding GOOD (alice, bob)."""
    def make(kind: str) -> str:
        url = make_url(kind)
        store = open_storage(url)
        for sid, history in GOOD.items():
            store.save(sid, history)
        store.close()
        return url
    return make


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fusion: error: corrupt session data at "), stderr
    return lines[0]


@pytest.mark.parametrize("kind,case,payload,reason", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_corrupt_session(good_store, kind, case, payload, reason):
    backend = BACKEND[kind]
    url = good_store(kind)
    backend.plant(url, payload)
    planted = backend.raw(url)

    def unchanged() -> None:
        assert backend.raw(url) == planted

    # Reading it: exit 3, one line naming where and what.
    for args in (["show", "-s", "bad"], ["show", "-s", "bad", "--json"]):
        result = fusion(url, *args)
        assert result.exit_code == 3, result.output
        line = _one_error_line(result.stderr)
        assert all(w in line for w in backend.where(url)) and reason in line, line
        assert result.stdout == ""
        unchanged()

    # A turn: refused before the model is asked, nothing appended, the message handed back.
    result = fusion(url, "send", "-s", "bad", "please do not get lost")
    assert result.exit_code == 3 and result.stdout == ""
    first, *rest = result.stderr.splitlines()
    assert "corrupt session data" in first and reason in first
    assert rest[-1] == "please do not get lost"
    unchanged()

    # count: reports it where it has to read the data (always for files), else counts the stored messages.
    result = fusion(url, "count", "-s", "bad")
    if result.exit_code == 0:
        assert not backend.count_reads_messages and int(result.stdout) >= 1
    else:
        assert result.exit_code == 3 and reason in _one_error_line(result.stderr)
    unchanged()

    # Everything else keeps working, and the bad session is still listed.
    assert fusion(url, "list").stdout == "alice\nbad\nbob\n"
    assert fusion(url, "count", "-s", "alice").stdout == "2\n"
    assert fusion(url, "show", "-s", "bob", "--json").stdout == '[\n  {\n    "role": "user",\n    "content": "yo"\n  }\n]\n'
    listing = {d["id"]: d for d in map(orjson.loads, fusion(url, "list", "--json").stdout.splitlines())}
    assert list(listing) == ["alice", "bad", "bob"]
    assert listing["alice"]["messages"] == 2 and "error" not in listing["alice"]
    if "error" in listing["bad"]:  # where listing reads the data, it says why it cannot
        assert listing["bad"]["messages"] is None and reason in listing["bad"]["error"]
    else:
        assert not backend.count_reads_messages and isinstance(listing["bad"]["messages"], int)
    long = fusion(url, "list", "--long")
    assert long.exit_code == 0 and [r.split()[0] for r in long.stdout.splitlines()[1:]] == ["alice", "bad", "bob"]
    unchanged()

    # doctor: the one problem, where it is; read-only.
    result = fusion(url, "doctor")
    assert result.exit_code == 3
    assert len(result.stdout.splitlines()) == 1, result.stdout
    assert all(w in result.stdout for w in backend.where(url)) and reason in result.stdout
    unchanged()

    # Forgetting it is an explicit request, and allowed; the store is clean afterwards.
    assert fusion(url, "clear", "-s", "bad").exit_code == 0
    assert fusion(url, "list").stdout == "alice\nbob\n"
    clean = fusion(url, "doctor")
    assert (clean.exit_code, clean.stdout) == (0, ""), clean.output
    assert "checked 2 sessions (3 messages)" in clean.stderr


def test_the_library_refuses_to_append_to_a_corrupt_file(good_store):
    url = good_store("file")
    _file_plant(url, b'[{"role": "user"')
    store = open_storage(url)
    with pytest.raises(CorruptSession) as info:
        store.append("bad", [U("more")])
    assert info.value.location == str(_file_path(url))
    assert _file_path(url).read_bytes() == b'[{"role": "user"'
    assert not [p for p in _file_path(url).parent.iterdir() if p.name.endswith(".tmp")]


def test_the_error_is_one_line_from_a_real_process(good_store, fusion_env):
    url = good_store("file")
    _file_plant(url, b"{oops")
    proc = subprocess.run([sys.executable, "-m", "fusion_cli", "--storage", url, "show", "-s", "bad"],
                          env=fusion_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and proc.stdout == ""
    assert _one_error_line(proc.stderr).startswith(f"fusion: error: corrupt session data at {_file_path(url)}:")


@pytest.mark.parametrize("junk", [os.urandom(4096), b"SQLite format 2\0" + b"\1" * 8000, b"just text\n"],
                         ids=["random", "wrong-header", "text"])
def test_a_sqlite_file_that_is_not_a_database(tmp_path, junk):
    path = tmp_path / "fusion.db"
    path.write_bytes(junk)
    url = f"sqlite:{path}"
    for args in (["list"], ["list", "--json"], ["count", "-s", "a"], ["show", "-s", "a"], ["clear", "-s", "a"],
                 ["send", "-s", "a", "hello"]):
        result = fusion(url, *args)
        assert result.exit_code == 3, (args, result.output)
        assert result.stderr.splitlines()[0] == (f"fusion: error: corrupt session data at {path}: file is not "
                                                 "a database (it was left untouched; fix or move it away, "
                                                 "then retry)")
        assert path.read_bytes() == junk
    result = fusion(url, "doctor")
    assert (result.exit_code, result.stdout) == (3, f"{path}: file is not a database\n")
    assert path.read_bytes() == junk
