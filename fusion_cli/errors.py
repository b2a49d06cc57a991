"""Every error fusion raises, in one tree with one root.

    FusionError                      (exit 1)
    ├── UsageError                   (exit 2)  bad flags, values or input
    │   ├── InvalidSessionId                   an id outside the session-id rules
    │   ├── InvalidStorageURL                  an unknown scheme or a malformed URL
    │   └── EmptyMessage                       nothing to send
    ├── StorageError                 (exit 3)  the store failed us
    │   ├── StorageUnavailable                 cannot reach / open the store
    │   ├── MissingDriver                      the backend's package is not installed
    │   ├── CorruptSession                     data that cannot be decoded; never overwritten
    │   ├── LockTimeout                        the session stayed busy past --lock-timeout
    │   ├── MigrationConflict                  a session exists at the destination
    │   └── DecryptionError                    encrypted contents that no key, or this key, cannot open
    └── ProviderError                (exit 4)  the model could not be reached or answered badly

The exit code is a class attribute; `cli.py` is the one place that turns an
error into a message and an exit code. Lower-level errors (OSError,
sqlite3.Error, redis errors, httpx errors) are mapped to the most specific
class here and chained with ``raise ... from exc``.
"""

from __future__ import annotations


class FusionError(Exception):
    """Root of every fusion error."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(FusionError):
    exit_code = 2


class InvalidSessionId(UsageError):
    pass


class InvalidStorageURL(UsageError):
    pass


class EmptyMessage(UsageError):
    pass


class StorageError(FusionError):
    exit_code = 3


class StorageUnavailable(StorageError):
    pass


class MissingDriver(StorageError):
    pass


class CorruptSession(StorageError):
    def __init__(self, location: str, reason: str) -> None:
        super().__init__(
            f"corrupt session data at {location}: {reason}",
            hint="it was left untouched; fix or move it away, then retry",
        )
        self.location = location
        self.reason = reason  # what is wrong there, for `fusion doctor`'s one line a problem


class LockTimeout(StorageError):
    pass


class MigrationConflict(StorageError):
    pass


class DecryptionError(StorageError):
    """An encrypted session that cannot be read as configured; it is never written to.

    `reason`: ``no-key`` (none is set), ``other-key`` (written with another
    key) or ``damaged`` (the token was altered). The message never holds ciphertext.
    """

    def __init__(self, message: str, *, session: str, reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.session = session
        self.reason = reason


class ProviderError(FusionError):
    exit_code = 4
