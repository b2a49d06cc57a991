"""Security, tested as an adversary would: the tools' sandbox, file permissions, and secrets.

Every model call is real HTTP to the loopback server (tests/model_server.py),
which plays a hostile model: it asks the tools for paths outside the root and
echoes the API key back in its errors. Redis and PostgreSQL are the real servers.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusion_cli.cli import cli
from fusion_cli.storage import open_storage
from tests.conftest import POSTGRES_URL
from tests.model_server import Recorded, Reply, closed_port_url

SECRET_TEXT = "TOP-SECRET-OUTSIDE-THE-ROOT"
REFUSED = "is outside the directory the tools may use"


# ---- 1. the tools' sandbox ------------------------------------------------------

@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A root with hostile symlinks, the files they aim at outside it, and an unrelated cwd."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text(SECRET_TEXT)
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("inside text")
    sibling = tmp_path / "root-sibling"  # the root's name is a prefix of it: not inside
    sibling.mkdir()
    (sibling / "x.txt").write_text(SECRET_TEXT)
    (root / "file_link").symlink_to(outside / "secret.txt")
    (root / "dir_link").symlink_to(outside)
    (root / "rel_link").symlink_to("../outside/secret.txt")
    (root / "dangling").symlink_to(outside / "made-through-a-link.txt")  # does not exist yet
    (root / "loop").symlink_to(root / "loop")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    (root / "inner_link").symlink_to(root / "a.txt")  # inside: allowed
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # --root, not the working directory, must decide
    return {"tmp": tmp_path, "root": root, "outside": outside, "sibling": sibling}


def snapshot(base: Path) -> dict[str, object]:
    """Every path under `base`: a file's bytes, a symlink's target, or 'dir'."""
    seen: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            key = str(p.relative_to(base))
            seen[key] = (f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir()
                         else p.read_bytes())
    return seen


def send_tool_calls(server, store_url: str, calls, *options: str, env=None):
    """One `send` whose model asks for each (tool, input) in turn, then answers; the observations."""
    for tool, value in calls:
        server.reply_tool(tool, value)
    server.reply_final("done")
    result = CliRunner().invoke(
        cli, ["--storage", store_url, "send", "--provider", "openai", "--base-url", server.openai_url,
              "--json", "--max-iterations", str(len(calls) + 1), *options, "go"],
        env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    steps = json.loads(result.stdout)["steps"]
    assert len(steps) == len(calls) + 1
    return [s["observation"] for s in steps[:-1]], result


# (tool, input with {root}/{outside} filled in, what the observation must say)
ESCAPES = [
    ("read_file", {"path": "../outside/secret.txt"}, REFUSED),
    ("read_file", {"path": "sub/../../outside/secret.txt"}, REFUSED),
    ("read_file", {"path": "{outside}/secret.txt"}, REFUSED),
    ("read_file", {"path": "/etc/passwd"}, REFUSED),
    ("read_file", {"path": "../root-sibling/x.txt"}, REFUSED),
    ("read_file", {"path": "file_link"}, REFUSED),
    ("read_file", {"path": "rel_link"}, REFUSED),
    ("read_file", {"path": "dir_link/secret.txt"}, REFUSED),
    ("read_file", {"path": "{root}/dir_link/secret.txt"}, REFUSED),
    ("read_file", {"path": "loop"}, "loop of symbolic links"),
    ("read_file", {"path": "loop_a/x.txt"}, "loop of symbolic links"),
    ("read_file", {"path": "a.txt\0../../outside/secret.txt"}, "contains a NUL character"),
    ("list_directory", {"path": ".."}, REFUSED),
    ("list_directory", {"path": "/"}, REFUSED),
    ("list_directory", {"path": "dir_link"}, REFUSED),
    ("list_directory", {"path": "loop"}, "loop of symbolic links"),
    ("list_directory", {"path": "sub\0"}, "contains a NUL character"),
    ("write_file", {"path": "../outside/new.txt", "content": "x"}, REFUSED),
    ("write_file", {"path": "{outside}/new.txt", "content": "x"}, REFUSED),
    ("write_file", {"path": "dir_link/new.txt", "content": "x"}, REFUSED),
    ("write_file", {"path": "dir_link/dir/new.txt", "content": "x"}, REFUSED),
    ("write_file", {"path": "file_link", "content": "overwritten"}, REFUSED),
    ("write_file", {"path": "dangling", "content": "x"}, REFUSED),
    ("write_file", {"path": "loop", "content": "x"}, "loop of symbolic links"),
    ("write_file", {"path": "new\0.txt", "content": "x"}, "contains a NUL character"),
]


@pytest.mark.parametrize("tool, value, expected", ESCAPES,
                         ids=[f"{t}:{v['path'].replace(chr(0), '<NUL>')}" for t, v, _ in ESCAPES])
def test_no_tool_call_reaches_outside_the_root(tree, model_server, tmp_path_factory, tool, value, expected):
    store_url = f"file:{tmp_path_factory.mktemp('store')}"
    value = {k: v.format(root=tree["root"], outside=tree["outside"]) for k, v in value.items()}
    before = snapshot(tree["tmp"])
    (observation,), result = send_tool_calls(model_server, store_url, [(tool, value)],
                                             "--root", str(tree["root"]), "--allow", "write_file")
    assert observation.startswith("Error: ") and expected in observation
    assert snapshot(tree["tmp"]) == before  # nothing written, inside or out
    assert not (tree["outside"] / "made-through-a-link.txt").exists()
    stored = open_storage(store_url).load("default")
    sent = b"".join(r.raw for r in model_server.requests)
    assert SECRET_TEXT not in result.stdout + "".join(m.content for m in stored)
    assert SECRET_TEXT.encode() not in sent  # nor did the model see it


def test_the_same_tools_work_inside_the_root(tree, model_server, tmp_path_factory):
    """The control: the refusals above are the sandbox's, not tools that fail on everything."""
    store_url = f"file:{tmp_path_factory.mktemp('store')}"
    root = tree["root"]
    observations, _ = send_tool_calls(model_server, store_url, [
        ("read_file", {"path": "a.txt"}),
        ("read_file", {"path": "inner_link"}),
        ("read_file", {"path": f"{root}/sub/../a.txt"}),
        ("write_file", {"path": "sub/made.txt", "content": "made"}),
        ("list_directory", {"path": "sub"}),
    ], "--root", str(root), "--allow", "write_file")
    assert observations == ["inside text", "inside text", "inside text",
                            "Wrote 4 characters to sub/made.txt", "made.txt"]
    assert (root / "sub" / "made.txt").read_text() == "made"


