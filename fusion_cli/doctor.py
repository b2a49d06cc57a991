"""`fusion doctor`: check a whole store and report every problem, one a line.

    from fusion_cli.doctor import check_store
    report = check_store(store)              # reads only
    for problem in report.problems:
        print(problem)                       # "<location>: <problem>"
    check_store(store, fix=True)             # also mends what is safe to mend

On every backend each session is loaded, so that every message is decoded
and has a known role and string content, and each listed id must follow the
session-id rules. Then what can go wrong in one backend only:

    file      entries that are not sessions; a session file that is a symlink
              (the next write would replace it); modes other than 0600/0700;
              temporary files of an interrupted write, older than a minute
              (a younger one may be a write in flight)
    sqlite    PRAGMA integrity_check; the file's mode; messages rows whose
              session row is missing (no command can see or remove them)
    redis     the index against the keys: keys of a session missing from the
              index (and not expiring), a session's hash missing, keys of the
              wrong type, unknown keys under the prefix, locks with no TTL
    postgres  nothing more: the foreign key keeps messages tied to their
              session, and an empty session is a session

A store that cannot be read at all because it is corrupt (an SQLite file
that is not a database) is one problem; one that cannot be reached is an
error, as for any command. `fix` only removes those stale temporary files
and takes group/other permissions away; everything else needs a person.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import CorruptSession, DecryptionError
from .messages import ROLES
from .storage.base import ConversationStorage, is_valid_session_id

STALE_TMP = 60.0  # seconds: a temporary file older than this is no write in flight


@dataclass
class Problem:
    location: str  # a file, a database, a key or a row: where to look
    problem: str
    fix: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    fixed: bool = False

    def __post_init__(self) -> None:
        # One line each, printable and encodable whatever a file name or key held.
        self.location, self.problem = _printable(self.location), _printable(self.problem)

    def __str__(self) -> str:
        return f"{self.location}: {self.problem}" + (" (fixed)" if self.fixed else "")

    def to_dict(self) -> dict[str, Any]:
        return {"location": self.location, "problem": self.problem,
                "fixable": self.fix is not None, "fixed": self.fixed}


@dataclass
class DoctorReport:
    store: str
    sessions: int = 0  # sessions listed
    messages: int = 0  # messages read, in the sessions that could be read
    undecrypted: int = 0  # encrypted sessions checked without a key: structure only
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem left (none found, or every one fixed)."""
        return all(p.fixed for p in self.problems)

    def add(self, location: str, problem: str, fix: Callable[[], None] | None = None) -> None:
        self.problems.append(Problem(location, problem, fix))

    def apply_fixes(self) -> None:
        """Mend every problem that has a safe fix; one that fails says why and stays."""
        for problem in self.problems:
            if problem.fix is not None and not problem.fixed:
                try:
                    problem.fix()
                    problem.fixed = True
                except OSError as exc:
                    problem.problem += f" (could not fix: {exc.strerror or exc})"

    def summary(self) -> str:
        text = (f"checked {self.sessions} session{'' if self.sessions == 1 else 's'} "
                f"({self.messages} message{'' if self.messages == 1 else 's'}) in {self.store}: ")
        found = len(self.problems)
        fixed = sum(p.fixed for p in self.problems)
        text += f"{found} problem{'' if found == 1 else 's'}" if found else "no problems"
        text += f", {fixed} fixed" if fixed else ""
        if self.undecrypted:
            text += (f"; {self.undecrypted} encrypted session{'' if self.undecrypted == 1 else 's'} "
                     "checked without decrypting (no key set)")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"store": _printable(self.store), "sessions": self.sessions, "messages": self.messages,
                "undecrypted": self.undecrypted, "ok": self.ok,
                "problems": [p.to_dict() for p in self.problems]}


