"""Load: many real `fusion` processes at once, and very large histories, on every persistent backend.

Every process is `python -m fusion_cli`, so locks, connections and start-up
are the real ones; the model is the loopback server of tests/model_server.py
(or the offline echo provider where the model's answer does not matter).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

import orjson
import pytest

from fusion_cli.messages import ChatMessage
from fusion_cli.storage import ConversationStorage, open_storage
from tests.conftest import PERSISTENT
from tests.model_server import ModelServer, Recorded, Reply, final

CLIENTS = 50
LOCK_TIMEOUT = "600"  # 50 queued sends on 2 cores: never let a slow start look like a deadlock
MODEL_TIMEOUT = "300"  # longer than any hold below, so no client retries a held request
HOLD_DEADLINE = 120.0  # seconds the server waits for every send to be in flight at once


# ---- helpers -------------------------------------------------------------------

def _spawn(env: dict[str, str], url: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fusion_cli", "--storage", url,
                             "--lock-timeout", LOCK_TIMEOUT, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish_all(procs: list[subprocess.Popen[bytes]],
                on_failure: Callable[[], None] | None = None) -> list[tuple[int, bytes, bytes]]:
    """(exit code, stdout, stderr) of each process; kills the rest if one hangs.

    `on_failure` is called as soon as any process exits non-zero (its output is
    small, so polling cannot block it on a full pipe).
    """
    deadline = time.monotonic() + 300
    try:
        pending = list(procs)
        while pending and time.monotonic() < deadline:
            for p in [p for p in pending if p.poll() is not None]:
                pending.remove(p)
                if p.returncode != 0 and on_failure is not None:
                    on_failure()
            time.sleep(0.02)
        return [(p.returncode, *p.communicate(timeout=5)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def _assert_all_ok(results: list[tuple[int, bytes, bytes]]) -> None:
    failed = [(n, code, err.decode(errors="replace")[-500:]) for n, (code, _, err) in enumerate(results)
              if code != 0]
    assert not failed, f"{len(failed)} of {len(results)} sends failed, e.g. {failed[:3]}"


def _send_args(server: ModelServer, session: str, message: str) -> list[str]:
    return ["send", "-s", session, "--provider", "openai", "--base-url", server.openai_url,
            "--model", "test", "--timeout", MODEL_TIMEOUT, message]


def _answer_to(request: Recorded) -> str:
    return f"answer to <{request.messages[-1]['content']}>"


# ---- 50 sends to one session ------------------------------------------------------

@pytest.mark.parametrize("kind", PERSISTENT)
def test_fifty_concurrent_sends_to_one_session_run_one_after_another(kind, make_url, fusion_env,
                                                                     model_server):
    url = make_url(kind)
    model_server.responder = lambda r: Reply(content=final(_answer_to(r)))
    sent = [f"message {i}" for i in range(CLIENTS)]
    procs = [_spawn(fusion_env, url, *_send_args(model_server, "shared", text)) for text in sent]
    results = _finish_all(procs)
    _assert_all_ok(results)
    for text, (_, out, _) in zip(sent, results):  # each process printed its own answer
        assert out.decode() == f"answer to <{text}>\n"

    with open_storage(url) as store:
        stored = [m.to_dict() for m in store.load("shared")]
    assert len(stored) == 1 + 2 * CLIENTS, "a turn was lost or stored twice"
    assert stored[0]["role"] == "system"
    turns = [(stored[i], stored[i + 1]) for i in range(1, len(stored), 2)]
    users = [u["content"] for u, _ in turns]
    assert sorted(users) == sorted(sent), "not every message was stored exactly once"
    for user, answer in turns:  # each answer follows its own question, never another's
        assert user["role"] == "user" and answer["role"] == "assistant"
        assert orjson.loads(answer["content"])["final_answer"] == f"answer to <{user['content']}>"

    # One request a turn, in the stored order, each sent exactly the history committed
    # before it: turn k's request is the first 2k+1 stored messages, then its message.
    requests = model_server.requests
    assert len(requests) == CLIENTS, f"{len(requests)} model requests for {CLIENTS} turns"
    positions = [1 + 2 * users.index(r.messages[-1]["content"]) for r in requests]
    assert positions == sorted(positions), "the model saw the turns in another order than they were stored"
    for r, p in zip(requests, positions):
        assert r.messages == stored[:p + 1], f"the request for stored message {p} missed part of the history"


# ---- 50 sends to 50 sessions ------------------------------------------------------

class HoldUntilAll:
    """A responder that answers nobody until `expected` distinct messages are in flight at once.

    If any send had to wait for another session's lock before calling the model,
    the count could not reach `expected` while the others are held, and the
    deadline passes: then every request is answered (so the processes end) and
    `reached` stays False.
    """

    def __init__(self, expected: int, deadline: float) -> None:
        self.expected = expected
        self.deadline = time.monotonic() + deadline
        self.in_flight: set[str] = set()
        self.reached = False
        self._cond = threading.Condition()

    def __call__(self, request: Recorded) -> Reply:
        text = request.messages[-1]["content"]
        with self._cond:
            self.in_flight.add(text)
            if len(self.in_flight) >= self.expected:
                self.reached = True
                self._cond.notify_all()
            while not self.reached and (left := self.deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            seen = len(self.in_flight)
        return Reply(content=final(f"{_answer_to(request)} with {seen} in flight"))

    def release(self) -> None:
        with self._cond:
            self.deadline = 0.0
            self._cond.notify_all()


def _require_free_postgres_connections(needed: int) -> None:
    """Fail at once, saying why, when the server cannot take `needed` more clients.

    A send holds one PostgreSQL connection (its data's and its session lock's)
    across its model call, so 50 held sends need 50 of the default 100.
    Anything else connected (another test run on a shared server) makes some
    sends fail with "too many clients"; this says so before starting them.
    """
    import psycopg

    from tests.conftest import POSTGRES_URL

    with psycopg.connect(POSTGRES_URL) as conn:
        limit = int(conn.execute("SHOW max_connections").fetchone()[0])
        used = conn.execute("SELECT count(*) FROM pg_stat_activity "
                            "WHERE backend_type = 'client backend'").fetchone()[0]
    free = limit - used + 1  # this connection closes before the sends start
    if free < needed:
        pytest.fail(f"PostgreSQL has {free} free connections of {limit}; {needed} concurrent sends "
                    f"hold {needed} (1 each). Run this test with no other client connected.",
                    pytrace=False)


@pytest.mark.parametrize("kind", PERSISTENT)
def test_fifty_sends_to_fifty_sessions_all_reach_the_model_at_once(kind, make_url, fusion_env,
                                                                   model_server):
    url = make_url(kind)
    if kind == "postgres":
        _require_free_postgres_connections(CLIENTS)
    hold = HoldUntilAll(CLIENTS, HOLD_DEADLINE)
    model_server.responder = hold
    sessions = [f"s{i:02d}" for i in range(CLIENTS)]
    try:
        procs = [_spawn(fusion_env, url, *_send_args(model_server, sid, f"hello from {sid}"))
                 for sid in sessions]
        results = _finish_all(procs, on_failure=hold.release)  # a failed send: stop holding
    finally:
        hold.release()  # never leave a server thread waiting if the test breaks
    _assert_all_ok(results)
    assert hold.reached, (
        f"only {len(hold.in_flight)} of {CLIENTS} sends to distinct sessions reached the model "
        f"within {HOLD_DEADLINE:g} s while the first ones were held: some waited for another "
        f"session's lock (or could not connect)")
    assert len(model_server.requests) == CLIENTS

    with open_storage(url) as store:
        assert store.list_sessions() == sessions
        histories = {sid: store.load(sid) for sid in sessions}
    for sid, history in histories.items():
        assert [m.role for m in history] == ["system", "user", "assistant"]
        assert history[1].content == f"hello from {sid}"
        assert orjson.loads(history[2].content)["final_answer"].startswith(f"answer to <hello from {sid}>")


# ---- very large histories ---------------------------------------------------------

def _ten_thousand() -> list[ChatMessage]:
    body = [ChatMessage("user" if i % 2 == 0 else "assistant", f"message {i}: short text")
            for i in range(9_999)]
    return [ChatMessage.system("you are a test")] + body


def _ten_megabytes() -> list[ChatMessage]:
    # Text that stresses the encoders: quotes, backslashes, newlines, multi-byte
    # characters, and a message that looks like a stored history itself.
    line = 'line "quoted" back\\slash tab\t é € 😀 [{"role": "system", "content": "x"}]\n'
    unit = len(line.encode())
    chunks = [line * (2_600_000 // unit + k) for k in range(4)]
    history = [ChatMessage.system("you are a test")]
    history += [ChatMessage("user" if k % 2 == 0 else "assistant", chunk) for k, chunk in enumerate(chunks)]
    assert sum(len(m.content.encode()) for m in history) >= 10_000_000
    return history


def _shown(history: list[ChatMessage]) -> bytes:
    """What `fusion show` prints for a history (role headers, a blank line between messages)."""
    return "\n".join(f"[{m.role}]\n{m.content}\n" for m in history).encode()


@pytest.fixture
def opened() -> Iterator[Callable[[str], ConversationStorage]]:
    """opened(url) -> the store, closed after the test (no connection left to a shared server)."""
    stores: list[ConversationStorage] = []

    def open_(url: str) -> ConversationStorage:
        stores.append(open_storage(url))
        return stores[-1]
    yield open_
    for store in stores:
        store.close()


@pytest.mark.parametrize("kind", PERSISTENT)
def test_ten_thousand_messages_and_ten_megabytes_every_command_works(kind, make_url, fusion_env, opened):
    url = make_url(kind)
    other_kind = PERSISTENT[(PERSISTENT.index(kind) + 1) % len(PERSISTENT)]
    other_url = make_url(other_kind)
    seeds = {"long": _ten_thousand(), "huge": _ten_megabytes()}
    store = opened(url)
    for sid, history in seeds.items():
        store.save(sid, history)

    def fusion(*args: str, input: bytes | None = None) -> bytes:
        done = subprocess.run([sys.executable, "-m", "fusion_cli", "--storage", url, *args], input=input,
                              env=fusion_env, capture_output=True, timeout=120)
        assert done.returncode == 0, f"fusion {' '.join(args)[:80]}: {done.stderr.decode()[-800:]}"
        return done.stdout

    # send, with the model shown only the end of the history, then all of it;
    # the echo provider says how many earlier messages it was given.
    expected: dict[str, list[ChatMessage]] = {}
    for sid, seed in seeds.items():
        limit = 20 if sid == "long" else 2
        out = fusion("send", "-s", sid, "--provider", "echo", "--max-history", str(limit), f"first to {sid}")
        assert out.decode() == \
            f"Echo: first to {sid} (I was given {limit} earlier messages of this session.)\n"
        big = "ü" * 1_000_000 if sid == "huge" else "second"  # a 2 MB message on stdin
        out = fusion("send", "-s", sid, "--provider", "echo", input=big.encode() + b"\n")
        earlier = len(seed) - 1 + 2  # all but the system prompt, and the first turn
        assert out.decode() == f"Echo: {big} (I was given {earlier} earlier messages of this session.)\n"
        history = store.load(sid)  # the whole history is kept, whatever the model was sent
        assert history[:len(seed)] == seed
        assert [m.content for m in history[len(seed)::2]] == [f"first to {sid}", big]
        assert [m.role for m in history[len(seed):]] == ["user", "assistant"] * 2
        expected[sid] = history

    for sid, history in expected.items():
        assert fusion("count", "-s", sid) == f"{len(history)}\n".encode()
        assert orjson.loads(fusion("count", "--json", "-s", sid)) == {"session": sid, "count": len(history)}
        assert fusion("show", "-s", sid) == _shown(history)
        assert orjson.loads(fusion("show", "--json", "-s", sid)) == [m.to_dict() for m in history]
    assert fusion("list") == b"huge\nlong\n"
    listed = [orjson.loads(line) for line in fusion("list", "--json").splitlines()]
    assert [(d["id"], d["messages"]) for d in listed] == \
        [(sid, len(expected[sid])) for sid in ("huge", "long")]

    exported = orjson.loads(fusion("export", "--all"))
    assert {s["id"]: s["messages"] for s in exported["sessions"]} == \
        {sid: [m.to_dict() for m in h] for sid, h in expected.items()}
    lines = fusion("export", "-s", "long", "--format", "jsonl").splitlines()
    assert len(lines) == 1 and orjson.loads(lines[0])["messages"] == [m.to_dict() for m in expected["long"]]

    assert orjson.loads(fusion("migrate", "--from", url, "--to", other_url, "--json")) == {
        "copied": ["huge", "long"], "overwritten": [], "skipped": [],
        "messages": sum(map(len, expected.values())), "dry_run": False}
    copy = opened(other_url)
    for sid, history in expected.items():
        assert copy.load(sid) == history, f"the copy of {sid} in {other_kind} differs"

    for sid in expected:
        fusion("clear", "-s", sid)
        assert fusion("count", "-s", sid) == b"0\n"
        assert fusion("show", "-s", sid) == b""
    assert fusion("list") == b""
    assert copy.list_sessions() == ["huge", "long"]  # clearing the source left the copy alone


# ---- a PostgreSQL server out of connections -------------------------------------------

def test_a_postgres_server_out_of_connections_says_so(make_url, fusion_env):
    # A server at its max_connections (other clients, or many parallel sends): a full
    # server must be named as such, not as one that may not be running. A role
    # with CONNECTION LIMIT 0 is refused the same way without filling the shared server.
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    from tests.conftest import POSTGRES_URL

    url = make_url("postgres")
    role = f"fusion_full_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0')
        try:
            parts = urlsplit(url)  # the same server and database, as the limited role
            host = parts.netloc.rpartition("@")[2]
            full_url = urlunsplit(parts._replace(netloc=f"{role}@{host}"))
            done = subprocess.run([sys.executable, "-m", "fusion_cli", "--storage", full_url, "count"],
                                  env=fusion_env, capture_output=True, timeout=60)
        finally:
            admin.execute(f'DROP ROLE "{role}"')
    err = done.stderr.decode()
    assert done.returncode == 3, err
    assert "too many connections" in err and "connection limit" in err, err
    assert "is PostgreSQL running" not in err
    assert done.stdout == b""
