"""Export sessions to a file and import them back, on any backend.

Two layouts of the same records, both UTF-8:

``json`` (the default) -- one JSON object::

    {"format": "fusion-export", "version": 1, "sessions": [
    {"id": "alice", "created": "2024-05-01T12:00:00Z", "updated": "2024-05-02T08:30:00Z",
     "messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]},
    ...
    ]}

``jsonl`` -- JSON Lines: one session object (as in ``sessions`` above) a line.

A session object has exactly the keys ``id``, ``created``, ``updated`` and
``messages``; a message exactly ``role`` (system, user or assistant) and
``content`` (a string). Times are ISO 8601 in UTC, or null when the store
does not know them. `import_sessions` reads either layout (it tells them
apart by themselves), validates every session before writing any, and
writes through `migrate`, so it has the same conflict policy and checks
each session reads back equal. Messages round-trip exactly; the times do
not: the storage interface has no way to set them, so an imported session
is created and updated at the moment of the import (the exported times are
checked, then ignored).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Callable, Iterable

import orjson

from .errors import InvalidSessionId, StorageError, UsageError
from .messages import ROLES, ChatMessage
from .migrate import MigrationReport, migrate
from .storage import ConversationStorage, validate_session_id
from .timespec import format_time

FORMAT = "fusion-export"
VERSION = 1
FORMATS = ("json", "jsonl")
_SESSION_KEYS = ("id", "created", "updated", "messages")


# ---- export ------------------------------------------------------------------

def export_sessions(store: ConversationStorage, out: IO[bytes], session_ids: Iterable[str] | None = None,
                    fmt: str = "json") -> tuple[int, int]:
    """Write the sessions (all when `session_ids` is None) to the binary stream `out`.

    Returns (sessions, messages) written. Sessions go one at a time, so an
    export never holds more than one history in memory. A named session that
    does not exist is a UsageError, raised before anything is written.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}", hint="use json or jsonl")
    if session_ids is None:
        ids = store.list_sessions()
    else:
        ids = list(dict.fromkeys(validate_session_id(s) for s in session_ids))
        missing = [s for s in ids if not store.exists(s)]
        if missing:
            raise UsageError(f"no session {', '.join(map(repr, missing))} in {store.location}",
                             hint="'fusion list' shows the sessions there")
    if fmt == "json":
        out.write(b'{"format":"fusion-export","version":1,"sessions":[\n')
    sessions = messages = 0
    for sid in ids:
        record = session_record(store, sid)
        if record is None:
            continue  # deleted since the listing
        if fmt == "json" and sessions:
            out.write(b",\n")
        out.write(orjson.dumps(record))
        if fmt == "jsonl":
            out.write(b"\n")
        sessions += 1
        messages += len(record["messages"])
    if fmt == "json":
        out.write(b"\n]}\n")
    return sessions, messages


def session_record(store: ConversationStorage, session_id: str) -> dict | None:
    """One session as an export record, or None if it does not exist."""
    info = store.info(session_id)
    if info is None:
        return None
    history = store.load(session_id)
    return {"id": session_id, "created": format_time(info.created), "updated": format_time(info.updated),
            "messages": [m.to_dict() for m in history]}


