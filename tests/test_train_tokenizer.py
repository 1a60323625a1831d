"""`softvq-fast train-tokenizer` / `train_tokenizer`: it trains (a tiny tokenizer beats the best
image-independent reconstruction of held-out shapes; with the discriminator on from step 0 it
stays finite) and its export feeds from_pretrained, encode-dataset and generate; resume after
SIGKILL is bit-identical; 2 gloo processes equal 1 with the discriminator on, and agree to skip a
micro-batch that is empty on one of them; bad frozen-network files are named before the first
step; a non-finite term stops the run naming the step and the term; YAML and command-line
settings; the authors' schedule and weight-decay groups.

Tiny networks: the tokenizer of support.tokenizer_runs (ViT-S width, 2 blocks each, 32 px, 8
tokens), random DINOv2-S (2 blocks), DINO ViT-S/16 (1 block, the discriminator reading it after
block 0) and VGG16 files written by the tests in their public layouts."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support.cli import cli_error
from support.numerics import rel_err
from safetensors.torch import load_file
from support.tokenizer_files import save_tiny_tokenizer
from support.tokenizer_runs import write_config, write_frozen_files, write_shapes
from support.training_runs import (
    assert_same_state, checkpoint, kill_after_step, one_thread_like_the_subprocesses, records,
    run_two_gloo_processes, subprocess_env,
)

from softvq_fast import cli
from softvq_fast._extension import extension_available
from softvq_fast.data import EpochStream, LatentShards, load_image
from softvq_fast.metrics import psnr
from softvq_fast.models import SoftVQVAE
from softvq_fast.training.loop import NonFiniteLossError, SetupError, WarmupCosine
from softvq_fast.training.lpips import LPIPS
from softvq_fast.training.tokenizer import (
    TokenizerTrainingConfig, load_networks, model_source, read_training_config, train_tokenizer, training_images,
)

PINNED_BACKENDS = {
    "SOFTVQ_FAST_ATTENTION_BACKEND": "softvq" if extension_available() else "sdpa",
    "SOFTVQ_FAST_LINEAR_BACKEND": "torch",
    "SOFTVQ_FAST_SOFT_VQ_BACKEND": "cpu" if extension_available() else "reference",
}
# Every loss on, the adversarial terms from the second step (so a run holds both phases).
ALL_LOSSES = {"adversarial_start_step": 2, "perceptual_warmup_steps": 3}


one_thread = one_thread_like_the_subprocesses(PINNED_BACKENDS)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """40 coloured-shape images and the frozen networks' files."""
    root = tmp_path_factory.mktemp("tokenizer")
    write_shapes(root / "images", 40, seed=0)
    return SimpleNamespace(root=root, images=root / "images", **write_frozen_files(root / "frozen"))


def _settings(files, out: Path, **changes) -> dict:
    settings = dict(images=files.images, out=out, dinov2=files.dinov2, dino=files.dino, vgg=files.vgg,
                    lpips_heads=files.lpips_heads, alignment_depth=2, discriminator_taps=(0,), steps=4, global_batch=4,
                    lr=0.02, warmup_epochs=0.0, ema_decay=0.9, checkpoint_every=2, log_every=1, eval_every=0,
                    statistics_images=8, num_workers=0, progress=False)
    return {**settings, **changes}


def _config(files, out: Path, *, losses: dict | None = None, model: dict | None = None, **changes) -> TokenizerTrainingConfig:
    source = write_config(out.parent / f"{out.name}.yaml", model=model, losses=losses)
    return read_training_config(source, **_settings(files, out, **changes))


def _break_item_at(config: TokenizerTrainingConfig, position: int) -> Path:
    """Overwrite the image the data stream reads at `position` with bytes that are no image."""
    data = training_images(config, 32)
    item, _ = EpochStream(len(data.train), config.seed).at(position)
    path = data.folder.folder / data.folder.files[data.train.indices[item]]
    path.write_bytes(b"not an image")
    return path


# ------------------------------------------------------------------------------------ it trains
def _psnr(model: SoftVQVAE, images: torch.Tensor) -> float:
    with torch.no_grad():
        reconstructions = model.decode(model.encode(images)).clamp(-1, 1)
    return float(psnr((images + 1) / 2, (reconstructions + 1) / 2).mean())


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("shapes")
    train, held_out = write_shapes(root / "train", 256, seed=0), write_shapes(root / "held_out", 32, seed=1)
    return SimpleNamespace(root=root, train=root / "train", held_out=root / "held_out",
                           train_images=torch.stack([load_image(p, 32) for p in train]),
                           held_out_images=torch.stack([load_image(p, 32) for p in held_out]))


