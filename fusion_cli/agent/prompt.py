"""The system prompt: instructions, the step protocol, and each tool's description and input schema.

It is written once, first, when a session is new, so it describes every
built-in tool: which are enabled may change from one `send` to the next,
and a disabled tool answers with an observation saying how to enable it.
"""

from __future__ import annotations

from typing import Sequence

import orjson

from .tools import Tool

DEFAULT_INSTRUCTIONS = (
    "You are an autonomous agent. You help the user by reasoning step by step "
    "and by using tools when they help."
)

PROTOCOL = """\
Work in steps. At each step reply with exactly one JSON object and nothing else.
To use a tool:
{"thought": "what you think and why", "action": {"tool": "TOOL_NAME", "input": {...}}, "is_final": false, "final_answer": null}
The next message then starts with "Observation: " and holds the tool's result.
To answer the user (directly, or once you know enough):
{"thought": "what you think", "action": null, "is_final": true, "final_answer": "your answer to the user"}
Earlier messages of this conversation are part of the context: use them."""


def system_prompt(tools: Sequence[Tool], instructions: str | None = None) -> str:
    lines = [instructions or DEFAULT_INSTRUCTIONS, "", PROTOCOL, "", "Tools:"]
    for tool in tools:
        schema = orjson.dumps(tool.schema).decode()
        lines.append(f"- {tool.name}: {tool.description} Input (JSON schema): {schema}")
    lines += ["", "Some tools may be disabled by the user; calling one then returns an observation "
                  "saying so. File paths are relative to the working directory; the tools cannot "
                  "reach outside it."]
    return "\n".join(lines)
