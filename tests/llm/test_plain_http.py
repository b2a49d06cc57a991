"""An http:// endpoint skips building a verifying TLS context (a start-up cost, see bench/);
a proxy from the environment must still be used, and https:// keeps httpx's own TLS."""

from __future__ import annotations

import pytest

from fusion_cli.config import Settings
from fusion_cli.llm import _no_tls_needed, make_client
from fusion_cli.messages import ChatMessage


def client(base_url: str):
    return make_client(Settings(storage="memory:", provider="openai", base_url=base_url, model="m"))


def test_a_plain_http_endpoint_is_reached_directly(model_server):
    model_server.reply_text("direct")
    c = client(model_server.openai_url)
    assert c.complete([ChatMessage.user("hi")]) == "direct"
    assert model_server.requests[0].path == "/v1/chat/completions"
    c.close()


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_a_proxy_from_the_environment_is_still_used(model_server, monkeypatch, variable):
    # The loopback server stands in for the proxy: it receives the absolute URL.
    monkeypatch.setenv(variable, model_server.url)
    model_server.reply_text("via proxy")
    c = client("http://model.invalid:9/v1")  # not resolvable: only the proxy can answer
    assert c.complete([ChatMessage.user("hi")]) == "via proxy"
    assert model_server.requests[0].path == "http://model.invalid:9/v1/chat/completions"
    c.close()


@pytest.mark.parametrize("url,expected", [
    ("http://localhost:11434/v1", True),
    ("HTTP://127.0.0.1:8000/v1", True),
    ("https://api.openai.com/v1", False),
])
def test_only_plain_http_without_a_proxy_skips_tls(url, expected, monkeypatch):
    for v in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(v, raising=False)
    assert _no_tls_needed(url) is expected
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    assert _no_tls_needed(url) is False
