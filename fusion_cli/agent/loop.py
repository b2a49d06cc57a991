"""The ReAct loop for one turn: ask the model, run its tool, feed the observation back, until a final answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..llm.base import ChatClient, scrub
from ..messages import ChatMessage
from .protocol import FORMAT_REMINDER, parse_decision
from .tools import Toolbox

OBSERVATION = "Observation: "


@dataclass(frozen=True)
class Step:
    thought: str
    action: str | None  # the tool's name; None for the final answer or a reply that could not be followed
    input: Any
    observation: str | None  # what the tool returned (without the "Observation: " prefix)

    def to_dict(self) -> dict[str, Any]:
        return {"thought": self.thought, "action": self.action, "input": self.input,
                "observation": self.observation}


@dataclass
class AgentResult:
    result: str
    success: bool
    steps: list[Step] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"result": self.result, "success": self.success,
                "steps": [s.to_dict() for s in self.steps]}


def run_turn(client: ChatClient, context: Sequence[ChatMessage], message: str, tools: Toolbox,
             max_iterations: int, on_step: Callable[[Step], None] | None = None,
             secret: str | None = None) -> tuple[AgentResult, list[ChatMessage]]:
    """Run one turn; return its result and the messages to commit (the user's message first).

    `context` is what the model sees before `message` (system prompt and history).
    ProviderError propagates: then nothing of the turn is kept.
    """
    new = [ChatMessage.user(message)]
    steps: list[Step] = []
    for _ in range(max_iterations):
        # The key is scrubbed from everything that is stored or shown.
        decision = parse_decision(scrub(client.complete([*context, *new]), secret))
        new.append(ChatMessage.assistant(decision.stored))
        if decision.is_final:
            steps.append(Step(decision.thought, None, None, None))
            if on_step is not None:
                on_step(steps[-1])
            return AgentResult(decision.final_answer or "", True, steps), new
        if decision.problem:
            observation = f"Error: {decision.problem}. {FORMAT_REMINDER}"
        else:
            observation = scrub(tools.run(decision.tool or "", decision.input), secret)
        new.append(ChatMessage.user(OBSERVATION + observation))
        steps.append(Step(decision.thought, decision.tool, decision.input, observation))
        if on_step is not None:
            on_step(steps[-1])
    stopped = f"Stopped after {max_iterations} steps without a final answer."
    return AgentResult(stopped, False, steps), new
