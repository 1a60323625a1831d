"""Each benchmark suite's plumbing at tiny shapes with a fake timer: the rows it produces, its
baseline row and speed-ups, and its error columns (no timed assertions)."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.utils import flop_counter

from bench import measure
from bench.harness import Context
from bench.plain_models import PlainSiT, plain_copy
from bench.suites import (attention, layernorm_modulate, linear, lpips_distance, softvq, tokenizer, tokenizer_train,
                          train)
from bench.training_check import NotTheSameFunction, largest_fitting_batch, make_every_layer_count
from softvq_fast.models import SiT, SoftVQVAE, adaln_transformer
from softvq_fast.models.vit import Block, PatchEmbed
from softvq_fast.nn.linear import Linear
from softvq_fast.nn.transformer import Attention, Mlp
from softvq_fast.training.discriminator import DinoDiscriminator
from softvq_fast.training.frozen import DinoViTS16, FrozenDINOv2
from softvq_fast.training.tokenizer_model import tokenizer_for_training
from support.numerics import rel_err
from support.tokenizer_training import tiny_training_config


def _fake_round_robin(fns, device, *, rounds, **kwargs):
    """Runs each workload once; row i of the table takes i + 1 ms."""
    for fn in fns.values():
        fn()
    return {label: [float(index + 1)] * rounds for index, label in enumerate(fns)}


@pytest.fixture
def ctx(tmp_path):
    return Context(device=torch.device("cpu"), quick=True, out_dir=str(tmp_path), suite="test")


def _groups(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def _check_baselines(rows: list[dict], keys: tuple[str, ...], is_baseline) -> None:
    """One baseline row per group, the fastest accepted one, and every speed-up divides its time."""
    for members in _groups(rows, keys).values():
        (base,) = [row for row in members if row["baseline"] == "yes"]
        assert is_baseline(base) and base["median_ms"] == min(r["median_ms"] for r in members if is_baseline(r))
        for row in members:
            assert row["speedup"] == base["median_ms"] / row["median_ms"]


def test_attention_suite(ctx, monkeypatch):
    monkeypatch.setattr(measure, "time_round_robin", _fake_round_robin)
    monkeypatch.setattr(attention, "cases", lambda quick: [("generator", 2, 17, 72), ("tokenizer", 1, 33, 64)])
    rows = attention.run(ctx)
    assert [(r["S"], r["pass"], r["backend"], r["via"]) for r in rows] == [
        (seq, pass_name, backend, via)
        for seq in (17, 33) for pass_name in ("fwd", "fwd+bwd")
        for backend, via in (("softvq", "softvq_fast"), ("sdpa", "softvq_fast"), ("sdpa", "direct"))
    ]
    _check_baselines(rows, ("case", "S", "D", "pass"), lambda row: row["via"] == "direct")
    assert all(row["rel_err"] < 1e-5 and row["peak_mib"] >= 0 for row in rows)
    assert len({tuple(r) for r in rows}) == 1


def test_linear_suite(ctx, monkeypatch):
    monkeypatch.setattr(linear, "time_round_robin", _fake_round_robin)
    monkeypatch.setattr(linear, "SHAPES", [("a", 5, 80, 48, "none"), ("b", 3, 16, 24, "gelu_tanh")])
    rows = linear.run(ctx)
    assert {(r["backend"], r["via"]) for r in rows} >= {("torch", "softvq_fast"), ("torch", "direct")}
    _check_baselines(rows, ("case",), lambda row: row["via"] == "direct")
    assert all(row["rel_err"] < 1e-5 and row["auto"] in ("onednn", "torch") for row in rows)


def test_layernorm_modulate_suite(ctx, monkeypatch):
    monkeypatch.setattr(measure, "time_round_robin", _fake_round_robin)
    monkeypatch.setattr(layernorm_modulate, "QUICK", [("SiT-S", 2, 5, 40)])
    rows = layernorm_modulate.run(ctx)
    # conftest runs Triton in its interpreter without a GPU: the fused kernels get rows too
    assert [(r["pass"], r["backend"], r["via"]) for r in rows] == [
        (pass_name, backend, via) for pass_name in ("fwd", "fwd+bwd")
        for backend, via in (("triton", "softvq_fast"), ("reference", "softvq_fast"), ("torch", "direct"))
    ]
    _check_baselines(rows, ("case", "B", "S", "D", "pass"), lambda row: row["via"] == "direct")
    assert all(row["rel_err"] < 1e-5 for row in rows)
    assert any(note.startswith("CPU: the fused Triton kernels") for note in ctx.notes)


def test_lpips_distance_suite(ctx, monkeypatch):
    monkeypatch.setattr(measure, "time_round_robin", _fake_round_robin)
    monkeypatch.setattr(lpips_distance, "LAYERS", [("relu1_2", 5, 9), ("relu5_3", 7, 3)])
    monkeypatch.setattr(lpips_distance, "QUICK_BATCH", 1)
    rows = lpips_distance.run(ctx)
    # conftest runs Triton in its interpreter without a GPU: the fused kernels get rows too
    assert [(r["case"], r["pass"], r["backend"], r["via"]) for r in rows] == [
        (layer, pass_name, backend, via) for layer in ("relu1_2", "relu5_3") for pass_name in ("fwd", "fwd+bwd")
        for backend, via in (("reference", "softvq_fast"), ("cpu", "softvq_fast"), ("triton", "softvq_fast"),
                             ("torch", "direct"))
    ]
    _check_baselines(rows, ("case", "B", "pass"), lambda row: row["via"] == "direct" and row["backend"] == "torch")
    assert all(row["rel_err"] < 1e-5 for row in rows)


def test_softvq_suite(ctx, monkeypatch):
    monkeypatch.setattr(measure, "time_round_robin", _fake_round_robin)
    monkeypatch.setattr(softvq, "QUICK", {"main": (2, 48), "sweep": [(1, 24)]})
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the plumbing, not the compiler
    rows = softvq.run(ctx)
    assert [(r["case"].split()[2], r["pass"]) for r in rows[:9:3]] == [
        ("K48", "fwd"), ("K48", "fwd+stats"), ("K48", "fwd+bwd")]
    assert [r["backend"] for r in rows[:3]] == ["reference", "cpu", "compile(reference)"]
    assert [(r["pass"], r["backend"]) for r in rows[9:]] == [
        ("fwd+stats", "reference"), ("fwd+stats", "cpu"), ("fwd+bwd", "reference"), ("fwd+bwd", "cpu")]
    _check_baselines(rows, ("case", "pass"), lambda row: row["backend"] == "reference")
    assert all(row["memory_vs_baseline"] >= 0 and row["x_exp_limit"] == "" for row in rows)


def test_tokenizer_suite(ctx, monkeypatch, reference_dir):
    class TinyPresets:
        @staticmethod
        def from_preset(name):
            return SoftVQVAE.from_pretrained(reference_dir / "vectors" / "tokenizer_tiny")

    monkeypatch.setattr(measure, "time_round_robin", _fake_round_robin)
    monkeypatch.setattr(tokenizer, "SoftVQVAE", TinyPresets)
    monkeypatch.setattr(tokenizer, "QUICK", [("tiny", 2)])
    monkeypatch.setattr(tokenizer, "PROFILED_RUNS", 1)
    rows = tokenizer.run(ctx)
    assert [(r["pass"], r["backend"]) for r in rows] == [
        (pass_name, label) for pass_name in ("encode", "decode")
        for label in ("auto", "auto, torch linear", "plain PyTorch")]
    _check_baselines(rows, ("case", "precision", "pass"), lambda row: row["backend"].startswith("plain PyTorch"))
    assert rows[0]["speedup"] == 3.0  # fake times: auto 1 ms, plain 3 ms
    assert all(row["rel_err_vs_math"] < 1e-5 and math.isfinite(row["images_per_s"]) for row in rows)
    assert all(row["rel_err_vs_math"] > 0 for row in rows if row["backend"] == "auto")  # other kernels than math's
    assert any("on plain PyTorch" in note for note in ctx.notes)  # the time split
    assert any("auto vs the baseline: median 2 vs 6 ms (3.00x)" in note for note in ctx.notes)


# ------------------------------------------------------------------------------ training suites
TINY_SIT = (2, 48, 2)  # depth, hidden, heads of "SiT-S" in the training suites' tests


def _train_cases():
    return [train.Case("SiT-S/1", train._tokens(9, 6), 3),
            train.Case("SiT-S/2", {"input_size": 6, "in_channels": 4}, 2, sd_vae=True)]


def test_train_suite(ctx, monkeypatch):
    monkeypatch.setattr(measure, "time_round_robin", _fake_round_robin)
    monkeypatch.setitem(adaln_transformer.SIZES, "S", TINY_SIT)
    monkeypatch.setattr(train, "QUICK", _train_cases())
    rows = train.run(ctx)
    assert [(r["case"], r["tokens"], r["batch"], r["backend"]) for r in rows] == [
        (case, tokens, batch, stack) for case, tokens, batch in (("SiT-S/1 on 9 x 6 tokens", 9, 3),
                                                                 ("SiT-S/2 on 6x6x4 latents", 9, 2))
        for stack in ("ours", "plain PyTorch")]
    _check_baselines(rows, ("case",), lambda row: row["backend"] == "plain PyTorch")
    assert all(row["loss_rel_err"] <= 1e-5 and row["grad_rel_err"] <= 1e-4 for row in rows)
    # fake times: ours 1 ms, plain 2 ms per iteration
    assert [row["speedup"] for row in rows] == [2.0, 1.0, 2.0, 1.0]
    sd_vae = rows[2:]
    assert all(row["x_vs_sd_vae"] == row["ideal_x"] == row["eff"] == 1.0 for row in sd_vae)
    for row, base in zip(rows[:2], sd_vae):
        assert row["x_vs_sd_vae"] == pytest.approx(row["batch"] / base["batch"])  # equal times per iteration
        assert row["ideal_x"] == pytest.approx(base["gflops_per_sample"] / row["gflops_per_sample"])
        assert row["eff"] == pytest.approx(row["x_vs_sd_vae"] / row["ideal_x"])
    assert any("ours runs attention" in note for note in ctx.notes)


def test_train_suite_counts_the_cpu_attention_backward():
    q, k, v = (torch.randn(2, 3, 17, 8, requires_grad=True) for _ in range(3))
    train.register_training_flop_formulas()
    _, flops = train.counted_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward())
    shape = (2, 3, 17, 8)
    assert flops == flop_counter.sdpa_flop_count(shape, shape, shape) + flop_counter.sdpa_backward_flop_count(
        shape, shape, shape, shape)


class _PlainSiTSkippingItsLastBlock(PlainSiT):
    def __init__(self, of):
        super().__init__(of)
        self.blocks[-1].forward = lambda x, c: x


def test_train_suite_refuses_a_baseline_that_computes_another_function(ctx, monkeypatch):
    monkeypatch.setitem(adaln_transformer.SIZES, "S", TINY_SIT)
    monkeypatch.setattr(train, "QUICK", _train_cases()[:1])
    monkeypatch.setattr(train, "PlainSiT", _PlainSiTSkippingItsLastBlock)
    with pytest.raises(NotTheSameFunction, match="SiT-S/1 on 9 x 6 tokens, batch 3: ours and the plain baseline"):
        train.run(ctx)


def test_train_suite_halves_the_batch_until_it_fits(ctx, monkeypatch):
    ctx.device = torch.device("cuda")  # only the batch search looks at it
    tried = []

    def measure_batch(batch):
        tried.append(batch)
        if batch > 64:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return batch

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert largest_fitting_batch(ctx, 256, measure_batch, "case") == 64 and tried == [256, 128, 64]
    assert ctx.notes == ["case: batch 256 did not fit in GPU memory; tried 128",
                         "case: batch 128 did not fit in GPU memory; tried 64"]


def test_plain_sit_is_the_same_network():
    torch.manual_seed(0)
    ours = SiT(depth=2, hidden_size=48, num_heads=2, input_size=6, in_channels=4, patch_size=2)
    make_every_layer_count(ours, seed=1)
    plain = PlainSiT(ours)
    assert [(n, p.shape) for n, p in plain.named_parameters()] == [(n, p.shape) for n, p in ours.named_parameters()]
    x, t, y = torch.randn(3, 4, 6, 6), torch.rand(3), torch.tensor([1, 5, 999])
    drop = torch.tensor([False, True, False])
    assert rel_err(plain(x, t, y, label_drop=drop), ours(x, t, y, label_drop=drop)) <= 1e-5


def _tiny_tokenizer_suite(monkeypatch):
    """The tiny training tokenizer; a 1-block alignment DINOv2; the discriminator's 1-block trunk
    on 32 px (4 patches) instead of 224 px."""
    config = tiny_training_config(enc_pretrained=False, repa_patch_size=16, num_latent_tokens=4, codebook_size=40)
    monkeypatch.setattr(measure, "time_round_robin", _fake_round_robin)
    monkeypatch.setattr(tokenizer_train, "training_config", lambda preset: config)
    monkeypatch.setattr(tokenizer_train, "FrozenDINOv2", functools.partial(FrozenDINOv2, depth=1))
    monkeypatch.setattr(tokenizer_train, "DISCRIMINATOR_TAPS", (0,))
    monkeypatch.setattr(DinoViTS16, "image_size", 32)
    monkeypatch.setattr(tokenizer_train, "QUICK", [("tiny", 2)])
    monkeypatch.setattr(tokenizer_train, "QUANTIZER_BATCHES", {True: (2, 3)})


def test_tokenizer_train_suite(ctx, monkeypatch):
    _tiny_tokenizer_suite(monkeypatch)
    rows = tokenizer_train.run(ctx)
    quantizer = "quantizer alone: soft VQ fwd+bwd, 4 tokens, 2 x 40 x 8 codes"
    checkpointed = "ours + activation checkpointing"
    assert [(r["case"], r["batch"], r["backend"]) for r in rows] == [
        (case, batch, stack) for case, batch, stacks in (
            (quantizer, 2, ()), (quantizer, 3, ()), ("tiny 32 px, no GAN", 2, (checkpointed,)),
            ("tiny 32 px, GAN", 2, ()))
        for stack in ("ours", "plain PyTorch", *stacks)]
    _check_baselines(rows, ("case", "batch"), lambda row: row["backend"] == "plain PyTorch")
    assert all(row["loss_rel_err"] <= 1e-5 and row["grad_rel_err"] <= 1e-4 for row in rows)
    assert all(row["images_per_s"] == row["batch"] / row["median_ms"] * 1e3 for row in rows)
    shares = [note for note in ctx.notes if note.startswith("Quantizer share")]
    assert shares[0] == "Quantizer share, tiny 32 px, no GAN, batch 2, ours: 1 of 1 ms (100.0%), " + shares[0].split(
        "(100.0%), ")[1]  # fake times: 1 ms for ours everywhere
    assert len(shares) == 4  # both stacks of both iterations at batch 2; none at batch 3
    (trade,) = [note for note in ctx.notes if note.startswith("Activation checkpointing")]
    assert trade.startswith("Activation checkpointing, tiny 32 px, no GAN, batch 2: peak ") and trade.endswith(
        "3.00x ours' time.")  # fake times: 1 ms for ours, 3 ms for the third stack timed


def test_tokenizer_train_checkpointed_stack_is_a_checkpointing_copy_of_ours(monkeypatch):
    _tiny_tokenizer_suite(monkeypatch)
    networks = tokenizer_train.build_networks("tiny", torch.device("cpu"))
    made = tokenizer_train.stacks(networks, gan=False, autocast_dtype=None)
    ours, checkpointed = made["ours"].tokenizer, made["ours + activation checkpointing"].tokenizer
    assert ours is networks.tokenizer and checkpointed is not ours
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), checkpointed.state_dict().values()))
    flags = [{m.checkpoint_activations for m in model.modules() if isinstance(m, Block)}
             for model in (ours, checkpointed)]
    assert flags == [{False}, {True}]
    assert list(tokenizer_train.stacks(networks, gan=True, autocast_dtype=None)) == ["ours", "plain PyTorch"]


def _plain_copy_skipping_the_decoders_last_block(network):
    plain = plain_copy(network)
    if isinstance(network, SoftVQVAE):
        plain.decoder.model.blocks[-1].forward = lambda x, rotate=None, rows=None, draws=None: x[:, rows]
    return plain


def test_tokenizer_train_suite_refuses_a_baseline_that_computes_another_function(ctx, monkeypatch):
    _tiny_tokenizer_suite(monkeypatch)
    monkeypatch.setattr(tokenizer_train, "plain_copy", _plain_copy_skipping_the_decoders_last_block)
    with pytest.raises(NotTheSameFunction, match="tiny 32 px, no GAN, batch 2: ours and the plain baseline"):
        tokenizer_train.run(ctx)


def test_plain_copy_leaves_no_layer_of_ours(reference_dir):
    ours = tokenizer_for_training(tiny_training_config(enc_pretrained=False), seed=0)
    discriminator = DinoDiscriminator(DinoViTS16(depth=2, gelu="tanh").freeze(), taps=(1,))
    for network, modules in ((ours, ours.modules()), (discriminator, discriminator.dino.modules())):
        plain = plain_copy(network)
        inner = plain.dino.modules() if network is discriminator else plain.modules()
        assert not [m for m in inner if isinstance(m, (Attention, Mlp, Linear, Block, PatchEmbed))]
        assert [(n, p.shape) for n, p in plain.named_parameters()] == [
            (n, p.shape) for n, p in network.named_parameters()]
    assert plain_copy(ours).quantize.backend == "reference" and ours.quantize.backend == "auto"
