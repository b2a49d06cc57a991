"""Copy sessions from one store to another, verified, with a conflict policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from .errors import FusionError, MigrationConflict, StorageError, UsageError
from .storage import ConversationStorage, validate_session_id

POLICIES = ("fail", "skip", "overwrite")


@dataclass
class MigrationReport:
    copied: list[str] = field(default_factory=list)  # new at the destination
    overwritten: list[str] = field(default_factory=list)  # replaced at the destination
    skipped: list[str] = field(default_factory=list)  # left as they were at the destination
    messages: int = 0
    dry_run: bool = False
    action: str = "copy"  # or "import": only the words of summary() and to_dict() change

    def summary(self) -> str:
        done, would = _VERBS[self.action]
        return (
            f"{would if self.dry_run else done} {len(self.copied) + len(self.overwritten)} sessions "
            f"({self.messages} messages): {len(self.copied)} new, "
            f"{len(self.overwritten)} overwritten, {len(self.skipped)} skipped"
        )

    def to_dict(self) -> dict[str, object]:
        return {_VERBS[self.action][0]: self.copied, "overwritten": self.overwritten,
                "skipped": self.skipped, "messages": self.messages, "dry_run": self.dry_run}


_VERBS = {"copy": ("copied", "would copy"), "import": ("imported", "would import")}


def plan_migration(
    source: ConversationStorage,
    destination: ConversationStorage,
    session_ids: Iterable[str] | None,
    on_conflict: str,
) -> tuple[list[str], list[str]]:
    """(ids to write, ids that already exist at the destination); refuses before any write."""
    if on_conflict not in POLICIES:
        raise UsageError(f"unknown conflict policy {on_conflict!r}", hint="use fail, skip or overwrite")
    if session_ids:
        ids = sorted({validate_session_id(s) for s in session_ids})
        missing = [s for s in ids if not source.exists(s)]
        if missing:
            raise UsageError(f"no session {', '.join(missing)} in {source.location}")
    else:
        ids = source.list_sessions()
    existing = set(destination.list_sessions())
    conflicts = [s for s in ids if s in existing]
    if conflicts and on_conflict == "fail":
        shown = ", ".join(conflicts[:5]) + (f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise MigrationConflict(
            f"{len(conflicts)} session(s) already exist in {destination.location}: {shown}; nothing was written",
            hint="choose --on-conflict skip or --on-conflict overwrite",
        )
    return ids, conflicts


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
    for sid in ids:
        if sid in conflict_set and on_conflict == "skip":
            report.skipped.append(sid)
        else:
            try:
                report.messages += _copy_one(source, destination, sid, dry_run, lock_timeout)
            except FusionError as exc:
                done = len(report.copied) + len(report.overwritten)
                what = "migration" if action == "copy" else action
                exc.message = (f"{what} stopped at session {sid!r}: {exc.message} "
                               f"({done} session(s) {_VERBS[action][0]} before it)")
                exc.hint = exc.hint or "fix the cause, then rerun with --on-conflict skip to resume"
                raise
            (report.overwritten if sid in conflict_set else report.copied).append(sid)
        if progress is not None:
            progress(sid)
    return report


def same_store(a: ConversationStorage, b: ConversationStorage) -> bool:
    """Whether two storage objects are one store (a memory: store is only ever itself)."""
    if a is b:
        return True
    if a.scheme == "memory" or b.scheme == "memory":
        return False
    return a.location == b.location and type(a) is type(b)


def _copy_one(source: ConversationStorage, destination: ConversationStorage,
              sid: str, dry_run: bool, lock_timeout: float) -> int:
    history = source.load(sid)
    if dry_run:
        return len(history)
    with destination.lock(sid, timeout=lock_timeout):
        destination.save(sid, history)
        copy = destination.load(sid)
    if copy != history:
        raise StorageError(f"verification failed: the copy of {sid!r} in {destination.location} differs")
    return len(history)
