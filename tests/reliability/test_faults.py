"""Faults under real `fusion` processes: writes that fail mid-save, servers that are
unreachable or go away mid-run, and stores locked by someone else.

Every case ends the same way: exit code 3, one clear line naming what failed
(the backend and its address, never a password), the previous history
intact, nothing half-written, and, for `send`, the message given back.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage
from tests.conftest import POSTGRES_URL, REDIS_URL
from tests.model_server import final
from tests.reliability.test_signals import (  # noqa: F401  (held_model is a fixture)
    UNSENT, _check_copies, _source, fusion_cmd, held_model, is_one_more_turn, model_env, run, spawn, timed)

S, U, A = ChatMessage.system, ChatMessage.user, ChatMessage.assistant
BEFORE = [S("prompt"), U("remember this"), A(final("remembered"))]
PASSWORD = "hunter2-do-not-print"

# Runs a command under a fault it sets up first, then becomes it (exec): a launcher
# rather than preexec_fn, which is unsafe in a process with threads (the model server's).
LAUNCH = textwrap.dedent("""
    import ctypes, os, resource, signal, sys
    fault, argv = sys.argv[1], sys.argv[2:]
    if fault.startswith("fsize="):
        # Past the limit write() fails with EFBIG, as on a full disk (SIGXFSZ would kill us).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(fault[6:])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    elif fault == "obey-permissions" and os.geteuid() == 0:
        # Root ignores file modes through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: drop
        # them from the bounding set, and exec gives the command a root without them.
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                print("cannot drop capabilities:", os.strerror(ctypes.get_errno()), file=sys.stderr)
                sys.exit(99)
    os.execv(argv[0], argv)
""")
CANNOT_LAUNCH = 99


def run_under(fault: str, *args: str, env: dict[str, str], input: bytes | None = None):
    result = subprocess.run([sys.executable, "-c", LAUNCH, fault, *fusion_cmd(*args)], env=env,
                            input=input, capture_output=True, timeout=120)
    if result.returncode == CANNOT_LAUNCH:
        pytest.skip(result.stderr.decode().strip())
    return result


def stray_files(directory: Path) -> list[str]:
    """Temporary files of a write, and SQLite rollback journals, left in `directory`."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".tmp", "-journal")))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a write fails mid-save ----------------------------------------------------------


def _store_dir(url: str) -> Path:
    path = Path(url.split(":", 1)[1])
    return path if url.startswith("file:") else path.parent


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_a_file_size_limit_mid_save_fails_cleanly(kind, make_url, fusion_env):
    url = make_url(kind)
    open_storage(url).save("s", BEFORE)
    env = {**fusion_env, "FUSION_STORAGE": url}
    message = "z" * 200_000  # the turn (it and its echo) is far past the limit; the history is not
    result = run_under("fsize=65536", "send", "--provider", "echo", "-s", "s", env=env,
                       input=message.encode() + b"\n")
    err = result.stderr.decode()
    assert (result.returncode, result.stdout) == (3, b""), err
    error, *rest = err.splitlines()
    assert error.startswith("fusion: error: cannot write ") and _store_dir(url).name in error
    assert ("File too large" if kind == "file" else "disk I/O error") in error
    assert "previous history is intact" in error
    assert rest == [UNSENT, message]
    assert open_storage(url).load("s") == BEFORE
    assert stray_files(_store_dir(url)) == []
    # Without the limit the same store takes the turn.
    again = run("send", "--provider", "echo", "-s", "s", "small now", env=env)
    assert again.returncode == 0, again.stderr.decode()
    assert is_one_more_turn(BEFORE, open_storage(url).load("s"), "small now", None)


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_a_read_only_directory_fails_cleanly(kind, tmp_path, fusion_env):
    directory = tmp_path / "store"
    url = f"file:{directory}" if kind == "file" else f"sqlite:{directory / 'fusion.db'}"
    store = open_storage(url)
    store.save("s", BEFORE)
    store.close()
    env = {**fusion_env, "FUSION_STORAGE": url}
    directory.chmod(0o500)
    try:
        sent = run_under("obey-permissions", "send", "--provider", "echo", "-s", "s", "do not lose me", env=env)
        cleared = run_under("obey-permissions", "clear", "-s", "s", env=env)
    finally:
        directory.chmod(0o700)
    for result, tail in ((sent, [UNSENT, "do not lose me"]), (cleared, [])):
        err = result.stderr.decode()
        assert (result.returncode, result.stdout) == (3, b""), err
        error, *rest = err.splitlines()
        assert error.startswith("fusion: error: cannot ") and str(directory) in error
        assert "Permission denied" in error or "readonly" in error
        assert "(check " in error  # a hint: what to check
        assert rest == tail
    assert open_storage(url).load("s") == BEFORE
    assert stray_files(directory) == []


# ---- a server that cannot be reached ----------------------------------------------------


