"""One Settings value: flags > FUSION_* environment > config file > defaults.

The config file is TOML (``--config``, ``FUSION_CONFIG``, or
``$XDG_CONFIG_HOME/fusion/config.toml``) with the same keys as the fields
below; it is parsed only when it exists, so a plain `fusion count` never
imports tomllib.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import UsageError

ENV_PREFIX = "FUSION_"


@dataclass(frozen=True)
class Settings:
    storage: str
    session: str = "default"
    lock_timeout: float = 120.0
    # the model side, used by `send` and `chat`
    provider: str | None = None  # openai | anthropic | echo; None picks one (see llm/)
    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    max_iterations: int = 10
    timeout: float = 60.0
    temperature: float | None = None
    max_history: int | None = None
    root: str | None = None  # the directory the file tools may use; None: the working directory
    encryption_key_file: str | None = None  # see crypto.py; the key itself is only ever an env var

    def __repr__(self) -> str:  # never show the key, even in a traceback
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        if shown["api_key"]:
            shown["api_key"] = "***"
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def _positive_float(v: Any) -> float:
    x = float(v)
    if not x >= 0 or x == float("inf"):
        raise ValueError("must be a number of seconds, 0 or more")
    return x


def _positive_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("must be a whole number")
    x = int(v)
    if x < 1:
        raise ValueError("must be 1 or more")
    return x


def _provider(v: Any) -> str:
    v = str(v).lower()
    if v not in ("openai", "anthropic", "echo"):
        raise ValueError("must be openai, anthropic or echo")
    return v


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "storage": str,
    "session": str,
    "lock_timeout": _positive_float,
    "provider": _provider,
    "base_url": str,
    "model": str,
    "api_key": str,
    "max_iterations": _positive_int,
    "timeout": _positive_float,
    "temperature": float,
    "max_history": _positive_int,
    "root": str,
    "encryption_key_file": str,
}


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Resolve every setting from its four sources, converting and checking each."""
    flags = flags or {}
    env = os.environ if env is None else env
    file_values = read_config_file(config_file or env.get("FUSION_CONFIG") or None, env)
    values: dict[str, Any] = {}
    for name, convert in _CONVERT.items():
        var = ENV_PREFIX + name.upper()
        for source, raw in (
            (f"--{name.replace('_', '-')}", flags.get(name)),
            (var, env.get(var) or None),
            (f"{name} in the config file", file_values.get(name)),
        ):
            if raw is None:
                continue
            try:
                values[name] = convert(raw)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"invalid value {raw!r} for {source}: {exc}") from exc
            break
    if "storage" not in values:
        values["storage"] = default_storage_url(env)
    return Settings(**values)


def read_config_file(path: str | None, env: Mapping[str, str]) -> dict[str, Any]:
    """The config file's keys, or {} when there is none. An explicit path must exist."""
    explicit = path is not None
    target = Path(path).expanduser() if explicit else config_dir(env) / "config.toml"
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"config file {target} does not exist") from None
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read config file {target}: {exc.strerror}") from exc
    import tomllib  # only when a file is there

    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"config file {target} is not valid TOML: {exc}") from exc
    unknown = sorted(set(parsed) - set(_CONVERT))
    if unknown:
        raise UsageError(
            f"config file {target} has unknown keys: {', '.join(unknown)}",
            hint="known keys: " + ", ".join(_CONVERT),
        )
    return parsed


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    if home:
        return Path(home)
    try:  # HOME unset or empty (some cron setups): ask the password database
        import pwd

        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError):
        return Path.home()


def data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if sys.platform == "darwin":
        return _home(env) / "Library" / "Application Support" / "fusion"
    if sys.platform == "win32":
        return Path(env.get("LOCALAPPDATA") or _home(env) / "AppData" / "Local") / "fusion"
    xdg = env.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else _home(env) / ".local" / "share"
    return base / "fusion"


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if sys.platform == "win32":
        return Path(env.get("APPDATA") or _home(env) / "AppData" / "Roaming") / "fusion"
    xdg = env.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else _home(env) / ".config"
    return base / "fusion"


def default_storage_url(env: Mapping[str, str] | None = None) -> str:
    """`file:` in the user's data directory, the same for cron and an interactive shell."""
    return "file:" + str(data_dir(env) / "sessions")
