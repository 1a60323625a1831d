"""Reading and writing the release layout: a folder with a flat `config.json` (the authors'
`ModelArgs` fields) and `model.safetensors` (or `pytorch_model.bin`).

Training-only entries (the representation-alignment model and its projector, the quantizer's
usage buffer, the encoder's token-drop mask token) are dropped and reported; every other key must
match the model's keys and shapes exactly, or loading fails naming the keys.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from softvq_fast.models.config import SoftVQConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"
TRAINING_ONLY_PREFIXES = ("repa_model.", "projection.", "quantize.codebook_used", "encoder.mask_token")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded into the model; the message names the file or keys."""


@dataclass
class LoadReport:
    """What `from_pretrained` did with the checkpoint's keys."""

    ignored: list[str] = field(default_factory=list)
    weights_file: str = ""


def read_config(directory: Path) -> SoftVQConfig:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a release folder holds config.json and model.safetensors)")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object of ModelArgs fields, got {type(values).__name__}")
    try:
        config = SoftVQConfig.from_dict(values)
        config.validate()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return config


def read_state_dict(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The weights of a release folder, preferring safetensors."""
    safetensors_path, pickle_path = directory / SAFETENSORS_NAME, directory / PICKLE_NAME
    if safetensors_path.is_file():
        try:
            return load_file(str(safetensors_path)), safetensors_path
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{safetensors_path}: cannot be read as safetensors ({exc})") from exc
    if pickle_path.is_file():
        try:
            state = torch.load(str(pickle_path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types for damaged archives
            raise CheckpointError(f"{pickle_path}: cannot be read as a torch checkpoint ({exc})") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{pickle_path}: expected a flat dict of tensors (a state dict)")
        return state, pickle_path
    raise CheckpointError(f"{directory}: neither {SAFETENSORS_NAME} nor {PICKLE_NAME} found")


def split_training_only(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(inference keys, sorted ignored training-only keys)."""
    kept = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    return kept, sorted(set(state) - set(kept))


def block_count(state: dict[str, torch.Tensor], prefix: str) -> int | None:
    """Number of transformer blocks under `prefix` (e.g. "encoder.model.blocks."), None if none."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    if not indices:
        return None
    if indices != set(range(len(indices))):
        raise CheckpointError(f"{prefix}*: block indices {sorted(indices)} are not contiguous from 0")
    return len(indices)


def check_keys(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: Path) -> None:
    """Raise CheckpointError naming missing, unexpected and misshaped keys."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    misshaped = [
        f"{key} has shape {tuple(state[key].shape)}, the model expects {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    if misshaped:
        problems.append("wrong shapes: " + "; ".join(misshaped))
    if problems:
        raise CheckpointError(f"{source}: " + " | ".join(problems))


def write_release(directory: Path, config: SoftVQConfig, state: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors (contiguous CPU copies)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
