"""SoftVQVAE: conformance with the authors' code, checkpoint layout, loading errors, API checks."""
from __future__ import annotations

import copy
import functools
import json
from typing import Callable

import pytest
import torch
from support.numerics import rel_err
from support.onednn import needs_onednn
from support.sharp_models import (BF16_TOL, DEVICES, MUTANTS, device_backends, float64_copy, float64_evaluation,
                                  inject_mutant, report, skip_if_backend_cannot_run, tiny_tokenizer, tolerance)
from safetensors.torch import load_file, save_file

from softvq_fast.models import PRESETS, SoftVQConfig, SoftVQVAE
from softvq_fast.models.checkpoint import CheckpointError

TINY = "vectors/tokenizer_tiny"
LAYOUT = "softvq-s-64_vits-vits_4codebooks"


def tiny_config(**overrides) -> SoftVQConfig:
    """ViT-S width, one block each, 32 px, 4 latent tokens, 2 codebooks of 16 x 8."""
    values = dict(image_size=32, base_image_size=32, codebook_size=16, codebook_embed_dim=8, num_codebooks=2,
                  tau=0.07, num_latent_tokens=4, encoder_depth=1, decoder_depth=1, codebook_show_usage=False)
    return SoftVQConfig(**{**values, **overrides})


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def reference(reference_dir):
    model = SoftVQVAE.from_pretrained(reference_dir / TINY)
    return model, load_file(str(reference_dir / TINY / "expected.safetensors"))


@pytest.mark.parametrize("backends", [
    ("auto", "auto", "auto"), pytest.param(("auto", "auto", "onednn"), marks=needs_onednn), ("math", "reference", "torch"),
])
def test_conformance_vectors(reference, backends, onednn_calls):
    model, expected = reference
    model.set_backends(attention=backends[0], soft_vq=backends[1], linear=backends[2])
    with torch.no_grad():
        latents = model.encode(expected["images"])
        assert rel_err(latents, expected["latents"]) <= 1e-5
        assert rel_err(model.decode(expected["latents"]), expected["reconstruction"]) <= 1e-5
        assert rel_err(model(expected["images"]), expected["reconstruction"]) <= 1e-5
    if backends[2] == "onednn":  # every linear layer, the encoder's patch embedding too
        onednn_calls.expect_every_linear_of(model, model.encoder.model.patch_embed.proj.weight)
    model.set_backends(attention="auto", soft_vq="auto", linear="auto")


def test_depth_follows_checkpoint(reference):
    model, _ = reference
    assert model.config.encoder_model == "vit_small_patch14_dinov2.lvd142m"  # 12 blocks by name
    assert len(model.encoder.model.blocks) == len(model.decoder.model.blocks) == 2
    assert model.load_report.ignored == []


