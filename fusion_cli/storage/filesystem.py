"""`file:PATH` -- one `{id}.json` per session in a directory, in the seed's exact format.

Writes go to a hidden temporary file in the same directory, are fsynced,
renamed over the old file, and the directory is fsynced: a crash leaves the
old history or the new one. Files are 0600, the directory 0700. The lock of
session `x` is `flock` on the hidden file `.x.lock` beside it (ids cannot
start with '.', so it never collides with a session); the kernel drops it
when its holder dies. Lock files are never deleted: deleting one while
another process waits on it would let two holders in.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import StorageError, StorageUnavailable
from ..messages import ChatMessage, decode_history, encode_history
from .base import ConversationStorage, SessionInfo, is_valid_session_id
from .dirs import make_private_dirs

SUFFIX = ".json"


class FileStorage(ConversationStorage):
    scheme = "file"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        super().__init__()
        self.directory = Path(directory).expanduser()
        self.location = str(self.directory)

    @classmethod
    def from_url(cls, url: str) -> "FileStorage":
        path = url
        if url.startswith("file://"):
            path = url[len("file://"):]  # file:///abs/path -> /abs/path
        elif url.startswith("file:"):
            path = url[len("file:"):]
        if not path:
            from ..errors import InvalidStorageURL

            raise InvalidStorageURL(f"storage URL {url!r} names no directory", hint="use file:PATH")
        return cls(path)

    def path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}{SUFFIX}"

    def _ensure_dir(self) -> None:
        try:
            make_private_dirs(self.directory)
        except OSError as exc:
            raise _io_error(f"cannot create the session directory {self.directory}", exc) from exc
        if not self.directory.is_dir():
            raise StorageUnavailable(f"{self.directory} is not a directory", hint="choose another --storage")

    def _save(self, session_id: str, history: list[ChatMessage]) -> None:
        self._write_atomic(self.path(session_id), encode_history(history))

    def _save_many(self, items: list[tuple[str, list[ChatMessage]]], times: dict) -> None:
        # Each file as `_save` writes it, but the directory fsynced once for the batch (its
        # renames are durable from then on) rather than once per file: half the fsyncs.
        for session_id, history in items:
            self._write_atomic(self.path(session_id), encode_history(history), sync_dir=False,
                               times=times.get(session_id))
        _fsync_dir(self.directory)

    def _set_times(self, session_id: str, created: float | None, updated: float | None) -> None:
        # updated is the file's mtime; created rides in the xattr every write carries on.
        path = self.path(session_id)
        try:
            if created is not None and _HAS_XATTR:
                try:
                    os.setxattr(path, CREATED_XATTR, repr(created).encode())
                except OSError as exc:
                    if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise
            if updated is not None:
                os.utime(path, (updated, updated))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _io_error(f"cannot set the times of {path}", exc) from exc

    def _get_times(self, session_id: str):
        path = self.path(session_id)  # a stat, not a parse: migrate asks this of every session
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _io_error(f"cannot read {path}", exc) from exc
        return _birth_time(st, path), st.st_mtime

    def _write_atomic(self, target: Path, data: bytes, sync_dir: bool = True,
                      times: tuple[float | None, float | None] | None = None) -> None:
        """Replace `target` with `data`; `times` (created, updated), when given, are set on
        the new file before it is renamed into place, so they arrive with the content."""
        created, updated = times or (None, None)
        self._ensure_dir()
        tmp = None
        try:
            # 0600 from the start; the leading dot hides it from list_sessions. (Not
            # tempfile.mkstemp: importing tempfile costs more than the whole write.)
            tmp = self.directory / f".{target.stem}.{os.urandom(6).hex()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                _set_created_time(target, f.fileno(), created)
                f.write(data)
                f.flush()
                if updated is not None:
                    os.utime(f.fileno(), (updated, updated))  # the rename keeps it
                os.fsync(f.fileno())
            os.replace(tmp, target)
            tmp = None
            if sync_dir:
                _fsync_dir(self.directory)
        except OSError as exc:
            raise _io_error(f"cannot write {target}", exc) from exc
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def _load(self, session_id: str) -> list[ChatMessage]:
        path = self.path(session_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _io_error(f"cannot read {path}", exc) from exc
        return decode_history(data, str(path))

    def _delete(self, session_id: str) -> None:
        try:
            self.path(session_id).unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _io_error(f"cannot delete {self.path(session_id)}", exc) from exc
        _fsync_dir(self.directory)

    def _exists(self, session_id: str) -> bool:
        return self.path(session_id).is_file()

    def _list_sessions(self) -> Iterable[str]:
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _io_error(f"cannot list {self.directory}", exc) from exc
        ids = []
        for entry in entries:
            name = entry.name
            if name.endswith(SUFFIX) and is_valid_session_id(name[: -len(SUFFIX)]) and entry.is_file():
                ids.append(name[: -len(SUFFIX)])
        return ids

    def _info(self, session_id: str) -> SessionInfo | None:
        times = self._get_times(session_id)
        return None if times is None else SessionInfo(session_id, self._count(session_id), *times)

    def _try_lock(self, session_id: str) -> Any:
        self._ensure_dir()
        lock_path = self.directory / f".{session_id}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _io_error(f"cannot open the lock file {lock_path}", exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise _io_error(f"cannot lock {lock_path}", exc) from exc
        return fd

    def _unlock(self, session_id: str, handle: Any) -> None:
        os.close(handle)  # closing the descriptor releases the flock


# The seed's format has no room for times, and every write renames a new file into
# place, so a session's creation time rides along in an extended attribute that
# each write copies from the file it replaces. Where xattrs are unsupported
# (macOS's Python, some filesystems) the file's own birth/change time stands in.
CREATED_XATTR = "user.fusion.created"
_HAS_XATTR = hasattr(os, "getxattr")


def _birth_time(st: os.stat_result, path: Path | None = None) -> float:
    if path is not None and _HAS_XATTR:
        try:
            return float(os.getxattr(path, CREATED_XATTR))
        except (OSError, ValueError):
            pass
    return getattr(st, "st_birthtime", None) or min(st.st_ctime, st.st_mtime)


def _set_created_time(target: Path, fd: int, created: float | None) -> None:
    """Mark the new file `fd` with `created`, or else with the created time of the `target`
    it replaces."""
    if not _HAS_XATTR:
        return
    if created is None:
        try:
            created = _birth_time(target.stat(), target)
        except OSError:
            return  # a new session: its own file times are its creation time
    try:
        os.setxattr(fd, CREATED_XATTR, repr(created).encode())
    except OSError:
        pass  # ENOTSUP and friends: fall back to the file's own times


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _io_error(what: str, exc: OSError) -> StorageError:
    reason = exc.strerror or str(exc)
    hint = None
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "check the directory's permissions or choose another --storage"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free some space; the previous history is intact"
    return StorageUnavailable(f"{what}: {reason}", hint=hint)
