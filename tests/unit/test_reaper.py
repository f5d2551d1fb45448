"""``serve.reaper``: what a replica started dies with it when the replica is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hsd_serve.serve import reaper

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")

# the owner: starts its watcher, then a child that starts a grandchild, and one child that
# ignores SIGTERM; prints their pids and waits to be killed
OWNER = textwrap.dedent("""
    import json, signal, subprocess, sys, time
    from hsd_serve.serve.reaper import ensure_reaper
    watcher = ensure_reaper(interval=0.05, grace=1.0)
    tree = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE,
                            text=True)
    grandchild = int(tree.stdout.readline())
    stubborn = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
    print(json.dumps({"watcher": watcher.pid, "tree": [tree.pid, grandchild, stubborn.pid]}),
          flush=True)
    time.sleep(300)
""")


def _gone(pids: dict, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not reaper._alive(pids):
            return True
        time.sleep(0.05)
    return False


def _started(pids) -> dict:
    return {p: reaper._stat(p)[1] for p in pids}


def test_a_killed_owner_takes_its_descendants_with_it():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(owner.stdout.readline())
        tree = _started(info["tree"])
        watcher = _started([info["watcher"]])
        assert set(tree) <= set(reaper.descendants(owner.pid))
        time.sleep(0.5)  # the watcher notes them
        assert reaper._alive(tree) == tree and reaper._alive(watcher) == watcher
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        # SIGTERM for all, SIGKILL after the 1 s grace for the one that ignores it
        assert _gone(tree, timeout=15), f"left running: {reaper._alive(tree)}"
        assert _gone(watcher, timeout=5)  # and the watcher itself is done
    finally:
        owner.kill()
        for pid in reaper._alive(locals().get("tree", {})):
            os.kill(pid, signal.SIGKILL)


def test_an_owner_that_exits_cleanly_leaves_no_watcher_behind():
    code = ("import json; from hsd_serve.serve.reaper import ensure_reaper; "
            "w = ensure_reaper(interval=0.05); assert ensure_reaper() is w; print(w.pid)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    watcher = int(out.stdout.strip())
    st = reaper._stat(watcher)
    assert st is None or _gone({watcher: st[1]}, timeout=5)


def test_a_recycled_pid_is_never_signalled():
    """A process is matched by pid and start time: the same pid with another start time (a new
    process that got a dead one's pid) is not among the live ones, so ``reap`` leaves it."""
    me = os.getpid()
    start = reaper._stat(me)[1]
    assert reaper._alive({me: start}) == {me: start}
    assert reaper._alive({me: start + 1}) == {}
    assert reaper.reap({me: start + 1}, grace=0.1) == {}
