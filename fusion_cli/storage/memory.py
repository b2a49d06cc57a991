"""`memory:` -- histories in a dict of this storage object; gone when the process exits."""

from __future__ import annotations

import threading
import time
from typing import Any, Iterable

from ..messages import ChatMessage
from .base import ConversationStorage, SessionInfo


class MemoryStorage(ConversationStorage):
    scheme = "memory"
    location = "memory:"

    def __init__(self) -> None:
        super().__init__()
        # Per instance, never process-global: two stores never share data.
        self._data: dict[str, list[ChatMessage]] = {}
        self._times: dict[str, tuple[float, float]] = {}
        self._mutex = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    @classmethod
    def from_url(cls, url: str) -> "MemoryStorage":
        return cls()

    def _touch(self, session_id: str) -> None:
        now = time.time()
        created = self._times.get(session_id, (now, now))[0]
        self._times[session_id] = (created, now)

    def _save(self, session_id: str, history: list[ChatMessage]) -> None:
        with self._mutex:
            self._data[session_id] = list(history)
            self._touch(session_id)

    def _set_times(self, session_id: str, created: float | None, updated: float | None) -> None:
        with self._mutex:
            if session_id in self._times:
                old = self._times[session_id]
                self._times[session_id] = (old[0] if created is None else created,
                                           old[1] if updated is None else updated)

    def _load(self, session_id: str) -> list[ChatMessage]:
        with self._mutex:
            return list(self._data.get(session_id, ()))

    def _delete(self, session_id: str) -> None:
        with self._mutex:
            self._data.pop(session_id, None)
            self._times.pop(session_id, None)

    def _exists(self, session_id: str) -> bool:
        return session_id in self._data

    def _list_sessions(self) -> Iterable[str]:
        with self._mutex:
            return list(self._data)

    def _append(self, session_id: str, messages: list[ChatMessage]) -> None:
        with self._mutex:
            self._data.setdefault(session_id, []).extend(messages)
            self._touch(session_id)

    def _count(self, session_id: str) -> int:
        return len(self._data.get(session_id, ()))

    def _info(self, session_id: str) -> SessionInfo | None:
        with self._mutex:
            if session_id not in self._data:
                return None
            created, updated = self._times[session_id]
            return SessionInfo(session_id, len(self._data[session_id]), created, updated)

    def _try_lock(self, session_id: str) -> Any:
        with self._mutex:
            lock = self._locks.setdefault(session_id, threading.Lock())
        return lock if lock.acquire(blocking=False) else None

    def _unlock(self, session_id: str, handle: Any) -> None:
        handle.release()
