"""Bundled small model zoo: a target and two drafters trained offline on CPU, and the drafter
aligned for sampled decoding (``hsd-serve align``).

Import is cheap on purpose (no torch / transformers at module level).  The trainer lives in
``hsd_serve.zoo.cli`` (``python -m hsd_serve.zoo build``).
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR: Path = Path(__file__).resolve().parent / "models"

#: names of the bundled models ``zoo build`` trains, in training order
MODEL_NAMES: tuple[str, ...] = ("target", "drafter", "byte_drafter")
#: bundled models made from those by ``hsd-serve align`` (docs/align.md)
ALIGNED_NAMES: tuple[str, ...] = ("drafter_aligned",)
BUNDLED_NAMES: tuple[str, ...] = MODEL_NAMES + ALIGNED_NAMES
BUNDLED_PREFIX = "bundled:"


def bundled_model_dir(name: str) -> Path:
    """Return the folder of a bundled model (a Hugging Face folder with config + tokenizer).

    Raises ``ValueError`` for an unknown name and ``FileNotFoundError`` if the model has not
    been built (run ``python -m hsd_serve.zoo build``).
    """
    if name not in BUNDLED_NAMES:
        raise ValueError(f"unknown bundled model {name!r}; expected one of {BUNDLED_NAMES}")
    path = BUNDLED_DIR / name
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        how = ("align it with `hsd-serve align` (docs/align.md)" if name in ALIGNED_NAMES
               else "build it with `python -m hsd_serve.zoo build`")
        raise FileNotFoundError(
            f"bundled model {name!r} not found at {path} (config.json + model.safetensors "
            f"missing); {how}"
        )
    return path


def resolve_model_path(path: str) -> str:
    """``bundled:<name>`` -> that bundled model's folder; any other path or hub id unchanged."""
    if path.startswith(BUNDLED_PREFIX):
        return str(bundled_model_dir(path[len(BUNDLED_PREFIX):]))
    return path


__all__ = ["ALIGNED_NAMES", "BUNDLED_DIR", "BUNDLED_NAMES", "BUNDLED_PREFIX", "MODEL_NAMES",
           "bundled_model_dir", "resolve_model_path"]
