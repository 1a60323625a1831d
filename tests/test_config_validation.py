"""Config fields of the tokenizer and the generators are checked at load (type, range, relations
between fields) with one error naming the field, its value and what is expected; so is the
tokenizer's max_batch argument."""
from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from support.tokenizer_files import save_tiny_tokenizer

from softvq_fast.models import DiT, SiT, SoftVQConfig, SoftVQVAE
from softvq_fast.models.checkpoint import CheckpointError

# (field, bad value, the expected part of the message); the tiny tokenizer has 32 px images,
# patch 16, 4 latent tokens in 2 codebooks.
TOKENIZER_CASES = [
    ("num_codebooks", 0, "num_codebooks must be a positive integer, got 0"),
    ("enc_patch_size", 0, "enc_patch_size must be a positive integer, got 0"),
    ("dec_patch_size", -16, "dec_patch_size must be a positive integer, got -16"),
    ("image_size", 32.0, "image_size must be a positive integer, got 32.0"),
    ("image_size", "32", "image_size must be a positive integer, got '32'"),
    ("num_latent_tokens", True, "num_latent_tokens must be a positive integer, got True"),
    ("codebook_size", None, "codebook_size must be a positive integer, got None"),
    ("codebook_embed_dim", 2.5, "codebook_embed_dim must be a positive integer, got 2.5"),
    ("tau", 0, "tau must be a finite number > 0, got 0"),
    ("tau", -0.07, "tau must be a finite number > 0, got -0.07"),
    ("tau", "0.07", "tau must be a finite number > 0, got '0.07'"),
    ("tau", math.inf, "tau must be a finite number > 0, got inf"),
    ("vq_std", 0, "vq_std must be a finite number > 0, got 0"),
    ("vq_std", math.nan, "vq_std must be a finite number > 0, got nan"),
    ("vq_mean", "0", "vq_mean must be a finite number, got '0'"),
    ("rope_theta", 0.0, "rope_theta must be a finite number > 0, got 0.0"),
    ("codebook_l2_norm", 1, "codebook_l2_norm must be true or false, got 1"),
    ("use_ape", "true", "use_ape must be true or false, got 'true'"),
    ("dec_cls_token", None, "dec_cls_token must be true or false, got None"),
    ("encoder_model", 7, "encoder_model must be a string, got 7"),
    ("enc_type", "cnn", "enc_type must be one of 'vit', got 'cnn'"),
    ("to_pixel", "conv", "to_pixel must be one of 'linear', got 'conv'"),
    ("dropout_p", 1.5, "dropout_p must be a finite number >= 0 and <= 1, got 1.5"),
    ("entropy_loss_ratio", -1, "entropy_loss_ratio must be a finite number >= 0, got -1"),
    ("encoder_ch_mult", [1, 0], r"encoder_ch_mult must be a list of integers >= 1, got \[1, 0\]"),
    ("repa_proj_dim", 0, "repa_proj_dim must be a positive integer, got 0"),
    # relations between fields
    ("image_size", 40, "image_size=40 must be a multiple of enc_patch_size=16"),
    ("num_codebooks", 3, "num_latent_tokens=4 must be divisible by num_codebooks=3"),
    ("decoder_model", "vit_huge_patch14_clip", "unknown ViT model name 'vit_huge_patch14_clip'"),
]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tiny_tokenizer(folder)
    return folder


def _with_config(source, target, **changes):
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.mark.parametrize("field, value, message", TOKENIZER_CASES)
def test_tokenizer_config_field_is_named_at_load(field, value, message, tokenizer_folder, tmp_path):
    folder = _with_config(tokenizer_folder, tmp_path / "bad", **{field: value})
    with pytest.raises(CheckpointError, match=re.escape(str(folder / "config.json")) + ": " + message):
        SoftVQVAE.from_pretrained(folder)


