"""The benchmark suite: `make bench` (everything) or `bench/run.py --quick` (a fast check).

    .venv/bin/python bench/run.py                       # all cases, several minutes
    .venv/bin/python bench/run.py --quick               # smaller sizes, fewer rounds
    .venv/bin/python bench/run.py --only startup,turn   # some cases
    .venv/bin/python bench/run.py --no-tools            # skip installing llm / shell-gpt

It prints the report (Markdown) and writes bench/out/results.md and
bench/out/results.json; bench/RESULTS.md is written by hand from a full run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from context import OUT, Context, machine  # noqa: E402
from harness import BenchError  # noqa: E402


def cases() -> dict:
    # Imported here so that `--help` stays instant and a case's imports load only when it runs.
    import cases_concurrency
    import cases_startup
    import cases_storage
    import cases_tools
    import cases_turn

    return {
        "startup": cases_startup.startup,
        "turn": cases_turn.turn,
        "memory": cases_turn.memory,
        "append": cases_storage.append,
        "list": cases_storage.listing,
        "migrate": cases_storage.migration,
        "tools": cases_tools.tools,
        "concurrency": cases_concurrency.concurrency,
    }


def _shown(path: Path) -> str:
    root = Path(__file__).resolve().parents[1]
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few rounds: a check that it all runs")
    parser.add_argument("--only", metavar="CASES", help="comma-separated: " + ", ".join(
        ["startup", "turn", "memory", "append", "list", "migrate", "tools", "concurrency"]))
    parser.add_argument("--runs", type=int, help="rounds per start-up comparison (default 21, quick 5)")
    parser.add_argument("--no-tools", action="store_true", help="do not install or run llm / shell-gpt")
    parser.add_argument("--out", type=Path, default=OUT, help="where results.md/json go (default bench/out)")
    parser.add_argument("--work", type=Path, default=OUT, help="where the stores are made, then removed "
                                                                 "(default bench/out)")
    args = parser.parse_args(argv)

    table = cases()
    chosen = list(table) if not args.only else [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in table]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")
    if args.no_tools and "tools" in chosen:
        chosen.remove("tools")

    ctx = Context(quick=args.quick, runs=args.runs, tools=not args.no_tools, work_root=args.work)
    started, load_before = time.time(), os.getloadavg()[0]
    sections = []
    try:
        for name in chosen:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            sections.append(table[name](ctx))
            print(f"bench: {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    except BenchError as exc:
        print(f"bench: a benchmarked command failed, so no figures: {exc}", file=sys.stderr)
        return 1
    finally:
        ctx.close()

    info = machine()
    head = [
        f"Run {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}, "
        f"{'quick' if args.quick else 'full'} mode, {time.time() - started:.0f} s; "
        f"{info['cores']} cores ({info['cpu']}), Python {info['python']}, {info['system']}; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other work on the machine "
        "shifts the absolute times; the ratios are from the same rounds).",
        f"Command: `{' '.join([_shown(Path(sys.executable)), 'bench/run.py', *(argv or sys.argv[1:])])}`",
        "",
    ]
    targets = [t for s in sections for t in s.targets]
    missed = [t for t in targets if t.met is False]
    summary = ["### Summary", "", f"{len(targets) - len(missed)} of {len(targets)} targets met."]
    summary += [f"- not met: {t.text} ({t.measured})" for t in missed]
    text = "\n".join(head + [s.markdown() for s in sections] + summary) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(
        {"machine": info, "quick": args.quick, "sections": {s.title: s.data for s in sections},
         "targets": [t.__dict__ for t in targets]}, indent=1))
    print(f"bench: {len(targets) - len(missed)} of {len(targets)} targets met", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
