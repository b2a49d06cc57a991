"""Anthropic's Messages API, `POST {base_url}/v1/messages`."""

from __future__ import annotations

from typing import Any, Sequence

import orjson

from ..messages import ChatMessage
from .endpoint import Endpoint
from .http import Http

ANTHROPIC_VERSION = "2023-06-01"
MAX_TOKENS = 4096  # the API requires a bound; an agent step is far shorter
CONTINUED = "(The conversation continues.)"


def to_anthropic(messages: Sequence[ChatMessage]) -> tuple[str | None, list[dict[str, str]]]:
    """(system, messages) as the API wants them.

    System messages move to `system`; consecutive messages of one role are
    merged (the API requires alternation) and the first must be the user's.
    """
    system = "\n\n".join(m.content for m in messages if m.role == "system") or None
    turns: list[dict[str, str]] = []
    for m in messages:
        if m.role == "system":
            continue
        if turns and turns[-1]["role"] == m.role:
            turns[-1]["content"] += "\n\n" + m.content
        else:
            turns.append({"role": m.role, "content": m.content})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": CONTINUED})
    return system, turns


class AnthropicClient:
    def __init__(self, endpoint: Endpoint, http: Http) -> None:
        base = endpoint.base_url
        if base.endswith("/v1/messages"):
            self.url = base
        else:
            self.url = base + ("/messages" if base.endswith("/v1") else "/v1/messages")
        self.model = endpoint.model
        self.temperature = endpoint.temperature
        self.http = http
        self._headers = {"anthropic-version": ANTHROPIC_VERSION}
        if endpoint.api_key:
            self._headers["x-api-key"] = endpoint.api_key

    def complete(self, messages: Sequence[ChatMessage], *, json_mode: bool = True) -> str:
        # json_mode: the Messages API has no JSON switch; the system prompt asks for JSON.
        system, turns = to_anthropic(messages)
        body: dict[str, Any] = {"model": self.model, "max_tokens": MAX_TOKENS, "messages": turns}
        if system:
            body["system"] = system
        if self.temperature is not None:
            body["temperature"] = self.temperature
        response = self.http.post_json(self.url, self._headers, body)
        if response.status_code >= 400:
            raise self.http.status_error(self.url, response)
        try:
            blocks = orjson.loads(response.content)["content"]
            return "".join(b["text"] for b in blocks if b.get("type") == "text")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise (self.http.error_in_body(self.url, response)
                   or self.http.bad_response(self.url, "no text in 'content'")) from exc

    def close(self) -> None:
        self.http.close()
