"""Model clients: OpenAI-compatible and Anthropic over httpx, and the offline echo.

`make_client` imports a provider's module only when it is chosen, so the
echo provider never loads httpx.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import Settings
from .base import ChatClient, scrub
from .endpoint import Endpoint, resolve_endpoint, unreachable_hint

__all__ = ["ChatClient", "Endpoint", "make_client", "resolve_endpoint", "scrub"]


def make_client(target: Settings | Endpoint, *, on_retry: Callable[[str], None] | None = None,
                **http_options: Any) -> ChatClient:
    """The client for `target`; `http_options` go to llm.http.Http (policy, transport)."""
    endpoint = resolve_endpoint(target) if isinstance(target, Settings) else target
    if endpoint.provider == "echo":
        from .echo import EchoClient

        return EchoClient()
    from .http import Http

    http = Http(endpoint.timeout, secret=endpoint.api_key, on_retry=on_retry,
                unreachable_hint=unreachable_hint(endpoint), **http_options)
    if endpoint.provider == "anthropic":
        from .anthropic import AnthropicClient

        return AnthropicClient(endpoint, http)
    from .openai import OpenAIClient

    return OpenAIClient(endpoint, http)