def test_authors_layout_key_set_and_load(reference_dir, tmp_path):
    layout = json.loads((reference_dir / "authors_checkpoint_layout.json").read_text())[LAYOUT]
    config = SoftVQConfig.from_dict(layout["config"])
    assert config.to_dict() == layout["config"]
    with torch.device("meta"):
        model = SoftVQVAE(config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == layout["state_dict"]
    # A checkpoint with exactly that layout loads, value for value.
    state = {k: torch.full(shape, float(i % 7)) for i, (k, shape) in enumerate(layout["state_dict"].items())}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(layout["config"]))
    loaded = SoftVQVAE.from_pretrained(tmp_path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def _save_tiny(tmp_path, **overrides) -> tuple[SoftVQVAE, dict]:
    torch.manual_seed(0)
    model = SoftVQVAE(tiny_config(**overrides))
    model.save_pretrained(tmp_path)
    return model, load_file(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("variant", [{}, {"use_rope": True, "rope_mixed": True}, {"use_rope": True},
                                     {"encoder_model": "vit_small_patch14_reg4_dinov2.lvd142m",
                                      "decoder_model": "vit_small_patch14_reg4_dinov2.lvd142m", "dec_cls_token": False}])
def test_save_load_round_trip(tmp_path, variant):
    model, _ = _save_tiny(tmp_path, **variant)
    loaded = SoftVQVAE.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == model.config.to_dict()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    x = images(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))


def test_register_model_layout():
    config = tiny_config(encoder_model="vit_base_patch14_reg4_dinov2.lvd142m")
    with torch.device("meta"):
        model = SoftVQVAE(config)
    state = model.state_dict()
    assert state["encoder.model.reg_token"].shape == (1, 4, 768)
    assert state["encoder.model.pos_embed"].shape == (1, 4, 768)  # patches only (no_embed_class)
    assert state["decoder.model.pos_embed"].shape == (1, 5, 384)  # class token + patches


def test_training_only_keys_ignored_and_reported(tmp_path):
    _, state = _save_tiny(tmp_path)
    extra = {"repa_model.blocks.0.weight": torch.zeros(2), "projection.0.weight": torch.zeros(2, 2),
             "quantize.codebook_used": torch.zeros(2, 65536), "encoder.mask_token": torch.zeros(1, 1, 384)}
    save_file({**state, **extra}, str(tmp_path / "model.safetensors"))
    model = SoftVQVAE.from_pretrained(tmp_path)
    assert model.load_report.ignored == sorted(extra)


def test_pytorch_bin_checkpoint_loads(tmp_path):
    model, state = _save_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = SoftVQVAE.from_pretrained(tmp_path)
    assert loaded.load_report.weights_file.endswith("pytorch_model.bin")
    assert torch.equal(loaded.quantize.embedding, model.quantize.embedding)


def _broken(tmp_path, change) -> str:
    _, state = _save_tiny(tmp_path)
    state = change(dict(state))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        SoftVQVAE.from_pretrained(tmp_path)
    return str(info.value)


def test_missing_key_is_named(tmp_path):
    message = _broken(tmp_path, lambda s: {k: v for k, v in s.items() if k != "decoder.mask_token"})
    assert "missing keys: decoder.mask_token" in message


def test_unexpected_key_is_named(tmp_path):
    message = _broken(tmp_path, lambda s: {**s, "decoder.extra.weight": torch.zeros(3)})
    assert "unexpected keys: decoder.extra.weight" in message


def test_wrong_shape_is_named(tmp_path):
    message = _broken(tmp_path, lambda s: {**s, "quant_conv.bias": torch.zeros(9)})
    assert "quant_conv.bias has shape (9,), the model expects (8,)" in message


def test_corrupted_file_is_named(tmp_path):
    _save_tiny(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot be read as safetensors"):
        SoftVQVAE.from_pretrained(tmp_path)


def test_unknown_model_name_is_named(tmp_path):
    _save_tiny(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "decoder_model": "vit_huge_patch14_clip"}))
    with pytest.raises(CheckpointError, match="unknown ViT model name 'vit_huge_patch14_clip'"):
        SoftVQVAE.from_pretrained(tmp_path)