def check_store(store: ConversationStorage, fix: bool = False) -> DoctorReport:
    """Check every session and the backend's own structure; write only if `fix`.

    Takes no lock: like `list`, it reads what is committed, so it can run
    beside other commands.
    """
    report = DoctorReport(store.location)
    try:
        for session_id in store.list_sessions():
            _check_session(store, session_id, report)
        extra = _BACKEND_CHECKS.get(store.scheme)
        if extra is not None:
            extra(store, report)
    except CorruptSession as exc:  # the store as a whole, e.g. not a database
        report.add(exc.location, exc.reason)
    if fix:
        report.apply_fixes()
    return report


def _check_session(store: ConversationStorage, session_id: str, report: DoctorReport) -> None:
    report.sessions += 1
    if not is_valid_session_id(session_id):
        report.add(store.location, f"session {session_id!r}: not a valid session id, so no command "
                                   "can name it (rename or remove it with the backend's own tools)")
        return
    try:
        history = store.load(session_id)
    except CorruptSession as exc:
        report.add(exc.location, exc.reason)
        return
    except DecryptionError as exc:
        # An encrypted store (storage.encrypted) decrypts after the backend has decoded
        # every message, so without a key the structure is still checked.
        if exc.reason == "no-key":
            report.undecrypted += 1
        else:
            report.add(f"{store.location} session {session_id!r}", exc.message)
        return
    report.messages += len(history)
    # Persistent backends refuse these on load already; memory: holds whatever a program saved.
    for n, m in enumerate(history, 1):
        if m.role not in ROLES or not isinstance(m.content, str):
            report.add(f"{store.location} session {session_id!r}",
                       f"message {n}: role {m.role!r} with {type(m.content).__name__} content")
            return


# ---- file: ---------------------------------------------------------------------

_TMP_RE = re.compile(r"\.[A-Za-z0-9_][A-Za-z0-9._-]*\.[0-9a-f]{12}\.tmp")  # see FileStorage._write_atomic
_LOCK_RE = re.compile(r"\.[A-Za-z0-9_][A-Za-z0-9._-]*\.lock")


def _check_files(store: Any, report: DoctorReport) -> None:
    directory = store.directory
    try:
        st = directory.stat()
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return  # nothing stored yet
    _check_mode(report, str(directory), st.st_mode, 0o700, "other users can list the sessions")
    now = time.time()
    for entry in entries:
        try:
            _check_entry(report, entry, now)
        except FileNotFoundError:
            pass  # removed since the listing (a session cleared, a write renamed into place)


def _check_entry(report: DoctorReport, entry: os.DirEntry[str], now: float) -> None:
    path, name = entry.path, entry.name
    sid = name[:-5] if name.endswith(".json") else None
    if sid is not None and is_valid_session_id(sid) and entry.is_file():
        if entry.is_symlink():
            report.add(path, "a symbolic link: the next write to this session replaces the link "
                             "with a file")
        else:
            _check_mode(report, path, entry.stat().st_mode, 0o600, "other users can read it")
    elif _TMP_RE.fullmatch(name) and entry.is_file(follow_symlinks=False):
        age = now - entry.stat(follow_symlinks=False).st_mtime
        if age > STALE_TMP:
            report.add(path, f"a temporary file left by an interrupted write ({age:.0f} s old; "
                             "the session's own file is intact)", fix=lambda p=path: _unlink(p))
    elif _LOCK_RE.fullmatch(name) and entry.is_file(follow_symlinks=False):
        pass  # a session's lock: kept for good by design
    else:
        report.add(path, "not a session file, so fusion ignores it (sessions are ID.json, ID being "
                         "1-128 of A-Z a-z 0-9 . _ -)")


def _check_mode(report: DoctorReport, path: str, mode: int, wanted: int, why: str) -> None:
    mode = stat.S_IMODE(mode)
    if mode & 0o077:
        report.add(path, f"mode {mode:04o}, expected {wanted:04o}: {why}",
                   fix=lambda: os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) & 0o700))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # gone meanwhile: fixed all the same


# ---- sqlite: ---------------------------------------------------------------------

_ORPHANS = ("SELECT m.session_id, count(*) FROM messages AS m LEFT JOIN sessions AS s "
            "ON s.id = m.session_id WHERE s.id IS NULL GROUP BY m.session_id ORDER BY m.session_id")


