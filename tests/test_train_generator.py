"""`softvq-fast train-generator` / `train_generator`: it trains (SiT and DiT reach a derived loss
and sample the true class means), resume after SIGKILL is bit-identical, 2 gloo processes (DDP and
FSDP) equal 1, a non-finite loss stops the run, an unwritable checkpoint keeps the previous one,
bad input fails before the first step, and the model runs through our ops with gradients."""
from __future__ import annotations

import errno
import json
import math
import os
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.cli import cli_error
from support.latent_shards import gaussian_classes, write_latent_dataset
from support.numerics import rel_err
from support.tokenizer_files import save_tiny_tokenizer
from support.training_runs import (
    assert_same_state, checkpoint, kill_after_step, one_thread_like_the_subprocesses, run_two_gloo_processes,
    subprocess_env, tensors,
)

from softvq_fast import cli, data
from softvq_fast._extension import extension_available
from softvq_fast.dispatch import NoBackendError
from softvq_fast.generation import load_generator, sample_latents
from softvq_fast.models.fields import FieldError
from softvq_fast.sampling.diffusion import GaussianDiffusion
from softvq_fast.training import loop as training_loop
from softvq_fast.training.generator import (
    FAMILIES, GeneratorTrainingConfig, save_release, slow_backend_warnings, train_generator, training_backends,
)
from softvq_fast.training.loop import NonFiniteLossError, SetupError
from softvq_fast.training.objectives import diffusion_loss, flow_matching_loss, flow_matching_times

TOKENS, CHANNELS, CLASSES = 4, 8, 4  # the tiny tokenizer's latents: 4 tokens of 8 channels
# Pinned so that the in-process runs and the subprocesses take the same kernels whatever the CPU
# rule in force (it depends on the torch thread count, which torchrun sets to 1 per process).
PINNED_BACKENDS = {
    "SOFTVQ_FAST_ATTENTION_BACKEND": "softvq" if extension_available() else "sdpa",
    "SOFTVQ_FAST_LAYERNORM_MODULATE_BACKEND": "reference",
    "SOFTVQ_FAST_LINEAR_BACKEND": "torch",
}


one_thread = one_thread_like_the_subprocesses(PINNED_BACKENDS)


