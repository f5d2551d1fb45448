"""Bundled small model zoo: a target and two drafters trained offline on CPU.

Import is cheap on purpose (no torch / transformers at module level).  The trainer lives in
``hsd_serve.zoo.cli`` (``python -m hsd_serve.zoo build``).
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR: Path = Path(__file__).resolve().parent / "models"

#: names of the bundled models, in training order
MODEL_NAMES: tuple[str, ...] = ("target", "drafter", "byte_drafter")


def bundled_model_dir(name: str) -> Path:
    """Return the folder of a bundled model (a Hugging Face folder with config + tokenizer).

    Raises ``ValueError`` for an unknown name and ``FileNotFoundError`` if the model has not
    been built (run ``python -m hsd_serve.zoo build``).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown bundled model {name!r}; expected one of {MODEL_NAMES}")
    path = BUNDLED_DIR / name
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"bundled model {name!r} not found at {path} (config.json + model.safetensors "
            "missing); build it with `python -m hsd_serve.zoo build`"
        )
    return path


__all__ = ["BUNDLED_DIR", "MODEL_NAMES", "bundled_model_dir"]
