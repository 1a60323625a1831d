"""SiT / DiT: the authors' conformance vectors, checkpoint key layout, 2-D mode, positions,
guidance, loading errors, bf16 and torch.compile."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil

import pytest
import torch

from support.numerics import rel_err
from support.onednn import needs_onednn
from support.sharp_models import (BF16_TOL, DEVICES, MUTANTS, device_backends, float64_copy, float64_evaluation,
                                  inject_mutant, report, skip_if_backend_cannot_run, tiny_generator, tolerance)
from safetensors.torch import load_file

from softvq_fast.generation import DIT_TIME_SCALE
from softvq_fast.models import DiT, SiT
from softvq_fast.models.adaln_transformer import AdaLNTransformer
from softvq_fast.models.checkpoint import CheckpointError
from softvq_fast.models.positions import sincos_1d, sincos_2d


def _vectors(reference_dir, name):
    directory = reference_dir / "vectors" / name
    return directory, load_file(str(directory / "expected.safetensors"))


@pytest.mark.parametrize("linear", [
    "torch", pytest.param("onednn", marks=needs_onednn),
])
@pytest.mark.parametrize("cls, name", [(SiT, "sit_tiny"), (DiT, "dit_tiny")])
def test_conformance_vectors(reference_dir, cls, name, linear, onednn_calls):
    directory, expected = _vectors(reference_dir, name)
    model = cls.from_pretrained(directory).set_backends(linear=linear)
    with torch.no_grad():
        out = model(expected["x"], expected["t"], expected["y"])
    assert out.shape == expected["output"].shape
    assert rel_err(out, expected["output"]) <= 1e-5
    if linear == "onednn":
        onednn_calls.expect_every_linear_of(model)


def test_conformance_with_the_fused_triton_layernorm(reference_dir):
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    directory, expected = _vectors(reference_dir, "sit_tiny")
    model = SiT.from_pretrained(directory, device=device).set_backends(layernorm_modulate="triton")
    with torch.no_grad():
        out = model(*(expected[k].to(device) for k in ("x", "t", "y")))
    assert rel_err(out, expected["output"]) <= 1e-5


def test_sit_xl1_key_layout_matches_the_authors_checkpoint(reference_dir):
    layout = json.loads((reference_dir / "authors_checkpoint_layout.json").read_text())["sit-xl-1_64tokens_32ch"]
    with torch.device("meta"):
        model = SiT.from_preset("SiT-XL/1", input_size=64, in_channels=32, vae_1d=True)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == layout["state_dict"]


def test_release_config_fields_are_accepted(reference_dir):
    config = json.loads((reference_dir / "vectors" / "sit_tiny" / "config.json").read_text())
    model = SiT.from_pretrained(reference_dir / "vectors" / "sit_tiny")
    assert model.path_type == config["path_type"] and model.use_cfg == config["use_cfg"]
    assert model.null_class == config["num_classes"]


# bf16 and CUDA accuracy, on sharp attention (support.sharp_models): the reference vectors'
# attention is nearly flat, so at bf16 tolerances they cannot tell attention from its mutants.
FAMILIES = {"sit": SiT, "dit": DiT}
CFG_SCALE = 2.5


@pytest.fixture(scope="module")
def sharp():
    """{family: (the tiny sharp generator, its float64 copy)}."""
    models = {name: tiny_generator(cls) for name, cls in FAMILIES.items()}
    return {name: (model, float64_copy(model)) for name, model in models.items()}


def generator_errors(model: AdaLNTransformer, model64: AdaLNTransformer, x: torch.Tensor, t: torch.Tensor,
                     y: torch.Tensor, autocast: bool = False) -> dict[str, float]:
    """Relative errors of forward(x, t, y) and forward_with_cfg(x, t, y, CFG_SCALE), run on the
    model's device and dtype (under bf16 autocast if asked), against the float64 evaluation."""
    with torch.no_grad(), float64_evaluation():
        expected = model64(x.double(), t, y), model64.forward_with_cfg(x.double(), t, y, CFG_SCALE)
    parameter = next(model.parameters())
    x, t, y = x.to(parameter.device, parameter.dtype), t.to(parameter.device), y.to(parameter.device)
    with torch.no_grad(), torch.autocast(parameter.device.type, dtype=torch.bfloat16, enabled=autocast):
        got = model(x, t, y), model.forward_with_cfg(x, t, y, CFG_SCALE)
    return {name: rel_err(out, ref) for name, out, ref in zip(("forward", "forward_with_cfg"), got, expected)}


