"""A loopback OpenAI-compatible model server that answers at once, for the benchmarks.

It answers every `POST .../chat/completions` with the same final answer in
fusion's agent protocol (the other tools just print it), as one JSON body or
as a server-sent-event stream when the request asks for `"stream": true`.
It never decodes the request body (a 10,000-message history is megabytes),
and it adds up the time it spends on each request, so that a benchmark can
subtract the server's share from a client's wall time.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER = json.dumps({"thought": "I can answer now.", "action": None, "is_final": True,
                     "final_answer": "ok"})
USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}

_BODY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "loopback",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": ANSWER}}],
    "usage": USAGE,
}).encode()


def _chunk(delta: dict, finish: str | None, usage: dict | None = None) -> bytes:
    event = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "loopback",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": usage}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


_STREAM = (_chunk({"role": "assistant", "content": ANSWER}, None) + _chunk({}, "stop", USAGE)
           + b"data: [DONE]\n\n")


class ModelServer:
    def __init__(self) -> None:
        self.requests = 0
        self.busy = 0.0  # seconds spent inside request handlers, summed
        self._guard = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.bench = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        """The base URL an OpenAI SDK takes (it adds /chat/completions)."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def host_url(self) -> str:
        """Without /v1, for clients that add it themselves (shell-gpt)."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def snapshot(self) -> tuple[int, float]:
        with self._guard:
            return self.requests, self.busy

    def _count(self, seconds: float) -> None:
        with self._guard:
            self.requests += 1
            self.busy += seconds

    def __enter__(self) -> "ModelServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        start = time.perf_counter()
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        # Enough to tell a streaming request without decoding megabytes of history.
        stream = b'"stream": true' in raw or b'"stream":true' in raw
        body = _STREAM if stream else _BODY
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream" if stream else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.server.bench._count(time.perf_counter() - start)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        pass
