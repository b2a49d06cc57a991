"""Durations and points in time as users write them on a command line.

    parse_duration("30d")          -> 2592000.0 seconds
    parse_duration("1h30m")        -> 5400.0;  a bare number is seconds: "90" -> 90.0
    parse_time("12h", now)         -> now - 12 hours ("that long ago")
    parse_time("2024-05-01")       -> midnight UTC of that day, as Unix seconds
    parse_time("2024-05-01T12:30:00+02:00"), parse_time("2024-05-01 10:30Z")

Units: s, m (minutes), h, d, w. A date or time without a zone is UTC, the
zone fusion prints its own times in (`list --json`). Errors are UsageError,
naming the value; callers add which option it came from.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

from .errors import UsageError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_HINT = ("use a duration like 30d, 12h, 90m, 45s, 2w or 1h30m, "
         "or an ISO date like 2024-05-01 or 2024-05-01T12:00Z")


def parse_duration(text: str) -> float:
    """Seconds in `text`: ``30d``, ``12h``, ``90m``, ``45s``, ``2w``, ``1h30m``, or bare seconds."""
    value = text.strip().lower()
    if _NUMBER.fullmatch(value):
        return float(value)
    pos, total = 0, 0.0
    for m in _PART.finditer(value):
        if m.start() != pos:
            break
        total += float(m.group(1)) * UNITS[m.group(2)]
        pos = m.end()
    if not value or pos != len(value):
        raise UsageError(f"invalid duration {text!r}",
                         hint="use e.g. 30d, 12h, 90m, 45s, 2w, 1h30m, or seconds")
    return total


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds for a duration ago (``30d``: 30 days before `now`) or an ISO date/datetime."""
    value = text.strip()
    if not value:
        raise UsageError("invalid time: it is empty", hint=_HINT)
    if _NUMBER.fullmatch(value) or _PART.match(value.lower()):
        try:
            seconds = parse_duration(value)
        except UsageError:
            raise UsageError(f"invalid time {text!r}", hint=_HINT) from None
        return (time.time() if now is None else now) - seconds
    try:
        point = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"invalid time {text!r}", hint=_HINT) from None
    if point.tzinfo is None:
        point = point.replace(tzinfo=timezone.utc)
    return point.timestamp()


def format_time(ts: float | None) -> str | None:
    """Unix seconds as ISO 8601 in UTC to the second (``2024-05-01T12:00:00Z``), as `list --json` has them."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
