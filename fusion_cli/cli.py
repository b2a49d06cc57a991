"""The `fusion` command: parse, call the library, print, map errors to exit codes.

Nothing here does storage or model work itself; heavy modules are imported
inside the commands that need them so `fusion count` starts fast.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn

import click

from . import __version__
from .errors import FusionError

INTERNAL_ERROR = 70  # EX_SOFTWARE: not one of DESIGN.md's codes, so scripts can tell a bug apart


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so `with` blocks (locks, temp files) unwind."""


class FusionGroup(click.Group):
    """The one place where a FusionError becomes a message and an exit code."""

    ALIASES = {"check": "doctor"}  # accepted, not listed in --help

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, self.ALIASES.get(name, name))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FusionError as exc:
            _fail(ctx, exc, exc.exit_code)
        except KeyboardInterrupt as exc:
            _stopped(exc, "interrupted")
            ctx.exit(130)
        except Terminated as exc:
            _stopped(exc, "terminated")
            ctx.exit(143)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # Click's own flow (Exit is a RuntimeError)
        except Exception as exc:  # a bug: one line, the trace only with -v
            wrapped = FusionError(f"internal error: {type(exc).__name__}: {exc}",
                                  hint="this is a bug in fusion; rerun with -v for the traceback")
            wrapped.__cause__ = exc
            _fail(ctx, wrapped, INTERNAL_ERROR)


def _stopped(exc: BaseException, what: str) -> None:
    """Say that a signal stopped the command; `send` marks it `stored` or with its `unsent` message."""
    if getattr(exc, "stored", False):
        click.echo(f"fusion: {what} after the turn was stored", err=True)
        return
    click.echo(f"fusion: {what}; the session was left as it was", err=True)
    unsent = getattr(exc, "unsent", None)
    if unsent is not None:
        click.echo(f"{_UNSENT}\n{unsent}", err=True)


def _fail(ctx: click.Context, exc: FusionError, code: int) -> NoReturn:
    app = ctx.find_object(App)
    text = f"fusion: error: {exc}"
    if app is not None and app.verbose > 0:
        import traceback

        text = "".join(traceback.format_exception(exc)) + text
    click.echo(_scrub_secrets(text, app), err=True)
    ctx.exit(code)


def _scrub_secrets(text: str, app: App | None) -> str:
    """The last guard, for an error raised anywhere (a bug's, a driver's): no API or encryption
    key and no storage password in what is printed, even in a -v traceback."""
    import os

    from .storage import redact_url, url_passwords

    keys = [os.environ.get(v) for v in ("FUSION_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY",
                                        "FUSION_ENCRYPTION_KEY")]
    urls = [os.environ.get("FUSION_STORAGE")]
    if app is not None:
        urls.append(app.flags.get("storage"))
        if app._settings is not None:
            keys.append(app._settings.api_key)
            urls.append(app._settings.storage)
    urls = [u for u in set(urls) if u]
    secrets = {k.strip() for k in keys if k and k.strip()}
    secrets.update(p for url in urls for p in url_passwords(url))
    # A redacted URL in the message stays readable when the password is also its user
    # name (postgres:postgres@): set aside while scrubbing, then put back.
    shown = [redact_url(u) for u in urls if url_passwords(u)]
    marks = ["\0" + "\1" * (n + 1) + "\0" for n in range(len(shown))]  # NUL: in no secret
    for location, mark in zip(shown, marks):
        text = text.replace(location, mark)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    for location, mark in zip(shown, marks):
        text = text.replace(mark, location)
    return text


