"""The storage contract of fusion_cli/storage/base.py, held against every backend."""

from __future__ import annotations

import threading
import time

import pytest

from fusion_cli.errors import InvalidSessionId, LockTimeout
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage

U = ChatMessage.user
A = ChatMessage.assistant
S = ChatMessage.system

TRICKY = [
    S("You are an autonomous agent.\nTools: read_file"),
    U("héllo wörld — ünïcödé 你好 🎉 \u202eRTL\u202c"),
    A('{"thought": "quotes \\" and \\\\ backslashes", "is_final": true}'),
    U("control \x00 \x01 \x1f \x7f tab\tline\r\nend\n"),
    U(""),
    U("   "),
]

BAD_IDS = ["", ".", "..", "../etc/passwd", "a/b", "a\\b", "/abs", ".hidden", "-dash", "a\n", "a b",
           "é", "x" * 129, "CON", "nul", "com1.json", "LPT9", "a\x00b", "ａ"]


def test_missing_session_is_empty(store):
    assert store.load("nobody") == []
    assert store.count("nobody") == 0
    assert store.exists("nobody") is False
    assert store.info("nobody") is None
    assert store.list_sessions() == []
    assert store.list_info() == []


def test_round_trip_keeps_messages_verbatim(store):
    store.save("s1", TRICKY)
    assert store.load("s1") == TRICKY
    assert store.count("s1") == len(TRICKY)
    assert store.exists("s1")


def test_large_content_round_trips(store):
    big = "x" * 1_000_000 + "é" * 100_000
    store.save("big", [U(big), A("ok")])
    assert store.load("big") == [U(big), A("ok")]


def test_save_replaces_the_whole_history(store):
    store.save("s", [U("one"), A("two"), U("three")])
    store.save("s", [U("only")])
    assert store.load("s") == [U("only")]
    assert store.count("s") == 1


def test_empty_history_still_creates_the_session(store):
    store.save("empty", [])
    assert store.exists("empty")
    assert store.list_sessions() == ["empty"]
    assert store.count("empty") == 0
    assert store.load("empty") == []


def test_append_adds_at_the_end(store):
    store.append("s", [U("a")])  # creates the session
    store.append("s", [A("b"), U("c")])
    assert store.load("s") == [U("a"), A("b"), U("c")]
    store.save("s", [U("x")])
    store.append("s", TRICKY)
    assert store.load("s") == [U("x"), *TRICKY]
    assert store.count("s") == 1 + len(TRICKY)


def test_append_and_save_agree(store):
    store.save("saved", TRICKY)
    for m in TRICKY:
        store.append("appended", [m])
    assert store.load("saved") == store.load("appended")


def test_delete_is_idempotent(store):
    store.save("s", [U("a")])
    store.save("t", [U("b")])
    store.delete("s")
    store.delete("s")
    store.delete("never-existed")
    assert not store.exists("s")
    assert store.load("s") == []
    assert store.list_sessions() == ["t"]


def test_list_is_sorted_by_code_point(store):
    ids = ["b", "a", "B", "A", "_x", "0", "a.b", "a-b", "a_b", "Z9", "z"]
    for sid in ids:
        store.save(sid, [U(sid)])
    assert store.list_sessions() == sorted(ids)
    assert [i.id for i in store.list_info()] == sorted(ids)


def test_info_reports_count_and_times(store):
    before = time.time() - 2
    store.save("s", [U("a"), A("b")])
    info = store.info("s")
    assert info is not None and info.id == "s" and info.messages == 2
    assert info.updated is not None and before <= info.updated <= time.time() + 2
    [listed] = store.list_info()
    assert (listed.id, listed.messages) == ("s", 2)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_refused_by_every_method(store, bad):
    for call in (lambda: store.load(bad), lambda: store.save(bad, [U("x")]),
                 lambda: store.append(bad, [U("x")]), lambda: store.delete(bad),
                 lambda: store.exists(bad), lambda: store.count(bad), lambda: store.info(bad)):
        with pytest.raises(InvalidSessionId):
            call()
    with pytest.raises(InvalidSessionId):
        with store.lock(bad, timeout=0):
            pass
    assert store.list_sessions() == []


def test_good_ids_are_accepted(store):
    good = ["a", "A" * 128, "user-123", "x.y.z", "_", "0", "CONSOLE", "con_1", "COM0", "LPT10", "a..b"]
    for sid in good:
        store.save(sid, [U(sid)])
    assert store.list_sessions() == sorted(good)


def test_lock_excludes_other_holders_until_released(store):
    held, release = threading.Event(), threading.Event()

    def holder():
        with store.lock("s", timeout=5):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(5)
    waits = []
    try:
        with pytest.raises(LockTimeout, match="busy"):
            with store.lock("s", timeout=0.3, on_wait=lambda: waits.append(1)):
                pass
        assert waits == [1]
        with store.lock("other", timeout=0.3):  # another session is not blocked
            pass
    finally:
        release.set()
        t.join()
    with store.lock("s", timeout=2):
        pass


def test_lock_is_reentrant_in_one_thread(store):
    with store.lock("s", timeout=1):
        with store.lock("s", timeout=0):
            store.append("s", [U("inside")])
    assert store.load("s") == [U("inside")]


def test_lock_excludes_a_second_store_object(store):
    if store.scheme == "memory":
        pytest.skip("memory: stores share nothing, by design")
    other = open_storage(store.url)
    try:
        with store.lock("s", timeout=1):
            with pytest.raises(LockTimeout):
                with other.lock("s", timeout=0.2):
                    pass
        with other.lock("s", timeout=2):
            pass
    finally:
        other.close()


def test_a_second_store_object_sees_the_writes(store):
    if store.scheme == "memory":
        pytest.skip("memory: stores share nothing, by design")
    store.save("s", [U("hello")])
    other = open_storage(store.url)
    try:
        assert other.load("s") == [U("hello")]
        other.append("s", [A("hi")])
        assert store.load("s") == [U("hello"), A("hi")]
    finally:
        other.close()
