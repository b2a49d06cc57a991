"""Session times on every backend, `list` by time, `prune`, and `--max-history`.

Times are never asserted against a clock: a test orders two writes (with a
pause between them so every backend's clock tells them apart) and picks its
cutoffs between the times the store itself reports.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from fusion_cli.cli import cli
from fusion_cli.errors import UsageError
from fusion_cli.lifecycle import prune, select_sessions
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import SessionInfo, open_storage
from fusion_cli.timespec import format_time, parse_duration, parse_time
from tests.conftest import PERSISTENT
from tests.model_server import Reply, final

U, A = ChatMessage.user, ChatMessage.assistant
DAY = 86400.0
PAUSE = 0.05  # longer than any backend's clock step (file mtimes, PostgreSQL now())


def run(*args: str, input=None, env=None):
    return CliRunner().invoke(cli, list(args), input=input, env=env, catch_exceptions=False)


def iso(ts: float) -> str:
    """A cutoff for the command line, to the microsecond."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def written_in_order(store, *ids: str) -> dict[str, SessionInfo]:
    """Save each session in turn, a pause apart; their infos, updated strictly increasing."""
    for n, sid in enumerate(ids):
        if n:
            time.sleep(PAUSE)
        store.save(sid, [U(sid)] * (n + 1))
    infos = {sid: store.info(sid) for sid in ids}
    times = [infos[sid].updated for sid in ids]
    assert times == sorted(times) and len(set(times)) == len(times), times
    return infos


# ---- timespec ------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("30d", 30 * DAY), ("12h", 43200), ("90m", 5400), ("45s", 45), ("2w", 14 * DAY),
    ("1h30m", 5400), ("1.5h", 5400), ("3600", 3600), (" 7D ", 7 * DAY), ("0s", 0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "30x", "-5m", "1h 30m", "30d2", "h1", "1e3"])
def test_bad_durations_and_times(text):
    with pytest.raises(UsageError):
        parse_duration(text)
    with pytest.raises(UsageError):
        parse_time(text)


def test_times_are_ago_or_iso_in_utc():
    now = 1_700_000_000.0
    assert parse_time("30d", now) == now - 30 * DAY
    assert parse_time("90m", now) == now - 5400
    assert parse_time("2024-05-01") == datetime(2024, 5, 1, tzinfo=timezone.utc).timestamp()
    assert parse_time("2024-05-01T12:30") == datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc).timestamp()
    assert parse_time("2024-05-01T12:30:00Z") == parse_time("2024-05-01 14:30:00+02:00")
    assert format_time(parse_time("2024-05-01T12:30:00.25Z")) == "2024-05-01T12:30:00Z"
    for bad in ("2024-13-01", "yesterday", "2024/05/01"):
        with pytest.raises(UsageError, match="invalid time"):
            parse_time(bad)


# ---- created and updated on every backend ---------------------------------------


def test_created_stays_and_updated_moves_forward(store):
    store.save("s", [U("a")])
    first = store.info("s")
    assert first.created is not None and first.created <= first.updated
    for write in (lambda: store.append("s", [A("b")]), lambda: store.save("s", [U("c")]),
                  lambda: store.append("s", []), lambda: store.save("s", [])):
        time.sleep(PAUSE)
        before = store.info("s")
        write()
        after = store.info("s")
        assert after.updated > before.updated
        assert after.created == first.created
    [listed] = store.list_info()
    assert (listed.created, listed.updated) == (after.created, after.updated)


def test_updated_moves_forward_on_every_write(store):
    store.save("s", [U("a")])
    seen = [store.info("s").updated]
    for write in (lambda: store.append("s", [A("b")]), lambda: store.save("s", [U("c")])):
        time.sleep(PAUSE)
        write()
        seen.append(store.info("s").updated)
    assert seen[0] < seen[1] < seen[2]
    assert store.info("s").created <= seen[2]


def test_reads_and_locks_do_not_touch_the_times(store):
    store.save("s", [U("a")])
    before = store.info("s")
    time.sleep(PAUSE)
    store.load("s"), store.count("s"), store.exists("s"), store.list_info()
    with store.lock("s", timeout=5):
        pass
    assert store.info("s") == before


