"""The tokenizer in training: its training forward and gradients against a float64 evaluation
written from the math, drop path, the encoder started from DINOv2 files, fine-tuning from a
release (the projector kept or created), and the export with measured latent statistics."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from softvq_fast.models import SoftVQVAE
from softvq_fast.models.checkpoint import CheckpointError
from softvq_fast.models.vit import DropPathDraws
from softvq_fast.training.frozen import FrozenWeightsError, resample_patch_embedding, resample_position_table
from softvq_fast.training.image_data import ImageBatch
from softvq_fast.training.tokenizer_model import (
    LatentStatistics,
    export_release,
    measure_latent_statistics,
    tokenizer_for_training,
    training_config,
)
from support.numerics import rel_err
from support.sharp_models import TOKENIZER_QK_GAIN, float64_copy, float64_evaluation, sharpen
from support.tokenizer_training import tiny_training_config, training_forward_float64
from test_frozen import SMALL, SMALL_REG, _official_from_timm, _random_timm_state

FP32 = 1e-5


def _images(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def sharp_model() -> SoftVQVAE:
    """The tiny training tokenizer with sharp attention and O(1) residual branches (so that every
    block matters to the outputs and the gradients), at tau 0.5: at the authors' 0.07 the encoder's
    gradient through the peaked softmax loses digits to cancellation (float32 against float64
    about 1e-4, a property of the function; tests/test_soft_vq.py checks the op at 0.07)."""
    return sharpen(tokenizer_for_training(tiny_training_config(tau=0.5), seed=1), 2, TOKENIZER_QK_GAIN)


def test_training_forward_and_gradients_match_float64(sharp_model, seed):
    model, images = sharp_model, _images(3, seed)
    out = model.training_forward(images)
    model64 = float64_copy(model)
    reference = training_forward_float64(model64, images)
    for name in ("reconstructions", "latents", "projected"):
        assert rel_err(getattr(out, name), reference[name]) <= FP32, name
    assert rel_err(out.entropy_loss, reference["entropy"]) <= FP32
    assert out.code_counts.shape == (2, 32) and int(out.code_counts.sum()) == 3 * 8

    generator = torch.Generator().manual_seed(seed + 1)
    weights = {name: torch.randn(reference[name].shape, generator=generator, dtype=torch.float64) for name in reference}
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    loss = (out.reconstructions * weights["reconstructions"].float()).sum() + out.entropy_loss * weights["entropy"].float() \
        + (out.latents * weights["latents"].float()).sum() + (out.projected * weights["projected"].float()).sum()
    grads = torch.autograd.grad(loss, list(trained.values()))
    parameters64 = dict(model64.named_parameters())
    loss64 = sum((reference[name] * weights[name]).sum() for name in reference)
    grads64 = torch.autograd.grad(loss64, [parameters64[name] for name in trained])
    errors = {name: rel_err(g, g64) for name, g, g64 in zip(trained, grads, grads64)}
    assert max(errors.values()) <= FP32, max(errors.items(), key=lambda item: item[1])
    assert len(errors) > 40 and "quantize.embedding" in errors and "projection.4.weight" in errors


def test_training_forward_agrees_with_the_inference_path(sharp_model, seed):
    images = _images(2, seed)
    out = sharp_model(images, training_outputs=True)
    with torch.no_grad():
        latents = sharp_model.encode(images)
        assert rel_err(out.latents, latents) <= FP32
        assert rel_err(out.reconstructions, sharp_model.decode(out.latents)) <= FP32


def test_unused_parameters_are_frozen_and_every_other_gets_a_gradient(seed):
    for overrides in ({}, {"use_rope": True}):
        model = tokenizer_for_training(tiny_training_config(**overrides), seed=seed)
        out = model.training_forward(_images(2, seed))
        (out.reconstructions.square().mean() + out.entropy_loss + out.projected.square().mean()).backward()
        missing = sorted(name for name, p in model.named_parameters() if p.grad is None)
        assert missing == sorted(model.unused_parameter_names()), overrides
        assert all(not dict(model.named_parameters())[name].requires_grad for name in missing)
        assert ("decoder.model.pos_embed" in missing) == bool(overrides)


def test_drop_path_is_timms_stochastic_depth(seed):
    config = tiny_training_config(encoder_depth=3, enc_drop_path_rate=0.5, dec_drop_path_rate=0.25)
    model = tokenizer_for_training(config, seed=seed)
    rates = [[block.drop_path_rate for block in vit.model.blocks] for vit in (model.encoder, model.decoder)]
    assert rates == [[0.0, 0.25, 0.5], [0.0, 0.25]]  # linspace(0, rate, depth) per ViT

    # One block against the definition: x + m1 / keep * gamma1 * attn(norm1 x), then the MLP's
    # branch with m2; m1, m2 drawn in that order from the generator.
    block = copy.deepcopy(model.encoder.model.blocks[2]).train()
    with torch.no_grad():  # O(1) branches (DINOv2's initial 1e-5 would hide them)
        for gamma in (block.ls1.gamma, block.ls2.gamma):
            gamma.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(6, 5, 384, generator=torch.Generator().manual_seed(seed))
    out = block(x, draws=DropPathDraws(torch.Generator().manual_seed(7)))
    generator = torch.Generator().manual_seed(7)
    m1, m2 = (torch.empty(6).bernoulli_(0.5, generator=generator).view(-1, 1, 1) for _ in range(2))
    b64 = float64_copy(block)
    with float64_evaluation():
        h = x.double() + m1 / 0.5 * b64.ls1.gamma * b64.attn(b64.norm1(x.double()))
        expected = h + m2 / 0.5 * b64.ls2.gamma * b64.mlp(b64.norm2(h))
    assert rel_err(out, expected) <= FP32 and 0 < m1.sum() < 6

    # Rows of a global batch are drawn as one process draws them.
    halves = [block(x[rows], draws=DropPathDraws(torch.Generator().manual_seed(7), rows.start, 6))
              for rows in (slice(0, 2), slice(2, 6))]
    assert rel_err(torch.cat(halves), out) <= FP32
    # Evaluation ignores drop path: the inference path is that of the same weights without it.
    plain = tokenizer_for_training(dataclasses.replace(config, enc_drop_path_rate=0.0, dec_drop_path_rate=0.0), seed=seed)
    with torch.no_grad():
        images = _images(2, seed)
        assert torch.equal(model.eval().encode(images), plain.eval().encode(images))
        assert not torch.equal(model.train().training_forward(images).latents, plain.training_forward(images).latents)


@pytest.mark.parametrize("model_name", [SMALL, SMALL_REG])
def test_encoder_starts_from_dinov2_files(model_name, tmp_path, seed):
    generator = torch.Generator().manual_seed(seed)
    timm_state = _random_timm_state(model_name, generator)  # 2 blocks, patch 14 on a 2 x 2 grid
    save_file(timm_state, str(tmp_path / "timm.safetensors"))
    torch.save(_official_from_timm(timm_state, generator), tmp_path / "official.pth")
    # 48 px in patches of 16: the file's 2 x 2 position grid is resampled to 3 x 3.
    config = tiny_training_config(encoder_model=model_name, enc_pretrained=True, image_size=48, base_image_size=48, repa=False)
    untouched = tokenizer_for_training(dataclasses.replace(config, enc_pretrained=False), seed=seed).state_dict()
    for name in ("timm.safetensors", "official.pth"):
        model = tokenizer_for_training(config, encoder_weights=tmp_path / name, seed=seed)
        encoder = model.encoder.model.state_dict()
        prefix = 0 if "reg4" in model_name else 1
        assert torch.equal(encoder["patch_embed.proj.weight"],
                           resample_patch_embedding(timm_state["patch_embed.proj.weight"], 16))
        assert rel_err(encoder["pos_embed"], resample_position_table(timm_state["pos_embed"], 3, prefix)) <= FP32
        for key in timm_state.keys() - {"patch_embed.proj.weight", "pos_embed", "cls_token"}:
            assert torch.equal(encoder[key], timm_state[key]), (name, key)
        assert rel_err(encoder["cls_token"], timm_state["cls_token"]) <= FP32  # official: class position folded in
        for key, value in model.state_dict().items():
            if not key.startswith("encoder.model."):
                assert torch.equal(value, untouched[key]), key


def test_wrong_encoder_starts_are_named(tmp_path, seed):
    state = _random_timm_state(SMALL, torch.Generator().manual_seed(seed))
    save_file(state, str(tmp_path / "two_blocks.safetensors"))
    with pytest.raises(FrozenWeightsError, match=r"two_blocks\.safetensors: not the DINOv2 ViT-small layout .*3 blocks.*missing keys .*blocks\.2\."):
        tokenizer_for_training(tiny_training_config(encoder_depth=3), encoder_weights=tmp_path / "two_blocks.safetensors")
    with pytest.raises(FrozenWeightsError, match=r"nothing\.pth: not found \(expected a local DINOv2"):
        tokenizer_for_training(tiny_training_config(), encoder_weights=tmp_path / "nothing.pth")
    with pytest.raises(ValueError, match=r"encoder_weights: the config says enc_pretrained=true"):
        tokenizer_for_training(tiny_training_config(enc_pretrained=True))
    with pytest.raises(ValueError, match="repa_align must be one of 'repeat', got 'global'"):
        tokenizer_for_training(tiny_training_config(repa_align="global"))
    with pytest.raises(ValueError, match="repa_model: unknown ViT model name 'vit_base_patch16_224'"):
        tokenizer_for_training(tiny_training_config(repa_model="vit_base_patch16_224"))
    with pytest.raises(ValueError, match="repa_patch_size=16: .* multiple of num_latent_tokens=8"):
        tokenizer_for_training(tiny_training_config(repa_patch_size=16))
    assert tokenizer_for_training(tiny_training_config(repa_align="global", repa=False)).projection is None
    for field, value, message in (("dec_pretrained", True, "dec_pretrained must be false"),
                                  ("enc_tuning_method", "lora", "enc_tuning_method must be one of 'full'"),
                                  ("enc_token_drop", 0.4, "enc_token_drop must be 0")):
        with pytest.raises(ValueError, match=message):
            tokenizer_for_training(tiny_training_config(**{field: value}))


def test_fine_tuning_keeps_a_release_projector_and_creates_a_missing_one(tmp_path, seed):
    trained = tokenizer_for_training(tiny_training_config(repa_proj_dim=24), seed=seed)
    trained.save_pretrained(tmp_path / "with")
    stored = load_file(str(tmp_path / "with" / "model.safetensors"))
    assert {k for k in stored if k.startswith("projection.")} == {f"projection.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    inference = SoftVQVAE.from_pretrained(tmp_path / "with")
    assert inference.projection is None and any(k.startswith("projection.") for k in inference.load_report.ignored)

    model = tokenizer_for_training(tmp_path / "with")
    assert model.training and model.config.repa
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    assert set(model.state_dict()) == set(stored)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in model.unused_parameter_names())

    plain = tokenizer_for_training(tiny_training_config(repa=False), seed=seed)
    assert plain.projection is None
    plain.save_pretrained(tmp_path / "without")
    assert tokenizer_for_training(tmp_path / "without").projection is None
    created = tokenizer_for_training(tmp_path / "without", alignment=True)
    assert created.config.repa and created.projection[4].weight.shape == (384, 32)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in created.state_dict().items() if not k.startswith("projection."))

    broken = dict(stored, **{"projection.4.weight": torch.zeros(384, 7)})
    save_file(broken, str(tmp_path / "with" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: wrong shapes: projection\.4\.weight has shape \(384, 7\)"):
        tokenizer_for_training(tmp_path / "with")
    with pytest.raises(ValueError, match="encoder_weights: .* a release whose encoder is already trained"):
        tokenizer_for_training(tmp_path / "without", encoder_weights=tmp_path / "x.pth")


def test_new_weights_are_seeded_and_initialised_like_timm(seed):
    model = tokenizer_for_training(tiny_training_config(encoder_depth=4, decoder_depth=4), seed=seed)
    again = tokenizer_for_training(tiny_training_config(encoder_depth=4, decoder_depth=4), seed=seed)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    weights = torch.cat([m.attn.qkv.weight.detach().flatten() for m in model.decoder.model.blocks])
    assert abs(float(weights.std()) - 0.02) < 1e-3 and float(weights.abs().max()) < 0.2
    assert not any(block.attn.qkv.bias.any() or block.mlp.fc2.bias.any() for block in model.encoder.model.blocks)
    # Outside the ViTs (quant_conv, the pixel head) nn.Linear's own initialisation, as the authors'.
    assert model.quant_conv.bias.abs().sum() > 0


def test_training_config_is_the_authors_softvq_l_64():
    config = training_config("softvq-l-64")
    expected = dict(encoder_model="vit_large_patch14_dinov2.lvd142m", decoder_model="vit_large_patch14_dinov2.lvd142m",
                    num_latent_tokens=64, codebook_size=8192, codebook_embed_dim=32, num_codebooks=4, tau=0.07,
                    entropy_loss_ratio=0.01, vq_loss_ratio=0.0, commit_loss_beta=0.0, enc_pretrained=True,
                    dec_pretrained=False, enc_patch_size=16, dec_patch_size=16, repa=True,
                    repa_model="vit_large_patch14_dinov2.lvd142m", repa_patch_size=16, repa_proj_dim=1024,
                    repa_align="repeat", image_size=256, enc_drop_path_rate=0.0, dec_drop_path_rate=0.0)
    assert {k: getattr(config, k) for k in expected} == expected


def test_export_measures_latent_statistics_and_loads_back(tmp_path, seed):
    model = tokenizer_for_training(tiny_training_config(), seed=seed)
    images = _images(7, seed)
    batches = [images[:3], ImageBatch(images[3:6], torch.zeros(3), torch.zeros(3)), images[6:]]
    statistics = measure_latent_statistics(model, batches, max_images=5)
    assert model.training and statistics.images == 5
    with torch.no_grad():
        latents = model.eval().encode(images[:5]).double()
    model.train()
    assert abs(statistics.mean - float(latents.mean())) <= FP32 * float(latents.abs().mean())
    assert abs(statistics.std - float(latents.std(correction=0))) <= FP32 * statistics.std

    export_release(model, tmp_path / "release", statistics)
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    assert (config["vq_mean"], config["vq_std"], config["repa"]) == (statistics.mean, statistics.std, True)
    loaded = SoftVQVAE.from_pretrained(tmp_path / "release")
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), model.eval().encode(images))
    assert (loaded.config.vq_mean, loaded.config.vq_std) == (statistics.mean, statistics.std)
    assert tokenizer_for_training(tmp_path / "release").projection is not None
    with pytest.raises(ValueError, match="max_images must be a positive integer"):
        measure_latent_statistics(model, batches, max_images=0)
    with pytest.raises(ValueError, match="images: no image"):
        measure_latent_statistics(model, [], max_images=4)
    with pytest.raises(ValueError, match="vq_std must be"):
        export_release(model, tmp_path / "bad", LatentStatistics(0.0, 0.0, 1))
