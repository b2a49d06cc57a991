"""save_many / load_many on every backend, and migrate's batches: what makes `migrate` fast
must not change what it does (bench/ measures the speed; these check the behaviour)."""

from __future__ import annotations

import threading

import pytest

from fusion_cli import migrate as migrate_module
from fusion_cli.errors import InvalidSessionId, LockTimeout
from fusion_cli.messages import ChatMessage
from fusion_cli.migrate import migrate
from fusion_cli.storage import open_storage

U, A = ChatMessage.user, ChatMessage.assistant


def test_save_many_writes_and_replaces_each_session(store):
    store.save("old", [U("before"), A("gone")])
    store.save_many([("old", [U("after")]), ("new", [U("n1"), A("n2")]), ("empty", [])])
    assert store.load("old") == [U("after")]
    assert store.load("new") == [U("n1"), A("n2")]
    assert store.exists("empty") and store.load("empty") == []
    assert store.list_sessions() == ["empty", "new", "old"]


def test_save_many_an_id_given_twice_keeps_its_last_history(store):
    store.save_many([("a", [U("first")]), ("a", [U("second"), A("x")])])
    assert store.load("a") == [U("second"), A("x")]


def test_save_many_checks_every_id_before_writing(store):
    with pytest.raises(InvalidSessionId):
        store.save_many([("fine", [U("x")]), ("../bad", [U("y")])])
    assert store.list_sessions() == []


def test_load_many_keeps_the_order_and_gives_empty_for_missing(store):
    store.save("b", [U("bee")])
    store.save("a", [U("ay"), A("yes")])
    assert store.load_many(["b", "missing", "a"]) == [[U("bee")], [], [U("ay"), A("yes")]]
    assert store.load_many([]) == []


def _fill(url: str, n: int) -> dict[str, list[ChatMessage]]:
    sessions = {f"s{i:03d}": [U(f"hello {i}"), A(f"answer {i}")] for i in range(n)}
    store = open_storage(url)
    store.save_many(sessions.items())
    store.close()
    return sessions


@pytest.mark.parametrize("dst_kind", ["sqlite", "redis"])
def test_migrate_more_than_one_batch(make_url, monkeypatch, dst_kind):
    monkeypatch.setattr(migrate_module, "BATCH", 7)  # 20 sessions: three batches, the last short
    src, dst = open_storage(make_url("file")), open_storage(make_url(dst_kind))
    sessions = _fill(src.url, 20)
    seen = []
    report = migrate(src, dst, progress=seen.append)
    assert report.copied == sorted(sessions) and report.messages == 40
    assert seen == sorted(sessions)
    assert dict(zip(sorted(sessions), dst.load_many(sorted(sessions)))) == sessions
    src.close()
    dst.close()


def test_migrate_a_busy_session_waits_for_its_lock_then_copies(make_url, monkeypatch):
    monkeypatch.setattr(migrate_module, "BATCH", 5)
    src, dst = open_storage(make_url("file")), open_storage(make_url("sqlite"))
    sessions = _fill(src.url, 10)
    other = open_storage(dst.url)  # another process's view: its lock excludes ours
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with other.lock("s007"):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    threading.Timer(0.3, release.set).start()
    report = migrate(src, dst, lock_timeout=10)  # the batch with s007 goes one by one, and waits
    holder.join()
    assert report.copied == sorted(sessions)
    assert dict(zip(sorted(sessions), dst.load_many(sorted(sessions)))) == sessions
    # the one-by-one copies keep their times too
    assert [t[1] for t in dst.times_many(sorted(sessions))] == pytest.approx(
        [t[1] for t in src.times_many(sorted(sessions))], abs=1e-3)
    for s in (src, dst, other):
        s.close()


def test_migrate_a_lock_that_stays_busy_names_its_session(make_url, monkeypatch):
    monkeypatch.setattr(migrate_module, "BATCH", 5)
    src, dst = open_storage(make_url("file")), open_storage(make_url("sqlite"))
    _fill(src.url, 10)
    other = open_storage(dst.url)
    with other.lock("s007"):
        with pytest.raises(LockTimeout) as caught:
            migrate(src, dst, lock_timeout=0.2)
    # The first batch is whole; in the second, the sessions before s007 are copied one by one.
    assert "stopped at session 's007'" in str(caught.value)
    assert "7 session(s) copied before it" in str(caught.value)
    assert dst.list_sessions() == [f"s{i:03d}" for i in range(7)]
    for s in (src, dst, other):
        s.close()
