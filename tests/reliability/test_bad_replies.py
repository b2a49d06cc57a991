"""Model replies that misbehave, over real HTTP, in both protocols (OpenAI and Anthropic).

Replies the agent can live with (garbage text, huge text, a tool call with
wrong types) end the turn normally or become an observation the model can
correct. Responses fusion cannot use (an error in a 200, truncated or
non-JSON bodies, a body that never ends, one too large) give exit 4 and one
clear error, and leave the session exactly as it was, its lock free.

JSON-level replies come from tests/model_server.py; byte-level ones (wrong
framing, a trickle, a bad encoding) from the small raw server below.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import orjson
import pytest
from click.testing import CliRunner

import fusion_cli.llm.http
from fusion_cli.cli import cli
from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage
from tests.model_server import Reply, final

U, A = ChatMessage.user, ChatMessage.assistant
PROVIDERS = ["openai", "anthropic"]
BEFORE = [ChatMessage.system("the prompt"), U("earlier"), A(final("earlier answer"))]
UNSENT = "fusion: your message was not sent; here it is:\nthe question\n"


def answer_body(path: str, text: str) -> dict:
    """A well-formed response of the protocol the path belongs to, carrying `text`."""
    if path.endswith("/messages"):
        return {"type": "message", "role": "assistant", "content": [{"type": "text", "text": text}]}
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


# ---- a raw server: whatever bytes a test wants, however slowly -----------------

Behaviour = Callable[["_RawHandler"], None]


class RawServer:
    def __init__(self) -> None:
        self.behaviour: Behaviour | None = None
        self.requests: list[str] = []
        self.stopped = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _RawHandler)
        self._httpd.daemon_threads = True
        self._httpd.raw = self  # type: ignore[attr-defined]
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()

    def base_url(self, provider: str) -> str:
        port = self._httpd.server_address[1]
        return f"http://127.0.0.1:{port}" + ("/v1" if provider == "openai" else "")

    def stop(self) -> None:
        self.stopped.set()
        self._httpd.shutdown()
        self._httpd.server_close()


class _RawHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        raw: RawServer = self.server.raw  # type: ignore[attr-defined]
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        raw.requests.append(self.path)
        try:
            assert raw.behaviour is not None, "the test set no behaviour"
            raw.behaviour(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what a time-out test expects

    def head(self, status: int = 200, content_type: str = "application/json", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()

    def whole(self, data: bytes, status: int = 200, content_type: str = "application/json", **headers) -> None:
        self.head(status, content_type, Content_Length=str(len(data)), **headers)
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture
def raw_server() -> Iterator[RawServer]:
    server = RawServer()
    yield server
    server.stop()


# ---- running fusion -------------------------------------------------------------

@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"file:{tmp_path / 'sessions'}"
    open_storage(url).save("s", BEFORE)
    return url


def send(store_url: str, provider: str, base_url: str, *extra: str):
    return CliRunner().invoke(cli, ["--storage", store_url, "send", "-s", "s", "--provider", provider,
                                    "--base-url", base_url, "--max-iterations", "4", *extra,
                                    "the question"])


def model_url(model_server, provider: str) -> str:
    return model_server.openai_url if provider == "openai" else model_server.url


def assert_failed_cleanly(result, store_url: str, *says: str) -> None:
    """Exit 4, one error line naming the model, the message given back, the session as it was."""
    assert (result.exit_code, result.stdout) == (4, ""), result.stderr
    first, _, rest = result.stderr.partition("\n")
    assert first.startswith("fusion: error: ") and "the model at http://127.0.0.1:" in first, first
    for text in says:
        assert text in first
    assert rest == UNSENT and "Traceback" not in result.stderr
    store = open_storage(store_url)
    assert store.load("s") == BEFORE
    with store.lock("s", timeout=0):  # released: taken at once
        pass


# ---- replies the agent lives with -------------------------------------------------

GARBAGE = ["\x00\x01\x02 binary-ish \x7f", "{{{{ not json", "}{", '{"is_final": tru', "null", "[1, 2, 3]",
           "\u202e reversed \ufeff \U0001f600", "<html><body>502 Bad Gateway</body></html>", "   \n"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_garbage_text_is_a_plain_answer_or_fed_back(store_url, model_server, provider):
    url = model_url(model_server, provider)
    for text in GARBAGE:
        open_storage(store_url).save("s", BEFORE)
        model_server.reply_text(text)
        model_server.reply_final("recovered")
        result = send(store_url, provider, url)
        assert result.exit_code == 0, result.stderr
        turn = open_storage(store_url).load("s")[len(BEFORE):]
        assert turn[0] == U("the question")
        if text.strip():  # not JSON that can be followed: the model's plain answer, stored as given
            assert result.stdout == text.strip() + "\n"
            assert turn[1:] == [A(text.strip())]
            model_server.replies.clear()
        else:  # an empty reply is fed back, and the model answers properly next
            assert result.stdout == "recovered\n"
            assert turn[2].content.startswith("Observation: Error: your reply was empty")
            assert turn[3] == A(final("recovered"))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_huge_reply_is_stored_whole(store_url, model_server, provider):
    answer = "".join(f"line {n}: {'x' * 90}\n" for n in range(80_000))  # 8 MB
    model_server.reply_final(answer)
    result = send(store_url, provider, model_url(model_server, provider))
    assert (result.exit_code, result.stdout) == (0, answer + "\n")
    assert open_storage(store_url).load("s")[len(BEFORE):] == [U("the question"), A(final(answer))]


WRONG_TYPES = [
    ({"thought": "t", "action": {"tool": 42, "input": {}}, "is_final": False}, "no 'tool' name"),
    ({"thought": "t", "action": {"tool": None, "input": {}}}, "no 'tool' name"),
    ({"thought": "t", "action": {"tool": ["read_file"], "input": {}}}, "no 'tool' name"),
    ({"thought": "t", "action": {"tool": "read_file", "input": ["a.txt"]}}, "must be a JSON object, not list"),
    ({"thought": "t", "action": {"tool": "read_file", "input": 7}}, "must be a JSON object, not int"),
    ({"thought": "t", "action": {"tool": "read_file", "input": {"path": 7}}}, "field 'path' must be a string"),
    ({"thought": "t", "action": {"tool": "read_file", "input": {}}}, "missing required field 'path'"),
    ({"thought": "t", "action": {"tool": "list_directory", "input": "."}}, "must be a JSON object, not str"),
    ({"thought": "t", "action": {"tool": "no_such_tool", "input": {}}}, "there is no tool 'no_such_tool'"),
    ({"thought": "t", "action": [1, 2], "is_final": False}, "neither an action nor a final answer"),
    ({"thought": "t", "action": None, "is_final": True, "final_answer": None}, "final_answer was missing"),
    ({"thought": {"deep": [1]}, "action": {"tool": "execute_shell", "input": {"command": 1}}},
     "not enabled"),
]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_tool_call_with_wrong_types_becomes_an_observation(store_url, model_server, provider, tmp_path,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)  # the tools' root: nothing of the repository is read
    url = model_url(model_server, provider)
    for reply, observed in WRONG_TYPES:
        open_storage(store_url).save("s", BEFORE)
        text = json.dumps(reply)
        model_server.reply_text(text)
        model_server.reply_final("corrected")
        result = send(store_url, provider, url, "--json")
        assert result.exit_code == 0, (reply, result.stderr)
        steps = orjson.loads(result.stdout)["steps"]
        assert observed in steps[0]["observation"], (reply, steps[0])
        turn = open_storage(store_url).load("s")[len(BEFORE):]
        assert [m.role for m in turn] == ["user", "assistant", "user", "assistant"]
        assert turn[1] == A(text)  # the model's own words, kept for it to see
        assert turn[2].content.startswith("Observation: Error: ") and observed in turn[2].content
        # the model is shown the observation on its next step, as the user's
        assert model_server.requests[-1].messages[-1]["content"].endswith(turn[2].content)


BAD_SHAPES = {
    "openai": [{"choices": [{"message": {"content": {"text": "a"}}}]}, {"choices": [{"message": {"content": None}}]},
               {"choices": [{"message": {}}]}, {"choices": "x"}, {"choices": []}, [1, 2], {}],
    "anthropic": [{"content": [{"type": "text", "text": 5}]}, {"content": "text"}, {"content": [7]},
                  {"content": None}, [1, 2], {}],
}
NO_TEXT = {  # well-formed, but no text in it: an empty reply, which the model is told about
    "openai": {"choices": [{"message": {"content": [{"type": "text", "text": 5}, "x", {"text": ["a"]}]}}]},
    "anthropic": {"content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}]},
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_reply_of_the_wrong_shape_is_a_clear_error(store_url, model_server, provider):
    for body in BAD_SHAPES[provider]:
        model_server.reply(Reply(body=body))
        result = send(store_url, provider, model_url(model_server, provider))
        assert_failed_cleanly(result, store_url, "sent a response fusion cannot read")
    assert len(model_server.requests) == len(BAD_SHAPES[provider])  # none retried


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_reply_without_text_is_fed_back_as_empty(store_url, model_server, provider):
    model_server.reply(Reply(body=NO_TEXT[provider]))
    model_server.reply_final("with text now")
    result = send(store_url, provider, model_url(model_server, provider))
    assert (result.exit_code, result.stdout) == (0, "with text now\n"), result.stderr
    turn = open_storage(store_url).load("s")[len(BEFORE):]
    assert turn[1] == A("") and turn[2].content.startswith("Observation: Error: your reply was empty")


# ---- responses fusion cannot use: exit 4, nothing stored ----------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
def test_http_200_with_an_error_body(store_url, model_server, provider):
    body = ({"error": {"message": "upstream overloaded", "type": "server_error", "code": 503}}
            if provider == "openai" else
            {"type": "error", "error": {"type": "overloaded_error", "message": "upstream overloaded"}})
    model_server.reply(Reply(status=200, body=body))
    result = send(store_url, provider, model_url(model_server, provider))
    assert_failed_cleanly(result, store_url, "answered HTTP 200 with an error: upstream overloaded")
    assert len(model_server.requests) == 1  # not retried: the same request gets the same answer


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name, behave, says", [
    ("truncated JSON", lambda h: h.whole(json.dumps(answer_body(h.path, final("hi"))).encode()[:-9]),
     "fusion cannot read"),
    ("empty body", lambda h: h.whole(b""), "fusion cannot read"),
    ("HTML page", lambda h: h.whole(b"<html><body>Welcome to nginx!</body></html>", content_type="text/html"),
     "fusion cannot read"),
    ("a JSON string", lambda h: h.whole(b'"hello"'), "fusion cannot read"),
    ("bad gzip", lambda h: h.whole(b"\x1f\x8b not gzip at all", Content_Encoding="gzip"),
     "could not be decoded"),
    ("invalid UTF-8 JSON", lambda h: h.whole(b'{"choices": [{"message": {"content": "caf\xe9"}}], '
                                             b'"content": [{"type": "text", "text": "caf\xe9"}]}'),
     "fusion cannot read"),
], ids=["truncated", "empty", "html", "json-string", "bad-gzip", "bad-utf8"])
def test_unusable_bodies(store_url, raw_server, provider, name, behave, says):
    raw_server.behaviour = behave
    result = send(store_url, provider, raw_server.base_url(provider))
    assert_failed_cleanly(result, store_url, says)
    assert "--base-url" in result.stderr  # points at the likely cause: the wrong endpoint


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_wrong_content_type_on_a_good_body_is_accepted(store_url, raw_server, provider):
    # Local servers are sloppy about Content-Type; the body is what counts.
    raw_server.behaviour = lambda h: h.whole(json.dumps(answer_body(h.path, final("fine"))).encode(),
                                             content_type="text/plain; charset=latin-1")
    result = send(store_url, provider, raw_server.base_url(provider))
    assert (result.exit_code, result.stdout) == (0, "fine\n"), result.stderr


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_body_that_never_ends_hits_the_time_limit(store_url, raw_server, provider):
    # A byte every 50 ms: httpx's own timeout is per read and never fires on this.
    def trickle(h) -> None:
        h.head(Content_Length="100000000")
        while not raw_server.stopped.wait(0.05):
            h.wfile.write(b" ")
            h.wfile.flush()

    raw_server.behaviour = trickle
    started = time.monotonic()
    result = send(store_url, provider, raw_server.base_url(provider), "--timeout", "0.3")
    assert_failed_cleanly(result, store_url, "did not answer within 0.3 s", "gave up after 4 attempts")
    assert "--timeout" in result.stderr
    assert time.monotonic() - started < 60  # a bound on a hang, not a timing assertion
    # The lock was released and nothing half-written: the next send just works.
    raw_server.behaviour = lambda h: h.whole(json.dumps(answer_body(h.path, final("back"))).encode())
    again = send(store_url, provider, raw_server.base_url(provider), "--timeout", "5")
    assert (again.exit_code, again.stdout) == (0, "back\n")
    assert open_storage(store_url).load("s") == BEFORE + [U("the question"), A(final("back"))]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_body_larger_than_the_limit_is_refused(store_url, raw_server, provider, monkeypatch):
    # The limit (64 MB) lowered to 1 MB for speed; an endless fast body is cut at it too.
    monkeypatch.setattr(fusion_cli.llm.http, "MAX_RESPONSE_BYTES", 1 << 20)

    def endless(h) -> None:
        h.head(Transfer_Encoding="chunked")
        chunk = b"x" * 65536
        while not raw_server.stopped.is_set():
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    raw_server.behaviour = endless
    result = send(store_url, provider, raw_server.base_url(provider))
    assert_failed_cleanly(result, store_url, "the body is larger than 1 MB")
    assert len(raw_server.requests) == 1  # not retried


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_connection_cut_mid_body(store_url, raw_server, provider):
    def cut(h) -> None:
        h.head(Content_Length="5000")
        h.wfile.write(b'{"choices": [')
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(2)

    raw_server.behaviour = cut
    result = send(store_url, provider, raw_server.base_url(provider))
    assert_failed_cleanly(result, store_url, "failed", "gave up after 4 attempts")
    assert len(raw_server.requests) == 4  # a broken connection is retried, then reported