def test_root_comes_from_the_flag_env_or_config_file_else_the_cwd(tmp_path, model_server, monkeypatch):
    for name in ("flag", "env", "file", "cwd"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "which.txt").write_text(name)
    config = tmp_path / "config.toml"
    config.write_text(f"root = {str(tmp_path / 'file')!r}\n")
    monkeypatch.chdir(tmp_path / "cwd")
    store_url = f"file:{tmp_path / 'store'}"
    read = [("read_file", {"path": "which.txt"})]

    def which(*options: str, **env: str) -> str:
        return send_tool_calls(model_server, store_url, read, *options, env=env)[0][0]

    assert which() == "cwd"
    assert which(FUSION_CONFIG=str(config)) == "file"
    assert which(FUSION_CONFIG=str(config), FUSION_ROOT=str(tmp_path / "env")) == "env"
    assert which("--root", str(tmp_path / "flag"), FUSION_ROOT=str(tmp_path / "env")) == "flag"


@pytest.mark.parametrize("make_root", [lambda t: t / "missing", lambda t: t / "a-file"])
def test_a_root_that_is_not_a_directory_is_refused_before_any_request(tmp_path, model_server, make_root):
    (tmp_path / "a-file").write_text("x")
    root = make_root(tmp_path)
    store_url = f"file:{tmp_path / 'store'}"
    result = CliRunner().invoke(cli, ["--storage", store_url, "send", "--provider", "openai", "--base-url",
                                      model_server.openai_url, "--root", str(root), "hi"])
    assert result.exit_code == 2
    assert f"the tools' root {str(root)!r} is not a directory" in result.stderr
    assert model_server.requests == [] and open_storage(store_url).count("default") == 0


