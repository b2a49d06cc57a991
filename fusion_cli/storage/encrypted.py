"""EncryptedStorage: message contents encrypted at rest, over any backend.

    store = EncryptedStorage(open_storage("sqlite:s.db"), Cipher(key))

The wrapper changes contents only: ids, roles, counts, times and locks are
the inner store's, so every backend stores tokens in its usual layout (the
file backend's JSON array keeps ``content`` holding the token).

- With a cipher, every write encrypts (``encrypt_writes=False`` writes
  plain text: `migrate --decrypt`), and reads decrypt tokens and pass plain
  contents through, so a store can be part plain, part encrypted.
- Without one (``cipher=None``, what the CLI uses when no key is set), writes
  are plain and a read that meets a token refuses with DecryptionError rather
  than return ciphertext. This costs one prefix check a message, and never
  imports `cryptography`.

A read that cannot decrypt raises DecryptionError naming the session and
writes nothing; an `append` first reads the session (unless this object has
read it already, as a `send` turn has), so it never adds messages under a
key that cannot read what is there.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Iterable

from ..crypto import KEY_ENV, KEY_FILE_ENV, Cipher, TokenError, configured_cipher, is_token, token_key_id
from ..errors import DecryptionError, StorageError
from ..messages import ChatMessage
from .base import DEFAULT_LOCK_TIMEOUT, ConversationStorage, SessionInfo


class EncryptedStorage(ConversationStorage):
    def __init__(self, inner: ConversationStorage, cipher: Cipher | None = None, *,
                 encrypt_writes: bool | None = None) -> None:
        super().__init__()
        if encrypt_writes and cipher is None:
            raise ValueError("encrypt_writes needs a cipher")
        self.inner = inner
        self.cipher = cipher
        self.encrypt_writes = cipher is not None if encrypt_writes is None else encrypt_writes
        self.scheme = inner.scheme  # type: ignore[misc]  (a ClassVar elsewhere; per object here)
        self.location = inner.location
        self.url = inner.url
        self._read_ok: set[str] = set()  # sessions this object has read with its key

    @classmethod
    def from_url(cls, url: str) -> "EncryptedStorage":
        raise TypeError("wrap an opened store: EncryptedStorage(open_storage(url), Cipher(key))")

    def __getattr__(self, name: str) -> Any:
        # Backend-specific attributes (a file store's `directory`, ...) stay reachable.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        key = f"key id {self.cipher.key_id}" if self.cipher is not None else "no key"
        return f"<EncryptedStorage {self.inner!r} {key}>"

    # ---- contents ------------------------------------------------------------

    def decode(self, session_id: str, stored: list[ChatMessage]) -> list[ChatMessage]:
        """The plain history of `stored` (as the inner store holds it), or DecryptionError."""
        if not any(is_token(m.content) for m in stored):
            return stored
        if self.cipher is None:
            raise DecryptionError(
                f"session {session_id!r} in {self.location} is encrypted, and no encryption key is set",
                session=session_id, reason="no-key",
                hint=f"set {KEY_ENV} or {KEY_FILE_ENV} to the key it was written with")
        plain = []
        for n, m in enumerate(stored, 1):
            if not is_token(m.content):
                plain.append(m)
                continue
            try:
                plain.append(ChatMessage(m.role, self.cipher.decrypt(m.role, m.content)))
            except TokenError as exc:
                raise self._undecryptable(session_id, n, exc) from None
        return plain

    def _undecryptable(self, session_id: str, n: int, exc: TokenError) -> DecryptionError:
        assert self.cipher is not None
        if exc.kind == "other-key":
            return DecryptionError(
                f"cannot decrypt session {session_id!r} in {self.location}: it was encrypted with "
                f"another key (key id {exc.key_id}; the key set here has id {self.cipher.key_id})",
                session=session_id, reason="other-key",
                hint=f"set {KEY_ENV} to the key it was written with; nothing was changed")
        return DecryptionError(
            f"cannot decrypt message {n} of session {session_id!r} in {self.location}: it was "
            "altered or damaged (its authentication tag does not match)",
            session=session_id, reason="damaged",
            hint="restore the session from a backup; nothing was changed")

    def encode(self, history: list[ChatMessage]) -> list[ChatMessage]:
        """`history` as this object writes it: encrypted, or plain."""
        if not self.encrypt_writes:
            return history
        assert self.cipher is not None
        return [ChatMessage(m.role, self.cipher.encrypt(m.role, m.content)) for m in history]

    def stored_as_written(self, stored: list[ChatMessage]) -> bool:
        """Whether `stored` is already as this object would write it (all ours, or all plain)."""
        if self.encrypt_writes:
            assert self.cipher is not None
            return all(token_key_id(m.content) == self.cipher.key_id for m in stored)
        return not any(is_token(m.content) for m in stored)

    def verify_stored(self, session_id: str) -> None:
        """After a migration's write: StorageError unless the raw contents are as written."""
        if not self.stored_as_written(self.inner.load(session_id)):
            state = "encrypted with this key" if self.encrypt_writes else "plain"
            raise StorageError(f"verification failed: not every message of {session_id!r} in "
                               f"{self.location} is stored {state}")

    # ---- the hooks: contents transformed, everything else delegated ---------

    def _save(self, session_id: str, history: list[ChatMessage]) -> None:
        self.inner.save(session_id, self.encode(history))
        self._read_ok.add(session_id)  # it now holds what this key wrote

    def _set_times(self, session_id: str, created: float | None, updated: float | None) -> None:
        self.inner.set_times(session_id, created, updated)

    def _get_times(self, session_id: str):
        return self.inner.times(session_id)

    def _times_many(self, session_ids: list[str]):
        return self.inner.times_many(session_ids)

    def _load(self, session_id: str) -> list[ChatMessage]:
        plain = self.decode(session_id, self.inner.load(session_id))
        self._read_ok.add(session_id)
        return plain

    def _append(self, session_id: str, messages: list[ChatMessage]) -> None:
        if session_id not in self._read_ok:
            self._load(session_id)  # raises, writing nothing, if this key cannot read it
        self.inner.append(session_id, self.encode(messages))

    def _delete(self, session_id: str) -> None:
        self.inner.delete(session_id)
        self._read_ok.discard(session_id)

    def _exists(self, session_id: str) -> bool:
        return self.inner.exists(session_id)

    def _list_sessions(self) -> Iterable[str]:
        return self.inner.list_sessions()

    def _count(self, session_id: str) -> int:
        return self.inner.count(session_id)

    def _info(self, session_id: str) -> SessionInfo | None:
        return self.inner.info(session_id)

    def _list_info(self) -> Iterable[SessionInfo]:
        return self.inner.list_info()

    def lock(self, session_id: str, timeout: float = DEFAULT_LOCK_TIMEOUT,
             on_wait: Callable[[], None] | None = None) -> AbstractContextManager[None]:
        # The inner store's own lock, so its re-entrancy (e.g. a default `_append`
        # taking the lock its caller holds) sees one holder, not two.
        return self.inner.lock(session_id, timeout, on_wait)

    def _try_lock(self, session_id: str) -> Any:
        return self.inner._try_lock(session_id)

    def _unlock(self, session_id: str, handle: Any) -> None:
        self.inner._unlock(session_id, handle)

    def close(self) -> None:
        self.inner.close()


def open_encrypted(url: str, key_file: str | None = None) -> EncryptedStorage:
    """open_storage(url) wrapped with the configured key (FUSION_ENCRYPTION_KEY, a key file), if any."""
    from . import open_storage

    cipher = configured_cipher(key_file)  # first: a bad key should not leave a store open
    return EncryptedStorage(open_storage(url), cipher)