def write_export(store: ConversationStorage, path: str | os.PathLike[str],
                 session_ids: Iterable[str] | None = None, fmt: str = "json") -> tuple[int, int]:
    """`export_sessions` into the file `path`, atomically: the whole export or no file.

    The file is created 0600 (it holds conversations); an existing one is replaced.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.urandom(6).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            counts = export_sessions(store, f, session_ids, fmt)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return counts


# ---- import ------------------------------------------------------------------

def parse_export(data: bytes, source: str = "the input",
                 times: dict[str, tuple[float | None, float | None]] | None = None,
                 ) -> list[tuple[str, list[ChatMessage]]]:
    """Every session of an export (json or jsonl), validated; UsageError naming the first fault.

    `source` names the input in messages (a path, or "stdin"). Given a dict
    `times`, it is filled with each session's (created, updated) in Unix seconds.
    """
    times = {} if times is None else times
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source} is not valid UTF-8 (at byte {exc.start})") from None
    lines = text.splitlines()
    first = next((n for n, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return []  # an empty JSON Lines export: no sessions
    try:
        head = orjson.loads(lines[first])
    except orjson.JSONDecodeError:
        head = None  # not one object a line: the json layout, spread over lines
    if isinstance(head, dict) and "format" not in head:
        return _parse_jsonl(lines, source, times)
    try:
        whole = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{source}: line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})",
                         hint="expected a fusion export (fusion export --format json or jsonl)") from None
    return _parse_container(whole, source, times)


def _parse_jsonl(lines: list[str], source: str, times: dict) -> list[tuple[str, list[ChatMessage]]]:
    sessions: list[tuple[str, list[ChatMessage]]] = []
    seen: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}: line {n}"
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        sessions.append(_session(obj, where, seen, times))
    return sessions


def _parse_container(whole: object, source: str, times: dict) -> list[tuple[str, list[ChatMessage]]]:
    if not isinstance(whole, dict) or whole.get("format") != FORMAT:
        raise UsageError(f"{source} is not a fusion export: expected an object with \"format\": \"{FORMAT}\"",
                         hint="or one session object a line (--format jsonl)")
    if whole.get("version") != VERSION:
        raise UsageError(f"{source}: export version {whole.get('version')!r} is not supported "
                         f"(this fusion reads version {VERSION})")
    unknown = sorted(set(whole) - {"format", "version", "sessions"})
    if unknown:
        raise UsageError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))} in the export")
    items = whole.get("sessions")
    if not isinstance(items, list):
        raise UsageError(f"{source}: \"sessions\" must be an array")
    seen: dict[str, str] = {}
    return [_session(obj, f"{source}: session {n}", seen, times) for n, obj in enumerate(items, 1)]


def _session(obj: object, where: str, seen: dict[str, str], times: dict) -> tuple[str, list[ChatMessage]]:
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a session object, found {_kind(obj)}")
    sid = obj.get("id")
    try:
        validate_session_id(sid)
    except InvalidSessionId as exc:
        raise UsageError(f"{where}: {exc}") from None
    at, where = where, f"{where} (session {sid!r})"
    unknown = sorted(set(obj) - set(_SESSION_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}",
                         hint="a session has " + ", ".join(_SESSION_KEYS))
    if sid in seen:
        raise UsageError(f"{where}: the same id as {seen[sid]}")
    seen[sid] = at
    for name in ("created", "updated"):
        value = obj.get(name)
        if value is not None and not _is_iso(value):
            raise UsageError(f"{where}: {name!r} must be an ISO 8601 time or null, not {value!r}")
    times[sid] = (_timestamp(obj.get("created")), _timestamp(obj.get("updated")))
    raw = obj.get("messages")
    if not isinstance(raw, list):
        raise UsageError(f"{where}: 'messages' must be an array, found {_kind(raw)}")
    messages = []
    for k, m in enumerate(raw, 1):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise UsageError(f"{where}: message {k}: expected an object with exactly 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise UsageError(f"{where}: message {k}: unknown role {role!r}",
                             hint="roles: " + ", ".join(ROLES))
        if not isinstance(content, str):
            raise UsageError(f"{where}: message {k}: 'content' must be a string, found {_kind(content)}")
        messages.append(ChatMessage(role, content))
    return sid, messages


def _timestamp(value: str | None) -> float | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)  # exports write UTC; a bare time is taken as UTC
    return moment.timestamp()


def _is_iso(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def import_sessions(data: bytes | list[tuple[str, list[ChatMessage]]], store: ConversationStorage,
                    on_conflict: str = "fail", dry_run: bool = False, lock_timeout: float = 120.0,
                    progress: Callable[[str], None] | None = None,
                    source: str = "the input") -> MigrationReport:
    """Write the sessions of an export (its bytes, or `parse_export`'s result) into `store`.

    Everything is validated first; then `migrate` applies the conflict
    policy (``fail`` refuses before any write if a session exists already,
    ``skip``, ``overwrite``) and writes each session atomically, checking it
    reads back equal.
    """
    from .storage.memory import MemoryStorage

    times: dict[str, tuple[float | None, float | None]] = {}
    sessions = parse_export(data, source, times) if isinstance(data, (bytes, bytearray)) else data
    staged = MemoryStorage()
    staged.save_many(sessions, times)  # with the export's times, which migrate carries to the copy
    return migrate(staged, store, None, on_conflict, dry_run, lock_timeout, progress, action="import")
