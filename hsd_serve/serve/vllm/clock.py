"""How long vLLM's engine has spent getting drafts: one shared counter of seconds.

The proposer runs in vLLM's worker process and adds the time of every ``propose`` call (its
drafts submitted and waited for); the target replica reads the counter at each output of a
request, so the difference since the request's previous output is the time its round spent in
the drafter (``Step.draft_s``).  One float64 in a file under ``/dev/shm`` (shared memory):
no message, no lock, no round trip per step.  An aligned 8-byte store is read whole on x86-64
and arm64; the reader only ever takes differences of a counter that grows.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from typing import Optional

ENV = "HSD_VLLM_DRAFT_CLOCK"  # the counter's path, handed to vLLM's worker process
_FMT = "d"


class DraftClock:
    def __init__(self, path: str, *, create: bool = False):
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, struct.calcsize(_FMT))
            self._map = mmap.mmap(fd, struct.calcsize(_FMT))
        finally:
            os.close(fd)
        if create:
            struct.pack_into(_FMT, self._map, 0, 0.0)

    @classmethod
    def create(cls) -> "DraftClock":
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="hsd-draft-clock-", dir=base)
        os.close(fd)
        return cls(path, create=True)

    @classmethod
    def from_env(cls) -> Optional["DraftClock"]:
        path = os.environ.get(ENV)
        if not path:
            return None
        try:
            return cls(path)
        except OSError:
            return None

    def value(self) -> float:
        return struct.unpack_from(_FMT, self._map, 0)[0]

    def add(self, seconds: float) -> None:
        struct.pack_into(_FMT, self._map, 0, self.value() + seconds)

    def close(self, *, remove: bool = False) -> None:
        try:
            self._map.close()
        finally:
            if remove:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