def test_missing_folder_contents(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        SoftVQVAE.from_pretrained(tmp_path)
    _save_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        SoftVQVAE.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def tiny_model() -> SoftVQVAE:
    """Random weights with LayerScale 1 (at its 1e-5 init the attention branch would hardly count)."""
    torch.manual_seed(1)
    model = SoftVQVAE(tiny_config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.fill_(1.0)
    return model


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 1, 32, 32), r"images must be a \(B, 3, 32, 32\) tensor"),
    (torch.zeros(3, 32, 32), r"images must be a \(B, 3, 32, 32\) tensor"),
    (torch.zeros(2, 3, 48, 48), "images must be 32x32"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "images must be a floating tensor"),
])
def test_encode_input_errors(tiny_model, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.encode(bad)


def test_decode_input_errors(tiny_model):
    with pytest.raises(ValueError, match=r"latents must be a \(B, 4, 8\) tensor, got \(2, 4, 9\)"):
        tiny_model.decode(torch.zeros(2, 4, 9))
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        tiny_model.decode(torch.zeros(2, 4, 8), max_batch=0)


def test_inputs_of_another_float_dtype_run_in_the_model_dtype(tiny_model):
    x = images(2, 32, seed=4)
    with torch.no_grad():
        latents = tiny_model.encode(x)
        assert torch.equal(tiny_model.encode(x.double()), latents)
        assert torch.equal(tiny_model.decode(latents.half().float()), tiny_model.decode(latents.half()))


def test_max_batch_slices_identically(tiny_model):
    x = images(5, 32, seed=3)
    with torch.no_grad():
        full = tiny_model.encode(x)
        assert rel_err(tiny_model.encode(x, max_batch=2), full) <= 1e-5  # GEMM blocking varies with batch
        assert rel_err(tiny_model.decode(full, max_batch=2), tiny_model.decode(full)) <= 1e-5


# bf16 and CUDA accuracy, on sharp attention (support.sharp_models): the reference vectors'
# attention is nearly flat, so at bf16 tolerances they cannot tell attention from its mutants.


@pytest.fixture(scope="module")
def sharp():
    """(the tiny sharp tokenizer, its float64 copy)."""
    model = tiny_tokenizer()
    return model, float64_copy(model)


def tokenizer_errors(encode: Callable, decode: Callable, model64: SoftVQVAE, images: torch.Tensor,
                     latents: torch.Tensor, device: str = "cpu") -> dict[str, float]:
    """Relative errors of encode(images) and decode(latents), run on `device`, against the float64
    evaluation."""
    with torch.no_grad(), float64_evaluation():
        encoded64, decoded64 = model64.encode(images.double()), model64.decode(latents.double())
    with torch.no_grad():
        encoded, decoded = encode(images.to(device)), decode(latents.to(device))
    assert encoded.dtype == decoded.dtype == torch.float32
    return {"encode": rel_err(encoded, encoded64), "decode": rel_err(decoded, decoded64)}


def _tokenizer_under_test(sharp, precision: str, device: str = "cpu", backend: str = "auto"):
    """(encode, decode) of a copy of the sharp tokenizer: precision "autocast" (float32 weights
    under bf16 autocast), "bf16" (bf16 weights) or "float32"."""
    model = copy.deepcopy(sharp[0]).to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    model.set_backends(attention=backend)
    autocast = torch.bfloat16 if precision == "autocast" else None
    return functools.partial(model.encode, autocast_dtype=autocast), functools.partial(model.decode, autocast_dtype=autocast)


def _sharp_inputs(sharp) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random images and two latents (independent, so that every latent token differs
    between the samples) of the tiny sharp tokenizer."""
    config = sharp[0].config
    images_ = torch.rand(2, 3, config.image_size, config.image_size) * 2 - 1
    latents = torch.randn(2, config.num_latent_tokens, config.codebook_embed_dim) * config.codebook_embed_dim**-0.5
    return images_, latents


@pytest.mark.parametrize("device, backend", device_backends())
@pytest.mark.parametrize("precision", ["autocast", "bf16", "float32"])
def test_matches_float64_on_sharp_attention(sharp, precision, device, backend):
    with skip_if_backend_cannot_run(backend):
        errors = tokenizer_errors(*_tokenizer_under_test(sharp, precision, device, backend), sharp[1], *_sharp_inputs(sharp), device)
    report(f"tokenizer {device} {precision} {backend}", errors)
    assert max(errors.values()) <= tolerance(precision), errors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutant", list(MUTANTS))
@pytest.mark.parametrize("precision", ["autocast", "bf16"])
def test_bf16_check_fails_on_attention_mutants(sharp, precision, mutant, device, monkeypatch):
    inject_mutant(monkeypatch, mutant)
    errors = tokenizer_errors(*_tokenizer_under_test(sharp, precision, device), sharp[1], *_sharp_inputs(sharp), device)
    report(f"tokenizer {device} {precision} mutant {mutant}", errors)
    assert min(errors.values()) > BF16_TOL, errors


@pytest.mark.cuda
def test_cuda_compiled_bf16_matches_float64_on_sharp_attention(sharp):
    encode, decode = _tokenizer_under_test(sharp, "autocast", "cuda")
    compiled = (torch.compile(lambda x: encode(x), fullgraph=True), torch.compile(lambda z: decode(z), fullgraph=True))
    errors = tokenizer_errors(*compiled, sharp[1], *_sharp_inputs(sharp), "cuda")
    report("tokenizer cuda compiled autocast", errors)
    assert max(errors.values()) <= BF16_TOL, errors


def test_normalize_round_trip(reference):
    model, expected = reference
    z = expected["latents"]
    assert torch.allclose(model.normalize_latents(z), (z - 0.01) / 0.5)
    assert torch.allclose(model.denormalize_latents(model.normalize_latents(z)), z, atol=1e-7)


def test_gradients_match_math_backends(tiny_model):
    x = images(2, 32, seed=5)

    def grads(attention: str, soft_vq: str) -> list[torch.Tensor]:
        tiny_model.set_backends(attention=attention, soft_vq=soft_vq)
        tiny_model.zero_grad()
        tiny_model(x).square().mean().backward()
        return [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]

    ours, reference = grads("auto", "auto"), grads("math", "reference")
    tiny_model.set_backends(attention="auto", soft_vq="auto")
    tiny_model.zero_grad()
    assert len(ours) == len(reference) > 20
    for a, b in zip(ours, reference):
        assert rel_err(a, b) <= 1e-4


def test_torch_compile_fullgraph(tiny_model):
    x = images(2, 32, seed=7)

    def round_trip(images_: torch.Tensor) -> torch.Tensor:
        return tiny_model.decode(tiny_model.encode(images_))

    compiled = torch.compile(round_trip, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), round_trip(x)) <= 1e-5


def test_presets_have_released_sizes():
    widths = {}
    for name, config in PRESETS.items():
        with torch.device("meta"):
            model = SoftVQVAE(config)
        grid = config.image_size // 16
        assert model.encoder.model.pos_embed.shape[1] == grid * grid + 1
        assert model.config.num_latent_tokens == int(name.split("-")[2])
        widths[name] = (model.encoder.model.pos_embed.shape[-1], model.decoder.model.pos_embed.shape[-1])
    assert widths["softvq-s-32"] == (384, 384)
    assert widths["softvq-b-64"] == (768, 768)
    assert widths["softvq-bl-64-512"] == (768, 1024)
    assert widths["softvq-l-32-512"] == (1024, 1024)
    with pytest.raises(ValueError, match="unknown preset 'softvq-xl-32'"):
        SoftVQVAE.from_preset("softvq-xl-32")


def test_from_pretrained_dtype(reference_dir):
    model = SoftVQVAE.from_pretrained(reference_dir / TINY, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.cuda
def test_cuda_conformance(reference_dir):
    model = SoftVQVAE.from_pretrained(reference_dir / TINY, device="cuda")
    expected = {k: v.cuda() for k, v in load_file(str(reference_dir / TINY / "expected.safetensors")).items()}
    with torch.no_grad():
        assert rel_err(model.encode(expected["images"]), expected["latents"]) <= 1e-5
        assert rel_err(model.decode(expected["latents"]), expected["reconstruction"]) <= 1e-5


def test_giant_uses_packed_swiglu():
    from softvq_fast.models.config import vit_spec
    from softvq_fast.models.vit import SwiGLU

    spec = vit_spec("vit_giant_patch14_reg4_dinov2.lvd142m")
    assert (spec.width, spec.depth, spec.heads, spec.reg_tokens) == (1536, 40, 24, 4)
    with torch.device("meta"):
        state = SoftVQVAE(tiny_config(encoder_model="vit_giant_patch14_dinov2.lvd142m")).state_dict()
    assert state["encoder.model.blocks.0.mlp.fc1.weight"].shape == (8192, 1536)
    assert state["encoder.model.blocks.0.mlp.fc2.weight"].shape == (1536, 4096)
    torch.manual_seed(0)
    mlp, x = SwiGLU(6, 8).double(), torch.randn(3, 6, dtype=torch.float64)
    hidden = x @ mlp.fc1.weight.T + mlp.fc1.bias
    expected = (torch.nn.functional.silu(hidden[:, :4]) * hidden[:, 4:]) @ mlp.fc2.weight.T + mlp.fc2.bias
    assert rel_err(mlp(x), expected) <= 1e-12


def test_feed_forward_without_autograd_matches_the_autograd_path():
    # Without autograd the MLPs apply their activation in place (no new activation tensors).
    from softvq_fast.models.vit import SwiGLU
    from softvq_fast.nn.transformer import Mlp

    torch.manual_seed(0)
    for module in (Mlp(16, 40), Mlp(16, 40, approximate="tanh"), SwiGLU(16, 40)):
        x = torch.randn(2, 5, 16)
        kept = x.clone()
        want = module(x)
        assert want.requires_grad
        with torch.inference_mode():
            got = module(x)
        with torch.no_grad():
            got_no_grad = module(x)
        assert torch.equal(got, want.detach()) and torch.equal(got_no_grad, want.detach()) and torch.equal(x, kept)


def test_mixed_rope_is_applied_in_both_vits():
    torch.manual_seed(2)
    model = SoftVQVAE(tiny_config(use_rope=True, rope_mixed=True))
    x = images(2, 32, seed=9)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):  # 1e-5 at init would hide the attention branch
                param.fill_(1.0)
        latents, recon = model.encode(x), model.decode(model.encode(x))
        for vit in (model.encoder, model.decoder):
            vit.freqs.zero_()  # rotation by angle 0: the identity
        assert rel_err(model.encode(x), latents) > 1e-4
        assert rel_err(model.decode(latents), recon) > 1e-4
