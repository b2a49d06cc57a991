"""One `send` turn against the loopback server: its overhead next to `fusion count`, and its memory."""

from __future__ import annotations

from context import Context
from harness import Cmd, Samples, compare, med, ms
from report import Section
from seed import history

from fusion_cli.storage import open_storage

SEND_LIMIT = 2.0  # the issue: a turn's own overhead within 2x of `fusion count`
RSS_LIMIT_MB = 100
# The client as fusion makes it for an http:// endpoint (fusion_cli.llm._plain_http_transport).
PLAIN_CLIENT = ("import click, httpx, ssl; httpx.Client(transport=httpx.HTTPTransport("
                "verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)))")


def backends(ctx: Context, quick: bool) -> dict[str, str]:
    urls = {"file": f"file:{ctx.path('turn-files')}", "sqlite": f"sqlite:{ctx.path('turn.db')}"}
    if not quick:
        urls["redis"] = ctx.redis_url("turn")
        urls["postgres"] = ctx.postgres_url("turn")
    return urls


def restoring(ctx: Context, url: str, sid: str, messages: list):
    """A `prepare` hook that puts the session back as it was before the timed turn appended to it."""
    store = open_storage(url)
    ctx.on_close(store.close)
    store.save(sid, messages)
    return lambda: store.save(sid, messages)


def server_share(ctx: Context):
    """For `compare(around=...)`: the seconds the server spent on this run's requests."""
    def around(label, go):
        _, before = ctx.server.snapshot()
        result = go()
        _, after = ctx.server.snapshot()
        return result, after - before
    return around


def turn(ctx: Context) -> Section:
    section = Section("One send turn (10-message history) next to count, a fresh process each")
    rows = []
    data = {}
    for kind, url in backends(ctx, ctx.quick).items():
        sid = "h10"
        restore = restoring(ctx, url, sid, history(10))
        commands = {
            "count": ctx.fusion_cmd("count", "-s", sid, storage=url),
            "send": ctx.fusion_cmd("send", "-s", sid, "What is on the list?", storage=url,
                                   env=ctx.send_env(), prepare=restore),
        }
        if kind == "file":  # what the overhead is made of, in the same rounds
            py = str(ctx.python)
            commands.update({
                "send --provider echo": ctx.fusion_cmd("send", "-s", sid, "What is on the list?", storage=url,
                                                       env=ctx.env(FUSION_PROVIDER="echo"), prepare=restore),
                "import click": Cmd([py, "-c", "import click"], env=ctx.env()),
                "import click, httpx": Cmd([py, "-c", "import click, httpx"], env=ctx.env()),
                "import click, httpx; Client()": Cmd([py, "-c", "import click, httpx; httpx.Client()"],
                                                     env=ctx.env()),
                "... Client(transport=fusion's)": Cmd([py, "-c", PLAIN_CLIENT], env=ctx.env()),
                "import click, http.client": Cmd([py, "-c", "import click, http.client"], env=ctx.env()),
            })
        s = compare(commands, runs=ctx.runs, warmup=2, around=server_share(ctx))
        if kind == "file":
            _floor(section, s)
        count, send = s["count"].median, s["send"].median_net
        rows.append([kind, ms(count), ms(s["send"].median), ms(med(s["send"].extra)), ms(send),
                     f"{send / count:.2f}x"])
        section.target(f"send's own overhead ({kind}) within {SEND_LIMIT:g}x of count",
                       f"{send / count:.2f}x",
                       send / count <= SEND_LIMIT)
        data[kind] = {"count": s["count"].walls, "send": s["send"].walls, "server": s["send"].extra}
    section.table(["backend", "count", "send (wall)", "server's share", "send overhead",
                   "overhead / count"], rows)
    section.data["turn"] = data
    return section


def _floor(section: Section, s: dict[str, Samples]) -> None:
    """The parts of a turn's overhead, from commands timed in the same rounds."""
    m = {k: v.median_net for k, v in s.items()}
    httpx_import = m["import click, httpx"] - m["import click"]
    ca_bundle = m["import click, httpx; Client()"] - m["... Client(transport=fusion's)"]
    client = m["... Client(transport=fusion's)"] - m["import click"]
    floor = m["count"] + client
    section.table(["file backend, same rounds", "median", "vs count"],
                  [[f"`{k}`", ms(v), f"{v / m['count']:.2f}x"] for k, v in m.items()])
    section.note(
        f"Importing httpx costs {ms(httpx_import)} (`import click, httpx` minus `import click`); making the "
        f"client as fusion does (which imports httpcore) brings it to {ms(client)}. httpx's default "
        f"`Client()` would cost {ms(ca_bundle)} more, loading the CA bundle, which fusion skips for an "
        f"http:// endpoint reached without a proxy. A turn without HTTP (`--provider echo`) costs "
        f"{m['send --provider echo'] / m['count']:.2f}x count. So with httpx, the floor of a turn is "
        f"count + the client = {ms(floor)}, {floor / m['count']:.2f}x count, before any byte is sent. "
        f"The standard library's http.client would cost "
        f"{ms(m['import click, http.client'] - m['import click'])} instead.")
    section.data["floor"] = m


def memory(ctx: Context) -> Section:
    n = 1000 if ctx.quick else 10_000
    section = Section(f"Peak RSS of one send with a {n:,}-message history")
    rows = []
    for kind, url in backends(ctx, ctx.quick).items():
        sid = "big"
        restore = restoring(ctx, url, sid, history(n))
        cmd = ctx.fusion_cmd("send", "-s", sid, "What is on the list?", storage=url, env=ctx.send_env(),
                             prepare=restore, rss=True)
        s = compare({"send": cmd}, runs=3, warmup=1)["send"]
        rows.append([kind, f"{s.peak_rss_mb:.1f} MB", ms(s.median)])
        if n == 10_000:
            section.target(f"peak RSS of send, 10,000 messages ({kind}) < {RSS_LIMIT_MB} MB",
                           f"{s.peak_rss_mb:.1f} MB", s.peak_rss_mb < RSS_LIMIT_MB)
    section.table(["backend", "peak RSS (max of 3)", "median wall"], rows)
    return section
