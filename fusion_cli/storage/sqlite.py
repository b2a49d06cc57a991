"""`sqlite:PATH` -- one SQLite database file, in WAL mode.

Also `sqlite:///relative.db` and `sqlite:////absolute.db`, as SQLAlchemy
writes them. Everything after the prefix is the path, verbatim (no query
parameters), with `~` expanded.

Tables (see `_STEPS`):

    sessions  id TEXT PRIMARY KEY, created REAL, updated REAL (Unix seconds)
    messages  id INTEGER PRIMARY KEY (the order), session_id, role TEXT, content TEXT

A row in `sessions` is what makes a session exist, so an empty history is
still a session. `append` is INSERTs and `count` is an index-only COUNT(*).
Every write is one `BEGIN IMMEDIATE` transaction. The schema version is
`PRAGMA user_version`.

One connection per storage object, opened on first use; `sqlite3` itself is
imported only then, and a read of a database that does not exist returns
nothing without creating (or importing) anything. The file is created 0600
and its directory 0700 by the first write or lock.

The lock of session `x` is `flock` on `<PATH>.locks/x.lock`: SQLite's own
locks last one transaction, while a `send` holds its lock across a model call
that must not block other sessions. Lock files are never deleted (deleting
one while another process waits on it would let two holders in).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ..errors import CorruptSession, InvalidStorageURL, StorageError, StorageUnavailable
from ..messages import ROLES, ChatMessage, unknown_role
from .base import ConversationStorage, SessionInfo
from .dirs import make_private_dirs

if TYPE_CHECKING:
    import sqlite3

BUSY_TIMEOUT = 30.0  # seconds a write waits for another process's transaction

# The schema's history: `PRAGMA user_version` N means the first N steps are
# applied. A later fusion appends steps and never edits one that has shipped.
_STEPS: list[list[str]] = [
    [
        # WITHOUT ROWID: small rows, clustered by id, so listing reads one b-tree.
        """CREATE TABLE sessions (
               id TEXT NOT NULL PRIMARY KEY,
               created REAL NOT NULL,
               updated REAL NOT NULL
           ) WITHOUT ROWID""",
        # A rowid table (not WITHOUT ROWID): contents can be megabytes, and the
        # rowid alias `id` gives the order for free. Every index entry carries
        # the rowid, so (session_id) alone serves both `WHERE session_id = ?
        # ORDER BY id` and COUNT(*) without touching the table.
        """CREATE TABLE messages (
               id INTEGER PRIMARY KEY,
               session_id TEXT NOT NULL,
               role TEXT NOT NULL,
               content TEXT NOT NULL
           )""",
        "CREATE INDEX messages_by_session ON messages (session_id)",
    ],
]
SCHEMA_VERSION = len(_STEPS)

_TOUCH = ("INSERT INTO sessions (id, created, updated) VALUES (?1, ?2, ?2) "
          "ON CONFLICT (id) DO UPDATE SET updated = excluded.updated")
_SET_TIMES = ("UPDATE sessions SET created = coalesce(?2, created), updated = coalesce(?3, updated) "
              "WHERE id = ?1")
_INSERT = "INSERT INTO messages (session_id, role, content) VALUES (?, ?, ?)"
# Contents come back as bytes so that a row that is not valid text is reported as
# corrupt, with its row id, rather than as an OperationalError from the driver.
_LOAD = ("SELECT id, typeof(role) = 'text' AND typeof(content) = 'text', "
         "CAST(role AS BLOB), CAST(content AS BLOB) "
         "FROM messages WHERE session_id = ? ORDER BY id")
_INFO = ("SELECT s.id, count(m.id), s.created, s.updated "
         "FROM sessions AS s LEFT JOIN messages AS m ON m.session_id = s.id ")

# Primary result codes (the low byte of sqlite_errorcode).
_PERM, _BUSY, _LOCKED, _READONLY, _IOERR = 3, 5, 6, 8, 10
_CORRUPT, _FULL, _CANTOPEN, _NOTADB = 11, 13, 14, 26
# An extended code: a write() failed. SQLite says FULL only for ENOSPC; a file-size
# limit (EFBIG, `ulimit -f`) or a quota arrives as this, "disk I/O error".
_IOERR_WRITE = _IOERR | (3 << 8)


class SqliteStorage(ConversationStorage):
    scheme = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        super().__init__()
        self.path = Path(path).expanduser()
        self.location = str(self.path)
        self.lock_dir = self.path.with_name(self.path.name + ".locks")
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._encoding = "utf-8"
        self._ready = False  # the schema is known to be current
        self._mutex = threading.RLock()  # one statement or transaction at a time

    @classmethod
    def from_url(cls, url: str) -> "SqliteStorage":
        rest = url[len("sqlite:"):]
        if rest.startswith("//") and not rest.startswith("///"):
            # SQLAlchemy's sqlite:// is an in-memory database; sqlite://x.db could be
            # a host or a path. Say which form to use rather than guess.
            raise InvalidStorageURL(
                f"ambiguous SQLite URL {url!r}",
                hint="use sqlite:PATH, sqlite:///relative/path.db or sqlite:////absolute/path.db "
                     "(or memory: for a store that lives only in this process)",
            )
        if rest.startswith("///"):
            rest = rest[3:]  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db
        if not rest:
            raise InvalidStorageURL(f"storage URL {url!r} names no database file",
                                    hint="use sqlite:PATH, e.g. sqlite:~/fusion.db")
        return cls(rest)

    def close(self) -> None:
        with self._mutex:
            conn, self._conn, self._ready = self._conn, None, False
        if conn is not None:
            conn.close()

    # ---- connection, schema, transactions ------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """The one place OSError and sqlite3.Error become fusion errors."""
        try:
            yield
        except OSError as exc:
            raise _os_error(self.location, exc) from exc
        except Exception as exc:
            import sqlite3  # already loaded if the error came from it

            if not isinstance(exc, sqlite3.Error):
                raise
            raise self._sqlite_error(exc) from exc

    def _sqlite_error(self, exc: Exception) -> StorageError:
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        where = f"the SQLite database {self.location}"
        if code in (_NOTADB, _CORRUPT):
            return CorruptSession(self.location, str(exc))
        if code in (_BUSY, _LOCKED):
            return StorageUnavailable(
                f"{where} stayed locked by another process for {self.busy_timeout:g} s",
                hint="retry later; if it persists, look for a stuck process using the file")
        if code == _FULL:
            return StorageUnavailable(f"cannot write {where}: {exc}",
                                      hint="free some disk space; the previous history is intact")
        if getattr(exc, "sqlite_errorcode", None) == _IOERR_WRITE:
            return StorageUnavailable(f"cannot write {where}: {exc}",
                                      hint="is the disk full, or the file over a size limit (ulimit -f)? "
                                           "The previous history is intact")
        if code in (_PERM, _READONLY, _CANTOPEN, _IOERR):
            return StorageUnavailable(
                f"cannot use {where}: {exc}",
                hint="check that it is a file you may read and write, in a directory you may write")
        return StorageError(f"{where} failed: {exc}")

    def _connection(self, create: bool) -> sqlite3.Connection | None:
        """The connection with a current schema, or None for a read of a store not yet created."""
        if self._conn is None:
            if create:
                self._create_file()
            else:
                try:
                    os.stat(self.path)
                except FileNotFoundError:
                    return None
            self._conn = self._connect()
        if not self._ready:
            version = _user_version(self._conn)
            if version > SCHEMA_VERSION:
                raise StorageUnavailable(
                    f"the SQLite database {self.location} was written by a newer fusion "
                    f"(schema version {version}; this fusion knows up to {SCHEMA_VERSION})",
                    hint="upgrade fusion: pip install -U fusion_cli")
            if version == 0 and not create:
                return None  # created by a writer that has not made the tables yet
            if version < SCHEMA_VERSION:
                self._migrate(self._conn)
            self._ready = True
        return self._conn

    def _create_file(self) -> None:
        make_private_dirs(self.path.parent)
        try:
            # Created here rather than by SQLite, whose files follow the umask (0644).
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            pass  # never truncate or replace an existing file, whatever it holds

    def _connect(self) -> sqlite3.Connection:
        import sqlite3

        # mode=rw: SQLite must never create the file itself (see _create_file).
        # timeout= is PRAGMA busy_timeout. isolation_level=None: we issue BEGIN
        # IMMEDIATE / COMMIT ourselves, rather than the driver's implicit BEGIN.
        conn = sqlite3.connect(_uri(self.path), uri=True, timeout=self.busy_timeout,
                               isolation_level=None, check_same_thread=False)
        try:
            self._enable_wal(conn)
            # FULL rather than NORMAL: with WAL, NORMAL may lose the last commits on
            # power loss; FULL fsyncs each commit, as the file backend does, so a
            # turn fusion reported as stored stays stored. One fsync per write.
            conn.execute("PRAGMA synchronous = FULL")
            self._encoding = conn.execute("PRAGMA encoding").fetchone()[0]
        except BaseException:
            conn.close()
            raise
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # WAL: readers never wait for a writer, and a killed writer leaves only an
        # uncommitted tail that the next opener discards. The switch is stored in
        # the file, so this is a no-op after the first time. Processes switching a
        # new file at once can deadlock, and SQLite then answers BUSY at once,
        # without its busy handler: the loser retries.
        import sqlite3

        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != _BUSY or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        import sqlite3

        for version, statements in enumerate(_STEPS, 1):
            with self._transaction(conn):
                # Re-read inside the write lock: another process may have just done it.
                if _user_version(conn) >= version:
                    continue
                try:
                    for statement in statements:
                        conn.execute(statement)
                except sqlite3.OperationalError as exc:
                    raise StorageUnavailable(
                        f"cannot create fusion's tables in {self.location}: {exc}",
                        hint="is it another program's database? point --storage at a new file",
                    ) from exc
                conn.execute(f"PRAGMA user_version = {version}")

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout), so a
        # transaction never fails half-way because another one started writing.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except Exception:
                    self._drop()  # a connection stuck in a transaction is no use
            raise

    def _drop(self) -> None:
        conn, self._conn, self._ready = self._conn, None, False
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection | None]:
        # One statement each: in autocommit it is its own consistent snapshot.
        with self._mutex, self._errors():
            yield self._connection(create=False)

    @contextmanager
    def _writing(self, create: bool = True) -> Iterator[sqlite3.Connection | None]:
        with self._mutex, self._errors():
            conn = self._connection(create)
            if conn is None:
                yield None
                return
            with self._transaction(conn):
                yield conn

    # ---- the hooks -------------------------------------------------------------

    def _save(self, session_id: str, history: list[ChatMessage]) -> None:
        self._save_many([(session_id, history)], {})

    def _append(self, session_id: str, messages: list[ChatMessage]) -> None:
        # No read and no lock: the transaction alone makes concurrent appends safe.
        with self._writing() as conn:
            conn.execute(_TOUCH, (session_id, time.time()))
            conn.executemany(_INSERT, [(session_id, m.role, m.content) for m in messages])

    def _save_many(self, items: list[tuple[str, list[ChatMessage]]], times: dict) -> None:
        # One transaction, so one fsync for the whole batch rather than one per session.
        now = time.time()
        with self._writing() as conn:
            conn.executemany(_TOUCH, [(sid, now) for sid, _ in items])
            conn.executemany("DELETE FROM messages WHERE session_id = ?",
                             [(sid,) for sid, _ in items])
            conn.executemany(_INSERT, [(sid, m.role, m.content)
                                       for sid, history in items for m in history])
            conn.executemany(_SET_TIMES, [(sid, *times[sid]) for sid, _ in items if sid in times])

    def _set_times(self, session_id: str, created: float | None, updated: float | None) -> None:
        with self._writing() as conn:
            conn.execute(_SET_TIMES, (session_id, created, updated))

    def _load(self, session_id: str) -> list[ChatMessage]:
        with self._reading() as conn:
            rows = [] if conn is None else conn.execute(_LOAD, (session_id,)).fetchall()
        history, encoding = [], self._encoding
        for row_id, is_text, role, content in rows:
            try:
                if not is_text:
                    raise ValueError("its role or content is not text")
                message = ChatMessage(role.decode(encoding), content.decode(encoding))
                if message.role not in ROLES:  # see messages.unknown_role
                    raise ValueError(unknown_role(message.role))
                history.append(message)
            except ValueError as exc:  # UnicodeDecodeError included
                reason = f"session {session_id!r}, messages row {row_id}: {exc}"
                raise CorruptSession(self.location, reason) from exc
        return history

    def _delete(self, session_id: str) -> None:
        with self._writing(create=False) as conn:
            if conn is not None:
                conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
                conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def _exists(self, session_id: str) -> bool:
        with self._reading() as conn:
            return conn is not None and conn.execute(
                "SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is not None

    def _list_sessions(self) -> Iterable[str]:
        with self._reading() as conn:
            if conn is None:
                return []
            return [row[0] for row in conn.execute("SELECT id FROM sessions ORDER BY id")]

    def _count(self, session_id: str) -> int:
        with self._reading() as conn:
            if conn is None:
                return 0
            return conn.execute("SELECT count(*) FROM messages WHERE session_id = ?",
                                (session_id,)).fetchone()[0]

    def _get_times(self, session_id: str):
        with self._reading() as conn:  # the sessions row alone, without counting messages
            row = None if conn is None else conn.execute(
                "SELECT created, updated FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return tuple(row) if row else None

    def _info(self, session_id: str) -> SessionInfo | None:
        with self._reading() as conn:
            row = None if conn is None else conn.execute(
                _INFO + "WHERE s.id = ? GROUP BY s.id", (session_id,)).fetchone()
        return SessionInfo(*row) if row else None

    def _list_info(self) -> Iterable[SessionInfo]:
        # One query: sessions in key order, each count from the index.
        with self._reading() as conn:
            query = _INFO + "GROUP BY s.id ORDER BY s.id"
            rows = [] if conn is None else conn.execute(query).fetchall()
        return [SessionInfo(*row) for row in rows]

    # ---- the lock -----------------------------------------------------------------

    def _try_lock(self, session_id: str) -> Any:
        with self._errors():
            make_private_dirs(self.lock_dir)
            path = self.lock_dir / f"{session_id}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _unlock(self, session_id: str, handle: Any) -> None:
        os.close(handle)  # closing the descriptor releases the flock


def _user_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _uri(path: Path) -> str:
    # Only '%', '?' and '#' mean something in the path of an SQLite URI.
    quoted = os.path.abspath(path).replace("%", "%25").replace("?", "%3f").replace("#", "%23")
    return f"file://{quoted}?mode=rw"


def _os_error(location: str, exc: OSError) -> StorageError:
    reason = exc.strerror or str(exc)
    what = f"cannot use the SQLite database {location}: {reason}"
    if exc.filename is not None and str(exc.filename) != location:
        what += f" ({exc.filename})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageUnavailable(what, hint="free some disk space; the previous history is intact")
    return StorageUnavailable(what, hint="check the path and its permissions, "
                                         "or choose another --storage")
