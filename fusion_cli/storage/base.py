"""The storage contract: read this file alone and you know every backend.

A backend subclasses `ConversationStorage` and implements the underscored
hooks (`_save`, `_load`, `_delete`, `_exists`, `_list_sessions`,
`_try_lock`, `_unlock`). The public methods validate the session id before
any hook runs, so no backend can touch a file or a server with a bad id.
Batch and counting hooks (`_append`, `_count`, `_info`, `_list_info`,
`_save_many`, `_load_many`) have generic defaults built on the others; a
backend overrides them when it can do better (an INSERT, an RPUSH, a COUNT,
one transaction for many sessions).

Every write is atomic: a reader sees the old history or the new one, never
a mix. Reads take no lock. `lock()` is for a caller's read-modify-write
(e.g. a whole `send` turn); it is exclusive across processes, released if
the holder dies, and re-entrant within one storage object and thread.
"""

from __future__ import annotations

import re
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping

from ..errors import InvalidSessionId, LockTimeout, StorageError
from ..messages import ChatMessage

MAX_SESSION_ID = 128
_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# Names Windows keeps for devices, alone or before a dot ("con", "NUL.json").
_RESERVED_RE = re.compile(r"(?:CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])(?:\..*)?", re.IGNORECASE | re.DOTALL)

DEFAULT_LOCK_TIMEOUT = 120.0
Times = tuple[float | None, float | None]  # (created, updated), Unix seconds


def validate_session_id(session_id: Any) -> str:
    """Return `session_id` if it follows the rules, else raise InvalidSessionId.

    1 to 128 characters of A-Z a-z 0-9 . _ -, not starting with '.' or '-',
    and not a Windows device name, so every store can move to any file system.
    """
    if not isinstance(session_id, str):
        raise InvalidSessionId(f"invalid session id: expected a string, got {type(session_id).__name__}")
    shown = repr(session_id if len(session_id) <= 40 else session_id[:40] + "...")
    if not session_id:
        raise InvalidSessionId("invalid session id: it is empty", hint=_ID_HINT)
    if len(session_id) > MAX_SESSION_ID:
        raise InvalidSessionId(
            f"invalid session id {shown}: {len(session_id)} characters, at most {MAX_SESSION_ID}",
            hint=_ID_HINT,
        )
    if not _ID_RE.fullmatch(session_id):
        raise InvalidSessionId(f"invalid session id {shown}", hint=_ID_HINT)
    if _RESERVED_RE.fullmatch(session_id):
        raise InvalidSessionId(f"invalid session id {shown}: a reserved device name on Windows", hint=_ID_HINT)
    return session_id


_ID_HINT = "use 1-128 of A-Z a-z 0-9 . _ -, not starting with '.' or '-'"


