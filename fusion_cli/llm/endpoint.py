"""Which endpoint, model and key to use, from Settings and the environment.

With no configuration: OPENAI_API_KEY set -> OpenAI; else ANTHROPIC_API_KEY
set -> Anthropic; else a local Ollama. `echo` is used only when asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from ..config import Settings
from ..errors import UsageError
from .base import safe_url

OPENAI_BASE_URL = "https://api.openai.com/v1"
OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_MODEL = "claude-sonnet-4-5"
OLLAMA_BASE_URL = "http://localhost:11434/v1"
OLLAMA_MODEL = "llama3.2"

KEY_VARIABLES = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


@dataclass(frozen=True)
class Endpoint:
    provider: str  # openai | anthropic | echo
    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    temperature: float | None = None

    def __repr__(self) -> str:  # never show the key, even in a traceback
        return (f"Endpoint(provider={self.provider!r}, base_url={self.base_url!r}, "
                f"model={self.model!r}, api_key={'***' if self.api_key else None})")


def resolve_endpoint(settings: Settings, env: Mapping[str, str] | None = None) -> Endpoint:
    env = os.environ if env is None else env
    provider = settings.provider or _guess_provider(settings, env)
    common = {"timeout": settings.timeout, "temperature": settings.temperature}
    if provider == "echo":
        return Endpoint("echo", "echo:", settings.model or "echo", None, **common)
    key = _usable_key(settings.api_key or env.get(KEY_VARIABLES[provider]) or None)
    if provider == "anthropic":
        base_url, model = settings.base_url or ANTHROPIC_BASE_URL, ANTHROPIC_MODEL
    else:  # with a key OpenAI itself, else a local server (Ollama's address by default)
        base_url = settings.base_url or (OPENAI_BASE_URL if key else OLLAMA_BASE_URL)
        model = OPENAI_MODEL if "api.openai.com" in base_url else OLLAMA_MODEL
    base_url = base_url.rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise UsageError(f"invalid base URL {safe_url(base_url)!r}",
                         hint="use http://HOST:PORT/... or https://..., e.g. http://localhost:11434/v1")
    return Endpoint(provider, base_url, settings.model or model, key, **common)


def _usable_key(key: str | None) -> str | None:
    """The key without surrounding whitespace; UsageError if a character could not go in a header.

    httpx would refuse such a header with an error that quotes it, key and all
    (`Illegal header value b'Bearer sk-...\\n'`), so this never shows the key.
    A newline or CR around it is the usual slip (a key file, a Windows env file).
    """
    if key is None:
        return None
    key = key.strip()
    bad = next((i for i, c in enumerate(key) if not "!" <= c <= "~"), None)
    if bad is not None:
        raise UsageError(f"the API key has a character an HTTP header cannot carry "
                         f"(character {bad + 1} of {len(key)}; the key is not shown)",
                         hint="check FUSION_API_KEY, OPENAI_API_KEY or ANTHROPIC_API_KEY "
                              "(or api_key in the config file)")
    return key or None


def _guess_provider(settings: Settings, env: Mapping[str, str]) -> str:
    if settings.base_url:
        return "anthropic" if "anthropic.com" in settings.base_url else "openai"
    if not env.get("OPENAI_API_KEY") and env.get("ANTHROPIC_API_KEY"):
        return "anthropic"
    return "openai"


def unreachable_hint(endpoint: Endpoint) -> str:
    """What to set when the endpoint cannot be reached: OpenAI, Ollama, and the offline echo."""
    api = "Anthropic" if endpoint.provider == "anthropic" else "OpenAI-compatible"
    return (f"tried model {endpoint.model!r} over the {api} API; "
            f"to use OpenAI: export OPENAI_API_KEY=sk-...; "
            f"for a local Ollama: run 'ollama serve' and 'ollama pull {OLLAMA_MODEL}', or set "
            f"FUSION_BASE_URL=http://HOST:11434/v1 and FUSION_MODEL={OLLAMA_MODEL}; "
            f"for Anthropic: export ANTHROPIC_API_KEY=...; "
            f"to try fusion offline: --provider echo or FUSION_PROVIDER=echo")
