"""The ReAct loop alone, with a scripted client (no HTTP)."""

from __future__ import annotations

import pytest

from fusion_cli.agent import Toolbox, run_turn
from fusion_cli.errors import ProviderError
from fusion_cli.messages import ChatMessage
from tests.model_server import final, tool_call

S, U, A = ChatMessage.system, ChatMessage.user, ChatMessage.assistant


class Scripted:
    """Answers with the given replies in order, recording what it was sent."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies)
        self.seen: list[list[ChatMessage]] = []

    def complete(self, messages, *, json_mode=True):
        self.seen.append(list(messages))
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self):
        pass


def test_a_direct_answer(tmp_path):
    client = Scripted(final("Hi!", thought="greet"))
    result, new = run_turn(client, [S("p")], "hello", Toolbox(root=tmp_path), 10)
    assert (result.result, result.success) == ("Hi!", True)
    assert [s.to_dict() for s in result.steps] == [
        {"thought": "greet", "action": None, "input": None, "observation": None}]
    assert new == [U("hello"), A(final("Hi!", thought="greet"))]
    assert client.seen == [[S("p"), U("hello")]]


def test_a_tool_call_then_a_final_answer(tmp_path):
    (tmp_path / "a.txt").write_text("42")
    client = Scripted(tool_call("read_file", {"path": "a.txt"}, thought="look"), final("It says 42"))
    seen_steps = []
    result, new = run_turn(client, [S("p")], "what is in a.txt?", Toolbox(root=tmp_path), 10,
                           on_step=seen_steps.append)
    assert result.result == "It says 42" and result.success
    assert result.steps[0].to_dict() == {"thought": "look", "action": "read_file",
                                         "input": {"path": "a.txt"}, "observation": "42"}
    assert seen_steps == result.steps
    assert [m.role for m in new] == ["user", "assistant", "user", "assistant"]
    assert new[2] == U("Observation: 42")
    assert client.seen[1][-1] == U("Observation: 42")  # the model saw the observation


def test_a_reply_that_cannot_be_followed_is_fed_back(tmp_path):
    client = Scripted('{"thought": "hmm"}', final("ok"))
    result, new = run_turn(client, [], "x", Toolbox(root=tmp_path), 10)
    assert result.success
    assert new[2].content.startswith("Observation: Error: your reply had neither an action nor a final answer")
    assert '"is_final": true' in new[2].content  # it is reminded of the format


def test_max_iterations_without_a_final_answer(tmp_path):
    client = Scripted(*[tool_call("list_directory", {})] * 3)
    result, new = run_turn(client, [], "loop", Toolbox(root=tmp_path), 3)
    assert not result.success and result.result == "Stopped after 3 steps without a final answer."
    assert len(result.steps) == 3 and len(new) == 1 + 2 * 3


def test_a_provider_error_propagates(tmp_path):
    client = Scripted(tool_call("list_directory", {}), ProviderError("down"))
    with pytest.raises(ProviderError):
        run_turn(client, [], "x", Toolbox(root=tmp_path), 5)


def test_the_secret_is_scrubbed_from_replies_and_observations(tmp_path):
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-test-SECRET123")
    client = Scripted(tool_call("read_file", {"path": ".env"}), final("the key is sk-test-SECRET123"))
    result, new = run_turn(client, [], "x", Toolbox(root=tmp_path), 5, secret="sk-test-SECRET123")
    assert "SECRET123" not in repr(new) + repr(result.to_dict())
    assert result.result == "the key is ***"
