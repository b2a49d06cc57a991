"""`postgresql://USER:PASS@HOST:PORT/DB?schema=S&table_prefix=P` -- a PostgreSQL server.

Two tables per store, `{prefix}sessions` and `{prefix}messages` (one row per
message, primary key (session_id, seq)), in schema S (default ``public``,
created if missing), plus `{prefix}migrations`, the named schema steps
applied so far. `schema` and `table_prefix` are ours and are stripped from
the URL; every other query parameter goes to libpq.

One data connection per storage object, opened on first use (autocommit off;
every statement runs inside ``conn.transaction()``), and a second one, in
autocommit, that only holds session locks: `pg_try_advisory_lock` is a
session-level lock, so the server drops it when its holder's connection goes,
and keeping it off the data connection means no rollback there touches it.
Session locks need a real server session: they do not work through a
transaction-pooling proxy (PgBouncer in transaction mode).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from ..errors import CorruptSession, InvalidStorageURL, StorageError, StorageUnavailable
from ..messages import ROLES, ChatMessage, unknown_role
from . import redact_url, url_passwords
from .base import ConversationStorage, SessionInfo

DEFAULT_SCHEMA = "public"
DEFAULT_PREFIX = "fusion_"
CONNECT_TIMEOUT = "5"  # seconds; libpq would otherwise wait for the OS (minutes)

_MAX_IDENT = 63  # PostgreSQL silently truncates longer names: two prefixes could collide
_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_]*")
_LONGEST_TABLE = "migrations"


def _key(*parts: str) -> int:
    """A stable signed 64-bit advisory-lock key (Python's hash() changes per process)."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# Serialises first use (creating the schema and tables) across processes and prefixes.
_MIGRATION_KEY = _key("fusion_cli", "migrations")

# The schema's history: ordered, named steps, each applied once, in its own
# transaction, and recorded in {prefix}migrations. A later fusion adds steps at
# the end and never edits one that has shipped.
#
# Content is bytea holding UTF-8, not text: text cannot hold NUL ("\x00"), which
# a message may contain, and bytea does not depend on the database's encoding
# (a LATIN1 or SQL_ASCII database would refuse or mangle other characters). One
# code path, lossless. In psql, read it with convert_from(content, 'UTF8').
# Ids are COLLATE "C" so that their index order is code-point order.
_STEPS: list[tuple[str, list[str]]] = [
    ("0001_sessions_and_messages", [
        """CREATE TABLE {sessions} (
               id text COLLATE "C" PRIMARY KEY,
               created timestamptz NOT NULL DEFAULT now(),
               updated timestamptz NOT NULL DEFAULT now())""",
        """CREATE TABLE {messages} (
               session_id text COLLATE "C" NOT NULL REFERENCES {sessions} (id) ON DELETE CASCADE,
               seq bigint NOT NULL,
               role text NOT NULL,
               content bytea NOT NULL,
               PRIMARY KEY (session_id, seq))""",
    ]),
]


class PostgresStorage(ConversationStorage):
    scheme = "postgresql"

    def __init__(self, conninfo: str, *, schema: str = DEFAULT_SCHEMA,
                 table_prefix: str = DEFAULT_PREFIX, location: str | None = None) -> None:
        super().__init__()
        _check_identifiers(schema, table_prefix, location or "PostgresStorage")
        self.conninfo = conninfo
        self.schema = schema
        self.table_prefix = table_prefix
        self.location = location or redact_url(conninfo)
        self._passwords = url_passwords(conninfo)  # kept out of every message we build
        self._names = {"schema": sql.Identifier(schema)}
        for table in ("sessions", "messages", "migrations"):
            self._names[table] = sql.Identifier(schema, table_prefix + table)
        # One connection carries the data and the advisory locks: a `send` costs the
        # server one slot, not two (50 parallel sends fit a default max_connections),
        # and a lock cannot outlive the connection its writes go through: when that
        # connection dies, so do its locks, and the writes stop instead of quietly
        # going on unlocked over a new one (see `_tx`).
        self._conn: psycopg.Connection[Any] | None = None
        self._mutex = threading.RLock()  # one statement or transaction at a time on it
        self._locked: set[str] = set()  # ids whose advisory lock this object holds
        self._lost: set[str] = set()  # ids whose lock died with a dropped connection

    @classmethod
    def from_url(cls, url: str) -> "PostgresStorage":
        parts = urlsplit(url)
        ours: dict[str, str] = {}
        rest: list[str] = []
        # Pieces that are not ours stay byte for byte as written: libpq decodes them
        # itself (and, unlike a form, does not read '+' as a space).
        for piece in filter(None, parts.query.split("&")):
            name, _, value = piece.partition("=")
            if name in ("schema", "table_prefix"):
                if name in ours:
                    raise InvalidStorageURL(f"{name!r} is given twice in {redact_url(url)!r}")
                ours[name] = unquote(value)
            else:
                rest.append(piece)
        given = any(piece.partition("=")[0] == "connect_timeout" for piece in rest)
        if not given and "PGCONNECT_TIMEOUT" not in os.environ:
            rest.append(f"connect_timeout={CONNECT_TIMEOUT}")
        conninfo = urlunsplit(parts._replace(query="&".join(rest)))
        if not parts.netloc and url[len(parts.scheme):].startswith("://"):
            # urlunsplit drops the '//' of an empty host (postgresql:///db, a Unix socket),
            # and libpq refuses what is left.
            conninfo = conninfo.replace(":", "://", 1)
        _check_ports(conninfo, redact_url(url))
        return cls(conninfo, schema=ours.get("schema", DEFAULT_SCHEMA),
                   table_prefix=ours.get("table_prefix", DEFAULT_PREFIX), location=redact_url(url))

    # ---- connections and errors ----------------------------------------------

    @contextmanager
    def _errors(self, drop: Callable[[], None]) -> Iterator[None]:
        """The one place psycopg errors become fusion errors."""
        try:
            yield
        except psycopg.OperationalError as exc:
            # Cannot connect, or the server went away: `drop` the connection so
            # that the next call opens a new one rather than reusing a dead one.
            drop()
            message = f"cannot use PostgreSQL at {self.location}: {self._safe_first_line(exc)}"
            raise StorageUnavailable(message, hint=_hint(str(exc))) from self._safe_cause(exc)
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL at {self.location} failed: {self._safe_first_line(exc)}") \
                from self._safe_cause(exc)

    # libpq quotes parts of a bad conninfo back (`invalid percent-encoded token:
    # "PASSWORD%zz"`), so its text is scrubbed, and such an exception is not chained
    # (a -v traceback would print it).
    def _safe_first_line(self, exc: BaseException) -> str:
        text = _first_line(exc)
        for password in self._passwords:
            text = text.replace(password, "***")
        return text

    def _safe_cause(self, exc: BaseException) -> BaseException | None:
        return None if any(p in str(exc) for p in self._passwords) else exc

    def _drop(self) -> None:
        with self._mutex:
            conn, self._conn = self._conn, None
            self._lost |= self._locked  # the server released them with the connection
            self._locked.clear()
        if conn is not None:
            conn.close()

    def _connect(self, autocommit: bool) -> psycopg.Connection[Any]:
        return psycopg.connect(self.conninfo, autocommit=autocommit)

    def _connection(self) -> psycopg.Connection[Any]:
        """The connection, opened (and the tables migrated) on first use; call under _mutex."""
        if self._conn is None:
            if self._lost:
                # A lock held by this object died with its connection: another process
                # may hold it now, so writing on would break the lock's promise.
                raise StorageUnavailable(
                    f"lost the connection to PostgreSQL at {self.location} while holding the lock "
                    f"of session {sorted(self._lost)[0]!r}; nothing more was written",
                    hint="run the command again")
            # Autocommit: idle between transactions, and a session-level advisory lock
            # is never tied to a transaction; `_tx` opens explicit ones.
            conn = self._connect(autocommit=True)
            try:
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        """A transaction on the connection."""
        with self._mutex, self._errors(self._drop):
            conn = self._connection()
            with conn.transaction():
                yield conn

    def _q(self, template: str) -> sql.Composed:
        return sql.SQL(template).format(**self._names)

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        """Bring the tables up to date; one short read-only transaction when they already are."""
        known = [name for name, _ in _STEPS]
        with conn.transaction():
            applied = self._applied(conn)
        if applied == set(known):
            return
        with conn.transaction():
            # Two processes using a new store at once: one creates, the other waits.
            conn.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (_MIGRATION_KEY,))
            # Checked first: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even then.
            found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,))
            if found.fetchone() is None:
                conn.execute(self._q("CREATE SCHEMA {schema}"))
            conn.execute(self._q("CREATE TABLE IF NOT EXISTS {migrations} (name text PRIMARY KEY, "
                                 "applied timestamptz NOT NULL DEFAULT now())"))
        for name, statements in _STEPS:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (_MIGRATION_KEY,))
                done = conn.execute(self._q("SELECT 1 FROM {migrations} WHERE name = %s"), (name,))
                if done.fetchone():
                    continue  # another process applied it while we waited
                for statement in statements:
                    conn.execute(self._q(statement))
                conn.execute(self._q("INSERT INTO {migrations} (name) VALUES (%s)"), (name,))

    def _applied(self, conn: psycopg.Connection[Any]) -> set[str]:
        table = self._names["migrations"].as_string(conn)
        # to_regclass rather than trying the SELECT: no error for a new store.
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
            return set()
        applied = {row[0] for row in conn.execute(self._q("SELECT name FROM {migrations}"))}
        newer = sorted(applied - {name for name, _ in _STEPS})
        if newer:
            raise StorageUnavailable(
                f"the fusion tables in PostgreSQL at {self.location} (schema {self.schema!r}, "
                f"prefix {self.table_prefix!r}) come from a newer fusion (step {newer[-1]!r})",
                hint="upgrade fusion: pip install -U fusion_cli",
            )
        return applied

    def close(self) -> None:
        self._drop()  # the server releases every advisory lock the connection held
        self._lost.clear()

    # ---- the hooks -------------------------------------------------------------

    def _save(self, session_id: str, history: list[ChatMessage]) -> None:
        with self._tx() as conn:
            self._touch(conn, session_id)  # locks the session row until commit
            conn.execute(self._q("DELETE FROM {messages} WHERE session_id = %s"), (session_id,))
            self._insert(conn, session_id, history, start=0)

    def _append(self, session_id: str, messages: list[ChatMessage]) -> None:
        with self._tx() as conn:
            # The upsert locks the session row, so concurrent appends to one session
            # queue here; the next statement takes a fresh snapshot (READ COMMITTED)
            # and sees the rows of whoever went first: seq never collides.
            self._touch(conn, session_id)
            if messages:
                self._insert(conn, session_id, messages, start=None)

    def _set_times(self, session_id: str, created: float | None, updated: float | None) -> None:
        with self._tx() as conn:
            conn.execute(self._q("UPDATE {sessions} SET created = coalesce(to_timestamp(%s), created), "
                                 "updated = coalesce(to_timestamp(%s), updated) WHERE id = %s"),
                         (created, updated, session_id))

    def _touch(self, conn: psycopg.Connection[Any], session_id: str) -> None:
        conn.execute(self._q("INSERT INTO {sessions} (id) VALUES (%s) "
                             "ON CONFLICT (id) DO UPDATE SET updated = now()"), (session_id,))

    def _insert(self, conn: psycopg.Connection[Any], session_id: str, messages: list[ChatMessage],
                start: int | None) -> None:
        """All messages in one statement (one round trip), seq from `start` or after the last."""
        if not messages:
            return
        if start is None:
            first = "(SELECT coalesce(max(seq) + 1, 0) FROM {messages} WHERE session_id = %s)"
            params: list[Any] = [session_id, session_id]
        else:
            first, params = "%s", [session_id, start]
        params += [[m.role for m in messages], [m.content.encode("utf-8") for m in messages]]
        conn.execute(self._q(
            "INSERT INTO {messages} (session_id, seq, role, content) "
            "SELECT %s, " + first + " + t.n - 1, t.role, t.content "
            "FROM unnest(%s::text[], %s::bytea[]) WITH ORDINALITY AS t(role, content, n)"), params)

    def _load(self, session_id: str) -> list[ChatMessage]:
        with self._tx() as conn:
            # Binary results: bytea arrives as raw bytes rather than twice as long in hex.
            rows = conn.execute(self._q("SELECT seq, role, content FROM {messages} "
                                        "WHERE session_id = %s ORDER BY seq"),
                                (session_id,), binary=True).fetchall()
        history = []
        for seq, role, content in rows:
            try:
                text = bytes(content).decode("utf-8")
                reason = None if role in ROLES else unknown_role(role)  # the column is any text
            except UnicodeDecodeError as exc:
                reason = f"content is not UTF-8 ({exc.reason})"
            if reason is not None:
                raise CorruptSession(f"{self.location} session {session_id!r} message seq {seq}", reason)
            history.append(ChatMessage(role, text))
        return history

    def _delete(self, session_id: str) -> None:
        with self._tx() as conn:
            conn.execute(self._q("DELETE FROM {sessions} WHERE id = %s"), (session_id,))  # cascades

    def _exists(self, session_id: str) -> bool:
        with self._tx() as conn:
            query = self._q("SELECT 1 FROM {sessions} WHERE id = %s")
            row = conn.execute(query, (session_id,)).fetchone()
        return row is not None

    def _list_sessions(self) -> Iterable[str]:
        with self._tx() as conn:
            query = self._q('SELECT id FROM {sessions} ORDER BY id COLLATE "C"')
            rows = conn.execute(query).fetchall()
        return [row[0] for row in rows]

    def _count(self, session_id: str) -> int:
        # seq runs 0..n-1 without gaps (`_save` numbers from 0, `_append` from the last + 1, and
        # only a whole session is ever deleted), so the last seq + 1 is the count: one probe of
        # the primary key, where count(*) would visit every row (bench/: 5x slower at 10,000).
        with self._tx() as conn:
            query = self._q("SELECT coalesce(max(seq) + 1, 0) FROM {messages} "
                            "WHERE session_id = %s")
            return conn.execute(query, (session_id,)).fetchone()[0]

    _INFO = ("SELECT s.id, count(m.seq), extract(epoch FROM s.created)::float8, "
             "extract(epoch FROM s.updated)::float8 "
             "FROM {sessions} s LEFT JOIN {messages} m ON m.session_id = s.id ")

    def _get_times(self, session_id: str):
        return self._times_many([session_id])[0]

    def _times_many(self, session_ids: list[str]):
        with self._tx() as conn:  # one query for the batch (migrate asks it of every session)
            rows = conn.execute(self._q("SELECT id, extract(epoch FROM created)::float8, "
                                        "extract(epoch FROM updated)::float8 FROM {sessions} "
                                        "WHERE id = ANY(%s)"), (session_ids,)).fetchall()
        found = {sid: (created, updated) for sid, created, updated in rows}
        return [found.get(sid) for sid in session_ids]

    def _info(self, session_id: str) -> SessionInfo | None:
        with self._tx() as conn:
            row = conn.execute(self._q(self._INFO + "WHERE s.id = %s GROUP BY s.id"),
                               (session_id,)).fetchone()
        return SessionInfo(*row) if row else None

    def _list_info(self) -> Iterable[SessionInfo]:
        # One query for every session: counting happens in the server, over the index.
        with self._tx() as conn:
            query = self._q(self._INFO + 'GROUP BY s.id ORDER BY s.id COLLATE "C"')
            rows = conn.execute(query).fetchall()
        return [SessionInfo(*row) for row in rows]

    # ---- the lock -------------------------------------------------------------

    def lock_key(self, session_id: str) -> int:
        """The advisory-lock key of a session: the same in every process using this store."""
        return _key(self.schema, self.table_prefix, session_id)

    def _try_lock(self, session_id: str) -> Any:
        with self._mutex:
            # The server counts a second lock on one connection as re-entry, so another
            # thread of this object holding the lock must be refused here.
            if session_id in self._locked:
                return None
            key = self.lock_key(session_id)
            with self._errors(self._drop):
                got = self._connection().execute("SELECT pg_try_advisory_lock(%s::bigint)",
                                                  (key,)).fetchone()[0]
            if not got:
                return None
            self._locked.add(session_id)
            return key

    def _unlock(self, session_id: str, handle: Any) -> None:
        with self._mutex:
            if session_id in self._lost:  # released by the server with its connection
                self._lost.discard(session_id)
                return
            self._locked.discard(session_id)
            if self._conn is None:
                return
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s::bigint)", (handle,))
            except psycopg.Error:
                # The connection is gone, and the server released its locks with it;
                # the work done under the lock is committed, so no error to report.
                self._drop()


