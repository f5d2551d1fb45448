"""Processes a replica started die with it, however it dies.

vLLM runs its engine core and workers in processes of their own.  When the replica that owns them
exits cleanly it shuts them down; when it is killed (Ray restarting a failed replica, an OOM kill,
``ray stop``, a node drain) nothing does: they live on as orphans, holding their model, their KV
cache space (and GPU memory on GPU nodes), so the replacement replica may not fit.  Measured here:
an ``AsyncLLM`` owner killed with SIGKILL left its engine core and worker (3.9 GB resident)
running until killed by hand.

``ensure_reaper()`` starts, once per process, a small watcher process (``python -m
hsd_serve.serve.reaper OWNER``) in a session of its own.  It notes the owner's descendants every
``interval`` seconds; once the owner is gone (the watcher's parent changes), it sends SIGTERM to
every noted process still alive, and SIGKILL to those left after ``grace`` seconds.  A process is
matched by pid and start time, so a recycled pid is never signalled.  Linux only (``/proc``);
elsewhere it does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional

_started: dict[int, subprocess.Popen] = {}  # owner pid -> its watcher


def _stat(pid: int) -> Optional[tuple[int, int]]:
    """(parent pid, start time in clock ticks) of ``pid``; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) "
    if fields[0] == b"Z":
        return None  # a zombie is already dead
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """``{pid: start time}`` of every live descendant of ``root``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append((int(name), st[1]))
    out: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, start in children.get(todo.pop(), ()):
            if pid not in out:
                out[pid] = start
                todo.append(pid)
    return out


def _alive(known: dict[int, int]) -> dict[int, int]:
    """The processes of ``known`` that still run (same pid, same start time)."""
    out = {}
    for pid, start in known.items():
        st = _stat(pid)
        if st is not None and st[1] == start:
            out[pid] = start
    return out


def _signal(procs: dict[int, int], sig: int) -> None:
    for pid in _alive(procs):
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def reap(known: dict[int, int], grace: float = 5.0) -> dict[int, int]:
    """SIGTERM the processes of ``known`` still alive (and what they started since), SIGKILL
    those left after ``grace`` seconds; returns the processes that were signalled."""
    targets = _alive(known)
    for pid in list(targets):
        targets.update(descendants(pid))
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(targets) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal(targets, signal.SIGKILL)
    return targets


def watch(owner: int, interval: float = 1.0, grace: float = 5.0) -> dict[int, int]:
    """Note ``owner``'s descendants until it exits, then reap them (this process's parent must
    be ``owner``)."""
    me = os.getpid()
    known: dict[int, int] = {}
    while os.getppid() == owner:
        known = _alive(known)
        known.update(descendants(owner))
        known.pop(me, None)
        time.sleep(interval)
    return reap(known, grace)


def ensure_reaper(interval: float = 1.0, grace: float = 5.0) -> Optional[subprocess.Popen]:
    """Start this process's watcher unless it runs already (Linux only; else None)."""
    owner = os.getpid()
    proc = _started.get(owner)
    if proc is not None and proc.poll() is None:
        return proc
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"):
        return None
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsd_serve.serve.reaper", str(owner), str(interval), str(grace)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True)
    _started[owner] = proc
    return proc


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]))