def _check_sqlite(store: Any, report: DoctorReport) -> None:
    # The WAL holds the latest commits until a checkpoint: as private as the database.
    for suffix in ("", "-wal", "-shm"):
        try:
            mode = os.stat(f"{store.path}{suffix}").st_mode
        except FileNotFoundError:
            continue
        _check_mode(report, f"{store.location}{suffix}", mode, 0o600, "other users can read the sessions")
    # The backend's own connection, so its errors map as for any command (not a
    # database: CorruptSession). list_sessions has just opened it.
    with store._reading() as conn:
        if conn is None:
            return
        for (line,) in conn.execute("PRAGMA integrity_check").fetchall():
            if line != "ok":
                report.add(store.location, f"integrity_check: {line}")
        for session_id, rows in conn.execute(_ORPHANS).fetchall():
            report.add(f"{store.location} messages of session {session_id!r}",
                       f"{rows} row{'' if rows == 1 else 's'} with no row in sessions: "
                       "no command lists, shows or clears them")


# ---- redis:// ---------------------------------------------------------------------

def _check_redis(store: Any, report: DoctorReport) -> None:
    client, prefix, where = store.client, store.prefix, store.location
    index = f"{prefix}sessions"
    with store._errors():  # (an index of the wrong type failed list_sessions already)
        now = time.time()
        alive = {}  # id -> score, entries not past their expiry
        for member, score in client.zrange(index, 0, -1, withscores=True):
            if score == 0 or score > now:
                alive[_text(member)] = score
        for sid in alive:
            if not is_valid_session_id(sid):
                report.add(f"{where} key {index}", f"member {sid!r} is not a valid session id, "
                                                    "so fusion does not list it")
        keys = sorted(_text(k) for k in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000))
        with client.pipeline(transaction=False) as pipe:  # one round trip, not two a key
            for key in keys:
                pipe.type(key)
                pipe.pttl(key)
            replies = pipe.execute()
        for n, key in enumerate(keys):
            found, ttl = _text(replies[2 * n]), replies[2 * n + 1]
            _check_redis_key(where, prefix, key, found, ttl, alive, report)
        present = set(keys)
        for sid, score in alive.items():
            if score == 0 and is_valid_session_id(sid) and f"{prefix}meta:{sid}" not in present:
                report.add(f"{where} key {prefix}meta:{sid}",
                           "missing: the session is indexed but has no times (list shows none)")


_REDIS_TYPES = {"session": "list", "meta": "hash", "lock": "string"}


def _check_redis_key(where: str, prefix: str, key: str, found: str, ttl: int, alive: dict[str, float],
                     report: DoctorReport) -> None:
    """One key under the prefix, given its TYPE and PTTL (-1: no TTL)."""
    kind, _, sid = key[len(prefix):].partition(":")
    if key == f"{prefix}sessions":
        return
    at = f"{where} key {key}"
    expected = _REDIS_TYPES.get(kind) if sid else None
    if expected is None:
        report.add(at, "not a key fusion writes, under its prefix")
        return
    if kind == "session" and sid in alive:
        return  # loading the session checked it
    if found == "none":
        return  # expired or deleted since the scan
    if found != expected:
        report.add(at, f"a {found}, expected a {expected}")
    elif kind == "lock":
        if ttl == -1:
            report.add(at, "a lock with no TTL: the session stays busy until the key is deleted")
    elif sid not in alive and ttl == -1:  # keys with a TTL are on their way out
        report.add(at, f"session {sid!r} is not in the index {prefix}sessions, "
                       "so no command lists, shows or clears it")


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


_BACKEND_CHECKS: dict[str, Callable[[Any, DoctorReport], None]] = {
    "file": _check_files,
    "sqlite": _check_sqlite,
    "redis": _check_redis,
}


def _printable(text: str) -> str:
    """`text` on one line: control characters and undecodable bytes escaped."""
    text = re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)
    try:  # a file name's undecodable bytes, as os.fsdecode carries them, back to \xNN
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")