# A faster start than the random DINOv2 files, and more codes: the run is short.
TRAINABLE_MODEL = {"enc_pretrained": False, "codebook_size": 256}
TRAINABLE = dict(global_batch=8, lr=0.04, log_every=50, statistics_images=0)


def test_it_trains_and_the_export_feeds_encode_dataset_and_generate(files, shapes, tmp_path, capsys):
    config = _config(files, tmp_path / "run", model=TRAINABLE_MODEL, losses={"perceptual_weight": 0.0,
                     "adversarial_weight": 0.0}, images=shapes.train, steps=200, checkpoint_every=200, eval_every=100,
                     eval_images=shapes.held_out, **TRAINABLE)
    export = train_tokenizer(config)
    trained = SoftVQVAE.from_pretrained(export)
    untrained = load_networks(config, model_source(config)).tokenizer.eval()
    # The best reconstruction that ignores the image is the training set's mean image: beating
    # it by 2 dB (37 % less squared error) takes encoding each image.
    mean_image = shapes.train_images.mean(0, keepdim=True).expand_as(shapes.held_out_images)
    threshold = float(psnr((shapes.held_out_images + 1) / 2, (mean_image + 1) / 2).mean()) + 2.0
    assert _psnr(trained, shapes.held_out_images) >= threshold, (_psnr(trained, shapes.held_out_images), threshold)
    assert _psnr(untrained, shapes.held_out_images) < threshold - 2.0

    logged = records(config.out)
    losses = [r["tokenizer/reconstruction"] for r in logged if "loss" in r]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    grids = [r for r in logged if r.get("event") == "reconstructions"]
    assert [r["step"] for r in grids] == [100, 200] and grids[1]["ema_psnr"] >= threshold
    assert all(Path(r["path"]).is_file() for r in grids)
    # vq_mean / vq_std: the latents of every training image (statistics_images 0) normalised to 0 and 1
    with torch.no_grad():
        latents = trained.normalize_latents(trained.encode(shapes.train_images)).double()
    assert abs(float(latents.mean())) <= 1e-5 and abs(float(latents.std(unbiased=False)) - 1) <= 1e-5
    ema = checkpoint(config.out, 200)["parts"]["tokenizer"]["ema"]
    assert all(torch.equal(trained.state_dict()[k], ema[k]) for k in trained.state_dict())

    encoded = tmp_path / "latents"
    assert cli.main(["encode-dataset", "--model", str(export), "--images", str(shapes.held_out), "--out",
                     str(encoded), "--num-workers", "0", "--device", "cpu"]) == 0
    latents = LatentShards(encoded)
    assert len(latents) == 32 and (latents.vq_mean, latents.vq_std) == (trained.config.vq_mean, trained.config.vq_std)
    from test_train_generator import save_tiny_generator

    save_tiny_generator(tmp_path / "sit", "SiT", tokens=8, channels=8, num_classes=2)
    grid = tmp_path / "generated.png"
    assert cli.main(["generate", "--tokenizer", str(export), "--generator", str(tmp_path / "sit"), "--classes",
                     "0-1", "--steps", "2", "--out", str(grid), "--device", "cpu"]) == 0
    assert grid.is_file()


def test_with_the_discriminator_from_step_0_it_stays_finite(files, shapes, tmp_path):
    config = _config(files, tmp_path / "run", model=TRAINABLE_MODEL, losses={"perceptual_weight": 0.0,
                     "adversarial_start_step": 0}, images=shapes.train, steps=8, checkpoint_every=8, **{
                     **TRAINABLE, "log_every": 2, "statistics_images": 16})
    train_tokenizer(config)
    logged = [r for r in records(config.out) if "loss" in r]
    assert len(logged) == 4
    for record in logged:
        terms = {k: v for k, v in record.items() if isinstance(v, float)}
        assert all(math.isfinite(v) for v in terms.values()), record
        assert {"discriminator/loss", "grad_norm/discriminator", "tokenizer/generator"} <= set(terms)
    lecam = checkpoint(config.out, 8)["extra"]["losses"]["lecam"]
    assert float(lecam["real"]) != 0 and float(lecam["fake"]) != 0


