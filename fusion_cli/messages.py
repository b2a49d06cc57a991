"""ChatMessage and the seed's JSON format for a history.

A history on disk is a JSON array of ``{"role": ..., "content": ...}``
objects, indented by two spaces as the seed (serde_json's pretty printer)
writes it. Readers accept any JSON layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import orjson

from .errors import CorruptSession

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}

    @classmethod
    def system(cls, content: str) -> "ChatMessage":
        return cls("system", content)

    @classmethod
    def user(cls, content: str) -> "ChatMessage":
        return cls("user", content)

    @classmethod
    def assistant(cls, content: str) -> "ChatMessage":
        return cls("assistant", content)


def message_from_obj(obj: Any, location: str, number: int | None = None) -> ChatMessage:
    """One decoded JSON value to a ChatMessage, or CorruptSession naming `location`
    (and the message's 1-based `number` in its history, when given)."""
    if isinstance(obj, dict):
        role, content = obj.get("role"), obj.get("content")
        if isinstance(role, str) and isinstance(content, str) and role in ROLES:
            return ChatMessage(role, content)
    subject = "a message" if number is None else f"message {number}"
    if not isinstance(obj, dict):
        reason = f"{subject}: expected a message object, found {type(obj).__name__}"
    elif isinstance(role, str) and isinstance(content, str):
        reason = f"{subject} has an {unknown_role(role)}"
    else:
        reason = f"{subject} lacks a string 'role' or 'content'"
    raise CorruptSession(location, reason)


def unknown_role(role: str) -> str:
    # A role the model API would refuse (exit 4 on the next send, far from the cause),
    # so every backend reports it on load as corrupt data, where it is.
    return f"unknown role {role!r} (expected one of {', '.join(ROLES)})"


def decode_history(data: bytes | str, location: str) -> list[ChatMessage]:
    """Decode a whole history (a JSON array), refusing anything else as corrupt."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptSession(location, f"not valid JSON ({exc})") from exc
    if not isinstance(value, list):
        raise CorruptSession(location, f"expected a JSON array, found {type(value).__name__}")
    return [message_from_obj(item, location, n) for n, item in enumerate(value, 1)]


def encode_history(history: Iterable[ChatMessage]) -> bytes:
    """The seed's file format: a JSON array, two-space indent, raw UTF-8, no trailing newline."""
    return orjson.dumps([m.to_dict() for m in history], option=orjson.OPT_INDENT_2)


def encode_message(message: ChatMessage) -> bytes:
    """One message as compact JSON (a row, a Redis list item, a JSON Lines record)."""
    return orjson.dumps(message.to_dict())


def decode_message(data: bytes | str, location: str) -> ChatMessage:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptSession(location, f"not valid JSON ({exc})") from exc
    return message_from_obj(value, location)