def test_a_recreated_session_starts_afresh(store):
    store.save("s", [U("a")])
    old = store.info("s")
    time.sleep(PAUSE)
    store.delete("s")
    store.append("s", [U("b")])
    new = store.info("s")
    assert new.created > old.created and new.messages == 1


# ---- select_sessions ------------------------------------------------------------

def close(a: float | None, b: float | None) -> bool:
    # PostgreSQL keeps microseconds and a file's mtime nanoseconds: equal to a millisecond.
    return a is not None and b is not None and abs(a - b) < 1e-3


OLD_CREATED, OLD_UPDATED = 1_600_000_000.25, 1_650_000_000.5  # 2020 and 2022


def test_set_times_and_times_on_every_backend(store):
    store.save("s", [U("a"), A("b")])
    store.set_times("s", OLD_CREATED, OLD_UPDATED)
    info = store.info("s")
    assert close(info.created, OLD_CREATED) and close(info.updated, OLD_UPDATED)
    assert info.messages == 2 and store.load("s") == [U("a"), A("b")]
    assert store.times("s") == (info.created, info.updated)
    store.set_times("s", None, OLD_CREATED)  # None keeps a time
    assert close(store.times("s")[0], OLD_CREATED) and close(store.times("s")[1], OLD_CREATED)
    store.set_times("absent", OLD_CREATED, OLD_UPDATED)  # creates nothing
    assert not store.exists("absent") and store.times("absent") is None
    assert store.times_many(["s", "absent", "s"]) == [store.times("s"), None, store.times("s")]
    time.sleep(PAUSE)
    store.append("s", [U("c")])  # a later write moves updated to now and keeps created
    created, updated = store.times("s")
    assert close(created, OLD_CREATED) and updated > OLD_UPDATED + 1e6


def test_save_many_sets_the_times_it_is_given(store):
    store.save_many([("a", [U("1")]), ("b", [U("2")])], {"a": (OLD_CREATED, OLD_UPDATED)})
    assert all(map(close, store.times("a"), (OLD_CREATED, OLD_UPDATED)))
    assert store.times("b")[1] > OLD_UPDATED + 1e6  # no times given: now


@pytest.mark.parametrize("src_kind", PERSISTENT)
@pytest.mark.parametrize("dst_kind", PERSISTENT)
def test_migrate_keeps_created_and_updated(src_kind, dst_kind, make_url):
    src, dst = open_storage(make_url(src_kind)), open_storage(make_url(dst_kind))
    for n, sid in enumerate(("old", "older")):
        src.save(sid, [U(sid)])
        src.set_times(sid, OLD_CREATED - n, OLD_UPDATED - n)
    result = run("migrate", "--from", src.url, "--to", dst.url)
    assert result.exit_code == 0, result.output
    for sid in ("old", "older"):
        assert all(map(close, dst.times(sid), src.times(sid))), (sid, dst.times(sid), src.times(sid))
    # so `prune` and `list --sort updated` still see the sessions' real age after a move
    assert [i.id for i in select_sessions(dst.list_info(), sort="updated")] == ["older", "old"]
    src.close()
    dst.close()


def test_an_export_round_trips_through_import_with_its_times(tmp_path):
    src, dst = f"sqlite:{tmp_path / 'a.db'}", f"file:{tmp_path / 'b'}"
    store = open_storage(src)
    store.save("s", [U("hi"), A("hello")])
    store.set_times("s", OLD_CREATED, OLD_UPDATED)
    exported = run("--storage", src, "export", "-s", "s")
    assert exported.exit_code == 0, exported.output
    assert run("--storage", dst, "import", "-", input=exported.stdout).exit_code == 0
    again = run("--storage", dst, "export", "-s", "s")
    assert again.stdout == exported.stdout  # exactly: messages and times
    assert orjson.loads(again.stdout)["sessions"][0]["created"] == "2020-09-13T12:26:40Z"