# ------------------------------------------------------------------------------------ resume
def test_resume_after_sigkill_is_bit_identical_to_a_straight_run(files, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(files.images, images)
    settings = _settings(files, tmp_path / "straight", images=images, micro_batch=2, eval_every=2, eval_count=2)
    source = write_config(tmp_path / "config.yaml", losses=ALL_LOSSES)
    straight = read_training_config(source, **settings)
    broken = _break_item_at(straight, 5)  # read by step 2, a micro-batch of one image
    train_tokenizer(straight)

    killed = read_training_config(source, **{**settings, "out": tmp_path / "killed"})
    run = {"source": str(source), "settings": {k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path)
                                                else v for k, v in {**settings, "out": killed.out}.items()}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    kill_after_step("tokenizer", tmp_path / "run.json", 3, subprocess_env(PINNED_BACKENDS))
    assert [p.name for p in (killed.out / "checkpoints").iterdir()] == ["step-000000002.pt"]
    train_tokenizer(read_training_config(source, **{**settings, "out": killed.out, "resume": True}))

    state = assert_same_state(straight.out, killed.out, 4)
    assert any("/parts/discriminator/optimizer/" in k for k in state) and any("/lecam/" in k for k in state)
    assert checkpoint(killed.out, 4)["extra"]["skipped_images"] == {"count": 1}
    steps = [r["step"] for r in records(killed.out) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the killed run's step 3 record, lost with its state, is gone
    assert (killed.out / "reconstructions" / "step-4.png").is_file()
    assert any(r.get("event") == "skipped_images" for r in records(straight.out)), broken


# ------------------------------------------------------------------------------------ processes
def _argv(config: TokenizerTrainingConfig, source: Path, *extra: str) -> list[str]:
    return ["train-tokenizer", "--images", str(config.images), "--config", str(source), "--out", str(config.out),
            "--dinov2", str(config.dinov2), "--dino", str(config.dino), "--vgg", str(config.vgg), "--lpips-heads",
            str(config.lpips_heads), "--alignment-depth", "2", "--discriminator-taps", "0", "--steps",
            str(config.steps), "--global-batch", str(config.global_batch), "--lr", str(config.lr), "--warmup-epochs",
            "0", "--ema-decay", str(config.ema_decay), "--checkpoint-every", str(config.checkpoint_every),
            "--log-every", "1", "--eval-every", "0", "--statistics-images", "8", "--num-workers", "0", *extra]


def _logged(run: Path) -> dict[int, dict[str, float]]:
    """The logged terms by step, less the codebook usage (a fraction per process, not additive)."""
    return {r["step"]: {k: v for k, v in r.items() if "/" in k and k != "tokenizer/codebook_usage" or k == "loss"}
            for r in records(run) if "loss" in r}


def _rounding_only(name: str, change: torch.Tensor) -> torch.Tensor:
    """`change` less the elements whose gradient is 0 in exact arithmetic, so that AdamW's first
    step, g / (|g| + 1e-8), moves them by their rounding alone: the key third of an attention's
    qkv bias (a softmax ignores a constant added to its logits) and a discriminator conv's bias
    that a batch norm follows."""
    if name.endswith("attn.qkv.bias"):
        third = change.numel() // 3
        return torch.cat([change[:third], change[2 * third:]])
    if re.fullmatch(r"heads\.\d+\.(0|1\.fn)\.0\.bias", name):
        return change[:0]
    return change


def _assert_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], tolerance: float, what: str) -> None:
    """Each tensor of `theirs` within `tolerance` of `ours`, relative to its norm or to 0.1 % of the
    norm of them all, whichever is larger (a gradient whose terms nearly cancel carries the
    rounding of the larger terms); elements whose gradient is 0 but for rounding left out."""
    ours = {k: _rounding_only(k, v) for k, v in ours.items()}
    scale = math.sqrt(sum(float(v.double().square().sum()) for v in ours.values()))
    for key, value in ours.items():
        error = float((_rounding_only(key, theirs[key]).double() - value.double()).norm())
        assert error <= tolerance * max(float(value.double().norm()), 1e-3 * scale), (what, key, error)


