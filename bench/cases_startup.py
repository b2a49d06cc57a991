"""Start-up: fusion's storage commands against `python -c "import click"`, and what they import."""

from __future__ import annotations

import re

from context import Context
from harness import Cmd, compare, ms, run
from report import Section
from seed import fill, history

LIMIT = 1.5  # the target: within 1.5x of `import click`
# What a storage command must not load (tests/test_imports.py holds the same list).
FORBIDDEN = ("httpx", "redis", "psycopg", "tomllib", "fusion_cli.agent", "fusion_cli.llm")


def stores(ctx: Context) -> dict[str, str]:
    urls = {"file": f"file:{ctx.path('startup-files')}", "sqlite": f"sqlite:{ctx.path('startup.db')}"}
    for url in urls.values():
        fill(url, {f"s{i}": history(10) for i in range(10)})
    return urls


def startup(ctx: Context) -> Section:
    section = Section("Start-up: a fresh process per command")
    urls = stores(ctx)
    py = str(ctx.python)
    commands = {
        "python -c pass": Cmd([py, "-c", "pass"], env=ctx.env()),
        'python -c "import click"': Cmd([py, "-c", "import click"], env=ctx.env()),
        "fusion --version": ctx.fusion_cmd("--version"),
    }
    for kind, url in urls.items():
        commands[f"fusion count ({kind})"] = ctx.fusion_cmd("count", "-s", "s1", storage=url)
        commands[f"fusion list ({kind})"] = ctx.fusion_cmd("list", storage=url)
    samples = compare(commands, runs=ctx.runs, warmup=2)
    base = samples['python -c "import click"'].median
    rows = []
    for label, s in samples.items():
        rows.append([f"`{label}`", ms(s.median), f"{s.median / base:.2f}x"])
    section.table(["command", "median wall", "vs import click"], rows)
    for label, s in samples.items():
        if label.startswith("fusion"):
            r = s.median / base
            section.target(f"`{label}` within {LIMIT}x of `import click`", f"{r:.2f}x", r <= LIMIT)
    section.data["startup"] = {k: v.walls for k, v in samples.items()}
    section.lines += importtime(ctx, urls, section)
    return section


_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")
GROUPS = (("click", lambda m: m == "click" or m.startswith("click.")),
          ("fusion_cli", lambda m: m.startswith("fusion_cli")),
          ("orjson, sqlite3", lambda m: m.split(".")[0] in ("orjson", "sqlite3", "_sqlite3")),
          ("the rest (stdlib, site)", lambda m: True))


def importtime(ctx: Context, urls: dict[str, str], section: Section) -> list[str]:
    """`python -X importtime` of each storage command: what loads, and proof that nothing forbidden does."""
    lines = ["`python -X importtime` of each storage command: modules loaded, and each group's share of the "
             "import time (self times summed; importtime slows imports down, so read shares, "
             "not totals):", ""]
    rows = []
    heaviest: dict[str, int] = {}
    for kind, url in urls.items():
        for command in (["count", "-s", "s1"], ["list"], ["clear", "-s", "s9"]):
            argv = [str(ctx.python), "-X", "importtime", str(ctx.fusion), "--storage", url, *command]
            result = run(Cmd(argv, env=ctx.env()))
            modules = {m.group(4): int(m.group(1)) for m in _LINE.finditer(result.stderr.decode())}
            bad = sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
            total = sum(modules.values()) or 1
            shares = dict.fromkeys((g for g, _ in GROUPS), 0)
            for name, self_us in modules.items():
                group = next(g for g, match in GROUPS if match(name))
                shares[group] += self_us
                if group == "fusion_cli":
                    heaviest[name] = max(heaviest.get(name, 0), self_us)
            rows.append([f"`fusion {command[0]}` ({kind})", len(modules)]
                        + [f"{v / total:.0%}" for v in shares.values()] + [", ".join(bad) or "none"])
            section.target(f"`fusion {command[0]}` ({kind}) imports no httpx/redis/psycopg/tomllib/agent/llm",
                           ", ".join(bad) or "none loaded", not bad)
    lines += ["| command | modules | " + " | ".join(g for g, _ in GROUPS) + " | forbidden loaded |",
              "|" + " --- |" * (len(GROUPS) + 3)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    top = sorted(heaviest.items(), key=lambda kv: -kv[1])[:5]
    lines += ["", "fusion's own heaviest modules (self time, worst of the runs above): "
              + ", ".join(f"`{name}` {us / 1000:.1f} ms" for name, us in top), ""]
    return lines
