"""The README is the manual: every shell block marked `<!-- runnable -->` is run here,
against the offline echo provider and a private store, so the manual cannot drift."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _delete_redis_prefix, require_redis

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"<!-- runnable -->\n```sh\n(.*?)```", README, re.S)
BIN = Path(sys.executable).parent


def test_the_readme_has_runnable_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block(index, tmp_path):
    if "redis://" in "".join(BLOCKS[: index + 1]):
        require_redis()
    assert (BIN / "fusion").exists(), "fusion is not installed in this environment"
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "FUSION_PROVIDER": "echo",
           "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "LANG": os.environ.get("LANG", "C.UTF-8")}
    # Each block runs after the ones before it, as a reader would type them.
    script = "set -eu\n" + "".join(f"{block}\n" for block in BLOCKS[:index]) + ": BLOCK\n" + BLOCKS[index]
    # The README's Redis prefix, made private to this run so parallel runs cannot collide.
    prefix = f"fusion-readme-{os.urandom(4).hex()}:"
    script = script.replace("fusion-readme:", prefix)
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
    finally:
        if prefix in script:
            _delete_redis_prefix(prefix)
    assert proc.returncode == 0, f"block {index} failed:\n{BLOCKS[index]}\n--- stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