def test_two_gloo_processes_equal_one_process_and_agree_to_skip(files, tmp_path):
    source = write_config(tmp_path / "config.yaml", losses={**ALL_LOSSES, "adversarial_start_step": 1})
    settings = dict(steps=2, checkpoint_every=1)
    one = read_training_config(source, **_settings(files, tmp_path / "one", **settings))  # one micro-batch of 4
    cli.main(_argv(one, source))
    two = read_training_config(source, **_settings(files, tmp_path / "two", **settings))  # 2 processes x 2
    # A folder whose image at stream position 1 (rank 1's only image of step 1) cannot be read.
    images = tmp_path / "images"
    shutil.copytree(files.images, images)
    skipping = read_training_config(source, **_settings(files, tmp_path / "skipping", images=images, steps=2,
                                                        global_batch=2))
    _break_item_at(skipping, 1)
    losses_off = ["--perceptual-weight", "0", "--adversarial-weight", "0"]  # the skip needs no loss network
    run_two_gloo_processes([_argv(two, source), _argv(skipping, source, *losses_off)], tmp_path,
                           subprocess_env(PINNED_BACKENDS))

    # Step 1: the gradients (AdamW's first moments, (1 - beta1) x gradient, and second moments) of
    # both networks to fp32 rounding; the weights they moved to 1e-3, AdamW's first step being
    # lr x g / (|g| + 1e-8): an element whose gradient is near 1e-8 (behind the decoder's LayerScale,
    # or summed from larger terms that nearly cancel) moves by its rounding, up to about 1e-4 of
    # the step here; those whose gradient is 0 but for rounding are left out.
    networks = load_networks(one, model_source(one))
    start = {"tokenizer": networks.tokenizer.state_dict(), "discriminator": networks.discriminator.state_dict()}
    reference, other = checkpoint(one.out, 1), checkpoint(two.out, 1)
    assert other["world_size"] == 2 and other["data"] == reference["data"]
    for part in ("tokenizer", "discriminator"):
        ours, theirs = reference["parts"][part]["optimizer"]["state"], other["parts"][part]["optimizer"]["state"]
        assert ours.keys() == theirs.keys() and len(ours) > 10
        for moment in ("exp_avg", "exp_avg_sq"):
            _assert_close({k: v[moment] for k, v in ours.items()}, {k: v[moment] for k, v in theirs.items()}, 1e-5,
                          f"{part} {moment}")
        for kind in ("model", "ema") if part == "tokenizer" else ("model",):
            ours, theirs = reference["parts"][part][kind], other["parts"][part][kind]
            moved = {k: v - start[part][k] for k, v in ours.items() if v.is_floating_point()}
            _assert_close(moved, {k: theirs[k] - start[part][k] for k in moved}, 1e-3, f"{part} {kind}")
    assert rel_err(other["extra"]["losses"]["lecam"]["real"], reference["extra"]["losses"]["lecam"]["real"]) <= 1e-5
    # Each term and gradient norm averaged over the processes; at step 2 on those weights.
    logged = [_logged(run) for run in (one.out, two.out)]
    assert logged[0].keys() == logged[1].keys() == {1, 2}
    for step, tolerance in ((1, 1e-5), (2, 1e-4)):
        terms = logged[0][step]
        assert terms.keys() == logged[1][step].keys() and "discriminator/loss" in terms
        assert all(terms[k] == pytest.approx(logged[1][step][k], rel=tolerance) for k in terms), step

    events = records(skipping.out)
    assert [e["step"] for e in events if e.get("event") == "skipped_step"] == [1]
    assert [r["step"] for r in events if "loss" in r] == [2]  # step 1 trained nothing, step 2 did
    assert checkpoint(skipping.out, 2)["extra"]["skipped_images"] == {"count": 1}


# ------------------------------------------------------------------------------------ failures
@pytest.fixture(scope="module")
def bad_files(files) -> Path:
    folder = files.root / "bad"
    folder.mkdir(exist_ok=True)
    (folder / "damaged.safetensors").write_bytes(b"\x00" * 64)
    return folder


@pytest.mark.parametrize("option, value, expected", [
    ("--vgg", "missing.pth", r"--vgg: .*missing\.pth: not found \(expected a local VGG16 weights file\)"),
    ("--dino", "damaged.safetensors", r"--dino: .*damaged\.safetensors: cannot be read as a weights file .*expected "
                                      r"the DINO ViT-S/16 layout"),
    ("--dinov2", "dino", r"--dinov2: .*dino\.safetensors: not the DINOv2 ViT-small layout .*missing keys"),
    ("--vgg", "dinov2", r"--vgg: .*dinov2\.safetensors: not torchvision's vgg16 state-dict layout"),
    ("--lpips-heads", "vgg", r"--lpips-heads: .*vgg\.safetensors: not the lpips v0\.1 VGG linear heads"),
    ("--dino", None, r"--dino: the discriminator \(adversarial_weight 0\.2\) needs the DINO ViT-S/16 weights"),
])
def test_bad_frozen_files_are_named_before_the_first_step(files, bad_files, tmp_path, capsys, option, value,
                                                          expected):
    source = write_config(tmp_path / "config.yaml")
    argv = _argv(read_training_config(source, **_settings(files, tmp_path / "run")), source)
    index = argv.index(option)
    if value is None:
        del argv[index:index + 2]
    else:
        argv[index + 1] = str(getattr(files, value, bad_files / value))
    message = cli_error(argv, capsys)
    assert re.search(expected, message), message
    assert not (tmp_path / "run").exists()  # the run folder comes after every network has loaded


