"""The library API, mirroring the seed's: create_session, send_message, clear_history, ..."""

from __future__ import annotations

import pytest

from fusion_cli import create_session
from fusion_cli.config import Settings
from fusion_cli.errors import EmptyMessage, ProviderError, UsageError
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage
from tests.model_server import Reply, closed_port_url, final, tool_call


def session_on(server, url, sid="user-123", **kw):
    kw.setdefault("provider", "openai")
    kw.setdefault("base_url", server.openai_url)
    return create_session(sid, url, **kw)


def test_persistent_session_pattern(model_server, tmp_path):
    store = f"file:{tmp_path / 'sessions'}"
    model_server.reply_final("Nice to meet you, Alice.")
    model_server.reply_final("Your name is Alice")
    with session_on(model_server, store) as first:
        assert first.send_message("Remember: my name is Alice").result == "Nice to meet you, Alice."
    with session_on(model_server, store) as later:
        result = later.send_message("What is my name?")
        assert (result.result, result.success) == ("Your name is Alice", True)
        assert later.message_count() == 5  # system, and two user/assistant pairs
        assert later.session_id == "user-123"
    sent = model_server.requests[1].messages
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1]["content"] == "Remember: my name is Alice"
    assert "Nice to meet you, Alice." in sent[2]["content"]


def test_the_system_prompt_is_written_once_first(model_server):
    model_server.reply_final("a")
    model_server.reply_final("b")
    s = session_on(model_server, "memory:", system_prompt="You are terse.")
    s.send_message("one")
    s.send_message("two")
    history = s.history()
    assert [m.role for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert history[0].content.startswith("You are terse.")
    assert '"is_final": true' in history[0].content and "read_file" in history[0].content


def test_send_message_with_iterations(model_server):
    model_server.responder = lambda request: Reply(content=tool_call("list_directory", {}))
    s = session_on(model_server, "memory:", max_iterations=10)
    result = s.send_message_with_iterations("go", 2)
    assert not result.success and len(result.steps) == 2
    assert len(model_server.requests) == 2
    assert s.message_count() == 1 + 1 + 4  # system, user, 2 x (assistant, observation): committed


def test_a_failed_turn_leaves_the_session_unchanged(tmp_path):
    store = open_storage(f"file:{tmp_path / 's'}")
    store.save("x", [ChatMessage.user("before")])
    s = create_session("x", store, provider="openai", base_url=closed_port_url())
    with pytest.raises(ProviderError, match="cannot reach the model"):
        s.send_message("lost?")
    assert store.load("x") == [ChatMessage.user("before")]


def test_clear_history_and_count(model_server):
    model_server.reply_final("a")
    s = session_on(model_server, "memory:")
    assert s.message_count() == 0
    s.send_message("hi")
    assert s.message_count() == 3
    s.clear_history()
    assert s.message_count() == 0


def test_empty_messages_are_refused_before_any_request(model_server):
    s = session_on(model_server, "memory:")
    for message in ("", "  \n\t"):
        with pytest.raises(EmptyMessage):
            s.send_message(message)
    assert model_server.requests == []


def test_settings_object_and_keyword_overrides(model_server):
    model_server.reply_final("ok")
    settings = Settings(storage="memory:", provider="openai", base_url="http://unused.invalid", model="m")
    s = create_session("k", "memory:", settings=settings, base_url=model_server.openai_url)
    s.send_message("hi")
    assert model_server.requests[0].body["model"] == "m"


def test_options_are_checked():
    with pytest.raises(TypeError, match="unknown Session option"):
        create_session("x", "memory:", colour="blue")
    with pytest.raises(UsageError, match="unknown tool"):
        create_session("x", "memory:", allow=["format_disk"])


def test_progress_goes_to_on_step_and_nothing_is_printed(model_server, capsys):
    model_server.reply_tool("list_directory", {})
    model_server.reply_text(final("x", thought="done"))
    steps = []
    s = session_on(model_server, "memory:", on_step=steps.append)
    s.send_message("hi")
    assert [step.action for step in steps] == ["list_directory", None]
    assert capsys.readouterr() == ("", "")


def test_the_echo_provider_through_the_library():
    s = create_session("e", "memory:", provider="echo")
    assert s.send_message("hi").result == "Echo: hi (I was given 0 earlier messages of this session.)"
    assert s.send_message("again").result == "Echo: again (I was given 2 earlier messages of this session.)"


def test_max_history_limits_what_the_model_is_given():
    s = create_session("e", "memory:", provider="echo", max_history=1)
    s.send_message("one")
    assert s.send_message("two").result.endswith("(I was given 1 earlier message of this session.)")
    assert s.message_count() == 5  # everything is still stored