def save_tiny_generator(directory: Path, family: str, *, tokens: int, channels: int, num_classes: int,
                        hidden: int = 32, seed: int = 0) -> None:
    """A random SiT or DiT of 2 blocks, 2 heads on (tokens, channels) latents, in the release layout."""
    arguments = dict(input_size=tokens, in_channels=channels, vae_1d=True, hidden_size=hidden, depth=2, num_heads=2,
                     num_classes=num_classes, patch_size=1)
    torch.manual_seed(seed)
    save_release(directory, family, arguments, FAMILIES[family](**arguments).state_dict())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Latents with flips (3 shards, one unreadable image), a tiny SiT and DiT, a tiny tokenizer."""
    root = tmp_path_factory.mktemp("train")
    rng = torch.Generator().manual_seed(0)
    latents = torch.randn(22, TOKENS, CHANNELS, generator=rng)
    labels = torch.arange(22) % CLASSES
    write_latent_dataset(root / "latents", latents, labels, flips=latents.flip(1), shard_size=8, unreadable=(9,))
    for family in ("SiT", "DiT"):
        save_tiny_generator(root / family, family, tokens=TOKENS, channels=CHANNELS, num_classes=CLASSES)
    save_tiny_tokenizer(root / "tokenizer")
    return root


def _config(files, out, family="SiT", **changes) -> GeneratorTrainingConfig:
    settings = dict(latents=files / "latents", model=str(files / family), out=out, steps=12, global_batch=8,
                    micro_batch=4, lr=1e-3, ema_decay=0.9, checkpoint_every=6, log_every=3, sample_every=0,
                    num_workers=0, progress=False)
    return GeneratorTrainingConfig(**{**settings, **changes})


# ------------------------------------------------------------------------------------ it trains
MEANS_SPREAD, SCALE = 1.5, 0.5  # class c ~ N(means[c], SCALE^2) per element, means[c] ~ N(0, 1.5^2)


@pytest.fixture(scope="module")
def gaussians(tmp_path_factory):
    root = tmp_path_factory.mktemp("gaussians")
    latents, labels, means = gaussian_classes(CLASSES, 64, (TOKENS, CHANNELS), spread=MEANS_SPREAD, scale=SCALE, seed=0)
    write_latent_dataset(root / "latents", latents, labels, shard_size=64)
    return root, means


def _held_out(means, n=1024, seed=1):
    rng = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat(n // CLASSES)
    x = means[labels] + SCALE * torch.randn(n, TOKENS, CHANNELS, generator=rng)
    return x, labels, torch.randn(n, TOKENS, CHANNELS, generator=rng), rng


def flow_matching_floor_and_start(means, t: torch.Tensor) -> tuple[float, float]:
    """Per element, data x ~ N(mu, s^2), noise e ~ N(0, 1), x_t = (1-t) x + t e, target v = e - x:
    (x_t, v) are jointly Gaussian, so the best prediction E[v | x_t] leaves
    Var(v) - Cov(v, x_t)^2 / Var(x_t) = s^2 / ((1-t)^2 s^2 + t^2), the Bayes floor at t. The
    untrained model outputs 0 (adaLN-Zero), so its loss is E[v^2] = 1 + s^2 + mean(mu^2)."""
    s2 = SCALE**2
    return float((s2 / ((1 - t) ** 2 * s2 + t**2)).mean()), 1 + s2 + float(means.square().mean())


def diffusion_floor_and_start(means, t: torch.Tensor, schedule: str) -> tuple[float, float]:
    """x_t = sqrt(abar) x + sqrt(1-abar) e: the best noise prediction E[e | x_t] leaves
    Var(e | x_t) = abar s^2 / (abar s^2 + 1 - abar) per element; the untrained model's 0 leaves E[e^2] = 1."""
    abar = GaussianDiffusion(1000, noise_schedule=schedule).alphas_cumprod[t].double()
    return float((abar * SCALE**2 / (abar * SCALE**2 + 1 - abar)).mean()), 1.0


def _evaluate(model, family, means):
    """(held-out loss, Bayes floor, untrained loss, worst class-mean error, per-class sample stds)."""
    x, labels, noise, rng = _held_out(means)
    model.eval()
    with torch.no_grad():
        if family == "SiT":
            t = flow_matching_times(len(x), generator=rng)
            loss = flow_matching_loss(model, x, labels, t=t, noise=noise).mean().item()
            floor, start = flow_matching_floor_and_start(means, t)
        else:
            t = torch.randint(0, 1000, (len(x),), generator=rng)
            noise_only = lambda x_t, t_, y: model(x_t, t_, y)[..., :CHANNELS]  # the mse term, no variance bound
            # on the schedule the model trained with (recorded in its export) and samples with
            schedule = model.noise_schedule
            loss = diffusion_loss(noise_only, x, labels, t=t, noise=noise, noise_schedule=schedule).mean().item()
            floor, start = diffusion_floor_and_start(means, t, schedule)
    sample_labels = torch.arange(CLASSES).repeat_interleave(64)
    samples = sample_latents(model, sample_labels, steps=25, seed=2)  # SiT: Euler ODE; DiT: DDPM
    errors = [float((samples[sample_labels == c].mean(0) - means[c]).norm() / means[c].norm()) for c in range(CLASSES)]
    stds = [float(samples[sample_labels == c].std(0).mean()) for c in range(CLASSES)]
    return loss, floor, start, max(errors), stds