def test_a_loss_switched_off_needs_no_file(files, tmp_path, capsys):
    source = write_config(tmp_path / "config.yaml", model={"enc_pretrained": False},
                          losses={"perceptual_weight": 0.0, "adversarial_weight": 0.0, "alignment_weight": 0.0})
    config = read_training_config(source, **_settings(files, tmp_path / "run", steps=1))
    argv = _argv(config, source)
    for option in ("--dinov2", "--dino", "--vgg", "--lpips-heads"):
        index = argv.index(option)
        del argv[index:index + 2]
    assert cli.main(argv) == 0
    state = checkpoint(config.out, 1)
    assert set(state["parts"]) == {"tokenizer"} and not any(k.startswith("projection.") for k in state["parts"][
        "tokenizer"]["model"])


def test_a_release_is_fine_tuned_keeping_its_weights_and_gaining_a_projector(files, tmp_path, capsys):
    save_tiny_tokenizer(tmp_path / "release")
    config_file = tmp_path / "release" / "config.json"
    values = json.loads(config_file.read_text())
    values.update(repa_model="vit_small_patch14_dinov2.lvd142m", repa_patch_size=8, repa_proj_dim=32, repa_align="repeat")
    config_file.write_text(json.dumps(values))
    argv = ["train-tokenizer", "--images", str(files.images), "--config", str(tmp_path / "release"), "--out",
            str(tmp_path / "run"), "--dinov2", str(files.dinov2), "--alignment-depth", "2", "--perceptual-weight",
            "0", "--adversarial-weight", "0", "--steps", "1", "--global-batch", "2", "--eval-every", "0",
            "--statistics-images", "4", "--num-workers", "0"]
    assert cli.main(argv) == 0
    start, tuned = load_file(str(tmp_path / "release" / "model.safetensors")), SoftVQVAE.from_pretrained(
        tmp_path / "run" / "export")
    exported = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    assert {k for k in exported if not k.startswith("projection.")} == set(start)
    assert {"projection.0.weight", "projection.4.weight"} <= set(exported)  # created, trained, exported
    # one AdamW step of 1e-4 x 2 / 256 from the release's weights, averaged into the EMA
    moved = max(float((exported[k] - start[k]).abs().max()) for k in start if start[k].is_floating_point())
    assert 0 < moved <= 1e-5 and tuned.config.vq_std != 1.0


def test_a_non_finite_term_stops_the_run_naming_the_step_and_the_term(files, tmp_path, monkeypatch):
    forward, calls = LPIPS.forward, []

    def infinite_at_step_3(self, x, y):
        calls.append(1)
        distance = forward(self, x, y)
        return distance * math.inf if len(calls) == 3 else distance

    monkeypatch.setattr(LPIPS, "forward", infinite_at_step_3)
    config = _config(files, tmp_path / "run", losses={"adversarial_weight": 0.0}, steps=6, checkpoint_every=2,
                     log_every=4)
    with pytest.raises(NonFiniteLossError, match=r"non-finite tokenizer/perceptual = inf at step 3: .*step-000000002"):
        train_tokenizer(config)
    # found when step 4 was to be checkpointed: its checkpoint is not written, step 2's is intact
    assert [p.name for p in (config.out / "checkpoints").iterdir()] == ["step-000000002.pt"]
    assert records(config.out)[-1]["event"] == "non_finite"


