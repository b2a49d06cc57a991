"""Shared fixtures: an isolated environment for every test, and a store of each backend.

Redis and PostgreSQL are the real servers on 127.0.0.1. Outside CI a test
that cannot reach one is skipped with the reason; under CI=true it fails.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fusion_cli.storage import open_storage

pytest_plugins = ["tests.model_server"]

REDIS_URL = os.environ.get("FUSION_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("FUSION_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")

BACKENDS = ["memory", "file", "sqlite", "redis", "postgres"]
PERSISTENT = ["file", "sqlite", "redis", "postgres"]
IN_CI = os.environ.get("CI", "").lower() == "true"


def server_unreachable(what: str, exc: BaseException) -> None:
    """Skip outside CI; fail under CI, where the servers must be there."""
    message = f"{what} is unreachable ({exc})"
    if IN_CI:
        pytest.fail(message + " -- under CI this is an error, not a skip", pytrace=False)
    pytest.skip(message)


_redis_checked: list[BaseException | None] = []


def require_redis() -> None:
    if not _redis_checked:
        try:
            import redis

            redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
            _redis_checked.append(None)
        except Exception as exc:  # ImportError included: the driver is part of the test extra
            _redis_checked.append(exc)
    if _redis_checked[0] is not None:
        server_unreachable(f"Redis at {REDIS_URL}", _redis_checked[0])


def _delete_redis_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


_postgres_checked: list[BaseException | None] = []


def require_postgres() -> None:
    if not _postgres_checked:
        try:
            import psycopg

            psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
            _postgres_checked.append(None)
        except Exception as exc:
            _postgres_checked.append(exc)
    if _postgres_checked[0] is not None:
        server_unreachable(f"PostgreSQL at {POSTGRES_URL}", _postgres_checked[0])


def _drop_postgres_prefix(prefix: str) -> None:
    """Drop every table whose name starts with the test's random prefix."""
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            " AND starts_with(tablename, %s)", (prefix,)).fetchall()
        for (name,) in rows:
            conn.execute(f'DROP TABLE IF EXISTS "{name}" CASCADE')


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test sees the user's sessions, config or keys (llm's trick)."""
    home = tmp_path_factory.mktemp("home")
    for name in list(os.environ):
        if name.startswith("FUSION_") or name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    return home


@pytest.fixture
def make_url(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """make_url(kind) -> a fresh, empty store's URL of that backend, cleaned up afterwards."""
    prefixes: list[str] = []
    pg_prefixes: list[str] = []
    counter = iter(range(1_000_000))

    def make(kind: str) -> str:
        n = next(counter)
        if kind == "memory":
            return "memory:"
        if kind == "file":
            return f"file:{tmp_path / f'files{n}'}"
        if kind == "sqlite":
            return f"sqlite:{tmp_path / f'db{n}.sqlite'}"
        if kind == "redis":
            require_redis()
            prefix = f"fusion-test-{uuid.uuid4().hex[:12]}:"
            prefixes.append(prefix)
            return f"{REDIS_URL}?prefix={prefix}"
        if kind == "postgres":
            require_postgres()
            prefix = f"t{uuid.uuid4().hex[:12]}_"
            pg_prefixes.append(prefix)
            return f"{POSTGRES_URL}?table_prefix={prefix}"
        raise ValueError(kind)

    yield make
    for prefix in prefixes:
        _delete_redis_prefix(prefix)
    for prefix in pg_prefixes:
        _drop_postgres_prefix(prefix)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, make_url: Callable[[str], str]):
    s = open_storage(make_url(request.param))
    yield s
    s.close()


@pytest.fixture
def fusion_env(tmp_path: Path, isolated_env: Path) -> dict[str, str]:
    """Environment for running `python -m fusion_cli` as a real subprocess."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FUSION_") and k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env


PYTHON = sys.executable
