"""Activation checkpointing of the tokenizer's ViT blocks (SoftVQVAE.set_activation_checkpointing,
train-tokenizer --activation-checkpointing): the same gradients as without it, drop path's draws
included, also under DistributedDataParallel; every block recomputed in the backward and far
fewer tensors kept by the forward; inference untouched; the command-line flag reaches the model
and a resumed run may change it."""
from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from softvq_fast import cli
from softvq_fast.models import SoftVQVAE
from softvq_fast.models.vit import Block
from softvq_fast.training.tokenizer import load_networks, model_source, run_config
from softvq_fast.training.tokenizer_model import tokenizer_for_training
from softvq_fast.training.tokenizer_step import StepDraws
from support.numerics import rel_err
from support.sharp_models import TOKENIZER_QK_GAIN, sharpen
from support.tokenizer_runs import write_config
from support.tokenizer_training import tiny_training_config

# Recomputation runs the same kernels on the same inputs: equal up to float32 reassociation at most.
GRAD_TOL = 1e-6
DROP_PATH = dict(enc_drop_path_rate=0.5, dec_drop_path_rate=0.5)


def _model(seed: int, **overrides) -> SoftVQVAE:
    """The tiny training tokenizer at tau 0.5 with O(1) residual branches (every block counts)."""
    return sharpen(tokenizer_for_training(tiny_training_config(tau=0.5, **overrides), seed=seed), seed,
                   TOKENIZER_QK_GAIN)


def _images(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gradients(model: torch.nn.Module, images: torch.Tensor, seed: int,
               autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The gradients of a loss over every training output, drop path drawn from StepDraws(seed)."""
    draws = StepDraws.seeded(seed, 1, 0, 0).drop_path()
    out = model(images, training_outputs=True, draws=draws, autocast_dtype=autocast_dtype)
    loss = out.reconstructions.square().mean() + out.entropy_loss + out.latents.sum() + out.projected.square().mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys() and len(got) > 40
    errors = {name: rel_err(got[name], expected[name]) for name in expected}
    assert max(errors.values()) <= GRAD_TOL, max(errors.items(), key=lambda item: item[1])


@pytest.mark.parametrize("overrides, autocast_dtype", [
    ({}, None), (DROP_PATH, None), ({**DROP_PATH, "use_rope": True, "rope_mixed": True}, None),
    (DROP_PATH, torch.bfloat16),
], ids=["plain", "drop_path", "drop_path_mixed_rope", "drop_path_bf16_autocast"])
def test_gradients_equal_those_without_checkpointing(overrides, autocast_dtype, seed):
    model, images = _model(seed, **overrides), _images(4, seed)
    expected = _gradients(model, images, seed, autocast_dtype)
    model.set_activation_checkpointing(True)
    _assert_same_gradients(_gradients(model, images, seed, autocast_dtype), expected)
    if overrides:  # drop path draws: another generator state gives other gradients
        assert any(not torch.equal(a, b) for a, b in zip(_gradients(model, images, seed + 1, autocast_dtype).values(),
                                                          expected.values()))


@contextlib.contextmanager
def _recorded(model: SoftVQVAE):
    """Counts of the blocks' attention calls in the forward and in the backward, and the bytes of
    the tensors autograd keeps during the forward."""
    record = SimpleNamespace(forward=0, backward=0, saved_bytes=0, in_backward=False)

    def count(*_):
        if record.in_backward:
            record.backward += 1
        else:
            record.forward += 1

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    handles = [block.attn.register_forward_hook(count) for block in blocks]
    try:
        yield record, len(blocks)
    finally:
        for handle in handles:
            handle.remove()


def _forward_backward(model: SoftVQVAE, images: torch.Tensor, record) -> None:
    def keep(tensor: torch.Tensor) -> torch.Tensor:
        record.saved_bytes += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = model.training_forward(images)
    record.in_backward = True
    (out.reconstructions.square().mean() + out.entropy_loss).backward()
    record.in_backward = False


def test_blocks_are_recomputed_in_the_backward_and_keep_less(seed):
    model, images = _model(seed, **DROP_PATH), _images(4, seed)
    records = {}
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        with _recorded(model) as (record, blocks):
            _forward_backward(model, images, record)
        records[enabled] = record
        assert record.forward == blocks == 4
    assert records[False].backward == 0 and records[True].backward == 4  # each block once more
    # The ViTs' intermediates dominate what the forward keeps; with checkpointing only the blocks'
    # inputs (and the drop-path scales) remain of them.
    assert records[True].saved_bytes < 0.5 * records[False].saved_bytes, (records[True].saved_bytes,
                                                                          records[False].saved_bytes)


def test_inference_and_no_grad_forwards_do_not_checkpoint(seed, monkeypatch):
    import softvq_fast.models.vit as vit

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint called outside a training forward with grad")

    model, images = _model(seed), _images(2, seed)
    with torch.no_grad():
        plain = model.eval().encode(images), model.train().training_forward(images).reconstructions
    model.set_activation_checkpointing(True)
    monkeypatch.setattr(vit, "checkpoint", refuse)
    with torch.no_grad():
        assert torch.equal(model.eval().encode(images), plain[0])
        assert torch.equal(model.train().training_forward(images).reconstructions, plain[1])
    with pytest.raises(AssertionError, match="checkpoint called"):  # the hook is the one in use
        model.training_forward(images)
    with pytest.raises(ValueError, match="enabled must be a bool, got 1"):
        model.set_activation_checkpointing(1)


def test_gradients_under_distributed_data_parallel(seed):
    model, images = _model(seed, **DROP_PATH), _images(4, seed)
    expected = _gradients(model, images, seed)
    model.set_activation_checkpointing(True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model, gradient_as_bucket_view=True)  # as the trainer wraps it
        got = _gradients(wrapped, images, seed)
    finally:
        dist.destroy_process_group()
    _assert_same_gradients({name.removeprefix("module."): g for name, g in got.items()}, expected)


def test_the_flag_reaches_the_model_and_a_resumed_run_may_change_it(tmp_path):
    from softvq_fast.commands.train_tokenizer import config_from_args

    parser = cli.build_parser()

    def config_of(config_file: Path, *options: str):
        return config_from_args(parser.parse_args(["train-tokenizer", "--images", str(tmp_path), "--config",
                                                   str(config_file), "--out", str(tmp_path / "run"), *options]))

    source = write_config(tmp_path / "config.yaml", model={"enc_pretrained": False},
                          losses={"perceptual_weight": 0.0, "adversarial_weight": 0.0, "alignment_weight": 0.0})
    flags = {}
    for options in ((), ("--activation-checkpointing",)):
        config = config_of(source, *options)
        networks = load_networks(config, model_source(config))
        flags[config.activation_checkpointing] = {block.checkpoint_activations
                                                  for block in networks.tokenizer.modules() if isinstance(block, Block)}
        # config.json (what a resumed run must match) leaves it out; config.yaml keeps it
        assert "activation_checkpointing" not in run_config(config, config, networks,
                                                            SimpleNamespace(identity=dict))["training"]
        assert f"activation_checkpointing: {str(config.activation_checkpointing).lower()}" in config.to_yaml()
    assert flags == {False: {False}, True: {True}}
    on_in_file = write_config(tmp_path / "on.yaml", training={"activation_checkpointing": True})
    assert config_of(on_in_file).activation_checkpointing
    assert not config_of(on_in_file, "--no-activation-checkpointing").activation_checkpointing
    with pytest.raises(ValueError, match="activation_checkpointing must be"):
        config.__class__(images=Path("."), out=Path("."), activation_checkpointing="yes").check()
