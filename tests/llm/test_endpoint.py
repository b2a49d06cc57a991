"""Which endpoint, model and key: defaults that work with no configuration."""

from __future__ import annotations

import pytest

from fusion_cli.config import Settings
from fusion_cli.errors import UsageError
from fusion_cli.llm.endpoint import (ANTHROPIC_BASE_URL, ANTHROPIC_MODEL, OLLAMA_BASE_URL, OLLAMA_MODEL,
                                     OPENAI_BASE_URL, OPENAI_MODEL, resolve_endpoint, unreachable_hint)


def resolve(env=None, **settings):
    e = resolve_endpoint(Settings(storage="memory:", **settings), env or {})
    return e.provider, e.base_url, e.model, e.api_key


def test_nothing_set_means_a_local_ollama_without_a_key():
    assert resolve() == ("openai", OLLAMA_BASE_URL, OLLAMA_MODEL, None)


def test_an_openai_key_means_openai():
    assert resolve({"OPENAI_API_KEY": "sk-o"}) == ("openai", OPENAI_BASE_URL, OPENAI_MODEL, "sk-o")


def test_an_anthropic_key_means_anthropic():
    assert resolve({"ANTHROPIC_API_KEY": "sk-a"}) == ("anthropic", ANTHROPIC_BASE_URL, ANTHROPIC_MODEL, "sk-a")


def test_openai_wins_when_both_keys_are_set():
    assert resolve({"OPENAI_API_KEY": "sk-o", "ANTHROPIC_API_KEY": "sk-a"})[0] == "openai"


def test_fusion_api_key_comes_first():
    assert resolve({"OPENAI_API_KEY": "sk-o"}, api_key="sk-f")[3] == "sk-f"
    assert resolve({"ANTHROPIC_API_KEY": "sk-a"}, provider="anthropic", api_key="sk-f")[3] == "sk-f"


def test_the_provider_reads_only_its_own_variable():
    assert resolve({"OPENAI_API_KEY": "sk-o"}, provider="anthropic")[3] is None


def test_a_base_url_of_a_local_server():
    assert resolve(base_url="http://gpu:8000/v1/") == ("openai", "http://gpu:8000/v1", OLLAMA_MODEL, None)
    assert resolve(base_url="http://gpu:8000/v1", model="qwen")[2] == "qwen"
    assert resolve(base_url="https://api.anthropic.com")[0] == "anthropic"


def test_echo_is_used_only_when_asked_for():
    assert resolve(provider="echo")[0] == "echo"
    assert all(resolve(env)[0] != "echo" for env in ({}, {"OPENAI_API_KEY": "k"}, {"ANTHROPIC_API_KEY": "k"}))


def test_a_base_url_must_be_http():
    with pytest.raises(UsageError, match="invalid base URL 'localhost:11434/v1'"):
        resolve(base_url="localhost:11434/v1")


def test_the_endpoint_repr_hides_the_key():
    endpoint = resolve_endpoint(Settings(storage="memory:", api_key="sk-test-SECRET123"), {})
    assert "SECRET123" not in repr(endpoint)


def test_the_unreachable_hint_says_what_to_set():
    hint = unreachable_hint(resolve_endpoint(Settings(storage="memory:"), {}))
    for needed in ("OPENAI_API_KEY", "FUSION_BASE_URL", "ollama serve", "--provider echo", "FUSION_PROVIDER=echo"):
        assert needed in hint
