"""Histories and stores to benchmark on, written through fusion's own storage API.

The messages look like a real agent session: a system prompt of the size
fusion writes, then user messages and the assistant's JSON decisions.
"""

from __future__ import annotations

from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage

SYSTEM = ("You are a helpful assistant that answers in JSON with thought, action, is_final and "
          "final_answer. " * 20)
ANSWER = ('{"thought": "I can answer now.", "action": null, "is_final": true, '
          '"final_answer": "Noted. Here is a short answer to message %d."}')


USER = "Message %d: please remember that this item belongs on the list for later."


def user_text(i: int) -> str:
    return USER % i


def history(n: int, system: bool = True) -> list[ChatMessage]:
    """`n` messages: the system prompt, then user/assistant pairs."""
    out = [ChatMessage.system(SYSTEM)] if system and n else []
    first = len(out)
    while len(out) < n:
        k = len(out) - first
        out.append(ChatMessage.user(user_text(k // 2)) if k % 2 == 0
                   else ChatMessage.assistant(ANSWER % (k // 2)))
    return out


def fill(url: str, sessions: dict[str, list[ChatMessage]], batch: int = 500) -> None:
    """Write every session into the store at `url` (in batches where the backend has them)."""
    store = open_storage(url)
    try:
        items = list(sessions.items())
        save_many = getattr(store, "save_many", None)
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            if save_many is not None:
                save_many(chunk)
            else:
                for sid, h in chunk:
                    store.save(sid, h)
    finally:
        store.close()
