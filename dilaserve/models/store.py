"""Models by name: the ones embedded in the package, or a directory path."""

from __future__ import annotations

from pathlib import Path

import dilaserve
from dilaserve.errors import CheckpointError

EMBEDDED_MODELS_DIR = Path(dilaserve.__file__).parent / "assets" / "models"
DEFAULT_MODEL_NAME = "dilaserve-tiny-arith"


def embedded_models() -> list[str]:
    if not EMBEDDED_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in EMBEDDED_MODELS_DIR.iterdir() if (p / "config.json").is_file())


def resolve_model(name_or_path: str) -> Path:
    """``default`` or an embedded model's name -> its directory; anything else is a path."""
    name = DEFAULT_MODEL_NAME if name_or_path == "default" else name_or_path
    embedded = EMBEDDED_MODELS_DIR / name
    if (embedded / "config.json").is_file():
        return embedded
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    known = ", ".join(["default", *embedded_models()])
    raise CheckpointError(f"no model named {name_or_path!r}: not an embedded model ({known}) nor a directory")
