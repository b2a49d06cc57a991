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

    if "transport" not in http_options and _no_tls_needed(endpoint.base_url):
        http_options["transport"] = _plain_http_transport()
    http = Http(endpoint.timeout, secret=endpoint.api_key, on_retry=on_retry,
                unreachable_hint=unreachable_hint(endpoint), **http_options)
    if endpoint.provider == "anthropic":
        from .anthropic import AnthropicClient

        return AnthropicClient(endpoint, http)
    from .openai import OpenAIClient

    return OpenAIClient(endpoint, http)


def _no_tls_needed(base_url: str) -> bool:
    """An http:// endpoint (a local Ollama, vLLM, ...) reached without a proxy never uses TLS."""
    if not base_url.lower().startswith("http://"):
        return False
    import os

    proxies = ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")
    return not any(os.environ.get(v) for v in proxies)


def _plain_http_transport() -> Any:
    # httpx's default transport builds a verifying TLS context up front, loading the CA
    # bundle: ~20 ms, a fifth of a `send` to a local model (bench/RESULTS.md). This one is
    # never asked for TLS: the client only posts to the http:// endpoint and follows no
    # redirect. Were it asked, its context, which trusts no CA, would refuse every certificate.
    import ssl

    import httpx

    return httpx.HTTPTransport(verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
