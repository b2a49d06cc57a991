"""The library API: a Session is one conversation in one store.

    from fusion_cli import create_session
    session = create_session("alice", "sqlite:sessions.db", provider="echo")
    print(session.send_message("Remember: my name is Alice").result)
    print(session.message_count())

A turn (`send_message`) holds the session's lock from loading the history to
committing the turn, and commits with one `append`: the user's message,
every step, and the final answer (the system prompt first when the session
is new). If the model fails, nothing is written. A Session never prints;
progress goes to the optional `on_step`, `on_retry` and `on_trim` callbacks.

`max_history` (a setting) limits what the model is sent, never what is
stored: the system prompt and the last `max_history` messages of the history,
then the new message. `on_trim(sent, total)` is called when a turn's context
was cut that way (`sent` of the history's `total` messages, the system
prompt not counted).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import EmptyMessage, UsageError
from .messages import ChatMessage
from .storage import ConversationStorage, validate_session_id
from .storage.base import DEFAULT_LOCK_TIMEOUT

if TYPE_CHECKING:  # the agent and the model clients load only when a message is sent
    from .agent import AgentResult, Step, Toolbox
    from .config import Settings
    from .llm import ChatClient, Endpoint

#: Settings fields a Session accepts as keyword arguments
MODEL_OPTIONS = ("provider", "base_url", "model", "api_key", "max_iterations", "timeout",
                 "temperature", "max_history")


class Session:
    def __init__(self, session_id: str, storage: ConversationStorage,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                 on_wait: Callable[[], None] | None = None, *,
                 settings: Settings | None = None, client: ChatClient | None = None,
                 allow: Iterable[str] = (), root: str | os.PathLike[str] | None = None,
                 system_prompt: str | None = None,
                 on_step: Callable[[Step], None] | None = None,
                 on_retry: Callable[[str], None] | None = None,
                 on_trim: Callable[[int, int], None] | None = None,
                 **model_options: Any) -> None:
        unknown = sorted(set(model_options) - set(MODEL_OPTIONS))
        if unknown:
            raise TypeError(f"unknown Session option(s): {', '.join(unknown)}")
        self._id = validate_session_id(session_id)
        self.storage = storage
        self.lock_timeout = lock_timeout
        self.on_wait = on_wait
        self.on_step = on_step
        self.on_retry = on_retry
        self.on_trim = on_trim
        self.instructions = system_prompt  # for a new session; the tool protocol is added to it
        self._given_settings, self._model_options = settings, model_options
        self._settings: Settings | None = None
        self._endpoint: Endpoint | None = None
        self._client = client
        self._allow, self._root = tuple(allow), root
        self._toolbox: Toolbox | None = None
        #: whether the latest send_message stored its turn (a signal's handler asks)
        self.last_turn_stored = False
        if self._allow or root is not None:
            self.toolbox  # check the --allow names and the root now, before any work

    @property
    def session_id(self) -> str:
        return self._id

    def history(self) -> list[ChatMessage]:
        return self.storage.load(self._id)

    def message_count(self) -> int:
        return self.storage.count(self._id)

    def clear_history(self) -> None:
        """Remove the session's history from the store (under its lock)."""
        with self.storage.lock(self._id, self.lock_timeout, self.on_wait):
            self.storage.delete(self._id)

    # ---- the model side ------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The Settings given (with keyword overrides), else flags > FUSION_* env > config file > defaults."""
        if self._settings is None:
            from .config import load_settings

            if self._given_settings is None:
                flags = {"storage": self.storage.url or "memory:", **self._model_options}
                self._settings = load_settings(flags)
            else:
                self._settings = dataclasses.replace(self._given_settings, **self._model_options)
        return self._settings

    @property
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            from .llm import resolve_endpoint

            self._endpoint = resolve_endpoint(self.settings)
        return self._endpoint

    @property
    def client(self) -> ChatClient:
        """One client (one HTTP connection pool) for every turn of this Session."""
        if self._client is None:
            from .llm import make_client

            self._client = make_client(self.endpoint, on_retry=self.on_retry)
        return self._client

    @property
    def toolbox(self) -> Toolbox:
        if self._toolbox is None:
            from .agent import Toolbox

            # `root` given here, else the `root` setting (--root, FUSION_ROOT), else the working directory
            root = self._root if self._root is not None else self.settings.root
            self._toolbox = Toolbox(self._allow, root)
        return self._toolbox

    def system_prompt(self) -> str:
        from .agent import system_prompt

        return system_prompt(self.toolbox.described(), self.instructions)

    def send_message(self, message: str) -> AgentResult:
        """Run one agent turn on `message` and commit it; see send_message_with_iterations."""
        return self.send_message_with_iterations(message, self.settings.max_iterations)

    def send_message_with_iterations(self, message: str, max_iterations: int) -> AgentResult:
        """Run one turn of at most `max_iterations` steps and commit it atomically.

        A turn without a final answer (success False) is committed too: its
        tool calls happened. ProviderError or StorageError: nothing is written.
        """
        from .agent import run_turn

        self.last_turn_stored = False
        if not isinstance(message, str) or not message.strip():
            raise EmptyMessage("the message is empty", hint="give the message as arguments or on stdin")
        for text, what in ((message, "the message"), (self.instructions or "", "the system prompt")):
            try:  # bytes that are not UTF-8 in argv arrive as lone surrogates, which no store can hold
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise UsageError(f"{what} is not valid UTF-8 (at character {exc.start})",
                                 hint="check the terminal's encoding, or convert it with iconv -t UTF-8") from None
        if max_iterations < 1:
            raise UsageError(f"max_iterations must be 1 or more, not {max_iterations}")
        client = self.client  # before the lock: a configuration error should not wait for it
        secret = self._endpoint.api_key if self._endpoint is not None else None  # None: a given client
        with self.storage.lock(self._id, self.lock_timeout, self.on_wait):
            history = self.storage.load(self._id)
            prompt = [] if history else [ChatMessage.system(self.system_prompt())]
            result, turn = run_turn(client, self._context(history or prompt), message, self.toolbox,
                                    max_iterations, self.on_step, secret)
            self.storage.append(self._id, prompt + turn)  # the one write of the turn
            self.last_turn_stored = True
        return result

    def _context(self, history: list[ChatMessage]) -> list[ChatMessage]:
        """What the model sees before the new message: the system prompt, then the history."""
        if history and history[0].role == "system":
            head, rest = history[:1], history[1:]
        else:  # a history written without one: the model still needs the protocol
            head, rest = [ChatMessage.system(self.system_prompt())], history
        limit = self.settings.max_history
        if not limit or len(rest) <= limit:
            return head + rest
        if self.on_trim is not None:
            self.on_trim(limit, len(rest))
        return head + rest[-limit:]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_session(session_id: str, storage: ConversationStorage | str,
                   **options: Any) -> Session:
    """A Session on `storage` (a backend object or a storage URL); loads nothing yet.

    `options`: lock_timeout, on_wait, settings, client, allow, root, system_prompt,
    on_step, on_retry, on_trim, and the model settings (provider, base_url, model, api_key,
    max_iterations, timeout, temperature, max_history).
    """
    validate_session_id(session_id)
    if isinstance(storage, str):
        # Like the CLI: a configured FUSION_ENCRYPTION_KEY applies, so a library
        # user never reads ciphertext or writes plaintext into an encrypted store.
        from .storage.encrypted import open_encrypted

        storage = open_encrypted(storage)
    return Session(session_id, storage, **options)
