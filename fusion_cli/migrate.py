"""Copy sessions from one store to another, verified, with a conflict policy."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from .errors import FusionError, MigrationConflict, StorageError, UsageError
from .storage import ConversationStorage, validate_session_id

if TYPE_CHECKING:
    from .crypto import Cipher

POLICIES = ("fail", "skip", "overwrite")


@dataclass
class MigrationReport:
    copied: list[str] = field(default_factory=list)  # new at the destination
    overwritten: list[str] = field(default_factory=list)  # replaced at the destination
    skipped: list[str] = field(default_factory=list)  # left as they were at the destination
    messages: int = 0
    dry_run: bool = False
    action: str = "copy"  # or "import": only the words of summary() and to_dict() change
    # --encrypt/--decrypt: "encrypt" or "decrypt", and the key id written with (encrypt)
    encryption: str | None = None
    key_id: str | None = None
    in_place: bool = False  # rewritten in their own store: `copied` holds them, `skipped` those already done

    def summary(self) -> str:
        done, would = _VERBS[self.action]
        verb = would if self.dry_run else done
        key = f" with key id {self.key_id}" if self.key_id else ""
        if self.in_place:
            state = "encrypted" + key if self.encryption == "encrypt" else "plain"
            return (f"{verb} {len(self.copied)} sessions in place ({self.messages} messages); "
                    f"{len(self.skipped)} skipped, already {state}")
        text = (
            f"{verb} {len(self.copied) + len(self.overwritten)} sessions "
            f"({self.messages} messages): {len(self.copied)} new, "
            f"{len(self.overwritten)} overwritten, {len(self.skipped)} skipped"
        )
        if self.encryption is not None:
            text += f"; contents {self.encryption}ed{key}"
        return text

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {_VERBS[self.action][0]: self.copied}
        if not self.in_place:
            d["overwritten"] = self.overwritten
        d.update(skipped=self.skipped, messages=self.messages, dry_run=self.dry_run)
        if self.encryption is not None:
            d.update(encryption=self.encryption, key_id=self.key_id, in_place=self.in_place)
        return d


_VERBS = {"copy": ("copied", "would copy"), "import": ("imported", "would import"),
          "encrypt": ("encrypted", "would encrypt"), "decrypt": ("decrypted", "would decrypt")}


def plan_migration(
    source: ConversationStorage,
    destination: ConversationStorage,
    session_ids: Iterable[str] | None,
    on_conflict: str,
) -> tuple[list[str], list[str]]:
    """(ids to write, ids that already exist at the destination); refuses before any write."""
    if on_conflict not in POLICIES:
        raise UsageError(f"unknown conflict policy {on_conflict!r}", hint="use fail, skip or overwrite")
    ids = _select(source, session_ids)
    existing = set(destination.list_sessions())
    conflicts = [s for s in ids if s in existing]
    if conflicts and on_conflict == "fail":
        shown = ", ".join(conflicts[:5]) + (f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise MigrationConflict(
            f"{len(conflicts)} session(s) already exist in {destination.location}: {shown}; nothing was written",
            hint="choose --on-conflict skip or --on-conflict overwrite",
        )
    return ids, conflicts


def _select(source: ConversationStorage, session_ids: Iterable[str] | None) -> list[str]:
    """The ids to work on, sorted: `session_ids` (each must exist), or every session."""
    if not session_ids:
        return source.list_sessions()
    ids = sorted({validate_session_id(s) for s in session_ids})
    missing = [s for s in ids if not source.exists(s)]
    if missing:
        raise UsageError(f"no session {', '.join(missing)} in {source.location}")
    return ids


def migrate(
    source: ConversationStorage,
    destination: ConversationStorage,
    session_ids: Iterable[str] | None = None,
    on_conflict: str = "fail",
    dry_run: bool = False,
    lock_timeout: float = 120.0,
    progress: Callable[[str], None] | None = None,
    action: str = "copy",
) -> MigrationReport:
    """Copy each session (all, or `session_ids`) and check the copy reads back equal.

    Each session is written atomically under the destination's lock, so a
    failure part-way leaves whole sessions only; rerunning with `skip` resumes.
    Sessions go in batches of BATCH (`load_many`, `save_many`), falling back to
    one at a time for a batch that cannot be done whole.
    Any two stores will do, `memory:` ones included (two memory stores are
    two stores; only the same object is refused). `action` ("copy" or
    "import") names the work in the report and in errors.
    """
    if action not in _VERBS:
        raise ValueError(f"unknown action {action!r}")
    if same_store(source, destination):
        raise UsageError("--from and --to name the same store")
    ids, conflicts = plan_migration(source, destination, session_ids, on_conflict)
    conflict_set = set(conflicts)
    report = MigrationReport(dry_run=dry_run, action=action)
    for start in range(0, len(ids), BATCH):
        chunk = ids[start:start + BATCH]
        todo = [sid for sid in chunk if not (sid in conflict_set and on_conflict == "skip")]
        # None when the batch could not be done whole: then one session at a time, which
        # waits for busy locks and stops at (and names) the session at fault.
        sizes = _copy_batch(source, destination, todo, dry_run) if todo else []
        copied = dict(zip(todo, sizes or ()))
        for sid in chunk:
            if sid in conflict_set and on_conflict == "skip":
                report.skipped.append(sid)
            else:
                try:
                    report.messages += copied[sid] if sizes is not None else _copy_one(
                        source, destination, sid, dry_run, lock_timeout)
                except FusionError as exc:
                    done = len(report.copied) + len(report.overwritten)
                    what = "migration" if action == "copy" else action
                    exc.message = (f"{what} stopped at session {sid!r}: {exc.message} "
                                   f"({done} session(s) {_VERBS[action][0]} before it)")
                    exc.hint = (exc.hint
                                or "fix the cause, then rerun with --on-conflict skip to resume")
                    raise
                (report.overwritten if sid in conflict_set else report.copied).append(sid)
            if progress is not None:
                progress(sid)
    return report


def same_store(a: ConversationStorage, b: ConversationStorage) -> bool:
    """Whether two storage objects are one store (a memory: store is only ever itself)."""
    a, b = getattr(a, "inner", a), getattr(b, "inner", b)  # an EncryptedStorage is its inner store
    if a is b:
        return True
    if a.scheme == "memory" or b.scheme == "memory":
        return False
    return a.location == b.location and type(a) is type(b)


# Sessions per batch: one load, one write (a transaction or pipeline where the backend
# has them) and one verifying load each, rather than a round trip and an fsync per session.
BATCH = 200


def _copy_batch(source: ConversationStorage, destination: ConversationStorage,
                sids: list[str], dry_run: bool) -> list[int] | None:
    """Copy `sids` together under all their locks, verified; their message counts, or None if
    any part failed (nothing is lost: each session is still written whole or not at all)."""
    try:
        histories = source.load_many(sids)
        if dry_run:
            return [len(h) for h in histories]
        with contextlib.ExitStack() as held:
            for sid in sids:  # timeout 0: a busy session sends the batch the one-by-one way
                held.enter_context(destination.lock(sid, timeout=0))
            times = {sid: t for sid, t in zip(sids, source.times_many(sids)) if t is not None}
            destination.save_many(zip(sids, histories), times)  # a copy keeps its times
            copies = destination.load_many(sids)
        if copies != histories:  # through an EncryptedStorage, plaintexts are compared
            return None
        verify_stored = getattr(destination, "verify_stored", None)
        if verify_stored is not None:
            for sid in sids:
                verify_stored(sid)
    except FusionError:
        return None
    return [len(h) for h in histories]


def _copy_one(source: ConversationStorage, destination: ConversationStorage,
              sid: str, dry_run: bool, lock_timeout: float) -> int:
    history = source.load(sid)
    if dry_run:
        return len(history)
    times = source.times(sid)
    with destination.lock(sid, timeout=lock_timeout):
        # One write with its times, where the backend can (a copy keeps its times).
        destination.save_many([(sid, history)], {sid: times} if times is not None else None)
        copy = destination.load(sid)
    if copy != history:  # through an EncryptedStorage, plaintexts are compared
        raise StorageError(f"verification failed: the copy of {sid!r} in {destination.location} differs")
    verify_stored = getattr(destination, "verify_stored", None)
    if verify_stored is not None:  # and the stored form is checked: all encrypted, or all plain
        verify_stored(sid)
    return len(history)


def migrate_encryption(
    source: ConversationStorage,
    destination: ConversationStorage,
    mode: str,
    cipher: Cipher | None,
    new_cipher: Cipher | None = None,
    session_ids: Iterable[str] | None = None,
    on_conflict: str = "fail",
    dry_run: bool = False,
    lock_timeout: float = 120.0,
    progress: Callable[[str], None] | None = None,
) -> MigrationReport:
    """`migrate --encrypt` / `--decrypt`: copy with every content encrypted, or every one plain.

    `source` and `destination` are plain stores (not EncryptedStorage). The
    source is read with `cipher` (None: it must hold no encrypted content);
    ``encrypt`` writes with `new_cipher` or else `cipher` (a new key re-keys),
    ``decrypt`` writes plain text. Each copy is verified on its plaintexts and
    on its stored form. When both name the same store, each session is
    rewritten in place instead, atomically under its lock; sessions already
    in the wanted form are skipped, so a rerun after a failure resumes.
    """
    from .storage.encrypted import EncryptedStorage

    if mode not in ("encrypt", "decrypt"):
        raise ValueError(f"unknown mode {mode!r}")
    write_cipher = (new_cipher or cipher) if mode == "encrypt" else cipher
    if write_cipher is None:
        from .crypto import KEY_ENV, KEY_FILE_ENV

        raise UsageError(f"--{mode} needs an encryption key, and none is set",
                         hint=f"set {KEY_ENV} or {KEY_FILE_ENV} ('fusion keygen' makes a key)")
    reader = EncryptedStorage(source, cipher)
    writer = EncryptedStorage(destination, write_cipher, encrypt_writes=mode == "encrypt")
    key_id = write_cipher.key_id if mode == "encrypt" else None
    if not same_store(source, destination):
        report = migrate(reader, writer, session_ids, on_conflict, dry_run, lock_timeout, progress)
        report.encryption, report.key_id = mode, key_id
        return report
    report = MigrationReport(dry_run=dry_run, action=mode, encryption=mode, key_id=key_id, in_place=True)
    for sid in _select(source, session_ids):
        try:
            with writer.lock(sid, timeout=lock_timeout):
                stored = source.load(sid)
                if writer.stored_as_written(stored):
                    report.skipped.append(sid)
                else:
                    plain = reader.decode(sid, stored)  # DecryptionError here: nothing written
                    if not dry_run:
                        writer.save(sid, plain)
                        if writer.load(sid) != plain:
                            raise StorageError(f"verification failed: {sid!r} in {source.location} "
                                               "does not read back equal")
                        writer.verify_stored(sid)
                    report.copied.append(sid)
                    report.messages += len(plain)
        except FusionError as exc:
            exc.message = (f"{mode}ion in place stopped at session {sid!r}: {exc.message} "
                           f"({len(report.copied)} session(s) {_VERBS[mode][0]} before it)")
            exc.hint = exc.hint or "fix the cause, then rerun: finished sessions are skipped"
            raise
        if progress is not None:
            progress(sid)
    return report
