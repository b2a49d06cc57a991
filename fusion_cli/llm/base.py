"""The model-client protocol every provider implements, and key scrubbing.

This module imports no HTTP code, so the offline `echo` provider can use it
without loading httpx.
"""

from __future__ import annotations

from typing import Protocol, Sequence
from urllib.parse import urlsplit, urlunsplit

from ..messages import ChatMessage


class ChatClient(Protocol):
    """One model behind one endpoint, used for every step of a turn."""

    def complete(self, messages: Sequence[ChatMessage], *, json_mode: bool = True) -> str:
        """The model's reply text to `messages`, or ProviderError.

        `json_mode` asks for a JSON object where the endpoint supports it.
        """
        ...

    def close(self) -> None:
        """Release connections; the client must not be used afterwards."""
        ...


def scrub(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` replaced by ``***``."""
    if secret and secret in text:
        return text.replace(secret, "***")
    return text


def safe_url(url: str) -> str:
    """`url` without user:password and query values, fit for a message."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed '[': a message about a bad URL must not fail too
        scheme, sep, rest = url.partition("://")
        return scheme + sep + rest.split("?", 1)[0].rpartition("@")[2]
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "..." if parts.query else "", ""))
