"""The built-in tools. read_file and list_directory are on by default; the rest need --allow."""

from __future__ import annotations

import os
import subprocess
import threading
from typing import IO, Any

from .tools import Tool, ToolContext, ToolError


def _string(description: str) -> dict[str, str]:
    return {"type": "string", "description": description}


def _schema(required: list[str], **props: dict[str, str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required}


def _os_error(what: str, path: str, exc: OSError) -> ToolError:
    return ToolError(f"cannot {what} {path!r}: {exc.strerror or exc}")


def read_file(args: dict[str, Any], ctx: ToolContext) -> str:
    path = ctx.resolve(args["path"])
    if not path.is_file():  # also refuses FIFOs and devices, which could block
        kind = "a directory" if path.is_dir() else "not a regular file" if path.exists() else "not found"
        raise ToolError(f"cannot read {args['path']!r}: {kind}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            data = f.read(ctx.max_output + 1)
    except OSError as exc:
        raise _os_error("read", args["path"], exc) from exc
    if b"\0" in data:
        raise ToolError(f"{args['path']!r} is a binary file ({size} bytes); read_file reads text")
    text = data[:ctx.max_output].decode("utf-8", errors="replace")
    if len(data) > ctx.max_output:
        text += f"\n[truncated: showing the first {ctx.max_output} of {size} bytes]"
    return text


def list_directory(args: dict[str, Any], ctx: ToolContext) -> str:
    path = ctx.resolve(args.get("path") or ".")
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as exc:
        raise _os_error("list", args.get("path") or ".", exc) from exc
    names = [e.name + ("/" if e.is_dir() else "") for e in entries]
    return "\n".join(names) if names else "(empty directory)"


def write_file(args: dict[str, Any], ctx: ToolContext) -> str:
    path = ctx.resolve(args["path"])
    if path.is_dir():
        raise ToolError(f"cannot write {args['path']!r}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:  # verbatim line endings
            f.write(args["content"])
    except OSError as exc:
        raise _os_error("write", args["path"], exc) from exc
    return f"Wrote {len(args['content'])} characters to {path.relative_to(ctx.root)}"


def http_get(args: dict[str, Any], ctx: ToolContext) -> str:
    url = args["url"]
    if not url.startswith(("http://", "https://")):
        raise ToolError(f"{url!r} is not an http:// or https:// URL")
    from ..llm.http import fetch  # httpx is loaded only when the tool runs

    try:
        status, content_type, text, cut = fetch(url, ctx.time_limit, ctx.max_output)
    except OSError as exc:
        raise ToolError(f"GET {url} failed: {exc}") from exc
    note = f"\n[truncated: showing the first {ctx.max_output} bytes]" if cut else ""
    return f"HTTP {status} {content_type}\n\n{text}{note}"


def execute_shell(args: dict[str, Any], ctx: ToolContext) -> str:
    proc = subprocess.Popen(args["command"], shell=True, cwd=ctx.root, env=dict(ctx.env),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    kept = bytearray()
    reader = threading.Thread(target=_drain, args=(proc.stdout, kept, ctx.max_output), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=ctx.time_limit)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise ToolError(f"the command did not finish within {ctx.time_limit:g} s and was killed") from None
    reader.join(1.0)  # a background child may hold the pipe open; do not wait for it
    output = kept[:ctx.max_output].decode("utf-8", errors="replace")
    if len(kept) > ctx.max_output:
        output += f"\n[truncated: showing the first {ctx.max_output} bytes of the output]"
    return f"exit code {proc.returncode}\n{output}"


def _drain(pipe: IO[bytes], kept: bytearray, limit: int) -> None:
    """Keep the first `limit`+1 bytes; read and drop the rest so the command never blocks on a full pipe."""
    while chunk := pipe.read(65536):
        if len(kept) <= limit:
            kept += chunk[:limit + 1 - len(kept)]
    pipe.close()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, 9)  # the whole group: the shell and what it started
    except (AttributeError, OSError):  # no process groups (Windows), or already gone
        proc.kill()
    proc.wait()


BUILTIN_TOOLS = (
    Tool("read_file", "Read a UTF-8 text file inside the working directory.",
         _schema(["path"], path=_string("the file's path, relative to the working directory")),
         read_file),
    Tool("list_directory", "List a directory inside the working directory; directories end with '/'.",
         _schema([], path=_string("the directory's path, relative to the working directory; default '.'")),
         list_directory),
    Tool("write_file", "Create or overwrite a UTF-8 text file inside the working directory.",
         _schema(["path", "content"], path=_string("the file's path, relative to the working directory"),
                 content=_string("the whole new content of the file")),
         write_file, read_only=False),
    Tool("http_get", "Fetch a URL with HTTP GET; returns the status, content type and body as text.",
         _schema(["url"], url=_string("an http:// or https:// URL")),
         http_get, read_only=False),
    Tool("execute_shell", "Run a shell command in the working directory; returns its exit code "
                          "and its combined stdout and stderr.",
         _schema(["command"], command=_string("the command line, run by /bin/sh")),
         execute_shell, read_only=False),
)
