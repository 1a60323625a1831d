"""Loading faults of every loader (SoftVQVAE, SiT, DiT, load_generator): damaged config.json files
and tensors of other dtypes give CheckpointError naming the file and the key, floating tensors are
cast at load and reported, non-floating ones refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.numerics import rel_err
from support.tokenizer_files import save_tiny_tokenizer

from softvq_fast.generation import load_generator
from softvq_fast.models import DiT, SiT, SoftVQVAE
from softvq_fast.models.checkpoint import CheckpointError

LOADERS = {"SoftVQVAE": SoftVQVAE.from_pretrained, "SiT": SiT.from_pretrained, "DiT": DiT.from_pretrained,
           "load_generator": load_generator}
GENERATOR_KEY = "blocks.1.attn.qkv.weight"
TOKENIZER_KEY = "decoder.model.blocks.0.mlp.fc1.weight"


@pytest.fixture
def sit_folder(reference_dir, tmp_path):
    """A writable copy of the reference SiT release folder."""
    folder = tmp_path / "sit"
    shutil.copytree(reference_dir / "vectors" / "sit_tiny", folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def _release(loader: str, reference_dir, tmp_path):
    """A release folder the loader takes (tokenizer or generator)."""
    if loader == "SoftVQVAE":
        save_tiny_tokenizer(tmp_path)
        return tmp_path
    source = reference_dir / "vectors" / ("dit_tiny" if loader == "DiT" else "sit_tiny")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, tmp_path / name)
        (tmp_path / name).chmod(0o644)
    return tmp_path


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("content, message", [
    (b'{"depth": 2,', "config.json: not valid JSON"),
    (b'{"depth": "\xff\xfe"}', "config.json: not UTF-8 text"),
    (b"[1, 2]", "config.json: expected a JSON object of .*, got a JSON array"),
    (b'"SiT"', "config.json: expected a JSON object of .*, got a JSON string"),
    (b"null", "config.json: expected a JSON object of .*, got a JSON null"),
])
def test_damaged_config_names_the_file(loader, content, message, reference_dir, tmp_path):
    folder = _release(loader, reference_dir, tmp_path)
    (folder / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as failure:
        LOADERS[loader](folder)
    assert str(folder / "config.json") in str(failure.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_missing_config_names_the_file(loader, tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        LOADERS[loader](tmp_path)


@pytest.mark.parametrize("tags", ["SiT", 3, [1, "SiT"]])
def test_generator_tags_must_be_a_list_of_strings(tags, sit_folder):
    config = json.loads((sit_folder / "config.json").read_text())
    (sit_folder / "config.json").write_text(json.dumps({**config, "tags": tags}))
    with pytest.raises(CheckpointError, match="config.json: tags must be a list of strings"):
        load_generator(sit_folder)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float64])
def test_generator_floating_tensor_of_another_dtype_is_cast_and_reported(stored, sit_folder):
    state = load_file(str(sit_folder / "model.safetensors"))
    state[GENERATOR_KEY] = state[GENERATOR_KEY].to(stored)
    save_file(state, str(sit_folder / "model.safetensors"))
    model = load_generator(sit_folder)
    assert model.load_report.cast == {GENERATOR_KEY: str(stored).removeprefix("torch.")}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.state_dict()[GENERATOR_KEY], state[GENERATOR_KEY].float())
    reference = SiT.from_pretrained(sit_folder, dtype=torch.float64)  # the stored values, in float64
    x, t, y = torch.randn(2, 8, 16), torch.rand(2), torch.tensor([1, 3])
    with torch.no_grad():
        assert rel_err(model(x, t, y), reference(x.double(), t.double(), y)) <= 1e-5


def test_generator_loads_in_the_requested_dtype(sit_folder):
    model = SiT.from_pretrained(sit_folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert len(model.load_report.cast) == len(model.state_dict())


@pytest.mark.parametrize("stored", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_generator_non_floating_tensor_is_refused_naming_the_key(stored, sit_folder):
    state = load_file(str(sit_folder / "model.safetensors"))
    state[GENERATOR_KEY] = torch.ones_like(state[GENERATOR_KEY], dtype=stored)
    save_file(state, str(sit_folder / "model.safetensors"))
    name = str(stored).removeprefix("torch.")
    for loader in (load_generator, SiT.from_pretrained):
        with pytest.raises(CheckpointError, match=f"model.safetensors: wrong dtypes: {GENERATOR_KEY} is {name}, "
                                                  "the model holds float32"):
            loader(sit_folder)


def test_tokenizer_float16_tensor_is_cast_and_int32_refused(tmp_path):
    save_tiny_tokenizer(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({**state, TOKENIZER_KEY: state[TOKENIZER_KEY].half()}, str(tmp_path / "model.safetensors"))
    loaded = SoftVQVAE.from_pretrained(tmp_path)
    assert loaded.load_report.cast == {TOKENIZER_KEY: "float16"}
    assert torch.equal(loaded.state_dict()[TOKENIZER_KEY], state[TOKENIZER_KEY].half().float())
    reference = SoftVQVAE.from_pretrained(tmp_path, dtype=torch.float64)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert rel_err(loaded(images), reference(images)) <= 1e-5
    save_file({**state, TOKENIZER_KEY: state[TOKENIZER_KEY].int()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"wrong dtypes: {TOKENIZER_KEY} is int32, the model holds float32"):
        SoftVQVAE.from_pretrained(tmp_path)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("dtype", ["float32", torch.int32, None])
def test_dtype_argument_must_be_a_floating_torch_dtype(loader, dtype, reference_dir, tmp_path):
    folder = _release(loader, reference_dir, tmp_path)
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        LOADERS[loader](folder, dtype=dtype)


def test_a_generator_folder_is_not_a_tokenizer(reference_dir):
    with pytest.raises(CheckpointError, match="not a SoftVQ tokenizer config: no image_size, codebook_size"):
        SoftVQVAE.from_pretrained(reference_dir / "vectors" / "sit_tiny")


def test_a_tokenizer_folder_is_not_a_generator(reference_dir):
    with pytest.raises(CheckpointError, match="does not describe a SiT: .*base_image_size"):
        load_generator(reference_dir / "vectors" / "tokenizer_tiny")