# ------------------------------------------------------------------------------------ settings
def test_yaml_sections_and_command_line_options_override_in_order(files, tmp_path):
    source = write_config(tmp_path / "config.yaml", model={"num_latent_tokens": 16}, losses={
        "perceptual_weight": 0.5, "diffaug_policy": "color"}, training={"lr": 3.0e-4, "epochs": 7, "betas": [0.8, 0.9]})
    parser = cli.build_parser()
    args = parser.parse_args(["train-tokenizer", "--images", str(files.images), "--config", str(source), "--out",
                              str(tmp_path / "run"), "--perceptual-weight", "0.25", "--adaptive-weight", "--epochs",
                              "3", "--discriminator-taps", "2,5"])
    from softvq_fast.commands.train_tokenizer import config_from_args

    config = config_from_args(args)
    assert config.model.num_latent_tokens == 16 and config.model.encoder_depth == 2  # the file's model
    assert config.losses.perceptual_weight == 0.25 and config.losses.adaptive_weight  # the command line first
    assert config.losses.diffaug_policy == "color" and config.losses.entropy_weight == 0.01  # then the file, defaults
    assert (config.lr, config.epochs, config.betas, config.discriminator_taps) == (3e-4, 3, (0.8, 0.9), (2, 5))
    assert config.weight_decay == 1e-4 and config.global_batch == 256
    # the effective configuration reads back as itself
    (tmp_path / "again.yaml").write_text(config.to_yaml())
    again = read_training_config(tmp_path / "again.yaml", images=config.images, out=config.out)
    assert again == config

    for sections, message in [
        ({"model": {"entropy_loss_ratio": 0.1}}, r"model\.entropy_loss_ratio is set through losses\.entropy_weight"),
        ({"losses": {"perceptual": 1.0}}, r"losses: unknown loss config fields \['perceptual'\]"),
        ({"training": {"learning_rate": 1.0}}, r"unknown training settings \['learning_rate'\]"),
        ({"training": {"min_lr_ratio": 2.0}}, r"training: min_lr_ratio must be a finite number >= 0 and <= 1"),
        ({"training": {"vgg": "x"}}, r"unknown training settings \['vgg'\]"),
        ({"model": {"preset": "softvq-q-64"}}, r"model: unknown preset 'softvq-q-64'"),
        ({"vq_model": "SoftVQ", "lr": 1e-4}, r"expected the sections .*the authors' flat training config is not read"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(json.dumps(sections))
        with pytest.raises(SetupError, match=rf"config: {re.escape(str(bad))}: .*{message}"):
            read_training_config(bad, images=files.images, out=tmp_path / "run")


def test_the_defaults_are_the_authors_configuration():
    config = TokenizerTrainingConfig(images=Path("images"), out=Path("run"))
    assert config.model == "softvq-l-64" and config.losses == config.losses.__class__()
    assert (config.lr, config.betas, config.weight_decay, config.grad_clip, config.ema_decay, config.epochs,
            config.global_batch, config.discriminator_taps) == (1e-4, (0.9, 0.95), 1e-4, 1.0, 0.9999, 50, 256,
                                                                 (2, 5, 8, 11))
    # 1000 images: 3 steps an epoch, 150 in all; lr 1e-4 x 256 / 256; timm's warm-up from 1e-5
    schedule = config.schedule(1000)
    assert (schedule.total_steps, schedule.warmup_steps, schedule.base, schedule.min_lr) == (150, 3, 1e-4, 1e-5)
    expected = [1e-5, 1e-5 + 3e-5, 1e-5 + 6e-5, 1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * 3 / 150))]
    assert [schedule.at(t) for t in range(4)] == pytest.approx(expected, rel=1e-12)
    assert schedule.at(150) == schedule.at(10_000) == pytest.approx(1e-5)
    assert WarmupCosine(2.0, 10, cosine=False).at(7) == 2.0


def test_weight_decay_spares_vectors_and_biases_and_the_backends_are_logged(files, tmp_path):
    config = _config(files, tmp_path / "run", losses={"perceptual_weight": 0.0, "alignment_weight": 0.0,
                                                      "adversarial_start_step": 1}, steps=1, checkpoint_every=1)
    train_tokenizer(config)
    start = records(config.out)[0]
    assert start["event"] == "start" and start["backends"] == {
        "attention": PINNED_BACKENDS["SOFTVQ_FAST_ATTENTION_BACKEND"], "linear": "torch",
        "soft_vq": PINNED_BACKENDS["SOFTVQ_FAST_SOFT_VQ_BACKEND"]}
    for part in ("tokenizer", "discriminator"):
        groups = checkpoint(config.out, 1)["parts"][part]["optimizer"]["param_groups"]
        assert [g["weight_decay"] for g in groups] == [0.0, 1e-4]
        spared, decayed = groups[0]["params"], groups[1]["params"]
        assert spared and decayed and any(name.endswith(".bias") for name in spared)
        shapes = {name: value.shape for name, value in checkpoint(config.out, 1)["parts"][part]["model"].items()}
        assert all(len(shapes[n]) <= 1 or n.endswith(".bias") for n in spared)
        assert all(len(shapes[n]) > 1 and not n.endswith(".bias") for n in decayed)