@pytest.mark.parametrize("command", [["count"], ["list"], ["clear"], ["send", "--provider", "echo", "hello"],
                                     ["-v", "show"]], ids=lambda c: "-".join(c[:2]))
@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_an_unreachable_server_is_named_without_its_password(kind, command, fusion_env):
    port = closed_port()
    url = (f"redis://:{PASSWORD}@127.0.0.1:{port}/0" if kind == "redis"
           else f"postgresql://fusion:{PASSWORD}@127.0.0.1:{port}/test")
    result = run("--storage", url, *command, env=fusion_env)
    out, err = result.stdout.decode(), result.stderr.decode()
    assert (result.returncode, out) == (3, ""), err
    assert PASSWORD not in err
    name = "Redis" if kind == "redis" else "PostgreSQL"
    error = [line for line in err.splitlines() if line.startswith("fusion: error: ")]
    assert len(error) == 1 and f"{name} at " in error[0] and f"127.0.0.1:{port}" in error[0]
    if command[0] != "-v":  # without -v, no traceback: the error line comes first
        assert err.splitlines()[0] == error[0]
        assert err.splitlines()[1:] == ([UNSENT, "hello"] if command[0] == "send" else [])


# ---- a server that goes away mid-run ----------------------------------------------------


class Relay:
    """A TCP relay to a real server, that the test can cut: the server 'goes away'
    (open connections drop, new ones are refused) without stopping the real one."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._guard = threading.Lock()
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url_through(self, url: str) -> str:
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = (credentials + "@" if credentials else "") + f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._upstream)
            except OSError:
                return
            with self._guard:
                if self._cut:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        with self._guard:
            self._cut = True
            sockets = [self._listener, *self._sockets]
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_redis_going_away_mid_send_changes_nothing(make_url, fusion_env, held_model, model_server):
    direct = make_url("redis") + "&lock_ttl=1"
    relay = Relay(direct)
    through = relay.url_through(direct)
    store = open_storage(direct)
    store.save("s", BEFORE)
    proc = spawn("send", "-s", "s", "do not lose me", env=model_env(fusion_env, through, model_server),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    gate = held_model.wait_request(proc)  # the history is read and the lock held
    relay.cut()
    gate.set()
    out, err = proc.communicate(timeout=60)
    err = err.decode()
    assert (proc.returncode, out) == (3, b""), err
    assert f"fusion: error: cannot reach Redis at redis://127.0.0.1:{relay.port}/0" in err
    assert err.endswith(f"{UNSENT}\ndo not lose me\n")
    # Every line before the message is fusion's own, the driver's warning included.
    assert all(line.startswith("fusion: ") for line in err[: err.index(UNSENT)].splitlines()), err
    assert "fusion: warning: could not release the lock" in err
    assert store.load("s") == BEFORE
    # The lock it could not release expires after lock_ttl; the next send takes it.
    held_model.hold, held_model.answer = False, "back"
    result = run("--lock-timeout", "30", "send", "-s", "s", "again", env=model_env(fusion_env, direct, model_server))
    assert (result.returncode, result.stdout) == (0, b"back\n"), result.stderr.decode()
    assert is_one_more_turn(BEFORE, store.load("s"), "again", "back")
    store.close()


def test_a_redis_connection_killed_mid_send_is_replaced(make_url, fusion_env, held_model, model_server):
    import redis

    name = f"fusion-fault-{uuid.uuid4().hex[:8]}"
    url = make_url("redis")
    store = open_storage(url)
    store.save("s", BEFORE)
    env = model_env(fusion_env, f"{url}&client_name={name}", model_server)
    proc = spawn("send", "-s", "s", "hello", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    gate = held_model.wait_request(proc)
    admin = redis.Redis.from_url(REDIS_URL)
    ids = [c["id"] for c in admin.client_list() if c.get("name") == name]
    assert ids, "the send has no connection to kill"
    for client_id in ids:
        admin.client_kill_filter(_id=client_id)
    held_model.answer = "fine"
    gate.set()
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, b"fine\n"), err.decode()
    assert is_one_more_turn(BEFORE, store.load("s"), "hello", "fine")  # once, whole
    prefix = url.split("prefix=", 1)[1]
    assert admin.exists(f"{prefix}lock:s") == 0  # released, not left to expire
    admin.close()
    store.close()


def _terminate(application_name: str, admin=None) -> int:
    """Terminate every PostgreSQL connection of that application; how many there were."""
    import psycopg

    if admin is None:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            return _terminate(application_name, admin)
    return admin.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                         "WHERE application_name = %s", (application_name,)).fetchone()[0]


def test_postgres_connections_terminated_mid_send_change_nothing(make_url, fusion_env, held_model, model_server):
    url = make_url("postgres")
    name = f"fusion-fault-{uuid.uuid4().hex[:8]}"
    victim = f"{url}&application_name={name}"
    store = open_storage(url)
    store.save("s", BEFORE)
    proc = spawn("send", "-s", "s", "do not lose me", env=model_env(fusion_env, victim, model_server),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    gate = held_model.wait_request(proc)
    assert _terminate(name) == 1  # its one connection: the data's and the lock's
    gate.set()
    out, err = proc.communicate(timeout=60)
    err = err.decode()
    assert (proc.returncode, out) == (3, b""), err
    assert err.startswith(f"fusion: error: cannot use PostgreSQL at {victim}: ")
    assert err.endswith(f"{UNSENT}\ndo not lose me\n")
    assert store.load("s") == BEFORE
    # The server dropped the advisory lock with the connection (as its backend exits).
    held_model.hold, held_model.answer = False, "back"
    result = run("--lock-timeout", "10", "send", "-s", "s", "again", env=model_env(fusion_env, url, model_server))
    assert (result.returncode, result.stdout) == (0, b"back\n"), result.stderr.decode()
    assert is_one_more_turn(BEFORE, store.load("s"), "again", "back")
    store.close()


@pytest.mark.slow
def test_postgres_connections_terminated_at_random_during_migrate(make_url, fusion_env, tmp_path):
    source = f"file:{tmp_path / 'source'}"
    sessions = _source(source)

    def command(destination: str) -> list[str]:
        return ["migrate", "--from", source, "--to", destination, "--on-conflict", "skip"]

    import psycopg

    duration = timed(*command(make_url("postgres")), env=fusion_env)
    rng = random.Random("terminate-migrate")
    admin = psycopg.connect(POSTGRES_URL, autocommit=True)
    failed = 0
    for _ in range(6):
        destination = make_url("postgres")
        name = f"fusion-fault-{uuid.uuid4().hex[:8]}"
        proc = spawn(*command(f"{destination}&application_name={name}"), env=fusion_env, stderr=subprocess.PIPE)
        # From a random moment on, its connections are cut as soon as they appear.
        time.sleep(rng.uniform(0.2, 0.9) * duration)
        while proc.poll() is None:
            _terminate(name, admin)
            time.sleep(0.01)
        err = proc.communicate(timeout=60)[1].decode()
        assert proc.returncode in (0, 3), err
        if proc.returncode == 3:
            failed += 1
            assert err.startswith("fusion: error: ") and "PostgreSQL at" in err
            assert "Traceback" not in err
        _check_copies(destination, sessions, complete=False)
        resumed = run(*command(destination), env=fusion_env)
        assert resumed.returncode == 0, resumed.stderr.decode()
        _check_copies(destination, sessions, complete=True)
    admin.close()
    assert failed, "no connection was cut while migrate ran; the test proved nothing"


# ---- a store locked by someone else --------------------------------------------------------

HOLD_SQLITE = textwrap.dedent("""
    import sqlite3, sys, time
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")  # as a sqlite3 shell left in a transaction would
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_sqlite_database_locked_by_another_process(tmp_path, fusion_env):
    db = tmp_path / "fusion.db"
    url = f"sqlite:{db}"
    open_storage(url).save("s", BEFORE)
    env = {**fusion_env, "FUSION_STORAGE": url}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SQLITE, str(db)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        cleared = run("--lock-timeout", "1", "clear", "-s", "s", env=env)
        sent = run("--lock-timeout", "1", "send", "--provider", "echo", "-s", "s", "hello", env=env)
        counted = run("count", "-s", "s", env=env)  # readers do not wait for a writer (WAL)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    locked = f"fusion: error: the SQLite database {db} stayed locked by another process for 1 s"
    for result, tail in ((cleared, []), (sent, [UNSENT, "hello"])):
        err = result.stderr.decode()
        assert (result.returncode, result.stdout) == (3, b""), err
        error, *rest = err.splitlines()
        assert error.startswith(locked) and rest == tail
    assert (counted.returncode, counted.stdout) == (0, b"3\n")
    assert open_storage(url).load("s") == BEFORE
    assert run("clear", "-s", "s", env=env).returncode == 0  # the holder is gone: it works again


def test_a_redis_lock_of_a_killed_send_is_taken_over_after_its_ttl(make_url, fusion_env, held_model,
                                                                   model_server):
    import redis

    url = make_url("redis") + "&lock_ttl=2"
    lock_key = url.split("prefix=", 1)[1].split("&", 1)[0] + "lock:s"
    env = model_env(fusion_env, url, model_server)
    dead = spawn("send", "-s", "s", "lost", env=env)
    held_model.wait_request(dead)
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    admin = redis.Redis.from_url(REDIS_URL)
    assert admin.pttl(lock_key) > 0  # the dead holder's lock is still there, until its TTL runs out
    admin.close()
    held_model.hold, held_model.answer = False, "taken over"
    result = run("--lock-timeout", "30", "send", "-s", "s", "next", env=env)
    assert (result.returncode, result.stdout) == (0, b"taken over\n"), result.stderr.decode()
    assert is_one_more_turn([], open_storage(url).load("s"), "next", "taken over")