@pytest.mark.parametrize("family", ["SiT", "DiT"])
def test_it_trains_to_the_bayes_floor_and_samples_the_class_means(gaussians, tmp_path, family):
    root, means = gaussians
    save_tiny_generator(tmp_path / "start", family, tokens=TOKENS, channels=CHANNELS, num_classes=CLASSES, hidden=64)
    # DiT on the linear schedule: the cosine one's last steps (beta clipped at 0.999) amplify the noise
    # prediction's error far more than a 400-step model can afford when sampling in 25 steps
    config = GeneratorTrainingConfig(latents=root / "latents", model=str(tmp_path / "start"), out=tmp_path / "run",
                                     steps=400, global_batch=64, lr=3e-3, ema_decay=0.99, checkpoint_every=400,
                                     log_every=100, sample_every=0, num_workers=0, progress=False,
                                     noise_schedule="linear" if family == "DiT" else None)
    export = train_generator(config)
    assert family == "SiT" or load_generator(export).noise_schedule == "linear"
    loss, floor, start, worst_mean, stds = _evaluate(load_generator(export), family, means)
    # 90% of the way from the untrained loss to the Bayes floor (EMA weights, held-out data)
    assert floor <= loss <= floor + 0.1 * (start - floor), (loss, floor, start)
    assert worst_mean <= 0.25, worst_mean
    assert all(0.7 * SCALE <= s <= 1.4 * SCALE for s in stds), stds
    untrained = _evaluate(load_generator(tmp_path / "start"), family, means)
    assert untrained[0] == pytest.approx(start, rel=0.05)  # the derivation of the untrained loss holds
    assert untrained[3] > 0.25 and not all(0.7 * SCALE <= s <= 1.4 * SCALE for s in untrained[4]), untrained
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]


# ------------------------------------------------------------------------------------ resume
def test_resume_after_sigkill_is_bit_identical_to_a_straight_run(files, tmp_path):
    straight = _config(files, tmp_path / "straight")
    train_generator(straight)
    killed = replace(straight, out=tmp_path / "killed")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(killed).items()}
    (tmp_path / "run.json").write_text(json.dumps(settings))
    kill_after_step("generator", tmp_path / "run.json", 10, subprocess_env(PINNED_BACKENDS))
    assert [p.name for p in (killed.out / "checkpoints").iterdir()] == ["step-000000006.pt"]
    train_generator(replace(killed, resume=True))
    assert_same_state(straight.out, killed.out, 12)
    steps = [json.loads(line).get("step") for line in (killed.out / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [3, 6, 9, 12]  # the killed run's step 9 record, lost with its state, is gone


# ------------------------------------------------------------------------------------ processes
def _argv(config: GeneratorTrainingConfig, *extra: str) -> list[str]:
    return ["train-generator", "--latents", str(config.latents), "--model", config.model, "--out", str(config.out),
            "--steps", str(config.steps), "--global-batch", str(config.global_batch), "--lr", str(config.lr),
            "--ema-decay", str(config.ema_decay), "--checkpoint-every", str(config.checkpoint_every),
            "--log-every", str(config.log_every), "--sample-every", "0", "--num-workers", "0", *extra]


def _logged_terms(run: Path) -> dict[int, dict[str, float]]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k == "loss" or k.startswith("grad_norm")}
            for r in records if "loss" in r}


