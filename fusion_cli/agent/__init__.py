"""The agent: the ReAct loop, its protocol, the system prompt and the built-in tools."""

from .loop import AgentResult, Step, run_turn
from .prompt import system_prompt
from .tools import Toolbox

__all__ = ["AgentResult", "Step", "Toolbox", "run_turn", "system_prompt"]
