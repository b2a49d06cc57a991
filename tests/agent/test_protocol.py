"""Parsing the model's step replies, tolerantly."""

from __future__ import annotations

import pytest

from fusion_cli.agent.protocol import parse_decision
from tests.model_server import final, tool_call


def test_a_final_answer():
    d = parse_decision(final("42", thought="easy"))
    assert (d.is_final, d.final_answer, d.thought, d.tool, d.problem) == (True, "42", "easy", None, None)
    assert d.stored == final("42", thought="easy")


def test_a_tool_call():
    d = parse_decision(tool_call("read_file", {"path": "a.txt"}))
    assert (d.is_final, d.tool, d.input, d.problem) == (False, "read_file", {"path": "a.txt"}, None)


def test_the_outermost_object_is_found_in_surrounding_text():
    inner = tool_call("list_directory", {"path": "."})
    d = parse_decision(f"Sure! Here is my step:\n```json\n{inner}\n```\nDone.")
    assert d.tool == "list_directory" and d.input == {"path": "."}
    assert d.stored == inner  # the model's JSON, without the chatter


@pytest.mark.parametrize("reply", ["Paris is the capital of France.", "a {broken json", "{not: json}", "[1, 2]", "7"])
def test_text_without_a_json_object_is_a_direct_final_answer(reply):
    d = parse_decision(f"  {reply}\n")
    assert (d.is_final, d.final_answer, d.stored, d.problem) == (True, reply, reply, None)


def test_a_final_answer_that_is_not_a_string_is_kept_as_json():
    d = parse_decision('{"thought": "t", "action": null, "is_final": true, "final_answer": {"n": 1}}')
    assert d.final_answer == '{"n":1}'


def test_a_final_answer_without_is_final_is_accepted():
    d = parse_decision('{"thought": "t", "final_answer": "yes"}')
    assert d.is_final and d.final_answer == "yes"


def test_action_given_as_a_bare_tool_name():
    d = parse_decision('{"thought": "t", "action": "read_file", "input": {"path": "x"}}')
    assert (d.tool, d.input) == ("read_file", {"path": "x"})


@pytest.mark.parametrize("reply, problem", [
    ('{"thought": "hmm", "action": null, "is_final": false, "final_answer": null}', "neither an action"),
    ('{"thought": "t", "action": {"input": {}}, "is_final": false}', "no 'tool' name"),
    ('{"thought": "t", "action": null, "is_final": true, "final_answer": null}', "final_answer was missing"),
    ("   ", "empty"),
])
def test_replies_that_cannot_be_followed_carry_a_problem(reply, problem):
    d = parse_decision(reply)
    assert not d.is_final and problem in d.problem
