"""Reading and writing the release layout: a folder with a flat `config.json` (the authors'
`ModelArgs` fields) and `model.safetensors` (or `pytorch_model.bin`).

Training-only entries (the representation-alignment model and its projector, the quantizer's
usage buffer, the encoder's token-drop mask token) are dropped and reported; every other key must
match the model's keys and shapes exactly, or loading fails naming the keys. Floating tensors
are cast to the requested dtype (and listed in the load report); other dtypes are refused.
The tokenizer and the generators load through the same functions here.
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
    """What `from_pretrained` did with the checkpoint's keys: the training-only keys it ignored and
    the floating tensors it cast to the requested dtype (key -> the dtype stored in the file)."""

    ignored: list[str] = field(default_factory=list)
    cast: dict[str, str] = field(default_factory=dict)
    weights_file: str = ""


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_json(path: Path, what: str) -> dict:
    """The JSON object in `path` (a release's config.json). CheckpointError naming the file when it
    is missing, unreadable, not UTF-8, not JSON, or not an object of `what`."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a release folder holds {CONFIG_NAME} and {SAFETENSORS_NAME})")
    try:
        values = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object of {what}, got a JSON {_JSON_TYPES[type(values)]}")
    return values


# ModelArgs fields that fix the architecture: a tokenizer's config.json names them all (the
# authors' release writes every field), so a config without them is not a tokenizer's.
REQUIRED_FIELDS = ("image_size", "codebook_size", "codebook_embed_dim", "num_codebooks", "num_latent_tokens",
                   "encoder_model", "decoder_model")


def read_config(directory: Path) -> SoftVQConfig:
    """The tokenizer config of a release folder, validated; CheckpointError naming the file and field."""
    path = directory / CONFIG_NAME
    values = read_json(path, "ModelArgs fields")
    missing = [name for name in REQUIRED_FIELDS if name not in values]
    if missing:
        raise CheckpointError(f"{path}: not a SoftVQ tokenizer config: no {', '.join(missing)}")
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


def check_dtype(dtype: torch.dtype, name: str = "dtype") -> torch.dtype:
    """`dtype` if it is a floating torch.dtype, else ValueError naming the argument `name`."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating torch.dtype such as torch.float32 or torch.bfloat16, got {dtype!r}")
    return dtype


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path, dtype: torch.dtype) -> dict[str, str]:
    """Load `state` into `model` (built on the meta device) with `assign`, floating tensors cast to
    `dtype`. Keys and shapes must match (`check_keys`); a tensor whose dtype cannot be cast (an
    integer, bool or complex tensor where the model holds floating point, or any other dtype for
    a non-floating model tensor) raises CheckpointError naming the file and the keys.
    Returns {key: stored dtype} of the floating tensors that were cast."""
    expected = model.state_dict()
    check_keys(expected, state, source)
    refused = [
        f"{key} is {_name(state[key].dtype)}, the model holds {_name(tensor.dtype)}"
        for key, tensor in expected.items()
        if not _castable(state[key], tensor)
    ]
    if refused:
        raise CheckpointError(f"{source}: wrong dtypes: " + "; ".join(refused))
    cast = {key: _name(value.dtype) for key, value in state.items() if value.is_floating_point() and value.dtype != dtype}
    model.load_state_dict(
        {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()},
        strict=True, assign=True,
    )
    return cast


def _castable(stored: torch.Tensor, expected: torch.Tensor) -> bool:
    """A floating model tensor takes any floating tensor (cast at load); any other needs its dtype."""
    return stored.is_floating_point() if expected.is_floating_point() else stored.dtype == expected.dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_release(directory: Path, config: SoftVQConfig, state: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors (contiguous CPU copies)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
