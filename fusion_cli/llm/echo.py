"""The offline `echo` provider: no network, no httpx; answers in the agent protocol.

Its final answer repeats the user's latest message and says how many earlier
messages of the session it was given: every message before that one except
the system prompt (so 0 on a session's first turn, 2 on its second).
"""

from __future__ import annotations

from typing import Sequence

import orjson

from ..messages import ChatMessage


def echo_answer(messages: Sequence[ChatMessage]) -> str:
    latest = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    text = messages[latest].content if latest is not None else ""
    earlier = sum(1 for m in messages[:latest or 0] if m.role != "system")
    noun = "message" if earlier == 1 else "messages"
    return f"Echo: {text} (I was given {earlier} earlier {noun} of this session.)"


class EchoClient:
    def complete(self, messages: Sequence[ChatMessage], *, json_mode: bool = True) -> str:
        return orjson.dumps({
            "thought": "I am the offline echo provider: I repeat the message.",
            "action": None,
            "is_final": True,
            "final_answer": echo_answer(messages),
        }).decode()

    def close(self) -> None:
        pass
