"""Loading a model directory in its published Hugging Face format.

``config.json``'s ``model_type`` picks the family; weights come only from ``*.safetensors``
(never pickle). Every failure names the file and, for weights, the key.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dilaserve.errors import CheckpointError
from dilaserve.models.base import DiffusionLM
from dilaserve.models.dream import DreamModel
from dilaserve.models.llada import LLaDAModel
from dilaserve.models.sdar import SDARModel
from dilaserve.models.spec import ModelSpec, dream_spec, llada_spec, sdar_spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    read_spec: Callable[[dict[str, Any], str], ModelSpec]
    build: Callable[[ModelSpec], DiffusionLM]


FAMILIES: dict[str, Family] = {
    "llada": Family(llada_spec, LLaDAModel),
    "dream": Family(dream_spec, DreamModel),
    "sdar": Family(sdar_spec, SDARModel),
}


def read_config(model_dir: str | Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {str(model_dir)!r} does not exist")
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json in the model directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config.json must hold a JSON object")
    return config


def read_spec(model_dir: str | Path) -> ModelSpec:
    config = read_config(model_dir)
    where = str(Path(model_dir) / "config.json")
    model_type = str(config.get("model_type", ""))
    family = FAMILIES.get(model_type.lower())
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise CheckpointError(f"{where}: model_type {model_type!r} is not a supported diffusion LM (known: {known})")
    return family.read_spec(config, where)


def build_model(spec: ModelSpec) -> DiffusionLM:
    return FAMILIES[spec.model_type.lower()].build(spec)


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {', '.join(bins)}: pickle weights are not loaded; convert them to safetensors)" if bins else ""
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files{hint}")
    return files


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(model_dir):
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read safetensors file: {exc}") from exc
    return state


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DiffusionLM:
    """Builds the family's module and fills it from the directory's safetensors files."""
    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    with torch.device("meta"):
        model = build_model(spec)
    expected = model.state_dict()
    state = load_state(model_dir)
    for key, param in expected.items():
        if key not in state:
            raise CheckpointError(f"{model_dir}: weight {key!r} is missing from the safetensors files")
        if tuple(state[key].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{model_dir}: weight {key!r} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        logger.warning("%s: ignoring %d unused weights (e.g. %s)", model_dir, len(extra), extra[0])
    model.load_state_dict({k: state[k].to(device=device, dtype=dtype) for k in expected}, assign=True)
    return model.eval()
