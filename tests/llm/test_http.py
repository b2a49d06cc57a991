"""llm.http.Http alone, over httpx.MockTransport: retries, and errors that say what failed."""

from __future__ import annotations

import httpx
import pytest

from fusion_cli.errors import ProviderError
from fusion_cli.llm.http import Http, provider_message
from fusion_cli.llm.retry import RetryPolicy

FAST = RetryPolicy(base_delay=0.0)
URL = "http://user:hunter2@model.test/v1/chat/completions"


def http_answering(*responses: httpx.Response, **options) -> tuple[Http, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0) if len(queue) > 1 else queue[0]

    options.setdefault("policy", FAST)
    return Http(5.0, transport=httpx.MockTransport(handler), **options), seen


def test_a_4xx_other_than_429_is_returned_at_once():
    http, seen = http_answering(httpx.Response(400, json={"error": {"message": "bad model"}}))
    assert http.post_json(URL, {}, {}).status_code == 400
    assert len(seen) == 1


def test_5xx_is_retried_three_times_then_reported():
    http, seen = http_answering(httpx.Response(503, json={"error": {"message": "overloaded"}}))
    with pytest.raises(ProviderError) as info:
        http.post_json(URL, {}, {"x": 1})
    assert len(seen) == 4
    text = str(info.value)
    assert "HTTP 503" in text and "overloaded" in text and "4 attempts" in text
    assert "http://model.test/v1/chat/completions" in text and "hunter2" not in text


def test_429_then_success():
    notes: list[str] = []
    http, seen = http_answering(httpx.Response(429, headers={"Retry-After": "0"}),
                                httpx.Response(200, json={"ok": True}), on_retry=notes.append)
    assert http.post_json(URL, {}, {}).json() == {"ok": True}
    assert len(seen) == 2
    assert "HTTP 429" in notes[0] and "retry 1 of 3" in notes[0]


def test_a_retry_after_longer_than_the_cap_is_not_waited_for():
    http, seen = http_answering(httpx.Response(429, headers={"Retry-After": "3600"},
                                               json={"error": {"message": "quota"}}))
    with pytest.raises(ProviderError) as info:
        http.post_json(URL, {}, {})
    assert len(seen) == 1
    assert "asked to wait 3600 s" in str(info.value)


def test_connection_errors_are_retried_and_named_with_the_hint():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    http = Http(5.0, transport=httpx.MockTransport(refuse), policy=FAST, unreachable_hint="set X")
    with pytest.raises(ProviderError) as info:
        http.post_json(URL, {}, {})
    assert str(info.value) == ("cannot reach the model at http://model.test/v1/chat/completions: "
                               "Connection refused (gave up after 4 attempts) (set X)")


def test_the_secret_is_scrubbed_from_a_provider_message():
    response = httpx.Response(401, json={"error": {"message": "Incorrect API key provided: sk-XYZ"}})
    assert provider_message(response, "sk-XYZ") == "Incorrect API key provided: ***"
    http, _ = http_answering(response, secret="sk-XYZ")
    error = http.status_error(URL, http.post_json(URL, {}, {}))
    assert "sk-XYZ" not in str(error) and "check the API key" in str(error)


@pytest.mark.parametrize("response, expected", [
    (httpx.Response(404, json={"error": "model 'nope' not found"}), "model 'nope' not found"),  # Ollama
    (httpx.Response(400, json={"type": "error", "error": {"type": "invalid_request_error",
                                                          "message": "max_tokens: required"}}),
     "max_tokens: required"),  # Anthropic
    (httpx.Response(422, json={"detail": [{"loc": ["body"], "msg": "bad"}]}), '[{"loc":["body"],"msg":"bad"}]'),
    (httpx.Response(502, text="<html>\n Bad   Gateway </html>"), "<html> Bad Gateway </html>"),
    (httpx.Response(500, text=""), "(an empty response body)"),
])
def test_provider_messages_of_every_shape(response, expected):
    assert provider_message(response) == expected
