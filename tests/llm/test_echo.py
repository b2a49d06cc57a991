"""The offline echo provider."""

from __future__ import annotations

import json

from fusion_cli.agent.protocol import parse_decision
from fusion_cli.config import Settings
from fusion_cli.llm import make_client
from fusion_cli.llm.echo import echo_answer
from fusion_cli.messages import ChatMessage

S, U, A = ChatMessage.system, ChatMessage.user, ChatMessage.assistant


def test_the_answer_repeats_the_latest_message_and_counts_earlier_ones_without_the_system_prompt():
    assert echo_answer([S("p"), U("hi")]) == "Echo: hi (I was given 0 earlier messages of this session.)"
    assert echo_answer([U("a"), U("b")]) == "Echo: b (I was given 1 earlier message of this session.)"
    assert echo_answer([S("p"), U("a"), A("x"), U("b")]) == \
        "Echo: b (I was given 2 earlier messages of this session.)"


def test_the_reply_follows_the_agent_protocol():
    reply = make_client(Settings(storage="memory:", provider="echo")).complete([S("p"), U("hello")])
    assert json.loads(reply)["is_final"] is True
    decision = parse_decision(reply)
    assert decision.is_final and decision.final_answer.startswith("Echo: hello (")
