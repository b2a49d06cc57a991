"""Start-up guard: the storage commands load no HTTP, Redis, PostgreSQL, TOML or agent code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = ("httpx", "redis", "psycopg", "tomllib", "fusion_cli.agent", "fusion_cli.llm",
             "sqlite3", "tempfile", "asyncio")  # (json: orjson itself loads it)

PROBE = """
import sys
from fusion_cli.cli import main
code = None
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
modules = sorted(sys.modules)
import json
print(json.dumps({"code": code, "modules": modules}), file=sys.stderr)
"""


def loaded_modules(args: list[str], tmp_path: Path) -> set[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          env=env, timeout=60)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None), proc.stderr
    return set(report["modules"])


@pytest.mark.parametrize("command", [["count"], ["list"], ["clear"], ["show"], ["--version"]])
@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_storage_commands_import_only_what_they_use(command, kind, tmp_path):
    url = f"file:{tmp_path / 's'}" if kind == "file" else f"sqlite:{tmp_path / 's.db'}"
    modules = loaded_modules(["--storage", url, *command], tmp_path)
    allowed_here = {"sqlite3"} if kind == "sqlite" and command != ["--version"] else set()
    bad = sorted(m for m in modules
                 if any(m == f or m.startswith(f + ".") for f in FORBIDDEN if f not in allowed_here))
    assert bad == []


@pytest.mark.parametrize("kind,driver,other", [("redis", "redis", "psycopg"), ("postgres", "psycopg", "redis")])
def test_server_backends_load_their_driver_only(kind, driver, other, tmp_path, make_url):
    modules = loaded_modules(["--storage", make_url(kind), "count", "-s", "nobody"], tmp_path)
    assert driver in modules  # the probe sees real imports: the driver was needed, so it is there
    bad = sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in
                                           ("httpx", other, "tomllib", "fusion_cli.agent", "fusion_cli.llm")))
    assert bad == []