def _generator_under_test(sharp, family: str, precision: str, device: str = "cpu", backend: str = "auto"):
    """(a copy of the sharp generator, its inputs x, t, y, autocast): precision "autocast"
    (float32 weights under bf16 autocast), "bf16" (bf16 weights) or "float32"."""
    model = copy.deepcopy(sharp[family][0]).to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    model.set_backends(attention=backend)
    x = torch.randn(3, *model.latent_shape)
    t = torch.rand(3) * (DIT_TIME_SCALE if family == "dit" else 1.0)
    y = torch.randint(0, model.y_embedder.num_classes, (3,))
    return model, x, t, y, precision == "autocast"


@pytest.mark.parametrize("device, backend", device_backends())
@pytest.mark.parametrize("precision", ["autocast", "bf16", "float32"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_float64_on_sharp_attention(sharp, family, precision, device, backend):
    model, *inputs = _generator_under_test(sharp, family, precision, device, backend)
    with skip_if_backend_cannot_run(backend):
        errors = generator_errors(model, sharp[family][1], *inputs)
    report(f"{family} {device} {precision} {backend}", errors)
    assert max(errors.values()) <= tolerance(precision), errors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutant", list(MUTANTS))
@pytest.mark.parametrize("precision", ["autocast", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_check_fails_on_attention_mutants(sharp, family, precision, mutant, device, monkeypatch):
    inject_mutant(monkeypatch, mutant)
    model, *inputs = _generator_under_test(sharp, family, precision, device)
    errors = generator_errors(model, sharp[family][1], *inputs)
    report(f"{family} {device} {precision} mutant {mutant}", errors)
    assert min(errors.values()) > BF16_TOL, errors


def test_forward_compiles_with_fullgraph(reference_dir):
    directory, expected = _vectors(reference_dir, "dit_tiny")
    model = DiT.from_pretrained(directory)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(expected["x"], expected["t"], expected["y"])
    assert rel_err(out, expected["output"]) <= 1e-5


def _randomised(model):
    torch.manual_seed(0)
    for p in model.parameters():  # adaLN-Zero initialises the output to zero
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_2d_latents_patchify_and_unpatchify():
    model = _randomised(SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=2, num_classes=3))
    assert model.num_tokens == 16 and model.channel_dim == 1
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        assert model(x, t, y).shape == (2, 4, 8, 8)
    # unpatchify inverts the row-major patch order of the patch embedding
    image = torch.randn(2, 4, 8, 8)
    tokens = image.reshape(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 2 * 2 * 4)
    torch.testing.assert_close(model._unpatchify(tokens), image, rtol=0, atol=0)
    fresh = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=2, num_classes=3)
    torch.testing.assert_close(fresh.pos_embed[0], sincos_2d(4, 64))


def test_position_tables():
    table = sincos_1d(5, 8)
    torch.testing.assert_close(table[3, 0:2], torch.tensor([math.sin(3.0), math.cos(3.0)]))
    torch.testing.assert_close(table[3, 2:4], torch.tensor([math.sin(0.3), math.cos(0.3)]))
    grid = sincos_2d(3, 8)
    row, column = 2, 1
    torch.testing.assert_close(grid[row * 3 + column, [0, 2]], torch.tensor([math.sin(column), math.cos(column)]))
    torch.testing.assert_close(grid[row * 3 + column, [4, 6]], torch.tensor([math.sin(row), math.cos(row)]))


def test_dit_guidance_keeps_the_conditional_variance():
    model = _randomised(DiT(input_size=5, in_channels=3, hidden_size=64, depth=1, num_heads=2, num_classes=4, vae_1d=True))
    x, t, y = torch.randn(2, 5, 3), torch.tensor([10.0, 900.0]), torch.tensor([1, 2])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 4))
        guided = model.forward_with_cfg(x, t, y, 3.0)
    assert guided.shape == (2, 5, 6)
    assert rel_err(guided[..., :3], uncond[..., :3] + 3.0 * (cond[..., :3] - uncond[..., :3])) <= 1e-5
    assert rel_err(guided[..., 3:], cond[..., 3:]) <= 1e-6


