"""`fusion send` against the loopback model server: CliRunner and real subprocesses.

Every model call here is real HTTP to tests/model_server.py; nothing is patched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusion_cli.cli import cli
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage
from tests.model_server import Reply, closed_port_url, final, model_server, tool_call  # noqa: F401

U, A = ChatMessage.user, ChatMessage.assistant
KEY = "sk-test-SECRET123"


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"file:{tmp_path / 'sessions'}"


@pytest.fixture
def send(model_server, store_url):
    """send(*args, input=..., env=..., group=[...]) -> click Result, pointed at the model server."""

    def run(*args: str, input: str | bytes | None = None, env: dict | None = None, group=()):
        full_env = {"FUSION_STORAGE": store_url, "FUSION_PROVIDER": "openai",
                    "FUSION_BASE_URL": model_server.openai_url, **(env or {})}
        return CliRunner().invoke(cli, [*group, "send", *args], input=input, env=full_env,
                                  catch_exceptions=False)
    return run


@pytest.fixture
def run_fusion(fusion_env, store_url):
    """A real `python -m fusion_cli` process with FUSION_STORAGE in a tmp dir."""

    def run(*args: str, input: bytes | None = None, env: dict | None = None, cwd=None, stdin=None):
        return subprocess.run([sys.executable, "-m", "fusion_cli", *args], input=input, stdin=stdin,
                              env={**fusion_env, "FUSION_STORAGE": store_url, **(env or {})},
                              capture_output=True, cwd=cwd, timeout=120)
    return run


def history(store_url: str, sid: str = "default") -> list[ChatMessage]:
    return open_storage(store_url).load(sid)


# ---- the loop through the command -------------------------------------------

def test_a_direct_answer(send, store_url, model_server):
    model_server.reply_final("Hello!")
    result = send("-s", "a", "hi", "there")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "Hello!\n", "")
    stored = history(store_url, "a")
    assert [m.role for m in stored] == ["system", "user", "assistant"]
    assert stored[1:] == [U("hi there"), A(final("Hello!"))]


def test_a_tool_call_then_a_final_answer(send, store_url, model_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("buy milk")
    model_server.reply_tool("read_file", {"path": "notes.txt"})
    model_server.reply_final("Your notes say: buy milk")
    result = send("--json", "what do my notes say?")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"result": "Your notes say: buy milk", "success": True, "steps": [
        {"thought": "I need a tool.", "action": "read_file", "input": {"path": "notes.txt"},
         "observation": "buy milk"},
        {"thought": "I can answer now.", "action": None, "input": None, "observation": None}]}
    assert model_server.requests[1].messages[-1] == {"role": "user", "content": "Observation: buy milk"}
    assert [m.role for m in history(store_url)] == ["system", "user", "assistant", "user", "assistant"]
    # one httpx.Client for the invocation: both steps on one connection
    assert model_server.requests[0].client_port == model_server.requests[1].client_port


def test_verbose_shows_each_step_on_stderr(send, model_server):
    model_server.reply_tool("list_directory", {"path": "."})
    model_server.reply_final("done")
    result = send("look around", group=["-v"])
    assert result.stdout == "done\n"
    assert 'fusion: step 1: list_directory {"path":"."}' in result.stderr
    assert "fusion: step 1: observation: " in result.stderr
    assert "fusion: step 2: I can answer now." in result.stderr


def test_json_inside_other_text_and_plain_text_replies(send, store_url, model_server):
    inner = '{"thought": "t", "action": null, "is_final": true, "final_answer": "inside"}'
    model_server.reply_text(f"Sure! ```json\n{inner}\n``` Hope that helps.")
    assert send("one").stdout == "inside\n"
    assert history(store_url)[-1] == A(inner)
    model_server.reply_text("Just plain words.\n")
    assert send("two").stdout == "Just plain words.\n"
    assert history(store_url)[-1] == A("Just plain words.")


def test_an_unknown_tool_is_fed_back_not_a_crash(send, model_server):
    model_server.reply_tool("teleport", {"to": "mars"})
    model_server.reply_final("I cannot teleport.")
    result = send("go to mars")
    assert (result.exit_code, result.stdout) == (0, "I cannot teleport.\n")
    observation = model_server.requests[1].messages[-1]["content"]
    assert observation.startswith("Observation: Error: there is no tool 'teleport'")


def test_a_disabled_tool_says_how_to_enable_it(send, model_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_server.reply_tool("write_file", {"path": "x.txt", "content": "x"})
    model_server.reply_final("not allowed")
    assert send("write x").exit_code == 0
    assert "--allow write_file" in model_server.requests[1].messages[-1]["content"]
    assert not (tmp_path / "x.txt").exists()
    model_server.reply_tool("write_file", {"path": "x.txt", "content": "x"})
    model_server.reply_final("written")
    assert send("--allow", "write_file", "write x").stdout == "written\n"
    assert (tmp_path / "x.txt").read_text() == "x"


def test_an_unknown_allow_name_is_a_usage_error(send, model_server):
    result = send("--allow", "nuke", "hi")
    assert result.exit_code == 2 and "unknown tool 'nuke' for --allow" in result.stderr
    assert model_server.requests == []


def test_max_iterations_exits_1_and_the_turn_is_committed(send, store_url, model_server):
    model_server.responder = lambda request: Reply(content=tool_call("list_directory", {}))
    result = send("--max-iterations", "2", "loop forever")
    assert (result.exit_code, result.stdout) == (1, "")
    assert "the agent stopped after 2 steps without a final answer; the turn was saved" in result.stderr
    assert len(model_server.requests) == 2
    assert [m.role for m in history(store_url)] == ["system", "user"] + ["assistant", "user"] * 2
    as_json = send("--json", "again", env={"FUSION_MAX_ITERATIONS": "1"})
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["success"] is False


def test_a_429_is_retried_after_its_retry_after(send, model_server):
    model_server.reply_error(429, "slow down", headers={"Retry-After": "1"})
    model_server.reply_final("made it")
    result = send("hi", group=["-v"])
    assert (result.exit_code, result.stdout) == (0, "made it\n")
    first, second = model_server.requests
    assert second.time - first.time >= 0.95
    assert "HTTP 429 from " in result.stderr and "retrying in 1.0 s (retry 1 of 3)" in result.stderr


def test_500_until_the_retries_run_out(send, store_url, model_server):
    model_server.reply_final("first answer")
    assert send("-s", "s", "first").exit_code == 0
    before = history(store_url, "s")
    model_server.responder = lambda request: Reply(status=500, body={"error": {"message": "kaboom"}})
    result = send("-s", "s", "please keep\nthis message")
    assert (result.exit_code, result.stdout) == (4, "")
    assert "answered HTTP 500: kaboom (gave up after 4 attempts)" in result.stderr
    assert result.stderr.endswith("fusion: your message was not sent; here it is:\nplease keep\nthis message\n")
    assert len(model_server.requests) == 1 + 4
    assert history(store_url, "s") == before


def test_a_request_slower_than_the_timeout(send, store_url, model_server):
    model_server.reply(Reply(content=final("too late"), delay=3))
    model_server.reply_final("on time")
    assert send("--timeout", "0.5", "hi").stdout == "on time\n"  # retried after the time-out
    model_server.responder = lambda request: Reply(content=final("too late"), delay=3)
    result = send("--timeout", "0.5", "again")
    assert result.exit_code == 4
    assert "did not answer within 0.5 s (gave up after 4 attempts)" in result.stderr
    assert "FUSION_TIMEOUT" in result.stderr
    assert len(history(store_url)) == 3  # only the first turn


def test_response_format_refused_then_dropped(send, model_server):
    model_server.reply_error(400, "response_format is not supported by this server")
    model_server.reply_tool("list_directory", {})
    model_server.reply_final("ok")
    assert send("hi").stdout == "ok\n"
    assert ["response_format" in r.body for r in model_server.requests] == [True, False, False]


def test_each_turn_sends_the_whole_history(send, store_url, model_server):
    for answer in ("a1", "a2", "a3"):
        model_server.reply_final(answer)
    send("one")
    send("two")
    before = history(store_url)
    send("three")
    assert model_server.requests[2].messages == [m.to_dict() for m in before] + [
        {"role": "user", "content": "three"}]


def test_system_applies_to_a_new_session_only(send, store_url, model_server):
    model_server.reply_final("a")
    model_server.reply_final("b")
    assert send("--system", "You are a pirate.", "hi").stderr == ""
    assert history(store_url)[0].content.startswith("You are a pirate.\n")
    result = send("--system", "You are a parrot.", "hi")
    assert "--system applies to a new session only" in result.stderr
    assert history(store_url)[0].content.startswith("You are a pirate.\n")


def test_flag_over_env_over_config_file(send, model_server, tmp_path):
    config = tmp_path / "fusion.toml"
    config.write_text('model = "from-file"\ntemperature = 0.5\n')
    for _ in range(3):
        model_server.reply_final("ok")
    send("hi", env={"FUSION_CONFIG": str(config)})
    send("hi", env={"FUSION_CONFIG": str(config), "FUSION_MODEL": "from-env"})
    send("--model", "from-flag", "--temperature", "0", "hi",
         env={"FUSION_CONFIG": str(config), "FUSION_MODEL": "from-env"})
    sent = [(r.body["model"], r.body["temperature"]) for r in model_server.requests]
    assert sent == [("from-file", 0.5), ("from-env", 0.5), ("from-flag", 0.0)]


def test_the_api_key_is_never_a_flag(send):
    result = send("--api-key", KEY, "hi")
    assert result.exit_code == 2 and "No such option" in result.stderr


# ---- the API key --------------------------------------------------------------

@pytest.mark.parametrize("provider, variable", [("openai", "OPENAI_API_KEY"), ("openai", "FUSION_API_KEY"),
                                                ("anthropic", "ANTHROPIC_API_KEY")])
def test_the_api_key_reaches_the_server_and_nowhere_else(run_fusion, model_server, tmp_path, store_url,
                                                         provider, variable):
    work = tmp_path / "work"
    work.mkdir()
    (work / ".env").write_text(f"{variable}={KEY}\n")
    base_url = model_server.url if provider == "anthropic" else model_server.openai_url
    env = {variable: KEY, "FUSION_PROVIDER": provider, "FUSION_BASE_URL": base_url}
    model_server.reply_tool("read_file", {"path": ".env"})
    model_server.reply_tool("execute_shell", {"command": "env"})
    model_server.reply_final(f"Your key is {KEY}")
    ok = run_fusion("-v", "send", "--allow", "execute_shell", "what is my key?", env=env, cwd=work)
    model_server.reply_error(401, f"Incorrect API key provided: {KEY}")
    failed = run_fusion("-v", "send", "again", env=env, cwd=work)
    assert ok.returncode == 0 and failed.returncode == 4
    assert b"Traceback" in failed.stderr  # -v shows it, without the key
    shown = ok.stdout + ok.stderr + failed.stdout + failed.stderr
    stored = b"".join(p.read_bytes() for p in Path(store_url[5:]).rglob("*") if p.is_file())
    assert KEY.encode() not in shown and KEY.encode() not in stored
    assert b"***" in ok.stdout
    header = "x-api-key" if provider == "anthropic" else "authorization"
    assert all(KEY in r.headers[header] for r in model_server.requests)


# ---- stdin and arguments, in a real process ------------------------------------

def test_messages_from_stdin_and_arguments(run_fusion, model_server, store_url, tmp_path):
    model_server.responder = lambda request: Reply(content=final("ok"))
    env = {"FUSION_PROVIDER": "openai", "FUSION_BASE_URL": model_server.openai_url}
    piped = run_fusion("send", "-s", "pipe", input=b"Remember:\n  keep  spaces \n\n", env=env)
    assert (piped.returncode, piped.stdout) == (0, b"ok\n")
    dash = run_fusion("send", "-s", "dash", "-", input=b"from dash\n", env=env)
    args = run_fusion("send", "-s", "args", "hello", "  world", input=b"not read", env=env)
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes("caf\u00e9\r\nline two\r\n".encode())
    with prompt.open("rb") as f:
        redirected = run_fusion("send", "-s", "file", stdin=f, env=env)
    assert all(p.returncode == 0 for p in (dash, args, redirected))
    assert history(store_url, "pipe")[1] == U("Remember:\n  keep  spaces \n")  # one newline less
    assert history(store_url, "dash")[1] == U("from dash")
    assert history(store_url, "args")[1] == U("hello   world")
    assert history(store_url, "file")[1] == U("caf\u00e9\r\nline two")
    assert [r.messages[-1]["content"] for r in model_server.requests][0] == "Remember:\n  keep  spaces \n"


@pytest.mark.parametrize("stdin, expected", [(b"", "the message is empty"), (b" \n\t\n", "the message is empty"),
                                             (b"caf\xe9\n", "not valid UTF-8")])
def test_bad_messages_exit_2_before_any_request(run_fusion, model_server, store_url, stdin, expected):
    env = {"FUSION_PROVIDER": "openai", "FUSION_BASE_URL": model_server.openai_url}
    result = run_fusion("send", "-s", "x", input=stdin, env=env)
    assert result.returncode == 2 and expected in result.stderr.decode()
    assert result.stdout == b"" and model_server.requests == [] and history(store_url, "x") == []


def test_unreachable_endpoint_says_what_to_set(run_fusion, store_url):
    result = run_fusion("send", "-s", "u", input=b"my precious prompt\n",
                        env={"FUSION_BASE_URL": closed_port_url()})
    err = result.stderr.decode()
    assert (result.returncode, result.stdout) == (4, b"")
    assert "cannot reach the model at http://127.0.0.1:" in err
    for needed in ("OPENAI_API_KEY", "ollama serve", "FUSION_BASE_URL", "--provider echo", "FUSION_PROVIDER=echo"):
        assert needed in err
    assert err.endswith("your message was not sent; here it is:\nmy precious prompt\n")
    assert history(store_url, "u") == []


# ---- the echo provider -------------------------------------------------------

PROBE = """
import sys
from fusion_cli.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("httpx loaded:", "httpx" in sys.modules, file=sys.stderr)
"""


def test_echo_end_to_end_offline(run_fusion, fusion_env, store_url):
    env = {"FUSION_PROVIDER": "echo"}
    first = run_fusion("send", "-s", "demo", "Remember: my name is Alice", env=env)
    second = subprocess.run([sys.executable, "-c", PROBE, "send", "-s", "demo", "What is my name?"],
                            env={**fusion_env, "FUSION_STORAGE": store_url, **env}, capture_output=True,
                            timeout=60)
    assert first.stdout == b"Echo: Remember: my name is Alice (I was given 0 earlier messages of this session.)\n"
    assert second.stdout == b"Echo: What is my name? (I was given 2 earlier messages of this session.)\n"
    assert b"httpx loaded: False" in second.stderr
    assert [m.role for m in history(store_url, "demo")] == ["system", "user", "assistant", "user", "assistant"]


# ---- Anthropic through the command --------------------------------------------

def test_anthropic_end_to_end(send, model_server):
    env = {"FUSION_PROVIDER": "anthropic", "FUSION_BASE_URL": model_server.url, "ANTHROPIC_API_KEY": "k"}
    model_server.reply_tool("list_directory", {})
    assert send("--max-iterations", "1", "look", env=env).exit_code == 1  # ends on an observation
    model_server.reply_final("Bonjour")
    assert send("hello", env=env).stdout == "Bonjour\n"
    body = model_server.requests[-1].body
    assert model_server.requests[-1].path == "/v1/messages"
    assert body["system"].startswith("You are an autonomous agent.")
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][2]["content"].startswith("Observation: ")
    assert body["messages"][2]["content"].endswith("\n\nhello")  # merged with the new message


# ---- the seed's pattern 2, and concurrency, across processes ------------------

@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_persistent_session_across_processes(run_fusion, model_server, tmp_path, kind):
    if kind == "sqlite":
        pytest.importorskip("fusion_cli.storage.sqlite", reason="the sqlite backend is not there yet")
    url = f"file:{tmp_path / 'files'}" if kind == "file" else f"sqlite:{tmp_path / 'fusion.db'}"
    env = {"FUSION_STORAGE": url, "FUSION_PROVIDER": "openai", "FUSION_BASE_URL": model_server.openai_url}
    model_server.reply_final("Nice to meet you, Alice.")
    model_server.reply_final("Your name is Alice.")
    first = run_fusion("send", "-s", "user-123", "Remember: my name is Alice", env=env)
    second = run_fusion("send", "-s", "user-123", "What is my name?", env=env)
    assert (first.returncode, second.returncode) == (0, 0)
    assert second.stdout == b"Your name is Alice.\n"
    earlier = model_server.requests[1].messages[1:3]
    assert earlier == [{"role": "user", "content": "Remember: my name is Alice"},
                       {"role": "assistant", "content": final("Nice to meet you, Alice.")}]


def test_two_sends_to_one_session_run_one_after_the_other(fusion_env, model_server, store_url):
    counter = iter(range(1, 100))
    guard = threading.Lock()

    def slow_answer(request):
        with guard:
            n = next(counter)
        return Reply(content=final(f"answer-{n}"), delay=0.5)

    model_server.responder = slow_answer
    env = {**fusion_env, "FUSION_STORAGE": store_url, "FUSION_PROVIDER": "openai",
           "FUSION_BASE_URL": model_server.openai_url}
    procs = [subprocess.Popen([sys.executable, "-m", "fusion_cli", "send", "-s", "shared", f"from {who}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for who in "AB"]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sorted(out for out, _ in outputs) == [b"answer-1\n", b"answer-2\n"]
    stored = history(store_url, "shared")
    assert [m.role for m in stored] == ["system", "user", "assistant", "user", "assistant"]
    assert {stored[1].content, stored[3].content} == {"from A", "from B"}
    assert [stored[2].content, stored[4].content] == [final("answer-1"), final("answer-2")]
    second = model_server.requests[1].messages
    assert second[:3] == [m.to_dict() for m in stored[:3]]  # it saw the first turn's answer