class App:
    """What the group's options decided; settings and storage are built on first use."""

    def __init__(self, flags: dict[str, Any], config: str | None, verbose: int) -> None:
        self.flags = flags
        self.config = config
        self.verbose = verbose
        self._settings = None
        self._storage = None

    @property
    def settings(self):
        if self._settings is None:
            from .config import load_settings

            self._settings = load_settings(self.flags, config_file=self.config)
        return self._settings

    def session_id(self, given: str | None) -> str:
        """The -s value, else FUSION_SESSION / config, else 'default'; checked before any I/O."""
        from .storage.base import validate_session_id

        return validate_session_id(given if given is not None else self.settings.session)

    @property
    def storage(self):
        if self._storage is None:
            from .storage.encrypted import open_encrypted

            # Always wrapped: with a key it encrypts; without one it refuses to show ciphertext.
            store = open_encrypted(self.settings.storage, self.settings.encryption_key_file)
            self._storage = _bound_waits(store, self.settings.lock_timeout)
            _prefix_library_warnings()
        return self._storage

    def on_wait(self, session_id: str):
        def say() -> None:
            if self.verbose >= 0:
                click.echo(f"fusion: session {session_id!r} is busy; waiting for its lock "
                           f"(up to {self.settings.lock_timeout:g} s)", err=True)
        return say

    def close(self) -> None:
        if self._storage is not None:
            self._storage.close()


pass_app = click.make_pass_decorator(App)


def _bound_waits(store, lock_timeout: float):
    """`store`, with SQLite's wait for another process's transaction bounded by --lock-timeout too.

    Without this a database held by a stuck process (an open `sqlite3` shell)
    made every command wait the backend's 30 s, whatever --lock-timeout said.
    At least 1 s, so that other writers' brief commits never fail a command.
    """
    inner = getattr(store, "inner", store)  # under the encryption wrapper
    if inner.scheme == "sqlite":
        inner.busy_timeout = min(inner.busy_timeout, max(1.0, lock_timeout))
    return store


def _prefix_library_warnings() -> None:
    """Give warnings a backend's driver logs (a Redis lock that could not be released)
    the `fusion:` prefix of every other line on stderr.

    Only once a backend has imported logging: importing it costs `count` 3 ms.
    """
    logging = sys.modules.get("logging")
    if logging is not None and not logging.getLogger().handlers:
        logging.basicConfig(format="fusion: warning: %(message)s", level=logging.WARNING)


