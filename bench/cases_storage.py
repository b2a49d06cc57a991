"""Storage at scale: append and count as history grows, list of many sessions, migrate."""

from __future__ import annotations

import os
import shutil
import time

from context import Context
from harness import compare, med, ms, run, time_calls
from report import Section
from seed import fill, history

from fusion_cli.messages import ChatMessage, encode_history
from fusion_cli.storage import open_storage

FLAT_LIMIT = 1.5  # append and count at 10,000 messages within 1.5x of at 10
REWRITE_LIMIT = 0.010  # the file backend's rewrite of 10,000 messages, seconds
COUNT_SHARE = 0.1  # a count that costs a tenth of a load or less has decoded nothing
LIST_LIMIT = 0.3  # `fusion list` of 10,000 sessions, seconds
TURN = [ChatMessage.user("What is on the list?"), ChatMessage.assistant(
    '{"thought": "I can answer now.", "action": null, "is_final": true, "final_answer": "ok"}')]


def _stores(ctx: Context, name: str, kinds: tuple[str, ...]) -> dict[str, str]:
    urls = {"file": f"file:{ctx.path(name + '-files')}", "sqlite": f"sqlite:{ctx.path(name + '.db')}",
            "redis": ctx.redis_url(name), "postgres": ctx.postgres_url(name)}
    return {k: urls[k] for k in kinds}


def append(ctx: Context) -> Section:
    """In-process: one turn's append, and count, at 10 and at N messages, on each backend."""
    big = 1_000 if ctx.quick else 10_000
    runs = 7 if ctx.quick else 31
    section = Section(f"History growth: one turn's append and a count, at 10 and {big:,} messages "
                      "(in-process)")
    rows = []
    for kind, url in _stores(ctx, "growth", ("file", "sqlite", "redis", "postgres")).items():
        store = open_storage(url)
        ctx.on_close(store.close)
        figures = _growth(store, (10, big), runs, with_save=kind == "file")
        a, c = figures["append", big] / figures["append", 10], figures["count", big] / figures["count", 10]
        rows.append([kind, ms(figures["append", 10]), ms(figures["append", big]), f"{a:.2f}x",
                     ms(figures["count", 10]), ms(figures["count", big]), f"{c:.2f}x",
                     ms(figures["load", big])])
        if kind == "file":
            rewrite = figures["save", big]
            long_history = history(big)
            data = encode_history(long_history)
            encode = med(time_calls(lambda: encode_history(long_history), runs))
            floor = _rewrite_floor(str(ctx.path("rewrite-floor")), data, runs)
            section.note(
                f"File backend: rewriting a {big:,}-message history ({len(data) / 1e6:.1f} MB) takes "
                f"a median {ms(rewrite)}: encoding it {ms(encode)}, then a durable replace. The same "
                f"replace done by hand, without fusion, costs {ms(floor['all'])} on this disk (create the temporary "
                f"file {ms(floor['create'])}, write {ms(floor['write'])}, fsync {ms(floor['fsync'])}, "
                f"rename and fsync the directory {ms(floor['rename + fsync dir'])}): the floor of any "
                f"rewrite that survives a crash is about {ms(encode + floor['all'])}. The `append` is the "
                f"rewrite plus reading the file first ({ms(figures['append', big])} in all): the seed's "
                "format is one JSON document per session, so a file append cannot avoid the rewrite.")
            section.data["rewrite floor"] = {**floor, "encode": encode}
            if big == 10_000:
                section.target(f"file rewrite at 10,000 messages < {REWRITE_LIMIT * 1000:g} ms", ms(rewrite),
                               rewrite < REWRITE_LIMIT)
        elif big == 10_000:
            section.target(f"append ({kind}) flat from 10 to 10,000 messages (within {FLAT_LIMIT}x)",
                           f"{a:.2f}x", a <= FLAT_LIMIT)
            # A count that decoded would cost at least what a load costs.
            share = figures["count", big] / figures["load", big]
            section.target(f"count ({kind}) at 10,000 messages decodes nothing (count / load)",
                           f"{share:.1%}", share < COUNT_SHARE)
        section.data[kind] = {f"{op}@{n}": v for (op, n), v in figures.items()}
    section.table(["backend", "append @10", f"append @{big:,}", "ratio", "count @10", f"count @{big:,}",
                   "ratio", f"load @{big:,} (for scale)"], rows)
    return section


def _growth(store, sizes: tuple[int, ...], runs: int, with_save: bool) -> dict[tuple[str, int], float]:
    """Median seconds of append, count and load (and save) at each size, the sizes interleaved.

    Appends follow each other as turns do: the long history is never put back (31 turns
    add 62 messages to 10,000), the short one every 10 appends. Putting a long history
    back before each append would time the aftermath of a big rewrite (a WAL checkpoint
    in SQLite, Redis freeing the old list), not a turn.
    """
    bases = {n: history(n) for n in sizes}
    times: dict[tuple[str, int], list[float]] = {}

    def timed(op: str, n: int, fn) -> None:
        start = time.perf_counter()
        fn()
        times.setdefault((op, n), []).append(time.perf_counter() - start)

    for n in sizes:
        store.save(f"h{n}", bases[n])
        for _ in range(5):  # untimed: settle what the first write left behind
            store.append(f"h{n}", TURN)
    small = min(sizes)
    for i in range(runs):
        if i and i % 10 == 0:
            store.save(f"h{small}", bases[small])
            store.append(f"h{small}", TURN)
        for n in (sizes if i % 2 else tuple(reversed(sizes))):  # neither size always goes first
            timed("append", n, lambda: store.append(f"h{n}", TURN))
            timed("count", n, lambda: store.count(f"h{n}"))
            if i % 4 == 0:
                timed("load", n, lambda: store.load(f"h{n}"))
            if with_save:
                timed("save", n, lambda: store.save(f"s{n}", bases[n]))
    return {key: med(values) for key, values in times.items()}


