"""`export` and `import`: the format, exact round trips on every backend, validation, conflicts."""

from __future__ import annotations

import io
import os
import stat

import orjson
import pytest
from click.testing import CliRunner

from fusion_cli.cli import cli
from fusion_cli.errors import MigrationConflict, UsageError
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage
from fusion_cli.timespec import format_time
from fusion_cli.transfer import export_sessions, import_sessions, parse_export, write_export
from tests.conftest import BACKENDS, PERSISTENT

S, U, A = ChatMessage.system, ChatMessage.user, ChatMessage.assistant

SESSIONS = {
    "alice": [S("sys"), U("Remember: my name is Alice"), A('{"is_final": true, "final_answer": "ok"}')],
    "bob": [U("héllo 🎉 \u202eRTL\u202c\n\x00\x01\x1f\x7f tab\t\r\nend\n"), A("x" * 100_000), U(""), U("   ")],
    "empty": [],
}


def run(*args: str, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def fill(store, sessions=SESSIONS) -> None:
    for sid, history in sessions.items():
        store.save(sid, history)


def contents(store) -> dict[str, list[ChatMessage]]:
    return {sid: store.load(sid) for sid in store.list_sessions()}


def export_bytes(store, ids=None, fmt="json") -> bytes:
    out = io.BytesIO()
    export_sessions(store, out, ids, fmt)
    return out.getvalue()


# ---- the format ------------------------------------------------------------------

def test_the_json_layout(store):
    fill(store)
    data = export_bytes(store)
    doc = orjson.loads(data)
    assert (doc["format"], doc["version"], list(doc)) == ("fusion-export", 1, ["format", "version", "sessions"])
    assert [s["id"] for s in doc["sessions"]] == ["alice", "bob", "empty"]
    for record in doc["sessions"]:
        assert list(record) == ["id", "created", "updated", "messages"]
        info = store.info(record["id"])
        assert (record["created"], record["updated"]) == (format_time(info.created), format_time(info.updated))
        assert record["messages"] == [m.to_dict() for m in SESSIONS[record["id"]]]
    assert data.endswith(b"\n]}\n") and data.count(b"\n") == 5  # a header, a session a line, a footer


def test_the_jsonl_layout_is_the_same_records_a_line(store):
    fill(store)
    lines = export_bytes(store, fmt="jsonl").splitlines()
    assert [orjson.loads(line) for line in lines] == orjson.loads(export_bytes(store))["sessions"]


def test_selected_sessions_and_missing_ones(store):
    fill(store)
    doc = orjson.loads(export_bytes(store, ["bob", "alice", "bob"]))
    assert [s["id"] for s in doc["sessions"]] == ["bob", "alice"]
    out = io.BytesIO()
    with pytest.raises(UsageError, match="no session 'nobody'"):
        export_sessions(store, out, ["alice", "nobody"])
    assert out.getvalue() == b""  # refused before writing anything
    assert export_bytes(open_storage("memory:")) == b'{"format":"fusion-export","version":1,"sessions":[\n\n]}\n'
    assert export_bytes(open_storage("memory:"), fmt="jsonl") == b""


# ---- round trips on every backend --------------------------------------------------

@pytest.mark.parametrize("fmt", ["json", "jsonl"])
@pytest.mark.parametrize("src_kind", BACKENDS)
def test_round_trip_is_exact_between_every_backend(src_kind, fmt, make_url):
    src = open_storage(make_url(src_kind))
    fill(src)
    data = export_bytes(src, fmt=fmt)
    for dst_kind in BACKENDS:
        dst = open_storage(make_url(dst_kind))
        report = import_sessions(data, dst)
        assert (report.copied, report.messages) == (["alice", "bob", "empty"], 7)
        assert contents(dst) == SESSIONS
        again = export_bytes(dst, fmt=fmt)
        strip = lambda d: [{**s, "created": None, "updated": None}  # noqa: E731
                           for s in (orjson.loads(d)["sessions"] if fmt == "json"
                                     else map(orjson.loads, d.splitlines()))]
        assert strip(again) == strip(data)  # messages byte for byte; times are the import's
        dst.close()
    src.close()


@pytest.mark.parametrize("kind", PERSISTENT)
def test_export_and_import_commands(kind, make_url, tmp_path):
    src_url, dst_url = make_url(kind), make_url(kind)
    src = open_storage(src_url)
    fill(src)
    src.close()
    (tmp_path / "out").mkdir()
    backup = tmp_path / "out" / "backup.json"
    out = run("--storage", src_url, "export", "--all", "-o", str(backup))
    assert (out.exit_code, out.stdout) == (0, "")
    assert out.stderr == f"fusion: exported 3 sessions (7 messages) to {backup}\n"
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["backup.json"]  # no temporary file left

    first = run("--storage", dst_url, "import", str(backup))
    assert (first.exit_code, first.stdout) == (0, "imported 3 sessions (7 messages): 3 new, 0 overwritten, "
                                                  "0 skipped\n")
    dst = open_storage(dst_url)
    assert contents(dst) == SESSIONS

    piped = run("--storage", src_url, "export", "-s", "bob", "--format", "jsonl")
    assert piped.exit_code == 0 and piped.stdout.count("\n") == 1
    dst.save("bob", [U("changed")])
    refused = run("--storage", dst_url, "import", "-", input=piped.stdout)
    assert refused.exit_code == 3 and "bob" in refused.stderr and "--on-conflict" in refused.stderr
    assert dst.load("bob") == [U("changed")]
    skipped = run("--storage", dst_url, "import", "--on-conflict", "skip", "--json", input=piped.stdout)
    assert orjson.loads(skipped.stdout) == {"imported": [], "overwritten": [], "skipped": ["bob"],
                                            "messages": 0, "dry_run": False}
    dry = run("--storage", dst_url, "import", "--on-conflict", "overwrite", "--dry-run", input=piped.stdout)
    assert dry.stdout.startswith("would import 1 sessions (4 messages): 0 new, 1 overwritten")
    assert dst.load("bob") == [U("changed")]
    over = run("--storage", dst_url, "import", "--on-conflict", "overwrite", input=piped.stdout)
    assert over.exit_code == 0 and dst.load("bob") == SESSIONS["bob"]
    dst.close()


def test_export_defaults_to_the_current_session(tmp_path):
    url = f"file:{tmp_path / 's'}"
    fill(open_storage(url))
    env = {"FUSION_STORAGE": url}
    result = CliRunner().invoke(cli, ["export"], env={**env, "FUSION_SESSION": "alice"})
    assert [s["id"] for s in orjson.loads(result.stdout)["sessions"]] == ["alice"]
    missing = CliRunner().invoke(cli, ["export"], env=env)  # "default" does not exist
    assert missing.exit_code == 2 and "no session 'default'" in missing.stderr and missing.stdout == ""
    both = CliRunner().invoke(cli, ["export", "--all", "-s", "bob"], env=env)
    assert both.exit_code == 2 and "not both" in both.stderr
    bad = CliRunner().invoke(cli, ["export", "-s", "../x"], env=env)
    assert bad.exit_code == 2 and "invalid session id" in bad.stderr


def test_a_failed_export_leaves_no_file(tmp_path):
    store = open_storage(f"file:{tmp_path / 's'}")
    fill(store)
    (tmp_path / "s" / "broken.json").write_text("[{")
    target = tmp_path / "out.json"
    target.write_text("the previous export")
    with pytest.raises(Exception, match="corrupt session data"):
        write_export(store, target)
    assert target.read_text() == "the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "s"]


def test_import_into_memory_and_between_memory_stores():
    a, b = open_storage("memory:"), open_storage("memory:")
    fill(a)
    assert import_sessions(export_bytes(a), b).copied == ["alice", "bob", "empty"]
    assert contents(b) == SESSIONS
    with pytest.raises(MigrationConflict):
        import_sessions(export_bytes(a), b)
    assert import_sessions(export_bytes(a), b, "skip").skipped == ["alice", "bob", "empty"]


# ---- validation: everything is checked before anything is written -----------------

def session_obj(sid="s", messages=None, **extra):
    return {"id": sid, "created": None, "updated": None,
            "messages": [{"role": "user", "content": "hi"}] if messages is None else messages, **extra}


def container(*sessions, **top):
    return orjson.dumps({"format": "fusion-export", "version": 1, "sessions": list(sessions), **top})


def jsonl(*objs) -> bytes:
    return b"\n".join(orjson.dumps(o) for o in objs) + b"\n"


BAD = [
    (jsonl(session_obj("a"), session_obj("../b")), "line 2: invalid session id '../b'"),
    (jsonl(session_obj("a"), session_obj("a")), "line 2 (session 'a'): the same id as"),
    (jsonl(session_obj(messages=[{"role": "robot", "content": "x"}])), "message 1: unknown role 'robot'"),
    (jsonl(session_obj(messages=[{"role": "user", "content": 5}])), "'content' must be a string, found a number"),
    (jsonl(session_obj(messages=[{"role": "user"}])), "message 1: expected an object with exactly 'role'"),
    (jsonl(session_obj(messages=[{"role": "user", "content": "x", "extra": 1}])), "exactly 'role' and 'content'"),
    (jsonl(session_obj(messages="hi")), "'messages' must be an array, found a string"),
    (jsonl(session_obj(owner="me")), "unknown key(s) 'owner'"),
    (jsonl(session_obj(created="yesterday")), "'created' must be an ISO 8601 time or null"),
    (jsonl(session_obj("a")) + b'{"id": "b", "messages": [}\n', "line 2: not valid JSON"),
    (jsonl(session_obj("a"), [1, 2]), "line 2: expected a session object, found an array"),
    (jsonl({"messages": []}), "line 1: invalid session id: expected a string, got NoneType"),
    (container(session_obj("a"), session_obj("CON")), "session 2: invalid session id 'CON'"),
    (container(session_obj("a"), version=2)[:-1] + b"}", "export version"),
    (orjson.dumps({"format": "fusion-export", "version": 2, "sessions": []}), "version 2 is not supported"),
    (orjson.dumps({"format": "other", "sessions": []}), "is not a fusion export"),
    (orjson.dumps({"format": "fusion-export", "version": 1, "sessions": {}}), '"sessions" must be an array'),
    (container(session_obj(), note="x"), "unknown key(s) 'note'"),
    (b'{"format": "fusion-export", "version": 1, "sessions": [\n{"id": "a"},\n', "line 3 column 1: not valid JSON"),
    (b"[1, 2]", "is not a fusion export"),
    (b"\xff\xfe", "not valid UTF-8"),
]


@pytest.mark.parametrize("data, expected", BAD, ids=[e for _, e in BAD])
def test_bad_input_names_the_fault(data, expected):
    with pytest.raises(UsageError) as info:
        parse_export(data, "in.json")
    assert str(info.value).startswith("in.json") and expected in str(info.value)


def test_nothing_is_written_when_a_later_session_is_bad(store):
    data = jsonl(session_obj("good"), session_obj("also-good"), session_obj("bad", [{"role": "x", "content": ""}]))
    with pytest.raises(UsageError, match="line 3 .session 'bad'.: message 1"):
        import_sessions(data, store)
    assert store.list_sessions() == []


@pytest.mark.parametrize("kind", PERSISTENT)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(kind, make_url, tmp_path):
    url = make_url(kind)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(session_obj("ok"), {"id": "x", "messages": [{"role": "user", "content": None}]}))
    result = run("--storage", url, "import", str(bad))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"fusion: error: {bad}: line 2 (session 'x'): message 1: 'content' must be a string, found null"]
    piped = run("--storage", url, "import", input=b"not json at all\n")
    assert piped.exit_code == 2 and piped.stderr.startswith("fusion: error: stdin: line 1")
    missing = run("--storage", url, "import", str(tmp_path / "nope.json"))
    assert missing.exit_code == 2 and "cannot read" in missing.stderr
    assert open_storage(url).list_sessions() == []


def test_an_empty_input_imports_nothing(tmp_path):
    result = run("--storage", f"file:{tmp_path}", "import", input=b"")
    assert (result.exit_code, result.stdout) == (0, "imported 0 sessions (0 messages): 0 new, 0 overwritten, "
                                                    "0 skipped\n")


def test_json_layout_on_one_line_and_a_single_jsonl_session_are_both_read():
    one_line = container(session_obj("a"), session_obj("b"))
    assert "\n" not in one_line.decode()
    assert [sid for sid, _ in parse_export(one_line)] == ["a", "b"]
    assert parse_export(orjson.dumps(session_obj("only"))) == [("only", [U("hi")])]
    assert parse_export(b"\n\n" + jsonl(session_obj("x")) + b"\n  \n") == [("x", [U("hi")])]
