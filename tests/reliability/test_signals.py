"""Signals against real `fusion` processes, on every persistent backend.

SIGKILL at random moments during `send`, `clear` and `migrate`: every session
afterwards holds the state from before the command or from after it, never a
mix, and the next run of the command succeeds (a dead holder's lock does not
block it). SIGINT and SIGTERM during a `send` that waits for the model: exit
130/143, the session unchanged, the lock released, the message given back.

Kill moments come from a seeded RNG, spread over the command's own measured
run time (or, for a `send`, over the few milliseconds after the model's answer
is let go, when the turn is being committed).
"""

from __future__ import annotations

import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage
from tests.conftest import PERSISTENT, POSTGRES_URL, REDIS_URL
from tests.model_server import Reply, final

S, U, A = ChatMessage.system, ChatMessage.user, ChatMessage.assistant
UNSENT = "fusion: your message was not sent; here it is:"
ROUNDS = 15  # kills per backend and command (seeded: the same delays on every run)


def fusion_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fusion_cli", *args]


def run(*args: str, env: dict[str, str], input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(fusion_cmd(*args), env=env, input=input, capture_output=True, timeout=120)


def spawn(*args: str, env: dict[str, str], **kw) -> subprocess.Popen:
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(fusion_cmd(*args), env=env, **kw)


def kill_after(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL `proc` after `delay` s; whether it was still running then."""
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)  # a no-op once it has exited and been reaped
    proc.wait(timeout=60)
    return proc.returncode == -signal.SIGKILL


def timed(*args: str, env: dict[str, str]) -> float:
    """Run a command that must succeed; its wall time, to aim the kills with."""
    started = time.monotonic()
    result = run(*args, env=env)
    assert result.returncode == 0, result.stderr.decode()
    return time.monotonic() - started


def store_url(make_url, kind: str) -> str:
    # A short Redis lock TTL: a killed holder's lock then blocks the next run for
    # half a second, not the default 30 s (the takeover itself is what is tested).
    url = make_url(kind)
    return url + "&lock_ttl=0.5" if kind == "redis" else url


class Victims:
    """Names the server connections of the processes a test kills, to wait for the server
    to be done with them: a killed client's last COMMIT or EXEC may still sit in the
    server's input and be applied after the client died, so checking the store before
    the server has closed the connection would race with it."""

    _PARAMETER = {"redis": "client_name", "postgres": "application_name"}

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"fusion-victim-{uuid.uuid4().hex[:12]}"
        self._admin = None
        if kind == "redis":
            import redis

            self._admin = redis.Redis.from_url(REDIS_URL)
        elif kind == "postgres":
            import psycopg

            self._admin = psycopg.connect(POSTGRES_URL, autocommit=True)

    def url(self, url: str) -> str:
        """`url` with the victims' connection name (file and SQLite have no server)."""
        parameter = self._PARAMETER.get(self.kind)
        return f"{url}&{parameter}={self.name}" if parameter else url

    def _connections(self) -> int:
        if self.kind == "redis":
            return sum(c.get("name") == self.name for c in self._admin.client_list())
        return self._admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                   (self.name,)).fetchone()[0]

    def settle(self) -> None:
        """Return once the server holds no connection of a victim."""
        if self._admin is None:
            return
        deadline = time.monotonic() + 60
        while self._connections():
            assert time.monotonic() < deadline, "the server kept a killed client's connection for 60 s"
            time.sleep(0.005)

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()


@pytest.fixture
def victims():
    made: list[Victims] = []

    def make(kind: str) -> Victims:
        made.append(Victims(kind))
        return made[-1]
    yield make
    for v in made:
        v.close()


class HeldModel:
    """The loopback model server, holding each answer until the test lets it go.

    `wait_request(proc)` returns when `proc`'s request has arrived (the process
    is then in the middle of its model call) with the gate that releases it.
    """

    def __init__(self, server) -> None:
        self.server = server
        self.hold = True
        self.answer = "answer"
        self._arrived: queue.Queue[threading.Event] = queue.Queue()
        self._gates: list[threading.Event] = []
        server.responder = self._respond

    def _respond(self, request) -> Reply:
        if self.hold:
            gate = threading.Event()
            self._gates.append(gate)
            self._arrived.put(gate)
            gate.wait(60)
        return Reply(content=final(self.answer))

    def wait_request(self, proc: subprocess.Popen, timeout: float = 60) -> threading.Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self._arrived.get(timeout=0.02)
            except queue.Empty:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise AssertionError(f"fusion exited with {proc.returncode} before asking the model: {err}")
        raise AssertionError("fusion never asked the model")

    def release_all(self) -> None:
        for gate in self._gates:
            gate.set()


@pytest.fixture
def held_model(model_server):
    held = HeldModel(model_server)
    yield held
    held.release_all()  # before the server stops: no handler stays blocked


def model_env(fusion_env: dict[str, str], url: str, model_server) -> dict[str, str]:
    return {**fusion_env, "FUSION_STORAGE": url, "FUSION_PROVIDER": "openai",
            "FUSION_BASE_URL": model_server.openai_url, "FUSION_LOCK_TIMEOUT": "30"}


def is_one_more_turn(before: list[ChatMessage], after: list[ChatMessage], message: str,
                     answer: str | None) -> bool:
    """Whether `after` is `before` plus one whole turn for `message` (the system prompt
    first when the session was new); `answer` None: the echo provider's answer."""
    if after[:len(before)] != before:
        return False
    new = after[len(before):]
    if not before:
        if not new or new[0].role != "system":
            return False
        new = new[1:]
    if len(new) != 2 or new[0] != U(message) or new[1].role != "assistant":
        return False
    if answer is None:
        return f"Echo: {message} (" in new[1].content
    return new[1].content == final(answer)


# ---- SIGKILL at random moments ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", PERSISTENT)
def test_sigkill_during_send_leaves_whole_turns(kind, make_url, fusion_env, held_model, model_server, victims):
    url = store_url(make_url, kind)
    killing = victims(kind)
    env = model_env(fusion_env, killing.url(url), model_server)
    store = open_storage(url)
    bystander = [S("other"), U("keep me"), A("kept")]
    store.save("bystander", bystander)
    rng = random.Random(f"send-{kind}")
    # Two turns to measure an echo send by (the faster: the first may fill caches).
    duration = min(timed("send", "--provider", "echo", "-s", "victim", f"warm-{n}", env=env) for n in range(2))
    killed = 0
    for i in range(ROUNDS):
        before = store.load("victim")
        message = f"turn {i}"
        if i % 2:  # offline: the kill lands anywhere in the run, mostly late
            answer = None
            proc = spawn("send", "--provider", "echo", "-s", "victim", message, env=env)
            killed += kill_after(proc, rng.uniform(0.4, 1.1) * duration)
        else:  # over HTTP: the kill lands while the answer is parsed and the turn committed
            answer = held_model.answer = f"answer {i}"
            proc = spawn("send", "-s", "victim", message, env=env, stderr=subprocess.PIPE)
            gate = held_model.wait_request(proc)
            gate.set()
            killed += kill_after(proc, rng.uniform(0, 0.02))
            proc.stderr.close()
        killing.settle()
        after = store.load("victim")
        assert after == before or is_one_more_turn(before, after, message, answer), \
            f"round {i}: a killed send left a partial turn: {[m.role for m in after[len(before):]]}"
        assert store.load("bystander") == bystander
    assert killed, "no process was killed while running; the test proved nothing"
    # The next send runs (no lock of a dead holder blocks it) and lands whole.
    before = store.load("victim")
    held_model.hold, held_model.answer = False, "after the storm"
    result = run("--lock-timeout", "10", "send", "-s", "victim", "still there?", env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert is_one_more_turn(before, store.load("victim"), "still there?", "after the storm")
    store.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", PERSISTENT)
def test_sigkill_during_clear_leaves_the_session_or_nothing(kind, make_url, fusion_env, victims):
    url = store_url(make_url, kind)
    killing = victims(kind)
    env = {**fusion_env, "FUSION_STORAGE": killing.url(url), "FUSION_LOCK_TIMEOUT": "30"}
    store = open_storage(url)
    bystander = [U("keep me")]
    store.save("bystander", bystander)
    # Many rows, so that SQLite's and PostgreSQL's DELETE take a while to be killed in.
    history = [S("prompt")] + [m for n in range(300) for m in (U(f"q{n} " + "x" * 200), A(f"a{n}"))]

    def clear_in_full() -> float:
        store.save("victim", history)
        return timed("clear", "-s", "victim", env=env)

    duration = min(clear_in_full() for _ in range(2))
    rng = random.Random(f"clear-{kind}")
    killed = 0
    for i in range(ROUNDS):
        version = history + [U(f"round {i}")]
        store.save("victim", version)
        killed += kill_after(spawn("clear", "-s", "victim", env=env), rng.uniform(0.5, 1.05) * duration)
        killing.settle()
        state = (store.exists("victim"), store.load("victim"), store.count("victim"))
        assert state in ((True, version, len(version)), (False, [], 0)), \
            f"round {i}: a killed clear left {state[0]}, {len(state[1])} messages, count {state[2]}"
        assert store.load("bystander") == bystander
    assert killed, "no process was killed while running; the test proved nothing"
    store.save("victim", history)
    result = run("--lock-timeout", "10", "clear", "-s", "victim", env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert not store.exists("victim") and store.load("bystander") == bystander
    store.close()


def _source(url: str) -> dict[str, list[ChatMessage]]:
    """A store of sessions of very different sizes, for migrate to copy."""
    sessions = {f"s{n:02d}": [S(f"prompt {n}")] + [m for k in range(n * 40) for m in
                                                    (U(f"{n}/{k} " + "y" * 300), A(f"ok {k}"))]
                for n in range(8)}
    store = open_storage(url)
    for sid, history in sessions.items():
        store.save(sid, history)
    store.close()
    return sessions


def _check_copies(url: str, sessions: dict[str, list[ChatMessage]], complete: bool) -> None:
    """Each session at `url` is absent or equal to its source (all there if `complete`)."""
    store = open_storage(url)
    try:
        present = store.list_sessions()
        assert set(present) <= set(sessions), present
        for sid in present:
            assert store.load(sid) == sessions[sid], f"{sid} was copied in part"
        for sid in set(sessions) - set(present):
            assert store.load(sid) == [] and store.count(sid) == 0
        if complete:
            assert present == sorted(sessions)
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", PERSISTENT)
def test_sigkill_during_migrate_leaves_whole_sessions(kind, make_url, fusion_env, tmp_path, victims):
    source = f"file:{tmp_path / 'source'}"
    sessions = _source(source)
    env = {**fusion_env, "FUSION_LOCK_TIMEOUT": "30"}

    def command(destination: str) -> list[str]:
        return ["migrate", "--from", source, "--to", destination, "--on-conflict", "skip"]

    duration = timed(*command(store_url(make_url, kind)), env=env)
    killing = victims(kind)
    rng = random.Random(f"migrate-{kind}")
    killed = 0
    for i in range(ROUNDS):
        destination = store_url(make_url, kind)  # a new, empty store: its creation is killed too
        proc = spawn(*command(killing.url(destination)), env=env)
        killed += kill_after(proc, rng.uniform(0.3, 1.05) * duration)
        killing.settle()
        _check_copies(destination, sessions, complete=False)
        if i % 3 == 2 or i == ROUNDS - 1:  # resuming is the same command again
            result = run(*command(killing.url(destination)), env=env)
            assert result.returncode == 0, result.stderr.decode()
            _check_copies(destination, sessions, complete=True)
    assert killed, "no process was killed while running; the test proved nothing"


# ---- SIGINT and SIGTERM during a send -------------------------------------------------


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("kind", PERSISTENT)
def test_a_signal_mid_request_changes_nothing_and_releases_the_lock(kind, sig, code, word, make_url, tmp_path,
                                                                     fusion_env, held_model, model_server):
    url = make_url(kind)  # the default Redis lock TTL (30 s): the lock must be released, not expire
    env = model_env(fusion_env, url, model_server)
    store = open_storage(url)
    before = [S("prompt"), U("earlier"), A(final("reply"))]
    store.save("s", before)
    message = "a message I typed with care\nover two lines"
    piped = tmp_path / "message.txt"  # as in `fusion send < message.txt`
    piped.write_bytes(message.encode() + b"\n")
    with piped.open("rb") as stdin:
        proc = spawn("send", "-s", "s", env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    held_model.wait_request(proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (code, b""), err.decode()
    assert err.decode() == f"fusion: {word}; the session was left as it was\n{UNSENT}\n{message}\n"
    assert store.load("s") == before
    # --lock-timeout 0: if the lock had been left behind, this would fail at once.
    held_model.hold, held_model.answer = False, "got it"
    again = run("--lock-timeout", "0", "send", "-s", "s", env=env, input=message.encode())
    assert (again.returncode, again.stdout) == (0, b"got it\n"), again.stderr.decode()
    assert store.load("s") == before + [U(message), A(final("got it"))]
    store.close()


def test_a_send_waiting_for_the_lock_gives_its_message_back_on_sigterm(make_url, fusion_env, held_model,
                                                                       model_server):
    url = make_url("file")
    env = model_env(fusion_env, url, model_server)
    store = open_storage(url)
    holder = spawn("send", "-s", "s", "first", env=env, stdout=subprocess.PIPE)
    gate = held_model.wait_request(holder)  # it holds the session's lock now
    waiter = spawn("send", "-s", "s", "second", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while b"waiting for its lock" not in seen:
        chunk = waiter.stderr.read1(4096)  # blocks until it says something, or exits
        if not chunk:
            break
        seen += chunk
    assert b"waiting for its lock" in seen, seen
    waiter.send_signal(signal.SIGTERM)
    out, rest = waiter.communicate(timeout=60)
    err = (seen + rest).decode()
    assert (waiter.returncode, out) == (143, b""), err
    assert err.endswith(f"{UNSENT}\nsecond\n")
    held_model.answer = "one"
    gate.set()
    assert holder.communicate(timeout=60)[0] == b"one\n" and holder.returncode == 0
    assert [m.content for m in store.load("s")[1:]] == ["first", final("one")]


def test_a_signal_after_the_commit_says_the_turn_was_stored(tmp_path, monkeypatch):
    # The window between the commit and the exit is too short to aim a real signal
    # at, so the interrupt comes from closing the session, after the turn is stored.
    from click.testing import CliRunner

    from fusion_cli.cli import cli
    from fusion_cli.session import Session

    def interrupted(self) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Session, "close", interrupted)
    url = f"file:{tmp_path / 's'}"
    result = CliRunner().invoke(cli, ["--storage", url, "send", "--provider", "echo", "-s", "s", "kept"])
    assert result.exit_code == 130
    assert result.stderr == "fusion: interrupted after the turn was stored\n"  # not "resend it"
    assert is_one_more_turn([], open_storage(url).load("s"), "kept", None)