def test_chat_keeps_to_the_root_too(tree, model_server, tmp_path_factory):
    store_url = f"file:{tmp_path_factory.mktemp('store')}"
    model_server.reply_tool("read_file", {"path": "../outside/secret.txt"})
    model_server.reply_final("could not")
    result = CliRunner().invoke(cli, ["--storage", store_url, "chat", "--provider", "openai", "--base-url",
                                      model_server.openai_url, "--root", str(tree["root"])],
                                input="read the secret\n", catch_exceptions=False)
    assert (result.exit_code, result.stdout) == (0, "could not\n")
    observation = open_storage(store_url).load("default")[3].content
    assert observation.startswith("Observation: Error: ") and REFUSED in observation
    assert SECRET_TEXT not in observation


def test_shell_http_and_write_need_allow(tree, model_server, tmp_path_factory):
    store_url = f"file:{tmp_path_factory.mktemp('store')}"
    model_server.pages["/secret"] = (200, "text/plain", SECRET_TEXT.encode())
    pwned = tree["outside"] / "pwned"
    calls = [("execute_shell", {"command": f"touch {pwned}; cat {tree['outside']}/secret.txt"}),
             ("http_get", {"url": model_server.url + "/secret"}),
             ("write_file", {"path": "new.txt", "content": "x"})]
    observations, result = send_tool_calls(model_server, store_url, calls, "--root", str(tree["root"]))
    for (tool, _), observation in zip(calls, observations):
        assert f"the tool {tool!r} is not enabled" in observation and f"--allow {tool}" in observation
    assert not pwned.exists() and not (tree["root"] / "new.txt").exists()
    assert SECRET_TEXT not in result.stdout

    # The control: allowed, they run (the shell in the root).
    observations, _ = send_tool_calls(model_server, store_url, [
        ("execute_shell", {"command": "pwd"}), ("http_get", {"url": model_server.url + "/secret"})],
        "--root", str(tree["root"]), "--allow", "execute_shell", "--allow", "http_get")
    assert observations == [f"exit code 0\n{tree['root']}\n", f"HTTP 200 text/plain\n\n{SECRET_TEXT}"]


def test_observations_are_size_limited_in_what_is_sent_and_stored(tree, model_server, tmp_path_factory):
    from fusion_cli.agent.tools import MAX_OBSERVATION, NOTE_ROOM

    store_url = f"file:{tmp_path_factory.mktemp('store')}"
    (tree["root"] / "big.txt").write_text("x" * 200_000 + "END-OF-BIG-FILE")
    observations, _ = send_tool_calls(model_server, store_url, [
        ("read_file", {"path": "big.txt"}),
        ("execute_shell", {"command": "head -c 3000000 /dev/zero | tr '\\0' y; echo END-OF-FLOOD"}),
    ], "--root", str(tree["root"]), "--allow", "execute_shell")
    for observation, end in zip(observations, ("END-OF-BIG-FILE", "END-OF-FLOOD")):
        assert len(observation) <= MAX_OBSERVATION + NOTE_ROOM and "[truncated: showing the first" in observation
        assert end not in observation
    stored = open_storage(store_url).load("default")
    assert max(len(m.content) for m in stored) <= len("Observation: ") + MAX_OBSERVATION + NOTE_ROOM
    assert all(len(r.raw) < 3 * MAX_OBSERVATION + 20_000 for r in model_server.requests)


# ---- 2. permissions under a permissive umask ---------------------------------------