@pytest.mark.parametrize("field, value, message", TOKENIZER_CASES)
def test_tokenizer_constructor_checks_the_same_fields(field, value, message, tokenizer_folder):
    values = json.loads((tokenizer_folder / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        SoftVQVAE(SoftVQConfig.from_dict({**values, field: value}))


def test_mixed_rope_needs_a_base_size_in_whole_patches(tokenizer_folder, tmp_path):
    folder = _with_config(tokenizer_folder, tmp_path / "rope", use_rope=True, rope_mixed=True, base_image_size=24)
    with pytest.raises(CheckpointError, match="base_image_size=24 must be a multiple of enc_patch_size=16"):
        SoftVQVAE.from_pretrained(folder)


def test_every_tokenizer_field_is_checked():
    """Each SoftVQConfig field refuses a value of the wrong type (a list for every field)."""
    import dataclasses

    for name in (f.name for f in dataclasses.fields(SoftVQConfig)):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            dataclasses.replace(SoftVQConfig(), **{name: [[]]}).validate()


GENERATOR_CASES = [
    ("hidden_size", 0, "hidden_size must be a positive integer, got 0"),
    ("hidden_size", 192.0, "hidden_size must be a positive integer, got 192.0"),
    ("num_heads", "3", "num_heads must be a positive integer, got '3'"),
    ("num_heads", 5, "hidden_size=192 must be divisible by num_heads=5"),
    ("depth", True, "depth must be a positive integer, got True"),
    ("input_size", -8, "input_size must be a positive integer, got -8"),
    ("in_channels", 0, "in_channels must be a positive integer, got 0"),
    ("num_classes", 0, "num_classes must be a positive integer, got 0"),
    ("patch_size", 0, "patch_size must be a positive integer, got 0"),
    ("mlp_ratio", 0, "mlp_ratio must be a finite number > 0, got 0"),
    ("mlp_ratio", "4", "mlp_ratio must be a finite number > 0, got '4'"),
    ("class_dropout_prob", 1.0, "class_dropout_prob must be a finite number >= 0 and < 1, got 1.0"),
    ("class_dropout_prob", None, "class_dropout_prob must be a finite number >= 0 and < 1, got None"),
    ("vae_1d", "yes", "vae_1d must be true or false, got 'yes'"),
    ("qk_norm", 0, "qk_norm must be true or false, got 0"),
    ("vae_1d", False, "input_size=8 must be divisible by patch_size=3", {"patch_size": 3}),
]
SIT_CASES = [
    ("path_type", 1, "path_type must be a string, got 1"),
    ("use_cfg", "no", "use_cfg must be true or false, got 'no'"),
    ("decoder_hidden_size", 19.2, "decoder_hidden_size must be a positive integer or None, got 19.2"),
    ("encoder_depth", 0, "encoder_depth must be a positive integer or None, got 0"),
]
DIT_CASES = [("learn_sigma", "true", "learn_sigma must be true or false, got 'true'")]


@pytest.mark.parametrize("family, changes, message", [
    pytest.param(family, {field: value, **(extra[0] if extra else {})}, message, id=f"{family.__name__}-{field}={value!r}")
    for family, cases in ((SiT, GENERATOR_CASES + SIT_CASES), (DiT, GENERATOR_CASES + DIT_CASES))
    for field, value, message, *extra in cases
])
def test_generator_config_field_is_named_at_load(family, changes, message, reference_dir, tmp_path):
    source = reference_dir / "vectors" / ("sit_tiny" if family is SiT else "dit_tiny")
    folder = _with_config(source, tmp_path / "bad", **changes)
    with pytest.raises(CheckpointError, match=f"config.json does not describe a {family.__name__}: {message}"):
        family.from_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_model(tokenizer_folder) -> SoftVQVAE:
    return SoftVQVAE.from_pretrained(tokenizer_folder)


@pytest.mark.parametrize("max_batch", [2.5, True, math.nan, "4", 0, -1, torch.tensor(2)])
@pytest.mark.parametrize("method", ["encode", "decode"])
def test_max_batch_must_be_a_positive_integer_or_none(tiny_model, method, max_batch):
    x = torch.zeros(2, 3, 32, 32) if method == "encode" else torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match=re.escape(f"max_batch must be a positive integer or None, got {max_batch!r}")):
        getattr(tiny_model, method)(x, max_batch=max_batch)


@pytest.mark.parametrize("max_batch", [None, 1, np.int64(1), 5])
def test_max_batch_accepts_integers_and_none(tiny_model, max_batch):
    latents = torch.randn(3, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.decode(latents, max_batch=max_batch), tiny_model.decode(latents))


@pytest.mark.parametrize("autocast_dtype", ["bfloat16", torch.int8])
def test_autocast_dtype_is_named(tiny_model, autocast_dtype):
    with pytest.raises(ValueError, match="autocast_dtype must be a floating torch.dtype"):
        tiny_model.decode(torch.zeros(1, 4, 8), autocast_dtype=autocast_dtype)