def test_two_gloo_processes_ddp_and_fsdp_equal_one_process(files, tmp_path):
    one = _config(files, tmp_path / "one", steps=4, checkpoint_every=4, log_every=2)  # 2 micro-batches of 4
    train_generator(one)
    ddp, fsdp = replace(one, out=tmp_path / "ddp"), replace(one, out=tmp_path / "fsdp")  # 2 processes x 4
    run_two_gloo_processes([_argv(ddp), _argv(fsdp, "--fsdp")], tmp_path, subprocess_env(PINNED_BACKENDS))
    start = tensors({"model": load_file(str(files / "SiT" / "model.safetensors"))})
    reference = checkpoint(one.out, 4)
    for run in (ddp.out, fsdp.out):
        other = checkpoint(run, 4)
        assert other["world_size"] == 2 and other["data"] == reference["data"]
        for part in ("model", "ema"):
            ours, theirs = tensors(reference["parts"]["generator"][part]), tensors(other["parts"]["generator"][part])
            # fp32: gradients summed in another order (gloo's all-reduce vs accumulation); compared as
            # the change from the start, so the untouched part of the weights does not hide it
            for key in ours:
                moved = ours[key] - start[f"/model{key}"]
                if moved.abs().max() > 0:
                    assert rel_err(theirs[key] - start[f"/model{key}"], moved) <= 1e-5, (run.name, part, key)
        logged = [_logged_terms(path) for path in (one.out, run)]
        assert logged[0].keys() == logged[1].keys() == {2, 4}
        for step, terms in logged[0].items():  # the loss and the gradient norm averaged over the processes
            assert all(terms[k] == pytest.approx(logged[1][step][k], rel=1e-5) for k in terms), (run.name, step)


# ------------------------------------------------------------------------------------ failures
def _poisoned(files, tmp_path, step: int) -> Path:
    """The files' latents with an inf in one item that the global batch of `step` (in the first
    epoch) is the first to read."""
    dataset = data.LatentShards(files / "latents", flip=False, normalize=False)
    latents = torch.stack([dataset[i][0] for i in range(len(dataset))])
    position = (step - 1) * 8 + 2
    assert position < len(dataset)
    latents[data.EpochStream(len(dataset), seed=0).at(position)[0], 0, 0] = math.inf
    write_latent_dataset(tmp_path / "poisoned", latents, dataset.labels(), shard_size=8)
    return tmp_path / "poisoned"


def test_a_non_finite_loss_stops_the_run_naming_the_step_before_any_later_checkpoint(files, tmp_path):
    config = _config(files, tmp_path / "run", latents=_poisoned(files, tmp_path, step=3), checkpoint_every=2,
                     log_every=10)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss = (nan|inf) at step 3: .*step-000000002\.pt") as error:
        train_generator(config)
    assert (error.value.step, error.value.term) == (3, "loss")
    # found when step 4 was to be checkpointed: step 4's checkpoint is not written, step 2's is intact
    assert [p.name for p in (config.out / "checkpoints").iterdir()] == ["step-000000002.pt"]
    state = tensors(checkpoint(config.out, 2))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    events = [json.loads(line) for line in (config.out / "log.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "non_finite" and events[-1]["step"] == 3


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EACCES], ids=["disk-full", "permissions"])
def test_an_unwritable_checkpoint_keeps_the_previous_one(files, tmp_path, monkeypatch, capsys, failure):
    save = torch.save

    def fail_at_step_4(state, f, *args, **kwargs):
        if state["step"] == 4:
            f.write(b"half a checkpoint")
            raise OSError(failure, os.strerror(failure))
        return save(state, f, *args, **kwargs)

    monkeypatch.setattr(training_loop.torch, "save", fail_at_step_4)
    config = _config(files, tmp_path / "run", steps=6, checkpoint_every=2, keep_checkpoints=1)
    seen = {}

    def look(step: int) -> None:
        if step == 4:
            seen["files"] = sorted(p.name for p in (config.out / "checkpoints").iterdir())
            seen["step"] = checkpoint(config.out, 2)["step"]

    train_generator(config, hooks=[look])
    assert seen == {"files": ["step-000000002.pt"], "step": 2}  # no partial file, the previous one whole
    err = capsys.readouterr().err
    assert "checkpoint at step 4 could not be written" in err and "step-000000002.pt, is intact" in err
    assert os.strerror(failure) in err
    assert [p.name for p in (config.out / "checkpoints").iterdir()] == ["step-000000006.pt"]  # it went on
    events = [json.loads(line) for line in (config.out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "checkpoint_failed"] == [4]


@pytest.fixture
def bad_model(files, tmp_path):
    save_tiny_generator(tmp_path / "long", "SiT", tokens=8, channels=CHANNELS, num_classes=CLASSES)
    save_tiny_generator(tmp_path / "two-classes", "SiT", tokens=TOKENS, channels=CHANNELS, num_classes=2)
    (tmp_path / "empty").mkdir()
    return tmp_path


@pytest.mark.parametrize("change, expected", [
    ({"model": "long"}, r"--model: the model takes \(tokens, channels\) = \(8, 8\), but the latents in .* are "
                        r"\(tokens, channels\) = \(4, 8\)"),
    ({"model": "two-classes"}, r"--latents: labels in .* lie in \[0, 3\], outside the model's 2 classes"),
    ({"latents": "empty"}, "--latents: .*empty holds no manifest.json"),
    ({"micro_batch": "3"}, "--micro-batch: 3 does not divide the per-process batch 8"),
    ({"model": "SiT-Q/1"}, "argument --model: 'SiT-Q/1' is not a folder"),
    ({"fsdp": None}, "--fsdp: shards the model over the processes of a torchrun launch"),
])
def test_bad_input_fails_before_the_first_step(files, bad_model, capsys, change, expected):
    config = _config(files, bad_model / "run")
    argv = _argv(config)
    for option, value in change.items():
        flag = f"--{option.replace('_', '-')}"
        value = str(bad_model / value) if option in ("model", "latents") and "/" not in value else value
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag] if value is None else [flag, value]
    message = cli_error(argv, capsys)
    assert re.search(expected, message), message
    assert not (bad_model / "run").exists()