def run_umask0(env: dict[str, str], *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    """`python -m fusion_cli ARGS` as a real process whose umask is 0 (every bit permitted)."""
    result = subprocess.run([sys.executable, "-m", "fusion_cli", *args], env=env, input=input,
                            capture_output=True, umask=0, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    return result


def modes_under(base: Path) -> dict[str, int]:
    return {str(p.relative_to(base)): stat.S_IMODE(p.lstat().st_mode) for p in [base, *base.rglob("*")]}


def assert_private(base: Path) -> None:
    """Every directory under `base` (itself included) 0700, every file 0600."""
    wrong = {name: oct(mode) for name, mode in modes_under(base).items()
             if mode != (0o700 if (base / name).is_dir() else 0o600)}
    assert wrong == {}


def test_the_file_store_is_private_whatever_the_umask(tmp_path, fusion_env, isolated_env):
    env = {**fusion_env, "FUSION_PROVIDER": "echo"}
    run_umask0(env, "--storage", f"file:{tmp_path / 'new' / 'deeper' / 'sessions'}", "send", "-s", "a", "hi")
    run_umask0(env, "send", "hi")  # the default store, in a data directory that does not exist yet
    run_umask0(env, "migrate", "--from", f"file:{tmp_path / 'new' / 'deeper' / 'sessions'}",
               "--to", f"file:{tmp_path / 'copy' / 'sessions'}")
    assert (tmp_path / "new" / "deeper" / "sessions" / "a.json").is_file()
    assert (isolated_env / "data" / "fusion" / "sessions" / "default.json").is_file()
    assert (tmp_path / "copy" / "sessions" / "a.json").is_file()
    for created in (tmp_path / "new", isolated_env / "data", tmp_path / "copy"):
        assert_private(created)  # the session files, lock files, and every directory made for them


def test_the_sqlite_database_and_its_wal_and_shm_are_private_whatever_the_umask(tmp_path, fusion_env):
    db = tmp_path / "new" / "deeper" / "fusion.db"
    # chat keeps its connection open between turns, so -wal and -shm exist while we look.
    proc = subprocess.Popen([sys.executable, "-m", "fusion_cli", "--storage", f"sqlite:{db}", "chat",
                             "--provider", "echo"], env=fusion_env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, umask=0)
    try:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith(b"Echo: hello")  # the turn is committed
        names = sorted(p.name for p in db.parent.iterdir())
        assert names == ["fusion.db", "fusion.db-shm", "fusion.db-wal", "fusion.db.locks"]
        assert_private(tmp_path / "new")
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read().decode()


def test_exports_are_private_whatever_the_umask(tmp_path, fusion_env):
    env = {**fusion_env, "FUSION_PROVIDER": "echo", "FUSION_STORAGE": f"file:{tmp_path / 'store'}"}
    run_umask0(env, "send", "hi")
    old = tmp_path / "old-backup.json"
    old.write_text("{}")
    old.chmod(0o644)  # an earlier, world-readable backup is replaced by a private one
    run_umask0(env, "export", "--all", "-o", str(tmp_path / "backup.json"))
    run_umask0(env, "export", "--all", "--format", "jsonl", "-o", str(old))
    assert stat.S_IMODE((tmp_path / "backup.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    assert b'"hi"' in old.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# ---- 3. secrets ---------------------------------------------------------------------

def _header_key(request: Recorded) -> str:
    return request.headers.get("authorization") or request.headers.get("x-api-key") or ""


def _echo_key_in_error(status: int, pad: int = 0):
    """A provider that puts the credentials it received in its error body (some proxies do).

    `pad` characters before them put the key across the 500-character cut of a shown message.
    """
    def respond(request: Recorded) -> Reply:
        message = "x" * pad + f"Incorrect API key provided: {_header_key(request)}"
        return Reply(status=status, body={"error": {"message": message, "type": "invalid_request_error"}})
    return respond


def _redis_keys(prefix: str) -> bytes:
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    out = bytearray()
    try:
        for key in client.scan_iter(match=prefix + "*", count=1000):
            kind = client.type(key)
            out += key
            if kind == b"string":
                out += client.get(key) or b""
            elif kind == b"list":
                out += b"".join(client.lrange(key, 0, -1))
            elif kind == b"hash":
                out += b"".join(k + v for k, v in client.hgetall(key).items())
            elif kind == b"zset":
                out += b"".join(client.zrange(key, 0, -1))
            elif kind == b"set":
                out += b"".join(client.smembers(key))
            else:
                out += client.dump(key) or b""
    finally:
        client.close()
    assert out, f"no Redis keys under {prefix!r}: the scenario stored nothing?"
    return bytes(out)


def _postgres_rows(prefix: str) -> bytes:
    import psycopg

    out = bytearray()
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        tables = [t for (t,) in conn.execute(
            "SELECT tablename FROM pg_tables WHERE starts_with(tablename, %s)", (prefix,))]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):  # bytea as its bytes, the rest as text
                out += b"\n".join(bytes(v) if isinstance(v, (bytes, memoryview)) else str(v).encode()
                                  for v in row)
    assert out, f"no PostgreSQL rows in tables {prefix}*: the scenario stored nothing?"
    return bytes(out)


SCENARIOS = [("FUSION_API_KEY", "file"), ("OPENAI_API_KEY", "redis"), ("ANTHROPIC_API_KEY", "postgres"),
             ("api_key in the config file", "sqlite")]


@pytest.mark.parametrize("source, backend", SCENARIOS, ids=[f"{s}-{b}" for s, b in SCENARIOS])
def test_the_key_and_the_storage_password_appear_nowhere(source, backend, tmp_path, fusion_env, isolated_env,
                                                         make_url, model_server):
    key = f"sk-test-SECRET-{uuid.uuid4().hex}"
    password = f"pw-SECRET-{uuid.uuid4().hex[:12]}"
    other_password = f"pw-OTHER-{uuid.uuid4().hex[:12]}"
    url = make_url(backend)
    if backend == "redis":  # the test server has no password: redis-py then carries on without one
        url = url.replace("redis://", f"redis://:{password}@", 1)
    elif backend == "postgres":  # trust authentication: the password is sent and ignored
        url = url.replace("postgres@", f"postgres:{password}@", 1)
    anthropic = source == "ANTHROPIC_API_KEY"
    env = {**fusion_env, "FUSION_STORAGE": url, "FUSION_PROVIDER": "anthropic" if anthropic else "openai",
           "FUSION_BASE_URL": model_server.url if anthropic else model_server.openai_url}
    written_by_us = []
    if source.startswith("api_key"):
        config = tmp_path / "config.toml"
        config.write_text(f'api_key = "{key}"\n')
        env["FUSION_CONFIG"] = str(config)
        written_by_us.append(config)
    else:
        env[source] = key
    work = tmp_path / "work"
    work.mkdir()
    (work / ".env").write_text(f"API_KEY={key}\n")  # a file the model will read
    written_by_us.append(work / ".env")
    runs: list[subprocess.CompletedProcess] = []

    def fusion(*args: str, code: int = 0, input: bytes | None = None, **more: str):
        result = subprocess.run([sys.executable, "-m", "fusion_cli", *args], input=input, cwd=work,
                                env={**env, **more}, capture_output=True, timeout=120)
        runs.append(result)
        assert result.returncode == code, (args, result.stderr.decode())
        return result

    # A successful turn whose tools and answer hold the key; -v shows the steps.
    model_server.reply_tool("read_file", {"path": ".env"})
    model_server.reply_tool("execute_shell", {"command": "env; cat .env"})
    model_server.reply(Reply(status=429, body={"error": {"message": f"slow down, {key}"}},
                             headers={"Retry-After": "0"}))
    model_server.reply_final(f"Your key is {key}")
    ok = fusion("-v", "send", "--allow", "execute_shell", "what is my key?")
    assert b"Your key is ***" in ok.stdout and b"retrying" in ok.stderr
    model_server.reply_final(f"again: {key}")
    fusion("-vv", "send", "--json", "again")
    assert all(key in _header_key(r) for r in model_server.requests)  # the key was really sent

    # The provider refuses the key and quotes it back: in a 401, across the message's cut, in a 200.
    for responder in (_echo_key_in_error(401), _echo_key_in_error(401, pad=430), _echo_key_in_error(200)):
        model_server.responder = responder
        failed = fusion("-v", "send", "refused", code=4)
        assert b"Traceback" in failed.stderr and b"Incorrect API key provided: " in failed.stderr
    fusion("-v", "chat", input=b"refused in a chat\n")
    model_server.responder = None
    # No server there; the key in the URL's user info and query too.
    unreachable = closed_port_url().replace("http://", f"http://user:{key}@", 1) + f"?api-key={key}"
    fusion("-vv", "send", "unreachable", code=4, FUSION_BASE_URL=unreachable)
    # A key with a character a header cannot carry: refused without showing it.
    bad = fusion("-v", "send", "bad key", code=2, FUSION_API_KEY=key + "\nX-Injected: 1")
    assert b"cannot carry" in bad.stderr

    # Every command that shows the store.
    export = tmp_path / "export.json"
    for args in (["where"], ["list"], ["list", "--json"], ["list", "--long"], ["count"], ["count", "--json"],
                 ["show"], ["show", "--json"], ["-v", "export", "--all", "-o", str(export)], ["export", "--all"]):
        fusion(*args)
    # Credentials the server refuses, or a URL libpq cannot parse (it quotes the bad part back).
    if backend == "redis":
        fusion("-v", "count", code=3, FUSION_STORAGE=url.replace(f":{password}@", f"nouser:{password}@"))
    elif backend == "postgres":
        fusion("-v", "count", code=3, FUSION_STORAGE=url.replace(password, password + "%zz"))
        # migrate's URLs are not the configured store: the backend itself must scrub its driver's text.
        bad_url = url.replace(password, other_password + "%zz")
        fusion("-v", "migrate", "--from", bad_url, "--to", f"file:{tmp_path / 'copy'}", code=3)

    shown = b"".join(r.stdout + r.stderr for r in runs)
    files = b"".join(p.read_bytes() for base in (tmp_path, isolated_env) for p in base.rglob("*")
                     if p.is_file() and p not in written_by_us)
    if backend == "redis":
        stored = _redis_keys(url.partition("prefix=")[2])
    elif backend == "postgres":
        stored = _postgres_rows(url.partition("table_prefix=")[2])
    else:
        stored = files  # the session files, or the database and any -wal
    assert b"Your key is ***" in stored  # the turn is there, scrubbed
    for secret in (key, password, other_password):
        assert secret.encode() not in shown
        assert secret.encode() not in files
        assert secret.encode() not in stored
    assert key[:24].encode() not in shown + files + stored  # not even the first half of it


def test_a_key_with_surrounding_whitespace_is_trimmed_and_sent(model_server, tmp_path):
    key = f"sk-test-SECRET-{uuid.uuid4().hex}"
    model_server.reply_final("ok")
    result = CliRunner().invoke(cli, ["--storage", f"file:{tmp_path}", "send", "--provider", "openai",
                                      "--base-url", model_server.openai_url, "hi"],
                                env={"FUSION_API_KEY": f" {key}\r\n"}, catch_exceptions=False)
    assert (result.exit_code, result.stdout) == (0, "ok\n")
    assert model_server.requests[0].headers["authorization"] == f"Bearer {key}"


@pytest.mark.parametrize("suffix", ["\nX-Injected: 1", "\u00e9", " inner space"])
def test_a_key_a_header_cannot_carry_is_refused_without_showing_it(model_server, tmp_path, suffix):
    key = f"sk-test-SECRET-{uuid.uuid4().hex}"
    result = CliRunner().invoke(cli, ["-v", "--storage", f"file:{tmp_path}", "send", "--provider", "openai",
                                      "--base-url", model_server.openai_url, "hi"],
                                env={"OPENAI_API_KEY": key + suffix})
    assert result.exit_code == 2 and "the API key has a character an HTTP header cannot carry" in result.stderr
    assert key[:20] not in result.output and model_server.requests == []


def test_an_internal_error_with_a_secret_in_it_is_scrubbed_even_in_the_traceback(
        model_server, tmp_path, monkeypatch):
    """A bug's exception quoting the key or the storage password: fusion's last guard."""
    key = f"sk-test-SECRET-{uuid.uuid4().hex}"
    password = f"pw-SECRET-{uuid.uuid4().hex[:12]}"
    url = POSTGRES_URL.replace("postgres@", f"postgres:{password}@", 1)  # in FUSION_STORAGE; never opened

    def buggy(text: str):
        raise RuntimeError(f"bug while parsing {text!r} with key {key} for {url}")

    monkeypatch.setattr("fusion_cli.agent.loop.parse_decision", buggy)
    model_server.reply_final("fine")
    for verbose in ([], ["-v"]):
        result = CliRunner().invoke(cli, [*verbose, "--storage", f"file:{tmp_path}", "send", "--provider",
                                          "openai", "--base-url", model_server.openai_url, "hi"],
                                    env={"FUSION_API_KEY": key, "FUSION_STORAGE": url})
        assert result.exit_code == 70
        assert "internal error: RuntimeError: bug while parsing" in result.stderr
        assert ("Traceback" in result.stderr) == bool(verbose)
        assert key not in result.output and password not in result.output
        model_server.reply_final("fine")