def _check_identifiers(schema: str, prefix: str, where: str) -> None:
    if not _SCHEMA_RE.fullmatch(schema) or len(schema) > _MAX_IDENT:
        raise InvalidStorageURL(
            f"invalid schema {schema!r} in {where!r}",
            hint=f"use 1-{_MAX_IDENT} letters, digits or underscores, not starting with a digit",
        )
    limit = _MAX_IDENT - len(_LONGEST_TABLE)
    if not _PREFIX_RE.fullmatch(prefix) or len(prefix) > limit:
        raise InvalidStorageURL(
            f"invalid table_prefix {prefix!r} in {where!r}",
            hint=f"use at most {limit} letters, digits or underscores",
        )


def _hint(error: str) -> str:
    """What to do about a connection failure, from libpq's message (it carries no SQLSTATE)."""
    if re.search(r'database ".*" does not exist', error):
        return "create the database (createdb NAME) or fix its name in the URL"
    if re.search(r'authentication|password|pg_hba\.conf|role ".*" does not exist', error, re.I):
        return "check the user name and password in the URL (or ~/.pgpass, PGUSER, PGPASSWORD)"
    # A full server is reachable: asking whether it runs would send the user the wrong way.
    if re.search(r"too many (clients|connections)|connection slots are reserved", error, re.I):
        return ("the server is at its connection limit, max_connections or the role's CONNECTION LIMIT; "
                "each running fusion command holds one connection: retry later, or raise the limit")
    return "is PostgreSQL running there and accepting connections? check the URL's host and port"



def _check_ports(conninfo: str, location: str) -> None:
    """A port that is not a number from 1 to 65535 is a usage error (exit 2), found before connecting."""
    try:
        ports = psycopg.conninfo.conninfo_to_dict(conninfo).get("port")
    except psycopg.Error:
        return  # a URL libpq cannot parse: reported (and scrubbed) when connecting
    for port in str(ports or "").split(","):  # one port per host, for host=a,b
        if port and not (set(port) <= set("0123456789") and 0 < int(port) < 65536):
            raise InvalidStorageURL(f"bad PostgreSQL URL {location!r}: port {port!r} is not a number "
                                    "from 1 to 65535", hint="e.g. postgresql://USER@HOST:5432/DB")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
