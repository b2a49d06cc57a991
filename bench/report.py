"""What a case hands back: a section of the report (tables, notes) and its targets, met or not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Target:
    text: str  # what the issue asks, e.g. "fusion count (file) <= 1.5x import click"
    measured: str  # the figure that decides it, e.g. "1.21x"
    met: bool | None  # None: could not be measured here

    def cell(self) -> str:
        return {True: "met", False: "NOT met", None: "not measured"}[self.met]


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # raw figures for results.json

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "|".join(" --- " for _ in header) + "|")
        for row in rows:
            self.lines.append("| " + " | ".join(str(c) for c in row) + " |")
        self.lines.append("")

    def note(self, text: str) -> None:
        self.lines.append(text)
        self.lines.append("")

    def target(self, text: str, measured: str, met: bool | None) -> None:
        self.targets.append(Target(text, measured, met))

    def markdown(self) -> str:
        out = [f"### {self.title}", ""] + self.lines
        if self.targets:
            out += ["| target | measured | |", "| --- | --- | --- |"]
            out += [f"| {t.text} | {t.measured} | {t.cell()} |" for t in self.targets]
            out.append("")
        return "\n".join(out)