def _complete_sessions(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    root = ctx.find_root()
    try:
        from .config import load_settings
        from .storage import open_storage

        url = root.params.get("storage")
        store = open_storage(load_settings({"storage": url}, config_file=root.params.get("config")).storage)
        return [s for s in store.list_sessions() if s.startswith(incomplete)]
    except Exception:  # completion must never print a traceback into the shell
        return []


session_option = click.option(
    "-s", "--session", "session", metavar="ID", default=None, shell_complete=_complete_sessions,
    help="Session id [env FUSION_SESSION; default: default].",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group(cls=FusionGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--storage", metavar="URL",
              help="Where sessions live: file:DIR, sqlite:PATH, redis://HOST, memory:, ... "
                   "[env FUSION_STORAGE; default: file: in the user's data directory].")
@click.option("--config", metavar="FILE", type=click.Path(dir_okay=False),
              help="TOML config file [env FUSION_CONFIG; default: ~/.config/fusion/config.toml].")
@click.option("--lock-timeout", type=float, metavar="S",
              help="Seconds to wait for a busy session [env FUSION_LOCK_TIMEOUT; default: 120].")
@click.option("-v", "--verbose", count=True, help="Show progress and tracebacks on stderr.")
@click.option("-q", "--quiet", count=True, help="Say less on stderr.")
@click.version_option(__version__, "-V", "--version", prog_name="fusion")
@click.pass_context
def cli(ctx: click.Context, storage: str | None, config: str | None, lock_timeout: float | None,
        verbose: int, quiet: int) -> None:
    """Persistent, multi-turn LLM agent conversations from the command line.

    \b
    echo "Remember: my name is Alice" | fusion send -s alice
    fusion send -s alice "What is my name?"
    fusion list --json
    """
    app = App({"storage": storage, "lock_timeout": lock_timeout}, config, verbose - quiet)
    ctx.obj = app
    ctx.call_on_close(app.close)


@cli.command("list")
@json_option
@click.option("-l", "--long", "long", is_flag=True, help="A table: id, messages, created, updated (UTC).")
@click.option("--sort", type=click.Choice(["id", "updated", "created"]), default="id", show_default=True,
              help="Order by id, or by time (oldest first).")
@click.option("-r", "--reverse", is_flag=True, help="Reverse the order.")
@click.option("--since", metavar="WHEN",
              help="Only sessions updated since WHEN: 30d, 12h, 90m (ago) or an ISO date.")
@click.option("--before", metavar="WHEN", help="Only sessions last updated before WHEN (same forms).")
@pass_app
def list_cmd(app: App, as_json: bool, long: bool, sort: str, reverse: bool, since: str | None,
             before: str | None) -> None:
    """List every session id, one a line (--json: JSON Lines with counts and times; --long: a table).

    \b
    fusion list --long --sort updated
    fusion list --since 7d            # updated in the last week
    fusion list --json --before 2024-01-01
    """
    if not (as_json or long or since or before or sort != "id"):
        ids = app.storage.list_sessions()  # the fast path: no counts, no times
        if ids:
            click.echo("\n".join(reversed(ids) if reverse else ids))
        return
    from .lifecycle import select_sessions

    window = {name: _when(f"--{name}", value) for name, value in (("since", since), ("before", before))}
    infos = select_sessions(app.storage.list_info(), sort=sort, reverse=reverse, **window)
    if as_json:
        import orjson

        for info in infos:
            click.echo(orjson.dumps(info.to_dict()))
    elif long:
        rows = [("ID", "MESSAGES", "CREATED", "UPDATED", "")]
        for info in infos:
            d = info.to_dict()
            rows.append((info.id, "?" if info.messages is None else str(info.messages), d["created"] or "-",
                         d["updated"] or "-", f"error: {info.error}" if info.error else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:  # the count right-aligned, the rest left; the error, if any, last
            cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2]),
                     r[3].ljust(widths[3]), r[4]]
            click.echo("  ".join(cells).rstrip())
    elif infos:
        click.echo("\n".join(i.id for i in infos))


def _when(option: str, value: str | None) -> float | None:
    """A --since/--before/--older-than value as Unix seconds; UsageError naming the option."""
    if value is None:
        return None
    from .timespec import parse_time

    try:
        return parse_time(value)
    except FusionError as exc:
        exc.message = f"{option}: {exc.message}"
        raise


@cli.command()
@session_option
@json_option
@pass_app
def count(app: App, session: str | None, as_json: bool) -> None:
    """Print the number of messages in a session (0 if it does not exist)."""
    sid = app.session_id(session)
    n = app.storage.count(sid)
    if as_json:
        import orjson

        click.echo(orjson.dumps({"session": sid, "count": n}))
    else:
        click.echo(n)


@cli.command()
@session_option
@json_option
@pass_app
def show(app: App, session: str | None, as_json: bool) -> None:
    """Print a session's history (nothing for a session that does not exist)."""
    sid = app.session_id(session)
    history = app.storage.load(sid)
    if as_json:
        from .messages import encode_history

        click.echo(encode_history(history))
        return
    colour = sys.stdout.isatty()
    for i, m in enumerate(history):
        if i:
            click.echo()
        click.echo(click.style(f"[{m.role}]", bold=True) if colour else f"[{m.role}]")
        click.echo(m.content)


@cli.command()
@session_option
@pass_app
def clear(app: App, session: str | None) -> None:
    """Remove a session's history (no error if it does not exist)."""
    from .session import Session

    sid = app.session_id(session)
    Session(sid, app.storage, app.settings.lock_timeout, app.on_wait(sid)).clear_history()
    if app.verbose > 0:
        click.echo(f"fusion: cleared session {sid!r}", err=True)


@cli.command()
@pass_app
def where(app: App) -> None:
    """Print where sessions are stored (the directory, database or server; no password)."""
    from .storage import redact_url, url_scheme

    url = app.settings.storage
    click.echo(app.storage.location if url_scheme(url) in ("file", "sqlite") else redact_url(url))


@cli.command()
@click.option("--fix", is_flag=True, help="Also remove temporary files of interrupted writes (older than "
                                          "a minute) and take group/other permissions off the store's "
                                          "files (0600) and directory (0700).")
@json_option
@pass_app
@click.pass_context
def doctor(ctx: click.Context, app: App, fix: bool, as_json: bool) -> None:
    """Check every session in the store: one problem a line on stdout, exit 3 if any (alias: check).

    Reads only, unless --fix; takes no lock. The summary goes to stderr
    (--json: one object on stdout).

    \b
    fusion doctor
    fusion --storage sqlite:fusion.db doctor --json
    """
    from .doctor import check_store

    report = check_store(app.storage, fix=fix)
    if as_json:
        import orjson

        click.echo(orjson.dumps(report.to_dict()))
    else:
        for problem in report.problems:
            click.echo(str(problem))
        if app.verbose >= 0:
            click.echo(f"fusion: {report.summary()}", err=True)
    if not report.ok:
        ctx.exit(3)  # a storage problem, as for any command that meets corrupt data


@cli.command()
@click.option("-o", "--output", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write the key to FILE (created 0600; an existing file is never replaced).")
@pass_app
def keygen(app: App, output: str | None) -> None:
    """Print a new encryption key, for FUSION_ENCRYPTION_KEY (or write it to a key file).

    \b
    export FUSION_ENCRYPTION_KEY="$(fusion keygen)"
    fusion keygen -o ~/.config/fusion/key && export FUSION_ENCRYPTION_KEY_FILE=~/.config/fusion/key
    """
    from .crypto import key_id, new_key, parse_key, write_key_file

    key = new_key()
    if output in (None, "-"):
        click.echo(key)
    else:
        output = str(write_key_file(output, key))
    if app.verbose >= 0:
        click.echo(f"fusion: new key, id {key_id(parse_key(key, 'the new key'))}"
                   + (f", written to {output}" if output not in (None, "-") else "")
                   + "; keep a copy safe: without it, what it encrypts cannot be read", err=True)


@cli.command()
@click.option("--from", "source", required=True, metavar="URL", help="The store to copy from.")
@click.option("--to", "destination", required=True, metavar="URL", help="The store to copy into.")
@click.option("-s", "--session", "sessions", multiple=True, metavar="ID",
              help="Copy only this session (repeatable); default: all.")
@click.option("--on-conflict", type=click.Choice(["fail", "skip", "overwrite"]), default="fail",
              show_default=True, help="What to do with a session that exists at the destination; "
                                      "'fail' checks all before writing anything.")
@click.option("--dry-run", is_flag=True, help="Say what would be copied; write nothing.")
@click.option("--encrypt", is_flag=True,
              help="Write every message's content encrypted with the key [FUSION_ENCRYPTION_KEY]; "
                   "with --to the same as --from, in place.")
@click.option("--decrypt", is_flag=True, help="Write every message's content as plain text (needs the key).")
@click.option("--to-key-file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Encrypt with the key in FILE instead (re-keying; implies --encrypt).")
@json_option
@pass_app
def migrate(app: App, source: str, destination: str, sessions: tuple[str, ...], on_conflict: str,
            dry_run: bool, encrypt: bool, decrypt: bool, to_key_file: str | None, as_json: bool) -> None:
    """Copy sessions between two stores, checking each copy reads back equal.

    Without --encrypt/--decrypt, contents are copied as stored (encrypted
    ones stay encrypted) and no key is needed.

    \b
    fusion migrate --from ~/.local/share/fusion/sessions --to sqlite:fusion.db
    fusion migrate --from sqlite:fusion.db --to redis://localhost:6379/0 --on-conflict skip
    fusion migrate --encrypt --from sqlite:fusion.db --to sqlite:fusion.db   # in place
    """
    from .errors import UsageError
    from .migrate import migrate as run_migration
    from .storage import open_storage, validate_session_id

    for sid in sessions:
        validate_session_id(sid)
    if decrypt and (encrypt or to_key_file):
        raise UsageError("give --encrypt (or --to-key-file) or --decrypt, not both")
    mode = "decrypt" if decrypt else "encrypt" if encrypt or to_key_file else None
    if mode is not None:
        from .crypto import Cipher, configured_cipher, read_key_file
        from .migrate import migrate_encryption

        cipher = configured_cipher(app.settings.encryption_key_file)
        new_cipher = Cipher(read_key_file(to_key_file)) if to_key_file else None
    src, dst = (_bound_waits(open_storage(url), app.settings.lock_timeout) for url in (source, destination))
    _prefix_library_warnings()
    try:
        with _progress(app, src, sessions, dry_run) as advance:
            if mode is None:
                report = run_migration(src, dst, sessions or None, on_conflict, dry_run,
                                       app.settings.lock_timeout, advance)
            else:
                report = migrate_encryption(src, dst, mode, cipher, new_cipher, sessions or None,
                                            on_conflict, dry_run, app.settings.lock_timeout, advance)
    finally:
        src.close()
        dst.close()
    if as_json:
        import orjson

        click.echo(orjson.dumps(report.to_dict()))
    else:
        click.echo(report.summary())


def _progress(app: App, src, sessions: tuple[str, ...], dry_run: bool):
    """A progress bar on stderr when it is a terminal; otherwise a no-op callback."""
    import contextlib

    if dry_run or app.verbose < 0 or not sys.stderr.isatty():
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def bar():
        total = len(sessions) if sessions else len(src.list_sessions())
        with click.progressbar(length=total, label="migrating", file=sys.stderr) as b:
            yield lambda _sid: b.update(1)

    return bar()


@cli.command()
@click.option("--older-than", "older_than", required=True, metavar="AGE",
              help="Remove sessions not updated for AGE (30d, 12h, 90m, seconds) or since a date (ISO).")
@click.option("--dry-run", is_flag=True, help="Print what would be removed; remove nothing.")
@json_option
@pass_app
def prune(app: App, older_than: str, dry_run: bool, as_json: bool) -> None:
    """Remove sessions nobody has updated for a while: one removed id a line on stdout.

    A session in use (its lock held, e.g. by a running send) or written since
    the listing is kept. The summary goes to stderr (--json: one object on stdout).

    \b
    fusion prune --older-than 30d --dry-run
    0 3 * * * fusion prune --older-than 90d      # in a crontab
    """
    from .lifecycle import prune as run_prune

    cutoff = _when("--older-than", older_than)
    report = run_prune(app.storage, cutoff=cutoff, dry_run=dry_run,
                       on_removed=None if as_json else click.echo)
    if as_json:
        import orjson

        click.echo(orjson.dumps(report.to_dict()))
    elif app.verbose >= 0:
        click.echo(f"fusion: {report.summary()}", err=True)
        if report.unreadable:
            click.echo(f"fusion: could not read {', '.join(report.unreadable)}; 'fusion list --json' "
                       "shows why", err=True)


@cli.command()
@click.option("-s", "--session", "sessions", multiple=True, metavar="ID", shell_complete=_complete_sessions,
              help="Export this session (repeatable) [default: FUSION_SESSION, else 'default'].")
@click.option("--all", "all_sessions", is_flag=True, help="Export every session.")
@click.option("--format", "fmt", type=click.Choice(["json", "jsonl"]), default="json", show_default=True,
              help="One JSON document, or JSON Lines (a session a line).")
@click.option("-o", "--output", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write to FILE (atomically, mode 0600) instead of stdout ('-').")
@pass_app
def export(app: App, sessions: tuple[str, ...], all_sessions: bool, fmt: str, output: str | None) -> None:
    """Write sessions with their messages and times, for `fusion import` or other tools.

    \b
    fusion export --all -o backup.json
    fusion export -s alice --format jsonl | jq .
    """
    from .errors import UsageError
    from .transfer import export_sessions, write_export

    if all_sessions and sessions:
        raise UsageError("give -s or --all, not both")
    ids = None if all_sessions else [app.session_id(s) for s in sessions] or [app.session_id(None)]
    to_file = output not in (None, "-")
    if to_file:
        count, messages = write_export(app.storage, output, ids, fmt)
    else:
        stream = sys.stdout.buffer
        count, messages = export_sessions(app.storage, stream, ids, fmt)
        stream.flush()
    if app.verbose > 0 or (to_file and app.verbose >= 0):
        click.echo(f"fusion: exported {count} session{'' if count == 1 else 's'} ({messages} messages)"
                   + (f" to {output}" if to_file else ""), err=True)


@cli.command("import")
@click.argument("file", required=False, default="-", metavar="[FILE|-]")
@click.option("--on-conflict", type=click.Choice(["fail", "skip", "overwrite"]), default="fail",
              show_default=True, help="What to do with a session that exists already; "
                                      "'fail' checks all before writing anything.")
@click.option("--dry-run", is_flag=True,
              help="Check the input and say what would be imported; write nothing.")
@json_option
@pass_app
def import_cmd(app: App, file: str, on_conflict: str, dry_run: bool, as_json: bool) -> None:
    """Read sessions from an export (FILE, or stdin when none or '-') into the store.

    Everything is checked before anything is written; the summary goes to stdout.

    \b
    fusion import backup.json --on-conflict skip
    fusion --storage sqlite:other.db export --all | fusion import -
    """
    from .errors import UsageError
    from .transfer import import_sessions

    if file == "-":
        data, source = sys.stdin.buffer.read(), "stdin"
    else:
        try:
            with open(file, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise UsageError(f"cannot read {file}: {exc.strerror}") from None
        source = file
    report = import_sessions(data, app.storage, on_conflict, dry_run, app.settings.lock_timeout,
                             source=source)
    if as_json:
        import orjson

        click.echo(orjson.dumps(report.to_dict()))
    else:
        click.echo(report.summary())


# ---- the model: send and chat ------------------------------------------------

_MODEL_OPTIONS = (
    click.option("--provider", type=click.Choice(["openai", "anthropic", "echo"], case_sensitive=False),
                 help="openai (any OpenAI-compatible endpoint), anthropic, or echo (offline) "
                      "[env FUSION_PROVIDER; default: the one whose API key is set, else a local Ollama]."),
    click.option("--base-url", metavar="URL",
                 help="The endpoint, e.g. http://localhost:11434/v1 [env FUSION_BASE_URL]."),
    click.option("--model", metavar="NAME", help="The model [env FUSION_MODEL; default: the provider's]."),
    click.option("--timeout", type=float, metavar="S",
                 help="Seconds per model request [env FUSION_TIMEOUT; default: 60]."),
    click.option("--max-iterations", type=int, metavar="N",
                 help="Agent steps per turn [env FUSION_MAX_ITERATIONS; default: 10]."),
    click.option("--temperature", type=float, metavar="T", help="Sampling temperature [env FUSION_TEMPERATURE]."),
    click.option("--max-history", type=int, metavar="N",
                 help="Send the model only the system prompt and the last N messages; all are kept "
                      "[env FUSION_MAX_HISTORY; default: all]."),
    click.option("--system", metavar="TEXT", envvar="FUSION_SYSTEM",
                 help="Instructions for a new session; the tool protocol is added [env FUSION_SYSTEM]."),
    click.option("--allow", multiple=True, metavar="TOOL", envvar="FUSION_ALLOW",
                 help="Enable write_file, http_get, execute_shell or all (repeatable) [env FUSION_ALLOW]."),
    click.option("--root", metavar="DIR",
                 help="The directory read_file, list_directory and write_file may use, symlinks resolved "
                      "[env FUSION_ROOT; default: the working directory]."),
)
_SETTING_FLAGS = ("provider", "base_url", "model", "timeout", "max_iterations", "temperature", "max_history",
                  "root")
_UNSENT = "fusion: your message was not sent; here it is:"


def model_options(f):
    for option in reversed(_MODEL_OPTIONS):
        f = option(f)
    return f


def _open_session(app: App, session: str | None, opts: dict[str, Any]):
    """The Session for send/chat, with the model flags on top of the app's settings."""
    from .config import load_settings
    from .session import Session

    flags = {**app.flags, **{k: opts[k] for k in _SETTING_FLAGS if opts[k] is not None}}
    settings = load_settings(flags, config_file=app.config)
    sid = app.session_id(session)
    loud = app.verbose > 0
    sess = Session(sid, app.storage, settings.lock_timeout, app.on_wait(sid), settings=settings,
                   allow=opts["allow"], root=settings.root, system_prompt=opts["system"],
                   on_step=_step_printer() if loud else None,
                   on_retry=(lambda note: click.echo(f"fusion: {note}", err=True)) if loud else None,
                   on_trim=(lambda sent, total: click.echo(
                       f"fusion: sending the last {sent} of {total} messages (--max-history)", err=True))
                   if loud else None)
    if opts["system"] and app.verbose >= 0 and sess.message_count():
        click.echo(f"fusion: --system applies to a new session only; {sid!r} keeps its prompt "
                   f"('fusion clear -s {sid}' starts it over)", err=True)
    if loud:  # which model answers is the first question when something looks wrong
        from .llm.base import safe_url

        e = sess.endpoint
        where = "offline" if e.provider == "echo" else safe_url(e.base_url)
        click.echo(f"fusion: model {e.model!r} ({e.provider}, {where})", err=True)
    return sess


def _step_printer():
    import itertools

    import orjson

    numbers = itertools.count(1)

    def show(step) -> None:
        n = next(numbers)
        if step.thought:
            click.echo(f"fusion: step {n}: {step.thought}", err=True)
        if step.action is not None:
            click.echo(f"fusion: step {n}: {step.action} {orjson.dumps(step.input).decode()}", err=True)
        if step.observation is not None:
            seen = " ".join(step.observation.split())
            click.echo(f"fusion: step {n}: observation: {seen[:300]}{'...' if len(seen) > 300 else ''}",
                       err=True)
    return show


def _read_message(words: tuple[str, ...]) -> str:
    """The arguments joined by spaces, else stdin less its one trailing newline."""
    from .errors import UsageError

    if words and words != ("-",):
        return " ".join(words)
    stream = sys.stdin.buffer
    if stream.isatty():
        click.echo("fusion: reading the message from stdin; end it with Ctrl-D", err=True)
    try:
        text = stream.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"the message on stdin is not valid UTF-8 (at byte {exc.start})",
                         hint="convert it first, e.g. with iconv -t UTF-8") from None
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _keep_unsent(exc, text: str) -> None:
    # The error line ends with the message itself, so a piped message is not lost.
    exc.message, exc.hint = f"{exc}\n{_UNSENT}\n{text}", None


@cli.command()
@session_option
@model_options
@json_option
@click.argument("message", nargs=-1)
@pass_app
def send(app: App, session: str | None, message: tuple[str, ...], as_json: bool, **opts: Any) -> None:
    """Send MESSAGE (the arguments, or stdin when none or '-') and print the answer.

    \b
    fusion send -s alice "What is my name?"
    echo "Remember: my name is Alice" | fusion send -s alice
    FUSION_PROVIDER=echo fusion send "try fusion offline"

    The API key comes from FUSION_API_KEY, else OPENAI_API_KEY or ANTHROPIC_API_KEY.
    """
    from .errors import ProviderError, StorageError

    app.session_id(session)  # a bad id is refused before stdin is read, so a piped message is not consumed
    text = _read_message(message)
    sess = None
    try:
        with _open_session(app, session, opts) as sess:
            try:
                result = sess.send_message(text)
            except (ProviderError, StorageError) as exc:
                _keep_unsent(exc, text)
                raise
        if as_json:
            import orjson

            click.echo(orjson.dumps(result.to_dict()))
        elif result.success:
            click.echo(result.result)
    except (KeyboardInterrupt, Terminated) as exc:
        # Ctrl-C or SIGTERM: the group says whether the turn was stored, and gives back a
        # message that was not (as for a model or storage error), so it can be sent again.
        if sess is not None and sess.last_turn_stored:
            exc.stored = True  # type: ignore[attr-defined]
        else:
            exc.unsent = text  # type: ignore[attr-defined]
        raise
    if not result.success:
        raise FusionError(f"the agent stopped after {len(result.steps)} steps without a final answer; "
                          "the turn was saved", hint="raise --max-iterations or FUSION_MAX_ITERATIONS")


_CHAT_HELP = """\
/count  the number of messages in the session
/clear  remove the session's history
/help   this list
/exit   leave (so does Ctrl-D)
Any other line is sent to the agent."""


@cli.command()
@session_option
@model_options
@pass_app
def chat(app: App, session: str | None, **opts: Any) -> None:
    """Talk with the agent, one committed turn a line: /count, /clear, /help, /exit (or Ctrl-D)."""
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    with _open_session(app, session, opts) as sess:
        if interactive:
            click.echo(f"fusion chat, session {sess.session_id!r}: /help for commands, Ctrl-D leaves", err=True)
        while (line := _next_line(interactive)) is not None:
            command = line.strip()
            if command == "/exit":
                break
            if command == "/clear":
                sess.clear_history()
                click.echo("fusion: history cleared", err=True)
            elif command == "/count":
                click.echo(f"Messages: {sess.message_count()}")
            elif command == "/help":
                click.echo(_CHAT_HELP, err=True)
            elif command.startswith("/") and " " not in command:
                click.echo(f"fusion: unknown command {command}; /help lists them", err=True)
            elif command:
                _chat_turn(sess, line, interactive)


def _next_line(interactive: bool) -> str | None:
    """The next line without its newline; None at the end of input."""
    from .errors import UsageError

    try:
        line = input("> ") if interactive else sys.stdin.readline()
    except EOFError:
        click.echo(err=True)  # end the prompt's line after Ctrl-D
        return None
    except UnicodeDecodeError:
        raise UsageError("a line on stdin is not valid UTF-8") from None
    if not interactive and not line:
        return None
    return line.removesuffix("\n")


def _chat_turn(sess, text: str, interactive: bool) -> None:
    """One committed turn; a failure is reported and the chat goes on."""
    from .errors import ProviderError, StorageError

    try:
        result = sess.send_message(text)
    except (ProviderError, StorageError) as exc:
        click.echo(f"fusion: error: {exc}", err=True)
        click.echo("fusion: that message was not sent" + (" (Up brings it back)" if interactive else ""),
                   err=True)
        return
    if result.success:
        click.echo(result.result)
    else:
        click.echo(f"fusion: {result.result} The turn was saved; raise --max-iterations.", err=True)
    if interactive:
        click.echo()


# ---- entry point -------------------------------------------------------------

def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(args: list[str] | None = None, prog_name: str = "fusion") -> None:
    signal.signal(signal.SIGTERM, _raise_terminated)
    cli.main(args=args, prog_name=prog_name)


if __name__ == "__main__":
    main()
