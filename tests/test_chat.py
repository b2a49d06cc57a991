"""`fusion chat`: the seed's REPL, driven through stdin that is not a terminal."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from fusion_cli.cli import cli
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage
from tests.model_server import model_server  # noqa: F401


def chat(store_url: str, lines: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["--storage", store_url, "chat", "-s", "repl"], input=lines,
                              env=env, catch_exceptions=False)


def test_a_scripted_chat(model_server, tmp_path):
    store_url = f"file:{tmp_path / 's'}"
    open_storage(store_url).save("repl", [ChatMessage.user("old"), ChatMessage.assistant("older")])
    model_server.reply_final("Hi!")
    env = {"FUSION_PROVIDER": "openai", "FUSION_BASE_URL": model_server.openai_url}
    result = chat(store_url, "/count\n/clear\n/count\nhello\n/count\n/help\n/bogus\n\n/exit\nnever sent\n", env)
    assert result.exit_code == 0
    assert result.stdout == "Messages: 2\nMessages: 0\nHi!\nMessages: 3\n"
    assert "fusion: history cleared" in result.stderr
    assert "/count  the number of messages" in result.stderr  # /help
    assert "unknown command /bogus" in result.stderr
    assert len(model_server.requests) == 1
    assert model_server.requests[0].messages[-1] == {"role": "user", "content": "hello"}
    assert [m.role for m in open_storage(store_url).load("repl")] == ["system", "user", "assistant"]


def test_each_line_is_a_committed_turn_and_end_of_input_exits_0(model_server, tmp_path):
    store_url = f"file:{tmp_path / 's'}"
    model_server.reply_final("one")
    model_server.reply_final("two")
    env = {"FUSION_PROVIDER": "openai", "FUSION_BASE_URL": model_server.openai_url}
    result = chat(store_url, "first\nsecond", env)  # no /exit, no final newline
    assert (result.exit_code, result.stdout) == (0, "one\ntwo\n")
    assert model_server.requests[1].messages[-3:] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": open_storage(store_url).load("repl")[2].content},
        {"role": "user", "content": "second"}]


def test_a_failed_turn_is_reported_and_the_chat_goes_on(model_server, tmp_path):
    store_url = f"file:{tmp_path / 's'}"
    model_server.reply_error(400, "model 'x' not found")
    model_server.reply_final("recovered")
    env = {"FUSION_PROVIDER": "openai", "FUSION_BASE_URL": model_server.openai_url}
    result = chat(store_url, "lost\nkept\n/count\n", env)
    assert result.exit_code == 0
    assert result.stdout == "recovered\nMessages: 3\n"
    assert "HTTP 400: model 'x' not found" in result.stderr and "that message was not sent" in result.stderr
    assert [m.content for m in open_storage(store_url).load("repl")][1] == "kept"


def test_chat_with_echo_in_a_real_process(fusion_env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fusion_cli", "--storage", str(tmp_path / "s"), "chat",
                           "--provider", "echo"], input=b"hi\nhow many?\n/count\n", env=fusion_env,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == [
        "Echo: hi (I was given 0 earlier messages of this session.)",
        "Echo: how many? (I was given 2 earlier messages of this session.)",
        "Messages: 5"]
