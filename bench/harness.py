"""Timing fresh processes side by side: warm-up, interleaved rounds, medians and ratios.

Every command of a comparison runs once per round, in a rotating order, so
that a slow moment of the machine (2 cores, other work) lands on all of them
alike; figures are medians over the rounds, and claims are ratios between
commands measured in the same rounds, never a lone absolute time.

A run is `fork + exec + the process + wait4`: the wall time is taken around
it. Peak RSS is measured through a small launcher (`Cmd.rss`, see LAUNCHER).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence


class BenchError(RuntimeError):
    """A benchmarked command failed: the figures would be meaningless."""


@dataclass
class Cmd:
    argv: Sequence[str]
    env: dict[str, str] | None = None
    cwd: str | None = None
    prepare: Callable[[], None] | None = None  # untimed, before every run (restore a snapshot)
    ok_codes: tuple[int, ...] = (0,)
    rss: bool = False  # start it from a small launcher, so that its peak RSS is its own (see LAUNCHER)


# Linux carries a process's peak RSS across exec, and a child made by (v)fork starts in
# its parent's memory: a command started straight from this process would report at
# least this process's RSS (here, stores of 10,000 messages). Started from this small
# launcher instead, it reports max(the launcher's ~8 MB, its own peak).
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
os.write(2, b"\\nbench-peak-rss-kb %d\\n" % usage.ru_maxrss)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""
_RSS_LINE = re.compile(rb"\nbench-peak-rss-kb (\d+)\n$")


@dataclass
class Run:
    wall: float  # seconds
    maxrss_kb: int
    code: int
    stdout: bytes
    stderr: bytes


def run(cmd: Cmd, check: bool = True) -> Run:
    """One fresh process; its wall time, peak RSS, exit code and output."""
    if cmd.prepare is not None:
        cmd.prepare()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        argv = [sys.executable, "-I", "-S", "-c", LAUNCHER, *cmd.argv] if cmd.rss else list(cmd.argv)
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=cmd.env,
                                cwd=cmd.cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        result = Run(wall, usage.ru_maxrss, proc.returncode, out.read(), err.read())
    if cmd.rss:  # the launcher's report replaces wait4's figure, which is polluted (see LAUNCHER)
        found = _RSS_LINE.search(result.stderr)
        if found is None:
            raise BenchError(f"no peak RSS from the launcher of {' '.join(map(str, cmd.argv))}")
        result.maxrss_kb = int(found.group(1))
        result.stderr = result.stderr[:found.start()]
    if check and result.code not in cmd.ok_codes:
        raise BenchError(f"{' '.join(map(str, cmd.argv))} exited {result.code}:\n"
                         f"{result.stderr.decode(errors='replace')[-2000:]}")
    return result


@dataclass
class Samples:
    runs: list[Run] = field(default_factory=list)
    extra: list[float] = field(default_factory=list)  # e.g. the server's share of each run

    @property
    def walls(self) -> list[float]:
        return [r.wall for r in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    @property
    def median_net(self) -> float:
        """The median of wall minus `extra` (the part of each run spent elsewhere)."""
        return statistics.median(w - e for w, e in zip(self.walls, self.extra))

    @property
    def peak_rss_mb(self) -> float:
        return max(r.maxrss_kb for r in self.runs) / 1024


def compare(commands: dict[str, Cmd], runs: int, warmup: int = 1,
            around: Callable[[str, Callable[[], Run]], tuple[Run, float]] | None = None
            ) -> dict[str, Samples]:
    """Run every command `warmup` times untimed, then `runs` interleaved rounds.

    `around(label, go)`, if given, wraps each timed run and returns (run, extra
    seconds to subtract), e.g. to read a server's counters before and after.
    """
    labels = list(commands)
    for _ in range(warmup):
        for label in labels:
            run(commands[label])
    samples = {label: Samples() for label in labels}
    for i in range(runs):
        order = labels[i % len(labels):] + labels[:i % len(labels)]  # rotate who goes first
        for label in order:
            go = (lambda c=commands[label]: run(c))
            if around is None:
                samples[label].runs.append(go())
                samples[label].extra.append(0.0)
            else:
                result, extra = around(label, go)
                samples[label].runs.append(result)
                samples[label].extra.append(extra)
    return samples


def time_calls(fn: Callable[[], object], runs: int, setup: Callable[[], object] | None = None,
               warmup: int = 1) -> list[float]:
    """In-process: seconds per call of `fn`, `setup` (untimed) before each."""
    times = []
    for i in range(warmup + runs):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return times


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    """A duration in the unit that keeps 2-3 significant digits."""
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 0.01:
        return f"{seconds * 1000:.2f} ms"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def run_together(cmds: Sequence[Cmd]) -> tuple[list[Run], float]:
    """Start every command at once; their results and the wall time until the last one ended."""
    files = []
    procs = []
    start = time.perf_counter()
    for cmd in cmds:
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        files.append((out, err))
        procs.append(subprocess.Popen(cmd.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                      env=cmd.env, cwd=cmd.cwd))
    results = []
    for proc, (out, err) in zip(procs, files):
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        results.append((proc.returncode, usage.ru_maxrss, out, err, time.perf_counter() - start))
    wall = time.perf_counter() - start
    runs = []
    for code, rss, out, err, ended in results:
        out.seek(0)
        err.seek(0)
        runs.append(Run(ended, rss, code, out.read(), err.read()))
        out.close()
        err.close()
    return runs, wall
