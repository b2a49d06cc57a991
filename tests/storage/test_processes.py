"""Many processes on one session, and processes killed mid-write, on every persistent backend."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fusion_cli.messages import ChatMessage
from fusion_cli.storage import open_storage
from tests.conftest import PERSISTENT

ROOT = Path(__file__).resolve().parents[2]

# Each worker does a read-modify-write (load, then save everything) under the
# lock, the pattern of a `send` turn: without real exclusion, turns get lost.
WORKER = textwrap.dedent("""
    import sys
    from fusion_cli.messages import ChatMessage
    from fusion_cli.storage import open_storage
    url, worker, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = open_storage(url)
    for i in range(n):
        with store.lock("shared", timeout=60):
            history = store.load("shared")
            store.save("shared", history + [ChatMessage.user(f"{worker}:{i}")])
    store.close()
""")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", PERSISTENT)
def test_eight_processes_lose_nothing(kind, make_url):
    url = make_url(kind)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, f"w{w}", "50"], env=_env())
             for w in range(8)]
    assert [p.wait(timeout=240) for p in procs] == [0] * 8
    contents = [m.content for m in open_storage(url).load("shared")]
    assert len(contents) == 400
    assert sorted(contents) == sorted(f"w{w}:{i}" for w in range(8) for i in range(50))
    for w in range(8):  # each worker's messages stay in its own order
        mine = [c for c in contents if c.startswith(f"w{w}:")]
        assert mine == [f"w{w}:{i}" for i in range(50)]


def test_appends_without_an_explicit_lock_lose_nothing(make_url):
    # The file backend's append is itself a read-modify-write; it must lock.
    url = make_url("file")
    code = textwrap.dedent("""
        import sys
        from fusion_cli.messages import ChatMessage
        from fusion_cli.storage import open_storage
        s = open_storage(sys.argv[1])
        for i in range(40):
            s.append("shared", [ChatMessage.user(sys.argv[2] + str(i))])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, url, f"p{w}-"], env=_env()) for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    assert open_storage(url).count("shared") == 160


SAVER = textwrap.dedent("""
    import sys
    from fusion_cli.messages import ChatMessage
    from fusion_cli.storage import open_storage
    store = open_storage(sys.argv[1])
    a = [ChatMessage.user("A" * 20000 + str(i)) for i in range(30)]
    b = [ChatMessage.assistant("B" * 50000 + str(i)) for i in range(12)]
    print("ready", flush=True)
    while True:
        store.save("victim", a)
        store.save("victim", b)
""")


@pytest.mark.slow
@pytest.mark.parametrize("kind", PERSISTENT)
def test_sigkill_while_saving_never_tears_a_session(kind, make_url):
    url = make_url(kind)
    a = [ChatMessage.user("A" * 20000 + str(i)) for i in range(30)]
    b = [ChatMessage.assistant("B" * 50000 + str(i)) for i in range(12)]
    rng = random.Random(1234)
    seen = set()
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, url], env=_env(), stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.01, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        history = open_storage(url).load("victim")
        assert history in ([], a, b), "a killed writer left a torn history"
        seen.add(len(history))
    assert seen & {len(a), len(b)}, "the writer never completed a save; the test proved nothing"
    store = open_storage(url)
    store.save("victim", [ChatMessage.user("after")])  # the store still works
    assert store.load("victim") == [ChatMessage.user("after")]