def test_select_filters_by_updated_and_sorts():
    infos = [SessionInfo("b", 1, 10.0, 40.0), SessionInfo("a", 2, 30.0, 30.0),
             SessionInfo("c", 3, 20.0, 20.0), SessionInfo("bad", None, error="corrupt")]
    ids = lambda **kw: [i.id for i in select_sessions(infos, **kw)]  # noqa: E731
    assert ids() == ["a", "b", "bad", "c"]
    assert ids(sort="updated") == ["c", "a", "b", "bad"]  # oldest first, unknown last
    assert ids(sort="created") == ["b", "c", "a", "bad"]
    assert ids(sort="updated", reverse=True) == ["b", "a", "c", "bad"]
    assert ids(reverse=True) == ["c", "bad", "b", "a"]
    assert ids(since=30.0) == ["a", "b"]  # since is inclusive
    assert ids(before=30.0) == ["c"]  # before is not
    assert ids(since=25.0, before=35.0) == ["a"]
    with pytest.raises(UsageError, match="sort"):
        select_sessions(infos, sort="size")


# ---- list on every persistent backend --------------------------------------------

@pytest.mark.parametrize("kind", PERSISTENT)
def test_list_long_json_sort_and_filters(kind, make_url):
    url = make_url(kind)
    store = open_storage(url)
    infos = written_in_order(store, "b", "a", "c")  # b oldest, c newest; 1, 2, 3 messages
    store.close()
    ls = lambda *a: run("--storage", url, "list", *a)  # noqa: E731

    assert ls().stdout == "a\nb\nc\n"
    assert ls("-r").stdout == "c\nb\na\n"
    assert ls("--sort", "updated").stdout == "b\na\nc\n"
    assert ls("--sort", "updated", "--reverse").stdout == "c\na\nb\n"

    lines = [orjson.loads(line) for line in ls("--json", "--sort", "updated").stdout.splitlines()]
    assert [(d["id"], d["messages"]) for d in lines] == [("b", 1), ("a", 2), ("c", 3)]
    assert [d["updated"] for d in lines] == [format_time(infos[s].updated) for s in "bac"]
    assert all(set(d) == {"id", "messages", "created", "updated"} for d in lines)

    table = ls("--long").stdout.splitlines()
    header = table[0]
    assert header.split() == ["ID", "MESSAGES", "CREATED", "UPDATED"]
    assert [row.split()[:2] for row in table[1:]] == [["a", "2"], ["b", "1"], ["c", "3"]]
    for row, sid in zip(table[1:], "abc"):  # aligned: each value starts under its heading
        assert row[header.index("CREATED"):].split()[0] == format_time(infos[sid].created)
        assert row[header.index("UPDATED"):] == format_time(infos[sid].updated)
        assert row[:header.index("MESSAGES") + len("MESSAGES")].split() == [sid, str(infos[sid].messages)]

    between_b_a = iso((infos["b"].updated + infos["a"].updated) / 2)
    between_a_c = iso((infos["a"].updated + infos["c"].updated) / 2)
    assert ls("--since", between_b_a).stdout == "a\nc\n"
    assert ls("--before", between_b_a).stdout == "b\n"
    assert ls("--since", between_b_a, "--before", between_a_c, "--json").stdout.count("\n") == 1
    assert ls("--since", "1d", "--sort", "updated").stdout == "b\na\nc\n"  # all written just now
    assert ls("--before", "1d").stdout == ""


def test_list_with_a_bad_time_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["--storage", f"file:{tmp_path}", "list", "--since", "last week"])
    assert result.exit_code == 2
    assert result.stderr.startswith("fusion: error: --since: invalid time 'last week'")
    assert len(result.stderr.splitlines()) == 1


def test_list_long_shows_an_unreadable_session(tmp_path):
    url = f"file:{tmp_path / 's'}"
    open_storage(url).save("good", [U("x")])
    (tmp_path / "s" / "bad.json").write_text("[{")
    rows = run("--storage", url, "list", "--long").stdout.splitlines()
    assert rows[1].split()[:2] == ["bad", "?"] and "error: corrupt session data" in rows[1]
    assert rows[2].split()[:2] == ["good", "1"]


