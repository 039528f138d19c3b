"""Where a configured model's directory is.

A model entry with a ``path`` uses that directory. Without one, the name is looked up among
the models embedded in the package (``dilaserve/assets/models/<name>``); a directory named by
``$DILASERVE_DEFAULT_MODEL_DIR`` comes next. While the trained default model has not shipped,
the last resort is a tiny random LLaDA model built once into a cache directory, so that a bare
``dilaserve serve`` runs today (its output is noise; a warning says so).

Every process that needs the model (ingress for the tokenizer, replicas for the weights)
resolves it on its own node; the random model is built from a fixed seed, so all nodes agree.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from dilaserve.errors import CheckpointError
from dilaserve.models.store import EMBEDDED_MODELS_DIR
from dilaserve.serving.config import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR_ENV = "DILASERVE_DEFAULT_MODEL_DIR"
CACHE_DIR_ENV = "DILASERVE_CACHE_DIR"
RANDOM_FALLBACK_NAME = "random-tiny-llada-seed0"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "dilaserve")


def resolve_model_dir(model: ModelConfig) -> Path:
    """The directory holding ``model``'s config.json, weights and tokenizer."""
    if model.path:
        path = Path(model.path).expanduser()
        if not (path / "config.json").is_file():
            raise CheckpointError(f"model {model.name!r}: {path} is not a model directory (no config.json)")
        return path
    embedded = EMBEDDED_MODELS_DIR / model.name
    if (embedded / "config.json").is_file():
        return embedded
    env_dir = os.environ.get(DEFAULT_MODEL_DIR_ENV)
    if env_dir:
        return resolve_model_dir(ModelConfig(model.name, env_dir, model.dtype, model.device))
    logger.warning(
        "model %r is not embedded in this install and has no path: serving a tiny RANDOM model "
        "instead (its output is noise). Set `path` in the config or $%s.", model.name, DEFAULT_MODEL_DIR_ENV,
    )
    return random_fallback_dir()


def random_fallback_dir() -> Path:
    """A tiny random LLaDA checkpoint with tokenizer, built once (atomically) into the cache."""
    target = cache_dir() / "models" / RANDOM_FALLBACK_NAME
    if (target / "config.json").is_file():
        return target
    from dilaserve.cli.init_model import SHAPES
    from dilaserve.models.checkpoint import make_random_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        make_random_checkpoint(staging, "llada", seed=0, **SHAPES["tiny"])
        try:
            staging.rename(target)
        except OSError:  # another process finished first: use its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
