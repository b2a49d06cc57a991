"""When to retry a model request and how long to wait: pure functions, no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in count, per wait and in total."""

    max_retries: int = 3
    base_delay: float = 0.5  # the first wait is up to this; each later one doubles
    max_delay: float = 30.0  # a longer Retry-After is not waited for: we give up instead
    max_total: float = 300.0  # no retry starts later than this after the first request

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based) when the server gave no hint."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (retry - 1)))


def retryable_status(status: int) -> bool:
    """429 (rate limited) and 5xx (server trouble) may pass; other 4xx will not."""
    return status == 429 or status >= 500


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": UTC by RFC 5322
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - now
    return max(0.0, seconds) if seconds == seconds else None  # NaN -> None
