"""A sessions directory written as the original Rust tool writes it (serde_json's
pretty printer) is read, and what fusion writes back is the same bytes."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from fusion_cli.cli import cli

# Written by hand in serde_json::to_string_pretty's layout: two-space indent,
# raw UTF-8, "\u001f"-style escapes for control characters, no trailing newline.
SEED_FILES = {
    "user-123": (
        '[\n'
        '  {\n'
        '    "role": "system",\n'
        '    "content": "You are an autonomous agent...\\nTools: read_file"\n'
        '  },\n'
        '  {\n'
        '    "role": "user",\n'
        '    "content": "What files are in /tmp?"\n'
        '  },\n'
        '  {\n'
        '    "role": "assistant",\n'
        '    "content": "{\\"thought\\": \\"I need to list files\\", \\"is_final\\": false}"\n'
        '  },\n'
        '  {\n'
        '    "role": "user",\n'
        '    "content": "Observation: file1.txt, file2.txt\\u001f héllo 你好 🎉\\t\\""\n'
        '  }\n'
        ']'
    ),
    "session-abc": '[\n  {\n    "role": "user",\n    "content": "hi"\n  }\n]',
    "user-456": "[]",
}


@pytest.fixture
def seed_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sessions"
    d.mkdir()
    for sid, text in SEED_FILES.items():
        (d / f"{sid}.json").write_bytes(text.encode())
    return d


def run(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_list_count_show(seed_dir):
    assert run("--storage", str(seed_dir), "list").splitlines() == ["session-abc", "user-123", "user-456"]
    assert run("--storage", f"file:{seed_dir}", "count", "-s", "user-123") == "4\n"
    shown = orjson.loads(run("--storage", str(seed_dir), "show", "-s", "user-123", "--json"))
    assert shown == orjson.loads(SEED_FILES["user-123"])


def test_compact_layout_is_read_too(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "x.json").write_text('[{"role":"user","content":"a"},{"content":"b","role":"assistant"}]')
    assert orjson.loads(run("--storage", str(d), "show", "-s", "x", "--json")) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


@pytest.mark.parametrize("via", ["sqlite", "redis"])
def test_migrated_away_and_back_byte_for_byte(seed_dir, tmp_path, make_url, via):
    middle, back = make_url(via), tmp_path / "back"
    run("migrate", "--from", str(seed_dir), "--to", middle)
    assert run("--storage", middle, "count", "-s", "user-123") == "4\n"
    run("migrate", "--from", middle, "--to", f"file:{back}")
    for sid, text in SEED_FILES.items():
        assert (back / f"{sid}.json").read_bytes() == text.encode(), sid


def test_fusion_writes_the_seed_layout(tmp_path):
    from fusion_cli.messages import decode_history
    from fusion_cli.storage import open_storage

    store = open_storage(str(tmp_path))
    for sid, text in SEED_FILES.items():
        store.save(sid, decode_history(text.encode(), sid))
        assert (tmp_path / f"{sid}.json").read_bytes() == text.encode()
