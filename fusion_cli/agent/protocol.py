"""The seed's step protocol: each model reply is one JSON object, parsed tolerantly.

    {"thought": "...", "action": {"tool": "read_file", "input": {"path": "a.txt"}},
     "is_final": false, "final_answer": null}
    {"thought": "...", "action": null, "is_final": true, "final_answer": "..."}

A reply that is not valid JSON is searched for its outermost {...}; failing
that it is a direct final answer. A JSON reply that cannot be followed gets
a `problem`, which the loop feeds back to the model as an observation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

FORMAT_REMINDER = (
    'Reply with one JSON object: {"thought": "...", "action": {"tool": "NAME", "input": {...}}, '
    '"is_final": false, "final_answer": null} to use a tool, or {"thought": "...", "action": null, '
    '"is_final": true, "final_answer": "..."} to answer.'
)


@dataclass(frozen=True)
class Decision:
    thought: str
    tool: str | None
    input: Any
    is_final: bool
    final_answer: str | None
    stored: str  # the history's assistant message: the model's JSON, or its plain text
    problem: str | None = None  # why the reply cannot be followed


def parse_decision(reply: str) -> Decision:
    text = reply.strip()
    if not text:
        return Decision("", None, None, False, None, text, "your reply was empty")
    obj, stored = _find_object(text)
    if obj is None:  # no JSON object at all: the model answered directly
        return Decision("", None, None, True, text, text)
    thought = _as_text(obj.get("thought")) or ""
    action, final = obj.get("action"), obj.get("final_answer")
    if _truthy(obj.get("is_final")) or (not action and isinstance(final, str) and final.strip()):
        if final is None:
            return Decision(thought, None, None, False, None, stored,
                            "is_final was true but final_answer was missing")
        return Decision(thought, None, None, True, _as_text(final), stored)
    if isinstance(action, dict):
        tool, tool_input = action.get("tool"), action.get("input")
    elif isinstance(action, str):  # a common slip: "action": "read_file", "input": {...}
        tool, tool_input = action, obj.get("input", obj.get("action_input"))
    else:
        return Decision(thought, None, None, False, None, stored,
                        "your reply had neither an action nor a final answer")
    if not isinstance(tool, str) or not tool:
        return Decision(thought, None, tool_input, False, None, stored,
                        "the action has no 'tool' name")
    return Decision(thought, tool, tool_input, False, None, stored)


def _find_object(text: str) -> tuple[dict[str, Any] | None, str]:
    """The JSON object in `text` and its source: the whole text, else its outermost {...}."""
    candidates = [text]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end and (start, end) != (0, len(text) - 1):
        candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            value = orjson.loads(candidate)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value, candidate
    return None, text


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()