# ---- prune: the library on every backend -------------------------------------------

def test_prune_removes_only_sessions_idle_past_the_cutoff(store):
    infos = written_in_order(store, "old", "older-still", "new")
    store.delete("older-still")
    store.save("older-still", [])  # now the newest: written after "new"
    cutoff = (infos["old"].updated + infos["new"].updated) / 2
    removed = []
    report = prune(store, cutoff=cutoff, on_removed=removed.append)
    assert report.removed == removed == ["old"]
    assert store.list_sessions() == ["new", "older-still"]
    assert (report.busy, report.refreshed, report.unreadable) == ([], [], [])


def test_prune_by_age_and_dry_run(store):
    store.save("a", [U("x")])
    store.save("b", [])
    assert prune(store, older_than=30 * DAY).removed == []  # written just now
    later = time.time() + 31 * DAY
    dry = prune(store, older_than=30 * DAY, now=later, dry_run=True)
    assert dry.removed == ["a", "b"] and dry.dry_run and "would remove 2 sessions" in dry.summary()
    assert store.list_sessions() == ["a", "b"]
    real = prune(store, older_than=30 * DAY, now=later)
    assert real.removed == ["a", "b"] and store.list_sessions() == []
    assert real.to_dict()["cutoff"] == format_time(later - 30 * DAY)
    with pytest.raises(UsageError):
        prune(store)


def test_prune_keeps_a_session_whose_lock_is_held(store):
    store.save("busy", [U("x")])
    store.save("idle", [U("y")])
    held, release = threading.Event(), threading.Event()

    def holder():  # a send in the middle of its turn
        with store.lock("busy", timeout=5):
            held.set()
            release.wait(30)
            store.append("busy", [A("answer")])

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(30)
        report = prune(store, cutoff=time.time() + DAY)  # everything is "old"
    finally:
        release.set()
        t.join()
    assert (report.removed, report.busy) == (["idle"], ["busy"])
    assert "kept 1 in use" in report.summary()
    assert store.load("busy") == [U("x"), A("answer")]


class RacingStore:
    """A store where a writer (another thread: another `send`) commits a turn to a session
    just before prune takes that session's lock -- after prune listed it as old."""

    def __init__(self, store, victim: str) -> None:
        self.store, self.victim = store, victim

    def __getattr__(self, name):
        return getattr(self.store, name)

    def lock(self, session_id, timeout=120.0, on_wait=None):
        if session_id == self.victim:
            def writer():
                with self.store.lock(session_id, timeout=5):
                    time.sleep(PAUSE)  # so that this write's time differs from the listing's
                    self.store.append(session_id, [U("late"), A("turn")])
            t = threading.Thread(target=writer)
            t.start()
            t.join()
        return self.store.lock(session_id, timeout, on_wait)


def test_prune_rechecks_under_the_lock_so_a_concurrent_turn_is_not_lost(store):
    infos = written_in_order(store, "a", "b")
    cutoff = infos["b"].updated + PAUSE / 5  # both old at the listing; "a" is written again
    report = prune(RacingStore(store, "a"), cutoff=cutoff)
    assert (report.removed, report.refreshed) == (["b"], ["a"])
    assert store.load("a") == [U("a"), U("late"), A("turn")]
    assert "1 updated meanwhile" in report.summary()


def test_prune_never_deletes_what_it_cannot_read(tmp_path):
    store = open_storage(f"file:{tmp_path / 's'}")
    store.save("fine", [U("x")])
    (tmp_path / "s" / "broken.json").write_text("not json")
    report = prune(store, cutoff=time.time() + DAY)
    assert (report.removed, report.unreadable) == (["fine"], ["broken"])
    assert (tmp_path / "s" / "broken.json").read_text() == "not json"


# ---- prune: the command ----------------------------------------------------------

