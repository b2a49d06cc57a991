"""`migrate` between every pair of persistent backends, and its policies."""

from __future__ import annotations

import itertools

import orjson
import pytest
from click.testing import CliRunner

from fusion_cli.cli import cli
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage
from tests.conftest import PERSISTENT

U, A = ChatMessage.user, ChatMessage.assistant

SESSIONS = {
    "alice": [ChatMessage.system("sys"), U("Remember: my name is Alice"), A('{"is_final": true}')],
    "bob": [U("héllo 🎉\n\x00"), A("x" * 100_000)],
    "empty": [],
}


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def fill(url: str, sessions=SESSIONS) -> None:
    store = open_storage(url)
    for sid, history in sessions.items():
        store.save(sid, history)
    store.close()


def contents(url: str) -> dict[str, list[ChatMessage]]:
    store = open_storage(url)
    try:
        return {sid: store.load(sid) for sid in store.list_sessions()}
    finally:
        store.close()


@pytest.mark.parametrize("src_kind,dst_kind", list(itertools.product(PERSISTENT, PERSISTENT)))
def test_every_pair(src_kind, dst_kind, make_url):
    src, dst = make_url(src_kind), make_url(dst_kind)
    fill(src)
    result = run("migrate", "--from", src, "--to", dst)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "copied 3 sessions (5 messages): 3 new, 0 overwritten, 0 skipped"
    assert contents(dst) == SESSIONS
    assert contents(src) == SESSIONS  # the source is untouched


def test_conflict_fails_before_writing_anything(make_url):
    src, dst = make_url("file"), make_url("sqlite")
    fill(src)
    fill(dst, {"bob": [U("theirs")]})
    result = CliRunner().invoke(cli, ["migrate", "--from", src, "--to", dst])
    assert result.exit_code == 3
    assert "bob" in result.stderr and "--on-conflict" in result.stderr
    assert contents(dst) == {"bob": [U("theirs")]}


def test_skip_is_idempotent_and_overwrite_replaces(make_url):
    src, dst = make_url("sqlite"), make_url("file")
    fill(src)
    fill(dst, {"bob": [U("theirs")]})
    first = run("migrate", "--from", src, "--to", dst, "--on-conflict", "skip", "--json")
    assert orjson.loads(first.stdout) == {"copied": ["alice", "empty"], "overwritten": [],
                                          "skipped": ["bob"], "messages": 3, "dry_run": False}
    second = run("migrate", "--from", src, "--to", dst, "--on-conflict", "skip", "--json")
    assert orjson.loads(second.stdout)["copied"] == []
    assert contents(dst)["bob"] == [U("theirs")]
    third = run("migrate", "--from", src, "--to", dst, "--on-conflict", "overwrite")
    assert "3 overwritten" in third.stdout
    assert contents(dst) == SESSIONS


def test_dry_run_writes_nothing(make_url):
    src, dst = make_url("file"), make_url("file")
    fill(src)
    result = run("migrate", "--from", src, "--to", dst, "--dry-run")
    assert result.stdout.startswith("would copy 3 sessions")
    assert contents(dst) == {}


def test_selected_sessions_only(make_url):
    src, dst = make_url("file"), make_url("sqlite")
    fill(src)
    run("migrate", "--from", src, "--to", dst, "-s", "bob", "-s", "alice")
    assert sorted(contents(dst)) == ["alice", "bob"]
    missing = CliRunner().invoke(cli, ["migrate", "--from", src, "--to", dst, "-s", "nobody"])
    assert missing.exit_code == 2 and "nobody" in missing.stderr
    bad = CliRunner().invoke(cli, ["migrate", "--from", src, "--to", dst, "-s", "../x"])
    assert bad.exit_code == 2 and "invalid session id" in bad.stderr


def test_corrupt_source_stops_with_exit_3_and_keeps_whole_sessions(make_url, tmp_path):
    src, dst = make_url("file"), make_url("sqlite")
    fill(src, {"a-good": [U("fine")], "b-bad": [U("x")]})
    (tmp_path / "files0" / "b-bad.json").write_text("[{\"role\": ")
    result = CliRunner().invoke(cli, ["migrate", "--from", src, "--to", dst])
    assert result.exit_code == 3
    assert "b-bad.json" in result.stderr and "1 session(s) copied before it" in result.stderr
    assert contents(dst) == {"a-good": [U("fine")]}


def test_same_store_is_refused(make_url):
    src = make_url("file")
    fill(src)
    result = CliRunner().invoke(cli, ["migrate", "--from", src, "--to", src])
    assert result.exit_code == 2


def test_unknown_scheme_is_refused(make_url):
    result = CliRunner().invoke(cli, ["migrate", "--from", "nosuch://x", "--to", make_url("file")])
    assert result.exit_code == 2 and "unknown storage scheme" in result.stderr


# ---- memory: pairs, through the library with open store objects ----------------
# memory: lives in one process, so the command cannot take it; the library can.

@pytest.mark.parametrize("src_kind,dst_kind",
                         [(a, b) for a, b in itertools.product(["memory", *PERSISTENT], repeat=2)
                          if "memory" in (a, b)])
def test_every_pair_with_memory_through_the_library(src_kind, dst_kind, make_url):
    from fusion_cli.migrate import migrate

    src, dst = open_storage(make_url(src_kind)), open_storage(make_url(dst_kind))
    for sid, history in SESSIONS.items():
        src.save(sid, history)
    report = migrate(src, dst)
    assert (report.copied, report.messages) == (["alice", "bob", "empty"], 5)
    assert {sid: dst.load(sid) for sid in dst.list_sessions()} == SESSIONS
    assert {sid: src.load(sid) for sid in src.list_sessions()} == SESSIONS
    again = migrate(src, dst, on_conflict="skip")
    assert (again.copied, again.skipped) == ([], ["alice", "bob", "empty"])
    src.close()
    dst.close()


def test_one_memory_store_is_not_two():
    from fusion_cli.errors import UsageError
    from fusion_cli.migrate import migrate

    store = open_storage("memory:")
    store.save("a", [U("x")])
    with pytest.raises(UsageError, match="same store"):
        migrate(store, store)
    other = open_storage("memory:")
    assert migrate(store, other).copied == ["a"] and other.load("a") == [U("x")]


def test_conflicts_with_memory_are_found_before_any_write(make_url):
    from fusion_cli.errors import MigrationConflict
    from fusion_cli.migrate import migrate

    src, dst = open_storage("memory:"), open_storage(make_url("sqlite"))
    for sid, history in SESSIONS.items():
        src.save(sid, history)
    dst.save("empty", [U("theirs")])
    with pytest.raises(MigrationConflict, match="nothing was written"):
        migrate(src, dst)
    assert dst.list_sessions() == ["empty"] and dst.load("empty") == [U("theirs")]
    assert migrate(src, dst, on_conflict="overwrite").overwritten == ["empty"]
    assert dst.load("empty") == []
