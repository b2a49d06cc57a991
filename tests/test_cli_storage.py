"""The storage commands through CliRunner: output shapes, exit codes, error lines."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import orjson
import pytest
from click.testing import CliRunner

from fusion_cli.cli import cli
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage

U, A = ChatMessage.user, ChatMessage.assistant


@pytest.fixture
def url(tmp_path):
    url = f"file:{tmp_path / 'store'}"
    store = open_storage(url)
    store.save("alice", [U("hi"), A("hello")])
    store.save("bob", [U("yo")])
    return url


def invoke(*args: str, env=None):
    return CliRunner().invoke(cli, list(args), env=env)


def test_list_and_json(url):
    assert invoke("--storage", url, "list").stdout == "alice\nbob\n"
    lines = [orjson.loads(line) for line in invoke("--storage", url, "list", "--json").stdout.splitlines()]
    assert [(d["id"], d["messages"]) for d in lines] == [("alice", 2), ("bob", 1)]
    assert all(d["updated"].endswith("Z") for d in lines)


def test_list_of_an_empty_store_prints_nothing(tmp_path):
    result = invoke("--storage", str(tmp_path / "none"), "list")
    assert (result.exit_code, result.stdout) == (0, "")
    assert not (tmp_path / "none").exists()  # a read creates nothing


def test_count(url):
    assert invoke("--storage", url, "count", "-s", "alice").stdout == "2\n"
    assert invoke("--storage", url, "count", "-s", "nobody").stdout == "0\n"
    assert orjson.loads(invoke("--storage", url, "count", "-s", "bob", "--json").stdout) == {
        "session": "bob", "count": 1}


def test_session_from_env_then_default(url):
    assert invoke("--storage", url, "count", env={"FUSION_SESSION": "alice"}).stdout == "2\n"
    open_storage(url).save("default", [U("d")])
    assert invoke("--storage", url, "count").stdout == "1\n"
    assert invoke("count", env={"FUSION_STORAGE": url, "FUSION_SESSION": "bob"}).stdout == "1\n"


def test_show(url):
    assert invoke("--storage", url, "show", "-s", "alice").stdout == "[user]\nhi\n\n[assistant]\nhello\n"
    assert orjson.loads(invoke("--storage", url, "show", "-s", "alice", "--json").stdout) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    missing = invoke("--storage", url, "show", "-s", "nobody")
    assert (missing.exit_code, missing.stdout) == (0, "")


def test_clear(url):
    assert invoke("--storage", url, "clear", "-s", "alice").exit_code == 0
    assert invoke("--storage", url, "list").stdout == "bob\n"
    assert invoke("--storage", url, "clear", "-s", "alice").exit_code == 0  # idempotent


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "", "CON", "x" * 129])
def test_bad_session_id_exits_2_before_any_io(tmp_path, bad):
    store_dir = tmp_path / "never"
    for command in ("count", "show", "clear"):
        result = invoke("--storage", str(store_dir), command, "-s", bad)
        assert result.exit_code == 2, command
        assert result.stderr.startswith("fusion: error: invalid session id")
        assert result.stdout == ""
    assert not store_dir.exists()


def test_bad_id_refused_before_contacting_a_server():
    # Port 1 is closed: a connection attempt would give exit 3, not 2.
    result = invoke("--storage", "redis://127.0.0.1:1/0", "count", "-s", "../x")
    assert result.exit_code == 2


def test_unknown_scheme_exits_2():
    result = invoke("--storage", "nosuch://x", "list")
    assert result.exit_code == 2
    assert "unknown storage scheme 'nosuch'" in result.stderr


def test_corrupt_file_exits_3_names_the_file_and_is_kept(tmp_path, url):
    path = tmp_path / "store" / "bad.json"
    for junk in (b"{not json", b'{"role": "user"}', b'[{"role": "user"}]', b"\xff\xfe[]"):
        path.write_bytes(junk)
        for command in ("count", "show"):
            result = invoke("--storage", url, command, "-s", "bad")
            assert result.exit_code == 3
            assert str(path) in result.stderr and "corrupt" in result.stderr
            assert "Traceback" not in result.stderr
        assert path.read_bytes() == junk
    # the other sessions keep working
    assert invoke("--storage", url, "count", "-s", "alice").stdout == "2\n"
    listing = [orjson.loads(x) for x in invoke("--storage", url, "list", "--json").stdout.splitlines()]
    assert [d["id"] for d in listing] == ["alice", "bad", "bob"]
    assert listing[1]["messages"] is None and "corrupt" in listing[1]["error"]


def test_verbose_shows_the_traceback(tmp_path):
    (tmp_path / "bad.json").write_text("nope")
    result = invoke("--storage", str(tmp_path), "-v", "count", "-s", "bad")
    assert result.exit_code == 3 and "Traceback" in result.stderr


def test_busy_session_times_out_with_exit_3_and_changes_nothing(url):
    store = open_storage(url)
    held, release = threading.Event(), threading.Event()

    def holder():
        with store.lock("alice"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        result = invoke("--storage", url, "--lock-timeout", "0.3", "clear", "-s", "alice")
    finally:
        release.set()
        t.join()
    assert result.exit_code == 3
    assert "waiting for its lock" in result.stderr and "busy" in result.stderr
    assert store.count("alice") == 2


def test_files_are_private(tmp_path):
    store_dir = tmp_path / "private"
    open_storage(str(store_dir)).save("s", [U("secret")])
    assert stat.S_IMODE(os.stat(store_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store_dir / "s.json").st_mode) == 0o600


def test_default_store_is_in_the_data_directory(isolated_env):
    open_storage(f"file:{isolated_env / 'data' / 'fusion' / 'sessions'}").save("s", [U("x")])
    assert invoke("list").stdout == "s\n"


def test_bad_setting_values_exit_2(url):
    result = invoke("--storage", url, "count", env={"FUSION_LOCK_TIMEOUT": "soon"})
    assert result.exit_code == 2 and "FUSION_LOCK_TIMEOUT" in result.stderr


def test_config_file(tmp_path, url):
    cfg = tmp_path / "fusion.toml"
    cfg.write_text(f'storage = "{url}"\nsession = "alice"\n')
    assert invoke("--config", str(cfg), "count").stdout == "2\n"
    assert invoke("count", env={"FUSION_CONFIG": str(cfg), "FUSION_SESSION": "bob"}).stdout == "1\n"
    cfg.write_text("storage = [")
    assert invoke("--config", str(cfg), "count").exit_code == 2
    cfg.write_text('colour = "red"\n')
    bad = invoke("--config", str(cfg), "count")
    assert bad.exit_code == 2 and "unknown keys: colour" in bad.stderr
    assert invoke("--config", str(tmp_path / "missing.toml"), "count").exit_code == 2


def test_python_dash_m_works_like_fusion(url):
    proc = subprocess.run([sys.executable, "-m", "fusion_cli", "--storage", url, "list"],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "alice\nbob\n")
    version = subprocess.run([sys.executable, "-m", "fusion_cli", "--version"],
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("fusion, version ")


def test_every_command_has_help():
    for name, command in cli.commands.items():
        assert command.help, name
        result = invoke(name, "--help")
        assert result.exit_code == 0 and "Usage:" in result.stdout