@pytest.mark.parametrize("kind", PERSISTENT)
def test_prune_command_on_every_backend(kind, make_url):
    url = make_url(kind)
    store = open_storage(url)
    infos = written_in_order(store, "x-old", "y-old", "z-new")
    store.close()
    cutoff = iso((infos["y-old"].updated + infos["z-new"].updated) / 2)
    dry = run("--storage", url, "prune", "--older-than", cutoff, "--dry-run")
    assert (dry.exit_code, dry.stdout) == (0, "x-old\ny-old\n")
    assert dry.stderr.startswith("fusion: would remove 2 sessions not updated since ")
    assert run("--storage", url, "list").stdout == "x-old\ny-old\nz-new\n"
    real = run("--storage", url, "prune", "--older-than", cutoff)
    assert (real.exit_code, real.stdout) == (0, "x-old\ny-old\n")
    assert real.stderr.startswith("fusion: removed 2 sessions")
    assert run("--storage", url, "list").stdout == "z-new\n"
    again = run("--storage", url, "prune", "--older-than", cutoff, "--json")
    assert orjson.loads(again.stdout) == {"removed": [], "busy": [], "refreshed": [], "unreadable": [],
                                          "cutoff": format_time(parse_time(cutoff)), "dry_run": False}
    assert again.stderr == ""


def age(store_dir: Path, sid: str, days: float) -> None:
    """Make a file-backend session look untouched for `days` (its mtime is its updated time)."""
    then = time.time() - days * DAY
    os.utime(store_dir / f"{sid}.json", (then, then))


def test_prune_older_than_a_duration(tmp_path):
    url = f"file:{tmp_path / 's'}"
    store = open_storage(url)
    for sid in ("month", "week", "today"):
        store.save(sid, [U(sid)])
    age(tmp_path / "s", "month", 31)
    age(tmp_path / "s", "week", 7)
    assert run("--storage", url, "prune", "--older-than", "30d").stdout == "month\n"
    assert run("--storage", url, "prune", "--older-than", "6d").stdout == "week\n"
    assert store.list_sessions() == ["today"]
    quiet = run("--storage", url, "-q", "prune", "--older-than", "1d")
    assert (quiet.stdout, quiet.stderr) == ("", "")
    bad = CliRunner().invoke(cli, ["--storage", url, "prune", "--older-than", "soon"])
    assert bad.exit_code == 2 and "--older-than: invalid time 'soon'" in bad.stderr
    missing = CliRunner().invoke(cli, ["--storage", url, "prune"])
    assert missing.exit_code == 2 and "--older-than" in missing.stderr