def test_bad_settings_are_named(files, tmp_path):
    with pytest.raises(FieldError, match=r"ema_decay must be a finite number >= 0 and < 1, got 1.0"):
        train_generator(_config(files, tmp_path / "run", ema_decay=1.0))
    with pytest.raises(FieldError, match=r"betas\[1\] must be a finite number >= 0 and < 1, got 1.5"):
        train_generator(_config(files, tmp_path / "run", betas=(0.9, 1.5)))
    assert not (tmp_path / "run").exists()


def test_a_run_folder_with_another_configuration_is_refused(files, tmp_path, capsys):
    config = _config(files, tmp_path / "run", steps=2, checkpoint_every=2)
    assert cli.main(_argv(config)) == 0
    before = {p: p.stat().st_mtime_ns for p in config.out.rglob("*")}
    message = cli_error(_argv(config), capsys)
    assert message.startswith("--out: ") and "holds a run (config.json); resume it" in message
    message = cli_error(_argv(replace(config, lr=2e-3)) + ["--resume"], capsys)
    assert message.startswith("--out: ") and "another configuration (training.lr: 0.001 -> 0.002)" in message
    message = cli_error(_argv(config, "--resume", "--path", "cosine"), capsys)
    assert "model.path_type: 'linear' -> 'cosine'" in message and "training.path: 'linear' -> 'cosine'" in message
    assert {p: p.stat().st_mtime_ns for p in config.out.rglob("*")} == before
    # what only changes how the run goes (steps, intervals, workers) may change
    assert cli.main(_argv(replace(config, steps=3, log_every=1)) + ["--resume"]) == 0
    assert checkpoint(config.out, 3)["step"] == 3


