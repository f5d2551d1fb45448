"""Training corpus: the Python standard library source of the running interpreter.

Deterministic: files are listed by relative POSIX path, split into train/validation by a hash of
that path, and the training order is a seeded hash shuffle.  ``site-packages`` / ``dist-packages``
(third-party code, which may contain benchmark prompts) are never included.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

EXCLUDED_DIR_NAMES = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _rel_parts_ok(rel: Path) -> bool:
    return not any(part in EXCLUDED_DIR_NAMES for part in rel.parts[:-1])


def list_corpus_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of all ``*.py`` files under ``root`` (default: the stdlib), sorted.

    Excludes anything below a ``site-packages``/``dist-packages``/``__pycache__`` directory and
    anything that is not a regular file (symlinks to files outside the tree are skipped).
    """
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if not _rel_parts_ok(rel):
            continue
        if p.is_symlink() or not p.is_file():
            continue
        out.append(rel.as_posix())
    out.sort()
    return out


def _hash01(text: str, salt: str) -> float:
    h = hashlib.sha256(f"{salt}\0{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_files(
    files: Sequence[str], val_fraction: float = 0.01, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic train/val split by path hash; train is returned in seeded shuffled order,
    validation in sorted order."""
    val = sorted(f for f in files if _hash01(f, "val") < val_fraction)
    vset = set(val)
    train = [f for f in files if f not in vset]
    train.sort(key=lambda f: _hash01(f, f"order{seed}"))
    return train, val


def read_text(root: Path, rel: str) -> str | None:
    """UTF-8 text of a file, or None if it is not valid UTF-8 (a handful of encoding tests)."""
    try:
        return (Path(root) / rel).read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None


@dataclass
class Corpus:
    root: Path
    train: list[str]
    val: list[str]

    @classmethod
    def build(cls, root: Path | None = None, val_fraction: float = 0.01, seed: int = 0) -> "Corpus":
        root = Path(root) if root is not None else stdlib_root()
        train, val = split_files(list_corpus_files(root), val_fraction, seed)
        return cls(root=root, train=train, val=val)

    def texts(self, files: Sequence[str]) -> Iterator[str]:
        for f in files:
            t = read_text(self.root, f)
            if t:
                yield t

    def val_text_sample(self, max_bytes: int = 100_000) -> list[str]:
        """The fixed validation documents used for the reported loss (first val files, sorted,
        until ``max_bytes`` UTF-8 bytes; the last one truncated at a line boundary)."""
        docs, n = [], 0
        for t in self.texts(self.val):
            b = len(t.encode())
            if n + b > max_bytes:
                cut = t.encode()[: max_bytes - n].decode("utf-8", "ignore")
                cut = cut[: cut.rfind("\n") + 1]
                if cut:
                    docs.append(cut)
                break
            docs.append(t)
            n += b
        return docs
