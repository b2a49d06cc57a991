"""What every case needs: paths, a clean environment, the model server, unique server-side names.

Redis keys live under a prefix and PostgreSQL tables under a table prefix
that are unique to this run, and `close()` removes them (and the work
directory) whatever happened.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import uuid
from pathlib import Path

from harness import Cmd
from modelserver import ModelServer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
REDIS = os.environ.get("FUSION_BENCH_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES = os.environ.get("FUSION_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


class Context:
    def __init__(self, quick: bool, runs: int | None, tools: bool = True, work_root: Path = OUT) -> None:
        self.quick = quick
        self.tools = tools  # install and run llm / shell-gpt
        self.runs = runs or (5 if quick else 21)  # rounds of a start-up comparison
        self.python = Path(sys.executable)  # the project's venv: `make bench` runs us with it
        self.fusion = self.python.parent / "fusion"
        tag = uuid.uuid4().hex[:8]
        # On the disk the stores would use (not a tmpfs): fsync costs what it costs there.
        self.work = Path(work_root) / f"work-{tag}"
        self.home = self.work / "home"
        self.home.mkdir(parents=True)
        self.redis_prefix = f"fusion-bench-{tag}:"
        self.pg_prefix = f"bench{tag}_"
        self.server = ModelServer().__enter__()
        self._redis_prefixes: list[str] = []
        self._pg_prefixes: list[str] = []
        self._closers: list = []

    # ---- environments and commands ------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment: our HOME, no FUSION_* or API keys from the caller."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home),
               "LANG": "C.UTF-8", "XDG_DATA_HOME": str(self.home / "data"),
               "XDG_CONFIG_HOME": str(self.home / "config")}
        env.update(extra)
        return env

    def fusion_cmd(self, *args: str, storage: str | None = None, **kw) -> Cmd:
        argv = [str(self.fusion)] + (["--storage", storage] if storage else []) + list(args)
        return Cmd(argv, env=kw.pop("env", None) or self.env(), **kw)

    def send_env(self) -> dict[str, str]:
        return self.env(FUSION_PROVIDER="openai", FUSION_BASE_URL=self.server.url, FUSION_MODEL="loopback")

    def path(self, name: str) -> Path:
        return self.work / name

    # ---- server-side stores, unique to this run ---------------------------------

    def redis_url(self, name: str) -> str:
        prefix = f"{self.redis_prefix}{name}:"
        self._redis_prefixes.append(prefix)
        return f"{REDIS}?prefix={prefix}"

    def postgres_url(self, name: str) -> str:
        prefix = f"{self.pg_prefix}{name}_"
        self._pg_prefixes.append(prefix)
        return f"{POSTGRES}?table_prefix={prefix}"

    def on_close(self, fn) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception as exc:  # cleanup must go on
                print(f"bench: cleanup failed: {exc}", file=sys.stderr)
        self.server.__exit__(None, None, None)
        if self._redis_prefixes:
            import redis

            client = redis.Redis.from_url(REDIS)
            for prefix in self._redis_prefixes:
                keys = list(client.scan_iter(match=prefix + "*", count=5000))
                for i in range(0, len(keys), 5000):
                    client.delete(*keys[i:i + 5000])
            client.close()
        if self._pg_prefixes:
            import psycopg

            with psycopg.connect(POSTGRES, autocommit=True) as conn:
                for prefix in self._pg_prefixes:
                    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                                        " AND starts_with(tablename, %s)", (prefix,)).fetchall()
                    for (table,) in rows:
                        conn.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')
        shutil.rmtree(self.work, ignore_errors=True)


def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cores": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}"}