def test_bad_inputs_and_configs_are_named():
    model = SiT(input_size=4, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3, vae_1d=True)
    with pytest.raises(ValueError, match=r"x must be \(B, tokens, channels\) = \(B, 4, 2\)"):
        model(torch.zeros(1, 5, 2), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"t must have shape \(1,\)"):
        model(torch.zeros(1, 4, 2), torch.zeros(2), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="decoder_hidden_size=64 must equal hidden_size=32"):
        SiT(hidden_size=32, decoder_hidden_size=64, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="no null class"):
        SiT(input_size=4, in_channels=2, hidden_size=32, depth=1, num_heads=2, class_dropout_prob=0.0).null_class
    with pytest.raises(ValueError, match="unknown generator preset 'SiT-XXL/2'"):
        SiT.from_preset("SiT-XXL/2")
    with pytest.raises(ValueError, match="is a DiT, not a SiT"):
        SiT.from_preset("DiT-B/2")


def test_checkpoint_errors_name_the_keys(reference_dir, tmp_path):
    source = reference_dir / "vectors" / "sit_tiny"
    shutil.copy(source / "config.json", tmp_path / "config.json")
    state = load_file(str(source / "model.safetensors"))
    state["blocks.0.extra.weight"] = state.pop("blocks.1.mlp.fc2.bias")
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias.*unexpected keys: blocks\.0\.extra\.weight"):
        SiT.from_pretrained(tmp_path)
    config = json.loads((source / "config.json").read_text())
    config["hidden_sizee"] = 10
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hidden_sizee"):
        SiT.from_pretrained(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="config.json: not found"):
        DiT.from_pretrained(tmp_path)


def test_dit_noise_schedule_defaults_and_sampling_follows_it(monkeypatch):
    """The authors' SoftVQ DiTs (1-D tokens) train on the cosine schedule and their configs do not
    record it: a DiT without noise_schedule takes cosine on 1-D tokens, linear on 2-D latents, and
    sampling runs on the model's schedule."""
    import softvq_fast.generation as generation
    from softvq_fast.models.fields import FieldError

    tiny = dict(depth=1, hidden_size=32, num_heads=2, num_classes=3)
    one_d = DiT(input_size=4, in_channels=2, vae_1d=True, **tiny)
    assert one_d.noise_schedule == "cosine"
    assert DiT(input_size=4, in_channels=2, patch_size=2, **tiny).noise_schedule == "linear"
    assert DiT(input_size=4, in_channels=2, vae_1d=True, noise_schedule="linear", **tiny).noise_schedule == "linear"
    with pytest.raises(FieldError, match="noise_schedule"):
        DiT(input_size=4, in_channels=2, vae_1d=True, noise_schedule="sigmoid", **tiny)
    seen = []
    original = generation.sample_diffusion
    monkeypatch.setattr(generation, "sample_diffusion",
                        lambda *a, **k: seen.append(k["noise_schedule"]) or original(*a, **k))
    generation.sample_latents(one_d, torch.tensor([0, 2]), steps=2)
    assert seen == ["cosine"]
