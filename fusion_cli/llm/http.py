"""HTTP for the model clients: one httpx.Client per invocation, retries, and errors that say what failed.

The one module that imports httpx. The llm package is imported only by
`send` and `chat`, so storage commands never load it.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Mapping

import httpx
import orjson

from .. import __version__
from ..errors import ProviderError, UsageError
from .base import safe_url, scrub
from .retry import RetryPolicy, parse_retry_after, retryable_status

USER_AGENT = f"fusion/{__version__}"
# A model's answer is kilobytes; a body past this is a misbehaving server, not an answer.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


def provider_message(response: httpx.Response, secret: str | None = None) -> str:
    """The error message a provider put in its response body, on one line."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        # OpenAI and Anthropic: {"error": {"message": ...}}; Ollama: {"error": "..."}
        message = error.get("message") if isinstance(error, dict) else error
        message = message or body.get("message") or body.get("detail")
    if message is not None and not isinstance(message, str):
        message = orjson.dumps(message).decode()
    if not message:
        message = response.text
    # Scrubbed before it is cut: a key across the cut would otherwise keep its first half.
    message = " ".join(scrub(message, secret).split())
    if len(message) > 500:
        message = message[:500] + "..."
    return message or "(an empty response body)"


class Http:
    """POSTs JSON with retries on connection errors, timeouts, 429 and 5xx."""

    def __init__(self, timeout: float, *, secret: str | None = None,
                 policy: RetryPolicy = RetryPolicy(),
                 on_retry: Callable[[str], None] | None = None,
                 unreachable_hint: str | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.timeout = timeout
        self.secret = secret  # only to scrub it from messages; never put in an exception's args
        self.policy = policy
        self.on_retry = on_retry
        self.unreachable_hint = unreachable_hint
        self.client = httpx.Client(timeout=timeout, transport=transport,
                                   headers={"User-Agent": USER_AGENT})

    def close(self) -> None:
        self.client.close()

    def post_json(self, url: str, headers: Mapping[str, str], body: Any) -> httpx.Response:
        """The first response that is not worth retrying (2xx, or a 4xx other than 429)."""
        payload = orjson.dumps(body)
        headers = {"Content-Type": "application/json", **headers}
        start = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                response = self._post(url, payload, headers)
            except (httpx.InvalidURL, UnicodeError) as exc:  # UnicodeError: a host name IDNA refuses
                raise UsageError(f"invalid model URL {safe_url(url)!r}: {exc}",
                                 hint="check --base-url (FUSION_BASE_URL)") from exc
            except httpx.DecodingError as exc:
                raise self.bad_response(url, f"the body could not be decoded ({_reason(exc)})") from exc
            except httpx.TransportError as exc:
                unusable = isinstance(exc, httpx.UnsupportedProtocol)  # a bad URL: no retry helps
                wait = None if unusable else self._wait(attempts, None, start)
                if wait is None:
                    raise self.transport_error(url, exc, attempts) from exc
                what = self.transport_error(url, exc, 1).message
            else:
                if not retryable_status(response.status_code):
                    return response
                after = parse_retry_after(response.headers.get("retry-after"), time.time())
                wait = self._wait(attempts, after, start)
                if wait is None:
                    raise self.status_error(url, response, attempts, after)
                what = f"HTTP {response.status_code} from {safe_url(url)}"
            if self.on_retry is not None:
                self.on_retry(f"{what}; retrying in {wait:.1f} s "
                              f"(retry {attempts} of {self.policy.max_retries})")
            time.sleep(wait)

    def _post(self, url: str, payload: bytes, headers: Mapping[str, str]) -> httpx.Response:
        """One POST whose whole body must arrive within `timeout` s and MAX_RESPONSE_BYTES.

        httpx's timeout bounds each read, not the response: a server that sent a
        byte now and then would otherwise hold fusion (and the session lock) forever.
        """
        deadline = time.monotonic() + self.timeout
        with self.client.stream("POST", url, content=payload, headers=headers) as streamed:
            if streamed.is_stream_consumed:  # a transport that hands back a response read already
                streamed.read()
                return streamed
            raw = bytearray()
            for chunk in streamed.iter_raw():
                raw += chunk
                if len(raw) > MAX_RESPONSE_BYTES:
                    raise self.bad_response(url, f"the body is larger than {MAX_RESPONSE_BYTES >> 20} MB")
                if time.monotonic() > deadline:  # a TimeoutException: retried like any time-out
                    raise httpx.ReadTimeout("the body did not end in time", request=streamed.request)
        # A plain response again (decoded here, so a DecodingError is caught by the caller).
        return httpx.Response(streamed.status_code, headers=streamed.headers, content=bytes(raw),
                              request=streamed.request)

    def _wait(self, attempts: int, retry_after: float | None, start: float) -> float | None:
        """Seconds before the next attempt, or None to give up."""
        policy = self.policy
        if attempts > policy.max_retries:
            return None
        wait = retry_after if retry_after is not None else policy.backoff(attempts)
        if wait > policy.max_delay or time.monotonic() - start + wait > policy.max_total:
            return None
        return wait

    def status_error(self, url: str, response: httpx.Response, attempts: int = 1,
                     retry_after: float | None = None) -> ProviderError:
        status = response.status_code
        message = (f"the model at {safe_url(url)} answered HTTP {status}: "
                   f"{provider_message(response, self.secret)}{_tries(attempts)}")
        if status in (401, 403):
            hint = "check the API key in FUSION_API_KEY, OPENAI_API_KEY or ANTHROPIC_API_KEY"
        elif status == 404:
            hint = "check --base-url and --model (FUSION_BASE_URL, FUSION_MODEL)"
        elif status == 429:
            asked = f"; the server asked to wait {retry_after:g} s" if retry_after else ""
            hint = f"rate limited{asked}: try again later"
        elif status >= 500:
            hint = "the model server failed: try again later"
        else:
            hint = "the endpoint refused the request: check --model and --base-url"
        return ProviderError(message, hint=hint)

    def transport_error(self, url: str, exc: httpx.TransportError, attempts: int) -> ProviderError:
        shown, reason = safe_url(url), scrub(_reason(exc), self.secret)
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return ProviderError(f"cannot reach the model at {shown}: {reason}{_tries(attempts)}",
                                 hint=self.unreachable_hint)
        if isinstance(exc, httpx.TimeoutException):
            return ProviderError(
                f"the model at {shown} did not answer within {self.timeout:g} s{_tries(attempts)}",
                hint="raise --timeout (FUSION_TIMEOUT), or try again later")
        if isinstance(exc, httpx.UnsupportedProtocol):
            return ProviderError(f"cannot use the model URL {shown}: {reason}",
                                 hint="--base-url must start with http:// or https://")
        return ProviderError(f"the connection to the model at {shown} failed: {reason}{_tries(attempts)}",
                             hint="try again later")

    def error_in_body(self, url: str, response: httpx.Response) -> ProviderError | None:
        """The error a 2xx body carries instead of an answer (some proxies do this), else None."""
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            return None
        if not (isinstance(body, dict) and (body.get("error") or body.get("type") == "error")):
            return None
        return ProviderError(f"the model at {safe_url(url)} answered HTTP {response.status_code} with an error: "
                             f"{provider_message(response, self.secret)}",
                             hint="try again later; if it persists, check --model and --base-url")

    def bad_response(self, url: str, why: str) -> ProviderError:
        return ProviderError(f"the model at {safe_url(url)} sent a response fusion cannot read: {why}",
                             hint="check that --base-url points at the right kind of endpoint (--provider)")


def _tries(attempts: int) -> str:
    return f" (gave up after {attempts} attempts)" if attempts > 1 else ""


def _reason(exc: Exception) -> str:
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc)).strip()
    return text or type(exc).__name__


def fetch(url: str, timeout: float, limit: int) -> tuple[int, str, str, bool]:
    """GET `url`: (status, content type, text of at most `limit` bytes, whether it was cut). OSError on failure."""
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True,
                          headers={"User-Agent": USER_AGENT}) as client:
            with client.stream("GET", url) as response:
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        break
                try:
                    text = bytes(body[:limit]).decode(response.encoding or "utf-8", errors="replace")
                except LookupError:  # a charset Python does not know
                    text = bytes(body[:limit]).decode("utf-8", errors="replace")
                return (response.status_code, response.headers.get("content-type", ""),
                        text, len(body) > limit)
    except httpx.HTTPError as exc:
        raise OSError(f"{type(exc).__name__}: {_reason(exc)}") from exc