# ------------------------------------------------------------------------------------ ops
def test_training_runs_through_our_ops_with_gradients(files, tmp_path, monkeypatch):
    import softvq_fast.models.adaln_transformer as transformer
    import softvq_fast.nn.linear as nn_linear
    import softvq_fast.nn.transformer as nn_transformer

    calls = {"attention": [], "layernorm_modulate": [], "linear": []}

    def recording(name, function):
        def record(*args, **kwargs):
            calls[name].append(any(a.requires_grad for a in args if isinstance(a, torch.Tensor)))
            return function(*args, **kwargs)
        return record

    monkeypatch.setattr(nn_transformer, "attention", recording("attention", nn_transformer.attention))
    monkeypatch.setattr(transformer, "layernorm_modulate", recording("layernorm_modulate", transformer.layernorm_modulate))
    monkeypatch.setattr(nn_linear, "linear", recording("linear", nn_linear.linear))
    config = _config(files, tmp_path / "run", steps=3, micro_batch=None, checkpoint_every=3)
    train_generator(config)
    model = load_generator(files / "SiT")
    layers = sum(isinstance(m, nn_linear.Linear) for m in model.modules())
    # per forward: each block's attention and its 2 modulated norms (+ the final layer's), every linear layer
    assert {name: (len(c), all(c)) for name, c in calls.items()} == {
        "attention": (3 * 2, True), "layernorm_modulate": (3 * 5, True), "linear": (3 * layers, True)}
    start = load_file(str(files / "SiT" / "model.safetensors"))
    trained = checkpoint(config.out, 3)["parts"]["generator"]["model"]
    # adaLN-Zero: step 1 moves the output layer, step 2 the gates, step 3 everything before them
    assert all(not torch.equal(trained[k], start[k]) for k in start if k.endswith(".weight"))
    event = json.loads((config.out / "log.jsonl").read_text().splitlines()[0])
    assert event["backends"] == {"attention": PINNED_BACKENDS["SOFTVQ_FAST_ATTENTION_BACKEND"],
                                 "layernorm_modulate": "reference", "linear": "torch"}


def test_a_backend_that_cannot_train_is_an_error_before_the_first_step(files, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTVQ_FAST_ATTENTION_BACKEND", "flash_attn")  # CUDA only
    with pytest.raises(NoBackendError, match="flash_attn.*cuda"):
        train_generator(_config(files, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("SOFTVQ_FAST_ATTENTION_BACKEND", "auto")
    monkeypatch.setenv("SOFTVQ_FAST_LINEAR_BACKEND", "auto")
    model = load_generator(files / "SiT")
    assert training_backends(model, 4, torch.device("cpu"), None)["linear"] == "torch"
    warnings = slow_backend_warnings({"attention": "math", "layernorm_modulate": "reference", "linear": "torch"},
                                     torch.device("cuda"))
    assert len(warnings) == 2 and "attention runs on its math backend" in warnings[0]
    assert slow_backend_warnings({"attention": "math"}, torch.device("cpu")) == []


# ------------------------------------------------------------------------------------ export
def test_samples_and_export_feed_generate(files, tmp_path, capsys):
    config = _config(files, tmp_path / "run", steps=2, checkpoint_every=2, sample_every=1, sample_steps=2,
                     sample_classes=[0, 3], tokenizer=files / "tokenizer")
    export = train_generator(config)
    samples = load_file(str(config.out / "samples" / "step-1.safetensors"))
    assert samples["latents"].shape == (2, TOKENS, CHANNELS) and samples["labels"].tolist() == [0, 3]
    assert (config.out / "samples" / "step-2.png").is_file()
    generator = load_generator(export)
    ema = checkpoint(config.out, 2)["parts"]["generator"]["ema"]
    assert all(torch.equal(generator.state_dict()[k], ema[k]) for k in ema)
    grid = tmp_path / "grid.png"
    assert cli.main(["generate", "--tokenizer", str(files / "tokenizer"), "--generator", str(export), "--classes",
                     "0-1", "--steps", "2", "--out", str(grid), "--device", "cpu"]) == 0
    assert grid.is_file()
    other = tmp_path / "other-latents"
    write_latent_dataset(other, torch.zeros(4, TOKENS, CHANNELS), torch.arange(4), vq_std=2.0)
    with pytest.raises(SetupError, match="tokenizer: .*differ from the latents"):
        train_generator(replace(config, latents=other, out=tmp_path / "run2"))
    assert not (tmp_path / "run2").exists()