def _rewrite_floor(directory: str, data: bytes, runs: int) -> dict[str, float]:
    """What any durable rewrite of `data` costs on this disk, step by step (no fusion code)."""
    os.makedirs(directory, exist_ok=True)
    target, steps = os.path.join(directory, "floor.json"), {}
    for i in range(runs):
        t0 = time.perf_counter()
        tmp = os.path.join(directory, f".floor.{i}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        t1 = time.perf_counter()
        os.write(fd, data)
        t2 = time.perf_counter()
        os.fsync(fd)
        os.close(fd)
        t3 = time.perf_counter()
        os.replace(tmp, target)
        dfd = os.open(directory, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        t4 = time.perf_counter()
        for step, dt in (("create", t1 - t0), ("write", t2 - t1), ("fsync", t3 - t2),
                         ("rename + fsync dir", t4 - t3), ("all", t4 - t0)):
            steps.setdefault(step, []).append(dt)
    return {step: med(v) for step, v in steps.items()}


def write_file_store(directory: str, sessions: int, messages: int) -> None:
    """A file store written directly in the seed's format (fast: no fsync; this is set-up, not timed)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    data = encode_history(history(messages))
    for i in range(sessions):
        with open(os.path.join(directory, f"s{i:05d}.json"), "wb") as f:
            f.write(data)


def listing(ctx: Context) -> Section:
    n = 1_000 if ctx.quick else 10_000
    section = Section(f"`fusion list` of {n:,} sessions, a fresh process each")
    urls = _stores(ctx, "many", ("file", "sqlite", "redis"))
    write_file_store(urls["file"][len("file:"):], n, 2)
    for kind in ("sqlite", "redis"):
        fill(urls[kind], {f"s{i:05d}": history(2) for i in range(n)})
    commands = {"list (empty store)": ctx.fusion_cmd("list", storage=f"file:{ctx.path('empty')}")}
    for kind, url in urls.items():
        commands[f"list ({kind})"] = ctx.fusion_cmd("list", storage=url)
        commands[f"list --json ({kind})"] = ctx.fusion_cmd("list", "--json", storage=url)
    samples = compare(commands, runs=max(3, ctx.runs // 3), warmup=1)
    for label, s in samples.items():
        lines = s.runs[-1].stdout.count(b"\n")
        if label != "list (empty store)" and lines != n:
            raise AssertionError(f"{label} printed {lines} lines, not {n}")
    base = samples["list (empty store)"].median
    rows = [[f"`fusion {label}`", ms(s.median), f"{s.median / base:.2f}x"] for label, s in samples.items()]
    section.table(["command", "median wall", "vs list of an empty store"], rows)
    for kind in urls:
        t = samples[f"list ({kind})"].median
        if n == 10_000:
            section.target(f"`fusion list` of 10,000 sessions ({kind}) < {LIST_LIMIT:g} s", ms(t),
                           t < LIST_LIMIT)
    section.data["list"] = {k: v.walls for k, v in samples.items()}
    return section


def migration(ctx: Context) -> Section:
    n, m = (500, 20) if ctx.quick else (10_000, 20)
    section = Section(f"`fusion migrate` of {n:,} sessions x {m} messages, one fresh process each")
    file_a, file_b = f"file:{ctx.path('mig-a')}", f"file:{ctx.path('mig-b')}"
    sqlite, redis = f"sqlite:{ctx.path('mig.db')}", ctx.redis_url("mig")
    write_file_store(file_a[len("file:"):], n, m)
    rows = []
    rates = {}
    for src, dst, label in ((file_a, sqlite, "file -> sqlite"), (sqlite, redis, "sqlite -> redis"),
                            (redis, file_b, "redis -> file")):
        result = run(ctx.fusion_cmd("migrate", "--from", src, "--to", dst, "--json", rss=True))
        listed = run(ctx.fusion_cmd("list", storage=dst)).stdout.count(b"\n")
        if listed != n:
            raise AssertionError(f"{label}: {listed} sessions at the destination, not {n}")
        rate = n / result.wall
        rates[label] = rate
        rows.append([label, f"{result.wall:.2f} s", f"{rate:,.0f} sessions/s", f"{n * m / result.wall:,.0f}",
                     f"{result.maxrss_kb / 1024:.0f} MB"])
    section.table(["migration", "wall", "sessions/s", "messages/s", "peak RSS"], rows)
    section.data["migrate"] = rates
    shutil.rmtree(ctx.path("mig-a"), ignore_errors=True)
    return section