def is_valid_session_id(session_id: Any) -> bool:
    try:
        validate_session_id(session_id)
    except InvalidSessionId:
        return False
    return True


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What `list --json` shows of a session. Times are Unix seconds, None when unknown."""

    id: str
    messages: int | None
    created: float | None = None
    updated: float | None = None
    error: str | None = None  # set when the session's data could not be read

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "messages": self.messages,
                             "created": _iso(self.created), "updated": _iso(self.updated)}
        if self.error is not None:
            d["error"] = self.error
        return d


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class ConversationStorage(ABC):
    """Where session histories live. One instance talks to one store."""

    #: the URL scheme that selects this backend (``file``, ``sqlite``, ...)
    scheme: ClassVar[str]
    #: how to name this store in messages, never with credentials
    location: str = ""
    #: the URL it was opened with, set by open_storage
    url: str = ""

    def __init__(self) -> None:
        self._held: dict[tuple[int, str], list[Any]] = {}  # (thread, id) -> [depth, handle]
        self._held_guard = threading.Lock()

    @classmethod
    @abstractmethod
    def from_url(cls, url: str) -> "ConversationStorage":
        """Build the backend from its URL (the registry has already checked the scheme)."""

    # ---- the public contract -------------------------------------------------

    def save(self, session_id: str, history: Iterable[ChatMessage]) -> None:
        """Replace the whole history, atomically. An empty history still creates the session."""
        self._save(validate_session_id(session_id), list(history))

    def load(self, session_id: str) -> list[ChatMessage]:
        """The history, oldest first; ``[]`` when the session does not exist."""
        return self._load(validate_session_id(session_id))

    def delete(self, session_id: str) -> None:
        """Remove the session; no error when it is absent."""
        self._delete(validate_session_id(session_id))

    def exists(self, session_id: str) -> bool:
        return self._exists(validate_session_id(session_id))

    def list_sessions(self) -> list[str]:
        """Every session id, sorted by code point (the same order on every backend)."""
        return sorted(self._list_sessions())

    def append(self, session_id: str, messages: Iterable[ChatMessage]) -> None:
        """Add messages at the end, atomically (all of them or none), creating the session."""
        self._append(validate_session_id(session_id), list(messages))

    def save_many(self, items: Iterable[tuple[str, Iterable[ChatMessage]]],
                  times: Mapping[str, Times] | None = None) -> None:
        """`save` of each (id, history): each session atomically, and the whole batch in one
        transaction where the backend has them (SQLite, Redis), which is what makes
        `migrate` fast. Every id is checked before anything is written; an id given
        twice gets its last history, as two `save`s would leave it.

        `times` (id -> (created, updated)) sets those sessions' times as `set_times`
        does, so that a copy keeps the times of its original."""
        batch = {validate_session_id(sid): list(history) for sid, history in items}
        self._save_many(list(batch.items()), dict(times or {}))

    def set_times(self, session_id: str, created: float | None, updated: float | None) -> None:
        """Set an existing session's created/updated times (Unix seconds; None keeps one).

        For copies (`migrate`, `import`); every other write moves `updated` to now.
        """
        self._set_times(validate_session_id(session_id), created, updated)

    def times(self, session_id: str) -> Times | None:
        """(created, updated) of a session, None if it does not exist; cheaper than `info`."""
        return self._get_times(validate_session_id(session_id))

    def times_many(self, session_ids: Iterable[str]) -> list[Times | None]:
        """`times` of each id, in order, in as few round trips as the backend allows."""
        return self._times_many([validate_session_id(sid) for sid in session_ids])

    def load_many(self, session_ids: Iterable[str]) -> list[list[ChatMessage]]:
        """`load` of each id, in order, in as few round trips as the backend allows."""
        return self._load_many([validate_session_id(sid) for sid in session_ids])

    def count(self, session_id: str) -> int:
        """The number of messages; 0 for a session that does not exist."""
        return self._count(validate_session_id(session_id))

    def info(self, session_id: str) -> SessionInfo | None:
        """Count and times of one session, or None if it does not exist."""
        return self._info(validate_session_id(session_id))

    def list_info(self) -> list[SessionInfo]:
        """`info` of every session, sorted by id; an unreadable one carries `error`."""
        return sorted(self._list_info(), key=lambda i: i.id)

    @contextmanager
    def lock(
        self,
        session_id: str,
        timeout: float = DEFAULT_LOCK_TIMEOUT,
        on_wait: Callable[[], None] | None = None,
    ) -> Iterator[None]:
        """Hold the session's exclusive, cross-process lock for the block.

        Waits up to `timeout` seconds, calling `on_wait` once if it has to
        wait, then raises LockTimeout. Re-entrant in the same thread.
        """
        session_id = validate_session_id(session_id)
        key = (threading.get_ident(), session_id)
        with self._held_guard:
            held = self._held.get(key)
            if held is not None:
                held[0] += 1
        if held is not None:
            try:
                yield
            finally:
                held[0] -= 1
            return
        handle = self._acquire(session_id, timeout, on_wait)
        with self._held_guard:
            self._held[key] = [1, handle]
        try:
            yield
        finally:
            with self._held_guard:
                del self._held[key]
            self._unlock(session_id, handle)

    def close(self) -> None:
        """Release connections; the object must not be used afterwards."""

    def __enter__(self) -> "ConversationStorage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.location}>"

    # ---- hooks a backend implements ----------------------------------------

    @abstractmethod
    def _save(self, session_id: str, history: list[ChatMessage]) -> None: ...

    @abstractmethod
    def _load(self, session_id: str) -> list[ChatMessage]: ...

    @abstractmethod
    def _delete(self, session_id: str) -> None: ...

    @abstractmethod
    def _exists(self, session_id: str) -> bool: ...

    @abstractmethod
    def _list_sessions(self) -> Iterable[str]: ...

    @abstractmethod
    def _try_lock(self, session_id: str) -> Any:
        """Take the lock without waiting: a handle for `_unlock`, or None if it is held."""

    @abstractmethod
    def _unlock(self, session_id: str, handle: Any) -> None: ...

    # ---- generic defaults a backend may override ---------------------------

    def _append(self, session_id: str, messages: list[ChatMessage]) -> None:
        # A read-modify-write: hold the lock so concurrent appends lose nothing.
        with self.lock(session_id):
            self._save(session_id, self._load(session_id) + messages)

    def _count(self, session_id: str) -> int:
        return len(self._load(session_id))

    def _save_many(self, items: list[tuple[str, list[ChatMessage]]], times: dict[str, Times]) -> None:
        for session_id, history in items:
            self._save(session_id, history)
            if session_id in times:
                self._set_times(session_id, *times[session_id])

    def _set_times(self, session_id: str, created: float | None, updated: float | None) -> None:
        """A backend that keeps no times keeps none here either."""

    def _get_times(self, session_id: str) -> Times | None:
        info = self._info(session_id)
        return None if info is None else (info.created, info.updated)

    def _load_many(self, session_ids: list[str]) -> list[list[ChatMessage]]:
        return [self._load(session_id) for session_id in session_ids]

    def _times_many(self, session_ids: list[str]) -> list[Times | None]:
        return [self._get_times(session_id) for session_id in session_ids]

    def _info(self, session_id: str) -> SessionInfo | None:
        if not self._exists(session_id):
            return None
        return SessionInfo(session_id, self._count(session_id))

    def _list_info(self) -> Iterable[SessionInfo]:
        for sid in self._list_sessions():
            try:
                info = self._info(sid)
            except StorageError as exc:
                info = SessionInfo(sid, None, error=str(exc))
            if info is not None:
                yield info

    def _acquire(self, session_id: str, timeout: float, on_wait: Callable[[], None] | None) -> Any:
        """Poll `_try_lock` with a growing pause until it succeeds or time runs out."""
        deadline = time.monotonic() + max(0.0, timeout)
        handle = self._try_lock(session_id)
        if handle is not None:
            return handle
        if on_wait is not None:
            on_wait()
        pause = 0.002
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeout(
                    f"session {session_id!r} in {self.location} is busy: "
                    f"another fusion process held its lock for {timeout:g} s",
                    hint="retry later, or raise --lock-timeout / FUSION_LOCK_TIMEOUT",
                )
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.05)
            handle = self._try_lock(session_id)
            if handle is not None:
                return handle
