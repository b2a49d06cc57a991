"""The OpenAI-compatible and Anthropic clients against the loopback model server."""

from __future__ import annotations

import pytest

from fusion_cli.config import Settings
from fusion_cli.errors import ProviderError
from fusion_cli.llm import make_client
from fusion_cli.llm.anthropic import CONTINUED, to_anthropic
from fusion_cli.messages import ChatMessage
from tests.model_server import Reply

S, U, A = ChatMessage.system, ChatMessage.user, ChatMessage.assistant


def client(provider, base_url, **kw):
    return make_client(Settings(storage="memory:", provider=provider, base_url=base_url, **kw))


def test_openai_request_shape(model_server):
    model_server.reply_text("hi there")
    c = client("openai", model_server.openai_url, model="m1", api_key="sk-1", temperature=0.2)
    assert c.complete([S("sys"), U("hello")]) == "hi there"
    request = model_server.requests[0]
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-1"
    assert request.body == {"model": "m1", "temperature": 0.2, "response_format": {"type": "json_object"},
                            "messages": [{"role": "system", "content": "sys"},
                                         {"role": "user", "content": "hello"}]}


def test_openai_without_a_key_sends_no_authorization(model_server):
    model_server.reply_text("ok")
    client("openai", model_server.openai_url).complete([U("x")])
    assert "authorization" not in model_server.requests[0].headers


def test_response_format_refused_is_dropped_for_the_rest_of_the_invocation(model_server):
    model_server.reply_error(400, "Unrecognized request argument: response_format")
    model_server.reply_text("one")
    model_server.reply_text("two")
    c = client("openai", model_server.openai_url)
    assert c.complete([U("a")]) == "one"
    assert c.complete([U("b")]) == "two"
    formats = ["response_format" in r.body for r in model_server.requests]
    assert formats == [True, False, False]


def test_another_400_is_an_error_with_the_providers_message(model_server):
    model_server.reply_error(400, "model 'nope' does not exist")
    with pytest.raises(ProviderError) as info:
        client("openai", model_server.openai_url, model="nope").complete([U("a")])
    assert f"{model_server.openai_url}/chat/completions answered HTTP 400: model 'nope' does not exist" in str(info.value)
    assert len(model_server.requests) == 1


def test_an_unreadable_success_is_an_error(model_server):
    model_server.reply(Reply(body={"choices": []}))
    with pytest.raises(ProviderError, match="cannot read: no choices"):
        client("openai", model_server.openai_url).complete([U("a")])


def test_anthropic_request_shape(model_server):
    model_server.reply_text("bonjour")
    c = client("anthropic", model_server.url, model="claude-x", api_key="sk-ant")
    history = [S("be brief"), U("hi"), A("hello"), U("Observation: x"), U("and?")]
    assert c.complete(history) == "bonjour"
    request = model_server.requests[0]
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == "sk-ant"
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    assert request.body["system"] == "be brief"
    assert request.body["model"] == "claude-x" and request.body["max_tokens"] > 0
    assert request.body["messages"] == [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "hello"},
                                        {"role": "user", "content": "Observation: x\n\nand?"}]


def test_anthropic_error_body(model_server):
    model_server.reply(Reply(status=401, body={"type": "error", "error": {
        "type": "authentication_error", "message": "invalid x-api-key"}}))
    with pytest.raises(ProviderError, match="HTTP 401: invalid x-api-key"):
        client("anthropic", model_server.url).complete([U("a")])


@pytest.mark.parametrize("base", ["", "/v1", "/v1/messages"])
def test_anthropic_base_url_forms(model_server, base):
    model_server.reply_text("ok")
    client("anthropic", model_server.url + base).complete([U("a")])
    assert model_server.requests[0].path == "/v1/messages"


def test_to_anthropic_moves_system_and_merges_same_role_messages():
    system, turns = to_anthropic([S("one"), U("a"), U("b"), A("c"), A("d"), S("two"), U("e")])
    assert system == "one\n\ntwo"
    assert turns == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c\n\nd"},
                     {"role": "user", "content": "e"}]


def test_to_anthropic_starts_with_a_user_message():
    system, turns = to_anthropic([S("s"), A("earlier answer"), U("now")])
    assert turns[0] == {"role": "user", "content": CONTINUED}
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert to_anthropic([U("only")]) == (None, [{"role": "user", "content": "only"}])
