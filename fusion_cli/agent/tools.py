"""Running the agent's tools: which are enabled, checking input, time limits, truncation.

Whatever goes wrong (an unknown or disabled tool, bad input, a failure, a
time-out) becomes observation text that tells the model what happened, so
it can correct itself; nothing here raises into the loop.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import orjson

from ..errors import UsageError

TIME_LIMIT = 30.0  # seconds per tool call
MAX_OBSERVATION = 20_000  # characters of a tool's output the model is shown
NOTE_ROOM = 200  # room for the note of a tool that truncated its own output
SECRET_VARIABLES = ("FUSION_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "FUSION_ENCRYPTION_KEY")


class ToolError(Exception):
    """What went wrong in a tool, worded for the model."""


class ToolTimeout(Exception):
    """A tool ran past its time limit."""


@dataclass(frozen=True)
class ToolContext:
    root: Path  # resolved; file tools stay inside it
    time_limit: float = TIME_LIMIT
    max_output: int = MAX_OBSERVATION
    env: Mapping[str, str] = field(default_factory=dict)  # for subprocesses: no API keys

    def resolve(self, path: str) -> Path:
        """`path` (relative to the root, or absolute) with symlinks resolved, if it is inside the root."""
        if "\0" in path:  # no file name holds one; os calls would raise ValueError
            raise ToolError(f"{path!r} is not a valid path: it contains a NUL character")
        try:
            target = (self.root / path).resolve()
        except RuntimeError:  # pathlib's report of a symlink loop
            raise ToolError(f"{path!r} cannot be resolved: it is a loop of symbolic links") from None
        if not target.is_relative_to(self.root):
            raise ToolError(f"{path!r} is outside the directory the tools may use ({self.root})")
        return target


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    schema: dict[str, Any]  # JSON schema of the input object
    run: Callable[[dict[str, Any], ToolContext], str]
    read_only: bool = True  # read-only tools are on by default; the others need --allow


def _holds_password(name: str, value: str) -> bool:
    """A storage URL with a password: the shell's output goes to the model, so it is left out."""
    if name != "FUSION_STORAGE":
        return False
    from ..storage import url_passwords

    return bool(url_passwords(value))


def _root_dir(root: str | os.PathLike[str] | None) -> Path:
    """The tools' root, resolved; UsageError unless it is an existing directory."""
    if root is None or str(root) == "":
        return Path(os.getcwd()).resolve()
    try:
        path = Path(root).expanduser().resolve()
        usable = path.is_dir()
    except (OSError, RuntimeError, ValueError):  # a NUL, a loop, a name too long
        usable = False
    if not usable:
        raise UsageError(f"the tools' root {str(root)!r} is not a directory",
                         hint="give an existing directory with --root (FUSION_ROOT)")
    return path


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[truncated: showing the first {limit} of {len(text)} characters]"


def check_input(tool: Tool, value: Any) -> dict[str, Any]:
    """`value` as the tool's arguments, or ToolError saying what is wrong with it."""
    props: dict[str, Any] = tool.schema.get("properties", {})
    required: list[str] = tool.schema.get("required", [])
    if value is None:
        value = {}
    if isinstance(value, str) and len(required) == 1:  # a common slip: the bare value
        value = {required[0]: value}
    if not isinstance(value, dict):
        raise ToolError(f"the input must be a JSON object, not {type(value).__name__}")
    for name in required:
        if name not in value:
            raise ToolError(f"missing required field {name!r}")
    for name, spec in props.items():
        if name in value and not _has_type(value[name], spec.get("type")):
            raise ToolError(f"field {name!r} must be a {spec.get('type')}")
    return value


def _has_type(value: Any, kind: str | None) -> bool:
    checks = {"string": str, "integer": int, "boolean": bool, "object": dict, "array": list}
    if kind not in checks:
        return True
    if kind == "integer" and isinstance(value, bool):
        return False
    return isinstance(value, checks[kind])


def run_with_time_limit(fn: Callable[[], str], limit: float) -> str:
    """fn() in a helper thread; ToolTimeout if it is not done in `limit` seconds (it is abandoned)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="fusion-tool", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        raise ToolTimeout
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class Toolbox:
    """The built-in tools, which of them are enabled, and where they may work."""

    def __init__(self, allow: Iterable[str] = (), root: str | os.PathLike[str] | None = None,
                 tools: Sequence[Tool] | None = None, time_limit: float = TIME_LIMIT,
                 max_output: int = MAX_OBSERVATION) -> None:
        if tools is None:
            from .builtins import BUILTIN_TOOLS

            tools = BUILTIN_TOOLS
        self.tools = {t.name: t for t in tools}
        self.enabled = {t.name for t in tools if t.read_only} | self._allowed(allow)
        env = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES and not _holds_password(k, v)}
        self.context = ToolContext(_root_dir(root), time_limit, max_output, env)

    def _allowed(self, allow: Iterable[str]) -> set[str]:
        names = {n.strip() for item in allow for n in item.split(",") if n.strip()}
        if "all" in names:
            return set(self.tools)
        unknown = sorted(names - set(self.tools))
        if unknown:
            raise UsageError(f"unknown tool {', '.join(map(repr, unknown))} for --allow",
                             hint="known: " + ", ".join([*self.tools, "all"]))
        return names

    def run(self, name: str, value: Any) -> str:
        """The observation for calling tool `name` with input `value`."""
        tool = self.tools.get(name)
        if tool is None:
            usable = ", ".join(n for n in self.tools if n in self.enabled)
            return (f"Error: there is no tool {name!r}. The tools you can use are: {usable}. "
                    f"Use one of them, or give your final answer.")
        if name not in self.enabled:
            return (f"Error: the tool {name!r} is not enabled. The user can enable it by running "
                    f"fusion with --allow {name} (or --allow all). Continue without it.")
        try:
            args = check_input(tool, value)
        except ToolError as exc:
            schema = orjson.dumps(tool.schema).decode()
            return f"Error: invalid input for {name}: {exc}. Its input must match this JSON schema: {schema}"
        limit = self.context.time_limit
        try:
            # A little grace so a tool that enforces the limit itself (the shell) reports first.
            output = run_with_time_limit(lambda: tool.run(args, self.context), limit + 1.0)
        except ToolTimeout:
            return f"Error: {name} did not finish within {limit:g} s and was abandoned."
        except ToolError as exc:
            return f"Error: {exc}"
        except Exception as exc:  # a tool failing must not end the turn
            return f"Error: {name} failed: {type(exc).__name__}: {exc}"
        if len(output) > self.context.max_output + NOTE_ROOM:  # else a tool cut it itself
            output = truncate(output, self.context.max_output)
        return output

    def described(self) -> list[Tool]:
        return list(self.tools.values())
