"""fusion next to `llm` and `shell-gpt`: start-up, one turn on 10/200/2,000 messages, a list of
1,000 conversations."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import tools as t
from cases_storage import write_file_store
from cases_turn import restoring, server_share
from context import Context
from harness import Cmd, compare, ms
from report import Section
from seed import history

FASTER = 3.0  # the issue: a fusion turn at least 3x faster than llm's
TEXT = "What is on the list?"


def installed(ctx: Context) -> t.Tools:
    if not hasattr(ctx, "_tools"):
        ctx._tools = t.install()  # type: ignore[attr-defined]
    return ctx._tools  # type: ignore[attr-defined]


def _restore_file(snapshot: Path, target: Path):
    def restore() -> None:
        for suffix in ("-wal", "-shm"):
            try:
                os.unlink(str(target) + suffix)
            except FileNotFoundError:
                pass
        shutil.copyfile(snapshot, target)
    return restore


def tools(ctx: Context) -> Section:
    section = Section("fusion next to llm and shell-gpt (same loopback server, fresh processes)")
    kit = installed(ctx)
    have = [c for c in ("llm", "sgpt") if c in kit.bin]
    section.note("Versions: " + ", ".join(f"{c} {kit.versions[c]}" for c in have)
                 + "".join(f"; {c}: not run ({why})" for c, why in kit.missing.items()) + ".")
    _startup(ctx, kit, have, section)
    _turns(ctx, kit, have, section)
    _listing(ctx, kit, have, section)
    return section


def _startup(ctx: Context, kit: t.Tools, have: list[str], section: Section) -> None:
    commands = {"fusion --version": ctx.fusion_cmd("--version")}
    if "llm" in have:
        commands["llm --version"] = Cmd([str(kit.bin["llm"]), "--version"], env=t.llm_env(ctx, "startup"))
    if "sgpt" in have:
        commands["sgpt --version"] = Cmd([str(kit.bin["sgpt"]), "--version"], env=t.sgpt_env(ctx, "startup"))
    s = compare(commands, runs=max(3, ctx.runs // 2), warmup=1)
    base = s["fusion --version"].median
    section.table(["start-up", "median wall", "vs fusion"],
                  [[f"`{k}`", ms(v.median), f"{v.median / base:.2f}x"] for k, v in s.items()])
    section.data["startup"] = {k: v.walls for k, v in s.items()}


def _turns(ctx: Context, kit: t.Tools, have: list[str], section: Section) -> None:
    sizes = (10, 200) if ctx.quick else (10, 200, 2000)
    store = f"file:{ctx.path('tools-files')}"
    llm_env = t.llm_env(ctx, "turns") if "llm" in have else None
    llm_ids, llm_snapshot = {}, None
    if llm_env is not None:
        llm_ids = t.llm_db(ctx, kit, llm_env, {f"h{n}": n // 2 for n in sizes})
        llm_snapshot = ctx.path("llm-turns.snapshot.db")
        shutil.copyfile(Path(llm_env["LLM_USER_PATH"]) / "logs.db", llm_snapshot)
    sgpt_env = t.sgpt_env(ctx, "turns") if "sgpt" in have else None
    rows = []
    for n in sizes:
        commands = {"fusion": ctx.fusion_cmd("send", "-s", f"h{n}", TEXT, storage=store, env=ctx.send_env(),
                                             prepare=restoring(ctx, store, f"h{n}", history(n)))}
        if llm_env is not None:
            logs = Path(llm_env["LLM_USER_PATH"]) / "logs.db"
            commands["llm"] = Cmd([str(kit.bin["llm"]), "--no-stream", "--cid", llm_ids[f"h{n}"], TEXT],
                                  env=llm_env, prepare=_restore_file(llm_snapshot, logs))
        if sgpt_env is not None:
            chat = t.sgpt_chat(kit, sgpt_env, f"h{n}", n)
            snapshot = ctx.path(f"sgpt-h{n}.snapshot.json")
            shutil.copyfile(chat, snapshot)
            commands["sgpt"] = t.sgpt_cmd(kit, sgpt_env, f"h{n}", TEXT, prepare=_restore_file(snapshot, chat))
        s = compare(commands, runs=max(3, ctx.runs // 3), warmup=1, around=server_share(ctx))
        for label, samples in s.items():  # every tool printed the loopback model's answer
            if b"ok" not in samples.runs[-1].stdout:
                raise AssertionError(f"{label} did not print the answer: {samples.runs[-1].stdout[:200]!r}")
        f = s["fusion"].median_net
        row = [f"{n:,}", ms(f)]
        for tool in ("llm", "sgpt"):
            row += [f"{ms(s[tool].median_net)} ({s[tool].median_net / f:.1f}x)" if tool in s else "not run"]
        rows.append(row)
        if "llm" in s and n == 10:  # the case; the longer histories are for the table
            r = s["llm"].median_net / f
            section.target(f"a send turn at least {FASTER:g}x faster than llm's (10 messages)", f"{r:.1f}x",
                           r >= FASTER)
        section.data[f"turn{n}"] = {k: {"wall": v.walls, "server": v.extra} for k, v in s.items()}
    section.note("One turn: median wall time minus the server's share (it answers at once), "
                 "the history put back before every run; in brackets, how many times fusion's time.")
    section.table(["history", "fusion send (file)", "llm --cid", "sgpt --chat"], rows)


def _listing(ctx: Context, kit: t.Tools, have: list[str], section: Section) -> None:
    n = 100 if ctx.quick else 1000
    store = f"file:{ctx.path('tools-list')}"
    write_file_store(store[len("file:"):], n, 2)
    commands = {"fusion list": ctx.fusion_cmd("list", storage=store),
                "fusion list --json": ctx.fusion_cmd("list", "--json", storage=store)}
    if "llm" in have:
        env = t.llm_env(ctx, "list")
        t.llm_db(ctx, kit, env, {f"c{i:04d}": 1 for i in range(n)})
        argv = [str(kit.bin["llm"]), "logs", "list", "-n", "0", "--json"]
        commands["llm logs list -n 0 --json"] = Cmd(argv, env=env)
    if "sgpt" in have:
        env = t.sgpt_env(ctx, "list")
        for i in range(n):
            t.sgpt_chat(kit, env, f"c{i:04d}", 3)
        (Path(env["CHAT_CACHE_PATH"]) / "_probe").unlink()
        commands["sgpt --list-chats"] = Cmd([str(kit.bin["sgpt"]), "--list-chats"], env=env)
    s = compare(commands, runs=max(3, ctx.runs // 3), warmup=1)
    base = s["fusion list"].median
    section.note(f"Listing {n:,} conversations. llm has no command that lists conversations; "
                 "`llm logs list -n 0 --json` (every logged exchange, here one per conversation) "
                 "is the nearest.")
    section.table(["command", "median wall", "vs fusion list"],
                  [[f"`{k}`", ms(v.median), f"{v.median / base:.2f}x"] for k, v in s.items()])
    section.data["list"] = {k: v.walls for k, v in s.items()}
