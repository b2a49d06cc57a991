"""A real loopback HTTP server that plays the model, scripted per test.

It speaks both APIs: a POST to a path ending in ``/messages`` is answered as
Anthropic's Messages API, any other POST as OpenAI's ``/chat/completions``.
Each request takes the next scripted reply from a queue (then `responder`,
if set) and is recorded: path, headers, JSON body, arrival time, client port.

    server.reply_final("Hello")                    # {"is_final": true, ...} as the model's text
    server.reply_tool("read_file", {"path": "a"})  # a tool call
    server.reply_text("any text at all")           # the model's raw text
    server.reply_error(429, "slow down", headers={"Retry-After": "1"})
    server.reply(Reply(delay=2.0, content=final("late")))
    server.requests[1].messages                    # what the model was sent

GET requests serve `server.pages[path] = (status, content_type, body)` for
the http_get tool.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest


def final(answer: str, thought: str = "I can answer now.") -> str:
    """A final answer in the agent protocol, as the model would write it."""
    return json.dumps({"thought": thought, "action": None, "is_final": True, "final_answer": answer})


def tool_call(tool: str, tool_input: Any, thought: str = "I need a tool.") -> str:
    return json.dumps({"thought": thought, "action": {"tool": tool, "input": tool_input},
                       "is_final": False, "final_answer": None})


@dataclass
class Reply:
    content: str | None = None  # the model's text, wrapped in the API's response shape
    status: int = 200
    body: Any = None  # a raw JSON body instead of `content`
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # the decoded JSON body (None for a GET)
    raw: bytes
    time: float  # time.monotonic() at arrival
    client_port: int

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body["messages"]


class ModelServer:
    def __init__(self) -> None:
        self.replies: collections.deque[Reply] = collections.deque()
        self.responder: Callable[[Recorded], Reply] | None = None
        self.requests: list[Recorded] = []
        self.pages: dict[str, tuple[int, str, bytes]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.model = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def openai_url(self) -> str:
        """The base URL an OpenAI-compatible client is given (it adds /chat/completions)."""
        return self.url + "/v1"

    def start(self) -> "ModelServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes delayed replies
        self._httpd.shutdown()
        self._httpd.server_close()

    # ---- scripting --------------------------------------------------------

    def reply(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def reply_text(self, content: str, **kw: Any) -> None:
        self.reply(Reply(content=content, **kw))

    def reply_final(self, answer: str, **kw: Any) -> None:
        self.reply(Reply(content=final(answer), **kw))

    def reply_tool(self, tool: str, tool_input: Any, **kw: Any) -> None:
        self.reply(Reply(content=tool_call(tool, tool_input), **kw))

    def reply_error(self, status: int, message: str, **kw: Any) -> None:
        self.reply(Reply(status=status, body={"error": {"message": message, "type": "test_error"}}, **kw))

    # ---- the handler's side -------------------------------------------------

    def _take(self, request: Recorded) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self.replies:
                return self.replies.popleft()
        if self.responder is not None:
            return self.responder(request)
        return Reply(status=500, body={"error": {"message": "the test scripted no reply for this request"}})

    def wait(self, seconds: float) -> None:
        self._stop.wait(seconds)


def _response_body(path: str, reply: Reply) -> Any:
    if reply.body is not None or reply.content is None:
        return reply.body
    if path.endswith("/messages"):
        return {"id": "msg_test", "type": "message", "role": "assistant", "model": "test",
                "content": [{"type": "text", "text": reply.content}], "stop_reason": "end_turn",
                "usage": {"input_tokens": 1, "output_tokens": 1}}
    return {"id": "chatcmpl-test", "object": "chat.completion", "model": "test",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply.content}}]}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse shows in client_port

    def _record(self, method: str) -> Recorded:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.loads(raw) if raw else None
        return Recorded(method, self.path, {k.lower(): v for k, v in self.headers.items()},
                        body, raw, time.monotonic(), self.client_address[1])

    def do_POST(self) -> None:
        server: ModelServer = self.server.model  # type: ignore[attr-defined]
        reply = server._take(self._record("POST"))
        if reply.delay:
            server.wait(reply.delay)
        body = _response_body(self.path, reply)
        self._send(reply.status, "application/json", json.dumps(body).encode(), reply.headers)

    def do_GET(self) -> None:
        server: ModelServer = self.server.model  # type: ignore[attr-defined]
        status, content_type, data = server.pages.get(self.path, (404, "text/plain", b"not found"))
        self._send(status, content_type, data, {})

    def _send(self, status: int, content_type: str, data: bytes, headers: dict[str, str]) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a time-out test)
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


def closed_port_url() -> str:
    """An http:// URL on a loopback port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    server = ModelServer().start()
    yield server
    server.stop()
