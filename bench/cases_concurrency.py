"""20 concurrent continuations of one conversation: does every turn survive, for each tool?"""

from __future__ import annotations

import json

import tools as t
from cases_tools import TEXT, installed
from context import Context
from harness import Cmd, ms, run_together
from report import Section
from seed import history

from fusion_cli.storage import open_storage

N = 20
_errors: dict[str, dict[str, int]] = {}  # tool -> last stderr line of a failed process -> how often


def _failures(tool: str, runs) -> int:
    failed = [r for r in runs if r.code != 0]
    for r in failed:
        lines = r.stderr.decode(errors="replace").strip().splitlines() or ["(nothing on stderr)"]
        line = lines[-1].strip()[:120]
        _errors.setdefault(tool, {})[line] = _errors.get(tool, {}).get(line, 0) + 1
    return len(failed)


def concurrency(ctx: Context) -> Section:
    _errors.clear()
    section = Section(f"{N} concurrent continuations of one 10-message conversation")
    rows = []
    urls = {"file": f"file:{ctx.path('conc-files')}", "sqlite": f"sqlite:{ctx.path('conc.db')}"}
    if not ctx.quick:
        urls.update(redis=ctx.redis_url("conc"), postgres=ctx.postgres_url("conc"))
    for kind, url in urls.items():
        store = open_storage(url)
        ctx.on_close(store.close)
        store.save("shared", history(10))
        runs, wall = run_together([ctx.fusion_cmd("send", "-s", "shared", f"{TEXT} (turn {i})", storage=url,
                                                  env=ctx.send_env()) for i in range(N)])
        failed = _failures(f"fusion ({kind})", runs)
        stored = store.load("shared")
        # Each turn stores its user message and the answer: both must be there, once each.
        kept = sum(1 for i in range(N) if sum(m.content == f"{TEXT} (turn {i})" for m in stored) == 1)
        lost = N - failed - kept
        extra = len(stored) - 10 - 2 * kept
        rows.append([f"fusion ({kind})", ms(wall), failed, kept,
                     lost if not extra else f"{lost} (+{extra} stray)"])
        section.target(f"fusion ({kind}): no turn lost or failed among {N} concurrent sends",
                       f"{kept} of {N} kept", kept == N and extra == 0)
    if ctx.tools:
        kit = installed(ctx)
        if "llm" in kit.bin:
            rows.append(_llm(ctx, kit))
        else:
            rows.append(["llm", "not run: " + kit.missing.get("llm", "?"), "", "", ""])
        if "sgpt" in kit.bin:
            rows.append(_sgpt(ctx, kit))
        else:
            rows.append(["sgpt", "not run: " + kit.missing.get("sgpt", "?"), "", "", ""])
    section.table(["tool", "wall, all done", "failed (exit != 0)", "turns kept",
                   "lost (exit 0, not stored)"], rows)
    section.note("A failed process told its user (who may retry); a lost turn was reported as done and is "
                 "not in the history.")
    for tool, errors in _errors.items():
        section.note(f"{tool}'s errors: " + "; ".join(f"`{e}` ({n}x)" for e, n in errors.items()))
    return section


def _llm(ctx: Context, kit: t.Tools) -> list:
    env = t.llm_env(ctx, "conc")
    cid = t.llm_db(ctx, kit, env, {"h10": 5})["h10"]
    before = t.llm_turns(kit, env, cid)
    llm = str(kit.bin["llm"])
    runs, wall = run_together([Cmd([llm, "--no-stream", "--cid", cid, f"{TEXT} (turn {i})"], env=env)
                               for i in range(N)])
    failed = _failures("llm", runs)
    kept = t.llm_turns(kit, env, cid) - before
    return ["llm", ms(wall), failed, kept, N - failed - kept]


def _sgpt(ctx: Context, kit: t.Tools) -> list:
    env = t.sgpt_env(ctx, "conc")
    chat = t.sgpt_chat(kit, env, "shared", 10)
    runs, wall = run_together([t.sgpt_cmd(kit, env, "shared", f"{TEXT} (turn {i})") for i in range(N)])
    failed = _failures("sgpt", runs)
    try:
        stored = json.loads(chat.read_text())
        kept = sum(1 for i in range(N) if any(m.get("content") == f"{TEXT} (turn {i})" for m in stored))
    except ValueError:  # a torn write: the file is not JSON any more
        return ["sgpt", ms(wall), failed, "0 (the chat file is corrupt)", N - failed]
    return ["sgpt", ms(wall), failed, kept, N - failed - kept]
