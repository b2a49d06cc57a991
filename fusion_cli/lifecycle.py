"""Sessions over time: list them by age, and prune the ones nobody updated for a while.

    from fusion_cli.lifecycle import prune, select_sessions
    recent = select_sessions(store.list_info(), since=time.time() - 86400, sort="updated")
    report = prune(store, older_than=30 * 86400)      # report.removed: the ids deleted

Both work on any backend through the public storage interface (`list_info`,
`info`, `lock`, `delete`). Every time is the session's `updated` time: the
last write to it (a turn of `send`, a `save`, a `migrate` or an `import`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .errors import CorruptSession, LockTimeout, UsageError
from .storage.base import ConversationStorage, SessionInfo

SORT_KEYS = ("id", "updated", "created")


def select_sessions(infos: Iterable[SessionInfo], *, since: float | None = None,
                    before: float | None = None, sort: str = "id",
                    reverse: bool = False) -> list[SessionInfo]:
    """Filter by updated time (`since` <= updated < `before`) and sort.

    With a filter, a session whose updated time is unknown (its data could
    not be read) is left out. `sort`: ``id`` (code point order), ``updated``
    or ``created`` (oldest first, ties by id; unknown times last);
    `reverse` turns the order round.
    """
    if sort not in SORT_KEYS:
        raise UsageError(f"unknown sort key {sort!r}", hint="use " + ", ".join(SORT_KEYS))
    chosen = [i for i in infos if _in_window(i.updated, since, before)]
    if sort == "id":
        chosen.sort(key=lambda i: i.id, reverse=reverse)
    else:
        known = sorted((i for i in chosen if getattr(i, sort) is not None),
                       key=lambda i: (getattr(i, sort), i.id), reverse=reverse)
        chosen = known + sorted((i for i in chosen if getattr(i, sort) is None), key=lambda i: i.id)
    return chosen


def _in_window(updated: float | None, since: float | None, before: float | None) -> bool:
    if since is None and before is None:
        return True
    if updated is None:
        return False
    return (since is None or updated >= since) and (before is None or updated < before)


@dataclass
class PruneReport:
    cutoff: float  # Unix seconds: sessions last updated before this go
    removed: list[str] = field(default_factory=list)  # deleted (or, dry run, would be)
    busy: list[str] = field(default_factory=list)  # locked by a running command: in use, kept
    refreshed: list[str] = field(default_factory=list)  # updated after they were listed: kept
    unreadable: list[str] = field(default_factory=list)  # times unknown (unreadable data): kept
    dry_run: bool = False

    def summary(self) -> str:
        from .timespec import format_time

        verb = "would remove" if self.dry_run else "removed"
        text = (f"{verb} {len(self.removed)} session{'' if len(self.removed) == 1 else 's'} "
                f"not updated since {format_time(self.cutoff)}")
        kept = [f"{len(ids)} {why}" for ids, why in ((self.busy, "in use"),
                                                     (self.refreshed, "updated meanwhile"),
                                                     (self.unreadable, "unreadable"))
                if ids]
        return text + (f"; kept {', '.join(kept)}" if kept else "")

    def to_dict(self) -> dict[str, object]:
        from .timespec import format_time

        return {"removed": self.removed, "busy": self.busy, "refreshed": self.refreshed,
                "unreadable": self.unreadable, "cutoff": format_time(self.cutoff),
                "dry_run": self.dry_run}


def prune(store: ConversationStorage, older_than: float | None = None, *,
          cutoff: float | None = None, now: float | None = None, dry_run: bool = False,
          on_removed: Callable[[str], None] | None = None) -> PruneReport:
    """Delete every session not updated for `older_than` seconds (or since `cutoff`, Unix seconds).

    Each deletion happens under the session's lock, after reading its
    updated time again: a session that a command wrote after the listing is
    kept (`refreshed`), and one whose lock is held right now is in use and is
    kept without waiting (`busy`), so a cron job never races or stalls a
    `send`. A session whose times cannot be read is never deleted
    (`unreadable`). `on_removed(id)` is called after each deletion (in a
    dry run, for each session that would go).
    """
    if (older_than is None) == (cutoff is None):
        raise UsageError("prune needs exactly one of older_than and cutoff")
    if older_than is not None:
        if not older_than >= 0:
            raise UsageError(f"older_than must be 0 seconds or more, not {older_than!r}")
        cutoff = (time.time() if now is None else now) - older_than
    assert cutoff is not None
    report = PruneReport(cutoff=cutoff, dry_run=dry_run)
    for info in store.list_info():
        if info.updated is None:
            if info.error is not None:
                report.unreadable.append(info.id)
            continue
        if info.updated >= cutoff:
            continue
        if not dry_run:
            try:
                with store.lock(info.id, timeout=0):
                    outcome = _delete_if_still_old(store, info.id, cutoff)
            except LockTimeout:
                outcome = "busy"
            if outcome == "gone":
                continue
            if outcome is not None:
                getattr(report, outcome).append(info.id)
                continue
        report.removed.append(info.id)
        if on_removed is not None:
            on_removed(info.id)
    return report


def _delete_if_still_old(store: ConversationStorage, session_id: str, cutoff: float) -> str | None:
    """Under the lock: delete and return None, or say why not ("gone": deleted meanwhile)."""
    try:
        current = store.info(session_id)
    except CorruptSession:
        return "unreadable"
    if current is None:
        return "gone"  # deleted by someone else meanwhile: nothing left to remove
    if current.updated is None or current.updated >= cutoff:
        return "refreshed"
    store.delete(session_id)
    return None

