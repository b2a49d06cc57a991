"""Run by the tools venv's Python: write conversations into an `llm` logs database.

    python llm_fixture.py LOGS.DB SPEC.json  ->  prints {"name": conversation_id, ...}

SPEC maps a name to [exchanges, prompt format, answer format]. The rows are
written by llm's own code (`Response.log_to_db`), so they are exactly what
`llm` stores itself; only the model call is replaced by the canned answer,
since asking the loopback server a thousand times would only slow the set-up.
"""

from __future__ import annotations

import json
import sys

import llm
import sqlite_utils
from llm.migrations import migrate


def main() -> None:
    db = sqlite_utils.Database(sys.argv[1])
    migrate(db)
    with open(sys.argv[2]) as f:
        spec = json.load(f)
    model = llm.get_model("loopback")
    ids = {}
    for name, (exchanges, prompt_format, answer_format) in spec.items():
        conversation = model.conversation()
        for i in range(exchanges):
            answer = answer_format % i
            model.execute = lambda *args, _answer=answer, **kw: iter([_answer])
            response = conversation.prompt(prompt_format % i, stream=False)
            response.text()
            response.log_to_db(db)
        ids[name] = conversation.id
    print(json.dumps(ids))


if __name__ == "__main__":
    main()
