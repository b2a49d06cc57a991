"""Storage backends, chosen by URL.

`open_storage(url)` looks the scheme up in `BACKENDS`, imports the backend's
module only then (so a command never loads a driver it does not use), and
turns a missing driver into a MissingDriver error that says what to install.
"""

from __future__ import annotations

import importlib
import re

from ..errors import InvalidStorageURL, MissingDriver
from .base import ConversationStorage, SessionInfo, is_valid_session_id, validate_session_id

__all__ = [
    "BACKENDS",
    "ConversationStorage",
    "SessionInfo",
    "is_valid_session_id",
    "open_storage",
    "redact_url",
    "validate_session_id",
]

# scheme -> (module, class, the package its driver comes from)
BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "file": ("fusion_cli.storage.filesystem", "FileStorage", None),
    "memory": ("fusion_cli.storage.memory", "MemoryStorage", None),
    "postgres": ("fusion_cli.storage.postgres", "PostgresStorage", "postgres"),
    "postgresql": ("fusion_cli.storage.postgres", "PostgresStorage", "postgres"),
    "redis": ("fusion_cli.storage.redis", "RedisStorage", "redis"),
    "rediss": ("fusion_cli.storage.redis", "RedisStorage", "redis"),
    "sqlite": ("fusion_cli.storage.sqlite", "SqliteStorage", None),
    "unix": ("fusion_cli.storage.redis", "RedisStorage", "redis"),
}

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def url_scheme(url: str) -> str:
    """The backend scheme of a storage value; ``file`` for a bare path.

    A value with ``://``, or one that starts with a known scheme and a colon,
    is a URL; an unknown scheme in a URL is refused rather than taken as a
    directory name. Anything else is a directory.
    """
    if not url:
        raise InvalidStorageURL("the storage URL is empty", hint="use file:PATH, sqlite:PATH, redis://HOST, ...")
    m = _SCHEME_RE.match(url)
    scheme = m.group(1).lower() if m else None
    if scheme in BACKENDS:
        return scheme
    if "://" in url:
        shown = url.split("://", 1)[0]
        raise InvalidStorageURL(
            f"unknown storage scheme {shown!r} in {redact_url(url)!r}",
            hint="known: " + ", ".join(f"{s}:" for s in BACKENDS),
        )
    return "file"


def open_storage(url: str) -> ConversationStorage:
    """The backend for `url`, ready to use (servers are contacted lazily)."""
    scheme = url_scheme(url)
    module_name, class_name, extra = BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if extra is None or exc.name is None or exc.name.startswith("fusion_cli"):
            raise
        raise MissingDriver(
            f"the {scheme}: backend needs the Python package {exc.name!r}, which is not installed",
            hint=f"pip install 'fusion_cli[{extra}]'",
        ) from exc
    storage = getattr(module, class_name).from_url(url)
    storage.url = url  # to open the same store again (may hold a password: never print it)
    return storage


def redact_url(url: str) -> str:
    """`url` with any password replaced by ``***``, for messages and `fusion where`.

    Covers ``user:PASSWORD@`` (the last ``@`` before the query ends the
    credentials, so an unencoded ``/`` or ``@`` inside the password is hidden
    too) and a ``password=`` query parameter, which redis-py and libpq take.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    before_query, q, query = rest.partition("?")
    credentials, at, host = before_query.rpartition("@")
    if at and ":" in credentials:
        before_query = credentials.split(":", 1)[0] + ":***@" + host
    if q:
        query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", query, flags=re.I)
    return scheme + sep + before_query + q + query


def url_passwords(url: str) -> tuple[str, ...]:
    """The passwords in a URL (``user:PASSWORD@``, ``password=``) or a libpq key=value string,
    as written and percent-decoded, longest first: what to scrub from a driver's message."""
    found = set(re.findall(r"(?:^|[?&\s])password\s*=\s*'?([^&\s']+)", url, flags=re.I))
    if "://" in url:  # the credentials end at the last '@' before the query, as redact_url reads them
        credentials, at, _ = url.partition("://")[2].partition("?")[0].rpartition("@")
        if at and ":" in credentials:
            found.add(credentials.split(":", 1)[1])
    from urllib.parse import unquote

    found |= {unquote(p) for p in found}
    return tuple(sorted(found - {""}, key=len, reverse=True))
