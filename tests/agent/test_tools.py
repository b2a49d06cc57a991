"""The built-in tools: enabling, input checks, the root directory, time limits, truncation."""

from __future__ import annotations

import os
import sys

import pytest

from fusion_cli.agent.tools import Tool, Toolbox
from fusion_cli.errors import UsageError


@pytest.fixture
def root(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "a.txt").write_text("hello\n")
    (tmp_path / "work" / "sub").mkdir()
    (tmp_path / "secret.txt").write_text("outside")
    return tmp_path / "work"


def test_read_only_tools_are_on_by_default(root):
    box = Toolbox(root=root)
    assert box.run("read_file", {"path": "a.txt"}) == "hello\n"
    assert box.run("list_directory", {}) == "a.txt\nsub/"
    for tool in ("write_file", "http_get", "execute_shell"):
        observation = box.run(tool, {})
        assert f"the tool {tool!r} is not enabled" in observation
        assert f"--allow {tool}" in observation and "--allow all" in observation


def test_allow_enables_tools_and_refuses_unknown_names(root):
    assert Toolbox(["write_file"], root).enabled == {"read_file", "list_directory", "write_file"}
    assert Toolbox(["all"], root).enabled == set(Toolbox(root=root).tools)
    assert Toolbox(["http_get,execute_shell"], root).enabled >= {"http_get", "execute_shell"}
    with pytest.raises(UsageError, match="unknown tool 'rm_rf' for --allow"):
        Toolbox(["rm_rf"], root)


def test_an_unknown_tool_is_an_observation_listing_the_usable_ones(root):
    observation = Toolbox(root=root).run("delete_everything", {})
    assert "there is no tool 'delete_everything'" in observation
    assert "read_file, list_directory" in observation


@pytest.mark.parametrize("value, problem", [
    ({}, "missing required field 'path'"),
    ({"path": 3}, "field 'path' must be a string"),
    ([1], "must be a JSON object"),
])
def test_invalid_input_is_an_observation_with_the_schema(root, value, problem):
    observation = Toolbox(root=root).run("read_file", value)
    assert problem in observation and '"required":["path"]' in observation


def test_a_bare_string_is_taken_as_the_one_required_field(root):
    assert Toolbox(root=root).run("read_file", "a.txt") == "hello\n"


@pytest.mark.parametrize("path", ["../secret.txt", "sub/../../secret.txt", "/etc/passwd"])
def test_file_tools_stay_inside_the_root(root, path):
    box = Toolbox(["write_file"], root)
    for tool, args in [("read_file", {"path": path}), ("list_directory", {"path": path}),
                       ("write_file", {"path": path, "content": "x"})]:
        assert "is outside the directory the tools may use" in box.run(tool, args)
    assert (root.parent / "secret.txt").read_text() == "outside"


def test_symlinks_are_resolved_before_the_check(root):
    (root / "link").symlink_to(root.parent / "secret.txt")
    (root / "dirlink").symlink_to(root.parent)
    box = Toolbox(["write_file"], root)
    assert "outside" in box.run("read_file", {"path": "link"})
    assert "outside" in box.run("write_file", {"path": "dirlink/new.txt", "content": "x"})
    assert not (root.parent / "new.txt").exists()
    assert (root.parent / "secret.txt").read_text() == "outside"


def test_write_file(root):
    box = Toolbox(["write_file"], root)
    assert box.run("write_file", {"path": "new/b.txt", "content": "x\r\ny"}) == "Wrote 4 characters to new/b.txt"
    assert (root / "new" / "b.txt").read_bytes() == b"x\r\ny"


def test_read_file_errors_are_observations(root):
    box = Toolbox(root=root)
    assert "not found" in box.run("read_file", {"path": "nope.txt"})
    assert "a directory" in box.run("read_file", {"path": "sub"})
    (root / "bin").write_bytes(b"\x00\x01")
    assert "binary file" in box.run("read_file", {"path": "bin"})


def test_large_output_is_truncated_and_says_so(root):
    (root / "big.txt").write_text("x" * 5000)
    observation = Toolbox(root=root, max_output=1000).run("read_file", {"path": "big.txt"})
    assert observation.startswith("x" * 1000)
    assert "[truncated: showing the first 1000 of 5000 bytes]" in observation

    def chatty(args, ctx):
        return "y" * 5000

    box = Toolbox(["all"], root, tools=[Tool("chatty", "talks", {"type": "object"}, chatty)], max_output=1000)
    assert "[truncated: showing the first 1000 of 5000 characters]" in box.run("chatty", {})


def test_every_tool_has_a_time_limit(root):
    import time

    def slow(args, ctx):
        time.sleep(5)
        return "done"

    box = Toolbox(root=root, tools=[Tool("slow", "sleeps", {"type": "object"}, slow)], time_limit=0.2)
    assert box.run("slow", {}) == "Error: slow did not finish within 0.2 s and was abandoned."


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell")
def test_execute_shell(root, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET123")
    box = Toolbox(["execute_shell"], root, time_limit=0.5)
    assert box.run("execute_shell", {"command": "echo out; echo err >&2; exit 3"}) == "exit code 3\nout\nerr\n"
    assert "SECRET123" not in box.run("execute_shell", {"command": "env"})  # no key in its environment
    assert box.run("execute_shell", {"command": "pwd"}) == f"exit code 0\n{root.resolve()}\n"
    assert "did not finish within 0.5 s and was killed" in box.run("execute_shell", {"command": "sleep 30"})


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell")
def test_execute_shell_keeps_only_the_start_of_a_flood(root):
    box = Toolbox(["execute_shell"], root, max_output=100)
    observation = box.run("execute_shell", {"command": "head -c 1000000 /dev/zero | tr '\\0' x"})
    assert observation.startswith("exit code 0\n" + "x" * 100)
    assert "[truncated: showing the first 100 bytes of the output]" in observation


def test_http_get(root, model_server):
    model_server.pages["/page"] = (200, "text/plain", b"some text")
    box = Toolbox(["http_get"], root)
    assert box.run("http_get", {"url": model_server.url + "/page"}) == "HTTP 200 text/plain\n\nsome text"
    assert box.run("http_get", {"url": model_server.url + "/missing"}).startswith("HTTP 404")
    assert "not an http:// or https:// URL" in box.run("http_get", {"url": "file:///etc/passwd"})


def test_http_get_failure_is_an_observation(root):
    from tests.model_server import closed_port_url

    observation = Toolbox(["http_get"], root).run("http_get", {"url": closed_port_url()})
    assert observation.startswith("Error: GET http://127.0.0.1:") and "ConnectError" in observation


def test_the_default_root_is_the_working_directory(root, monkeypatch):
    monkeypatch.chdir(root)
    assert Toolbox().context.root == root.resolve()
    assert os.path.samefile(Toolbox().context.root, os.getcwd())
