"""The tools users would pick instead: `llm` and `shell-gpt`, in their own venv, aimed at the loopback server.

The venv is bench/out/tools (kept between runs; delete it to reinstall).
A tool that does not install is reported as such, never silently left out.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from context import OUT, Context
from harness import Cmd, run
from seed import ANSWER, USER

VENV = OUT / "tools"
PACKAGES = {"llm": "llm", "sgpt": "shell-gpt"}  # command -> PyPI name
FIXTURES = OUT / "fixtures"


@dataclass
class Tools:
    bin: dict[str, Path] = field(default_factory=dict)  # command -> executable
    versions: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # command -> why not


def install() -> Tools:
    tools = Tools()
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    for command, package in PACKAGES.items():
        exe = VENV / "bin" / command
        if not exe.exists():
            done = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                                   "--disable-pip-version-check", package], capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                tools.missing[command] = f"pip install {package} failed: {last}"
                continue
        probe = f"import importlib.metadata as m; print(m.version({package!r}))"
        shown = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        tools.bin[command] = exe
        tools.versions[command] = shown.stdout.strip()
    return tools


# ---- llm ---------------------------------------------------------------------

def llm_env(ctx: Context, name: str) -> dict[str, str]:
    """An LLM_USER_PATH of its own, with the loopback server as the default model."""
    user = ctx.path(f"llm-{name}")
    user.mkdir(parents=True, exist_ok=True)
    (user / "extra-openai-models.yaml").write_text(
        f'- model_id: loopback\n  model_name: loopback\n  api_base: "{ctx.server.url}"\n')
    (user / "default_model.txt").write_text("loopback")
    return ctx.env(LLM_USER_PATH=str(user))


def llm_db(ctx: Context, tools: Tools, env: dict[str, str], spec: dict[str, int]) -> dict[str, str]:
    """Fill `env`'s logs.db with conversations of spec[name] exchanges; {name: conversation id}.

    Built once per llm version and spec, then copied (building a 1,000-exchange
    conversation through llm's code takes tens of seconds).
    """
    digest = hashlib.sha1(json.dumps(sorted(spec.items())).encode() + USER.encode() + ANSWER.encode())
    key = f"llm-{tools.versions['llm']}-{digest.hexdigest()[:12]}"
    cached_db, cached_ids = FIXTURES / f"{key}.db", FIXTURES / f"{key}.json"
    target = Path(env["LLM_USER_PATH"]) / "logs.db"
    if not cached_ids.exists():
        FIXTURES.mkdir(parents=True, exist_ok=True)
        spec_file = ctx.path(f"{key}.spec.json")
        spec_file.write_text(json.dumps({k: [v, USER, ANSWER] for k, v in spec.items()}))
        building = ctx.path(f"{key}.db")
        result = run(Cmd([str(VENV / "bin" / "python"), str(Path(__file__).with_name("llm_fixture.py")),
                          str(building), str(spec_file)], env=env))
        shutil.copyfile(building, cached_db)
        cached_ids.write_text(result.stdout.decode())
    shutil.copyfile(cached_db, target)
    return json.loads(cached_ids.read_text())


def llm_turns(tools: Tools, env: dict[str, str], cid: str) -> int:
    result = run(Cmd([str(tools.bin["llm"]), "logs", "list", "--cid", cid, "-n", "0", "--json"], env=env))
    return len(json.loads(result.stdout or b"[]"))


# ---- shell-gpt ---------------------------------------------------------------

def sgpt_env(ctx: Context, name: str) -> dict[str, str]:
    """shell-gpt reads these before its config file; a long CHAT_CACHE_LENGTH so it keeps whole histories."""
    home = ctx.path(f"sgpt-{name}")
    (home / "chats").mkdir(parents=True, exist_ok=True)
    return ctx.env(HOME=str(home), OPENAI_API_KEY="bench-not-a-key", OPENAI_API_HOST=ctx.server.host_url,
                   DEFAULT_MODEL="loopback", CHAT_CACHE_PATH=str(home / "chats"),
                   CACHE_PATH=str(home / "cache"), CHAT_CACHE_LENGTH="100000", DISABLE_STREAMING="true")


def sgpt_cmd(tools: Tools, env: dict[str, str], chat: str, text: str, **kw) -> Cmd:
    return Cmd([str(tools.bin["sgpt"]), "--chat", chat, "--no-cache", text], env=env, **kw)


def sgpt_chat(tools: Tools, env: dict[str, str], chat: str, messages: int) -> Path:
    """A chat file of `messages` messages (its own system message first), as shell-gpt writes it."""
    chats = Path(env["CHAT_CACHE_PATH"])
    probe = chats / "_probe"
    if not probe.exists():
        run(sgpt_cmd(tools, env, "_probe", "hello"))
    first = json.loads(probe.read_text())[0]
    history = [first] if first.get("role") == "system" else []
    i = 0
    while len(history) < messages:
        history.append({"role": "user", "content": USER % i})
        history.append({"role": "assistant", "content": ANSWER % i})
        i += 1
    path = chats / chat
    path.write_text(json.dumps(history[:messages]))
    return path


def sgpt_messages(path: Path) -> int:
    return len(json.loads(path.read_text()))
