"""Any OpenAI-compatible `POST {base_url}/chat/completions`: OpenAI, Ollama, vLLM, llama.cpp, LM Studio."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import orjson

from ..messages import ChatMessage
from .endpoint import Endpoint
from .http import Http

if TYPE_CHECKING:
    import httpx


class OpenAIClient:
    def __init__(self, endpoint: Endpoint, http: Http) -> None:
        base = endpoint.base_url
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = endpoint.model
        self.temperature = endpoint.temperature
        self.http = http
        self._headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        self._json_format = True  # until the endpoint refuses response_format

    def complete(self, messages: Sequence[ChatMessage], *, json_mode: bool = True) -> str:
        body: dict[str, Any] = {"model": self.model, "messages": [m.to_dict() for m in messages]}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        ask_json = json_mode and self._json_format
        if ask_json:
            body["response_format"] = {"type": "json_object"}
        response = self.http.post_json(self.url, self._headers, body)
        if ask_json and _refuses_json_format(response):
            self._json_format = False  # remembered for the rest of this invocation
            del body["response_format"]
            response = self.http.post_json(self.url, self._headers, body)
        if response.status_code >= 400:
            raise self.http.status_error(self.url, response)
        return self._content(response)

    def _content(self, response: httpx.Response) -> str:
        try:
            content = orjson.loads(response.content)["choices"][0]["message"]["content"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise (self.http.error_in_body(self.url, response)
                   or self.http.bad_response(self.url, "no choices[0].message.content")) from exc
        if isinstance(content, list):  # content parts: keep the text ones
            # (only string texts: a part with a number for text must not crash the join)
            content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        if not isinstance(content, str):
            raise self.http.bad_response(self.url, "the message content is not text")
        return content

    def close(self) -> None:
        self.http.close()


def _refuses_json_format(response: httpx.Response) -> bool:
    return response.status_code in (400, 422) and b"response_format" in response.content