def test_prune_from_cron_while_a_send_runs(tmp_path, fusion_env, model_server):
    """A real `send` process is in its model call on a stale session when `prune` runs:
    the session is in use, so it is kept, and the turn lands in full."""
    store_dir = tmp_path / "s"
    url = f"file:{store_dir}"
    store = open_storage(url)
    store.save("busy", [ChatMessage.system("sys"), U("earlier"), A("reply")])
    store.save("stale", [U("forgotten")])
    age(store_dir, "busy", 40)
    age(store_dir, "stale", 40)
    gate = threading.Event()

    def held_answer(request):
        gate.wait(60)
        return Reply(content=final("late answer"))

    model_server.responder = held_answer
    env = {**fusion_env, "FUSION_STORAGE": url, "FUSION_PROVIDER": "openai",
           "FUSION_BASE_URL": model_server.openai_url}
    send = subprocess.Popen([sys.executable, "-m", "fusion_cli", "send", "-s", "busy", "still here?"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not model_server.requests and send.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert model_server.requests, "the send never reached the model"
        pruned = subprocess.run([sys.executable, "-m", "fusion_cli", "prune", "--older-than", "30d"],
                                env=env, capture_output=True, timeout=60)
    finally:
        gate.set()
        out, err = send.communicate(timeout=60)
    assert (send.returncode, out) == (0, b"late answer\n"), err
    assert (pruned.returncode, pruned.stdout) == (0, b"stale\n")
    assert b"kept 1 in use" in pruned.stderr
    history = store.load("busy")
    assert history[:3] == [ChatMessage.system("sys"), U("earlier"), A("reply")]
    assert history[3:] == [U("still here?"), A(final("late answer"))]
    assert store.list_sessions() == ["busy"]


PROBE = """
import sys
from fusion_cli.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = [m for m in sys.modules if m.split(".")[0] in ("httpx", "redis", "psycopg", "tomllib", "sqlite3")
         or m.startswith(("fusion_cli.agent", "fusion_cli.llm", "fusion_cli.transfer"))]
print("HEAVY", sorted(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize("command", [["list", "--long", "--since", "1d", "--sort", "updated"],
                                     ["list", "--json"], ["prune", "--older-than", "30d"]])
def test_list_and_prune_start_light(command, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}
    url = f"file:{tmp_path / 's'}"
    open_storage(url).save("a", [U("x")])
    proc = subprocess.run([sys.executable, "-c", PROBE, "--storage", url, *command], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "HEAVY []" in proc.stderr, proc.stderr


# ---- --max-history ---------------------------------------------------------------

@pytest.fixture
def send_env(model_server, tmp_path):
    return {"FUSION_STORAGE": f"file:{tmp_path / 'm'}", "FUSION_PROVIDER": "openai",
            "FUSION_BASE_URL": model_server.openai_url}


def test_max_history_sends_the_prompt_and_the_last_n(model_server, send_env):
    for n in range(3):
        model_server.reply_final(f"answer {n}")
        assert run("send", "-s", "h", f"message {n}", env=send_env).exit_code == 0
    stored = open_storage(send_env["FUSION_STORAGE"]).load("h")
    assert len(stored) == 7
    model_server.reply_final("trimmed")
    result = run("-v", "send", "-s", "h", "--max-history", "3", "message 3", env=send_env)
    assert (result.exit_code, result.stdout) == (0, "trimmed\n")
    assert "fusion: sending the last 3 of 6 messages" in result.stderr
    sent = model_server.requests[-1].messages
    assert sent == [m.to_dict() for m in [stored[0], *stored[-3:]]] + [{"role": "user", "content": "message 3"}]
    assert len(open_storage(send_env["FUSION_STORAGE"]).load("h")) == 9  # the store keeps everything


def test_max_history_from_the_environment_and_only_when_needed(model_server, send_env):
    for answer in ("first", "second", "third"):
        model_server.reply_final(answer)
    first = run("-v", "send", "-s", "e", "one", env={**send_env, "FUSION_MAX_HISTORY": "1"})
    assert "sending the last" not in first.stderr  # nothing to trim yet
    second = run("-v", "send", "-s", "e", "two", env={**send_env, "FUSION_MAX_HISTORY": "1"})
    assert "fusion: sending the last 1 of 2 messages" in second.stderr
    assert [m["content"] for m in model_server.requests[-1].messages[1:]] == [final("first"), "two"]
    quiet = run("send", "-s", "e", "three", env={**send_env, "FUSION_MAX_HISTORY": "1"})
    assert quiet.exit_code == 0 and "sending the last" not in quiet.stderr  # only with -v


def test_max_history_in_chat(model_server, send_env):
    model_server.reply_final("one")
    model_server.reply_final("two")
    result = CliRunner().invoke(cli, ["-v", "chat", "-s", "c", "--max-history", "1"], input="hi\nagain\n",
                                env=send_env, catch_exceptions=False)
    assert result.exit_code == 0 and result.stdout == "one\ntwo\n"
    assert [m["role"] for m in model_server.requests[0].messages] == ["system", "user"]
    assert [m["role"] for m in model_server.requests[1].messages] == ["system", "assistant", "user"]
    assert result.stderr.count("fusion: sending the last 1 of 2 messages") == 1
    assert len(open_storage(send_env["FUSION_STORAGE"]).load("c")) == 5


@pytest.mark.parametrize("bad", ["0", "-3", "x"])
def test_a_bad_max_history_is_refused_before_any_request(model_server, send_env, bad):
    result = CliRunner().invoke(cli, ["send", "-s", "b", "--max-history", bad, "hi"], env=send_env)
    assert result.exit_code == 2 and model_server.requests == []
