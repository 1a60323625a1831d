"""`softvq-fast sample`: exactly N images of balanced classes as uint8 N x H x W x 3 in an ADM-suite
.npz, each image a function of the seed and its index only; resuming an interrupted run, refusing
other settings, and a 2-process gloo torchrun writing the same file as 1 process."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from support.cli import cli_error
from support.paths import ROOT
from support.tokenizer_files import save_tiny_tokenizer

from softvq_fast import cli
from softvq_fast.evaluation import sampling
from softvq_fast.generation import generate, load_generator
from softvq_fast.models import DiT, SiT, SoftVQVAE
from softvq_fast.models.adaln_transformer import AdaLNTransformer

NUM_CLASSES = 3


def _save_generator(folder: Path, cls: type, seed: int) -> None:
    """A random release folder on the tiny tokenizer's latents (4 tokens of 8 channels), every
    weight drawn (adaLN-Zero's zero init would make the samples ignore the labels)."""
    config = dict(input_size=4, in_channels=8, hidden_size=32, depth=1, num_heads=2, num_classes=NUM_CLASSES,
                  vae_1d=True, class_dropout_prob=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**config)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "tags": [cls.__name__]}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_tiny_tokenizer(root / "tok")
    _save_generator(root / "sit", SiT, seed=1)
    _save_generator(root / "dit", DiT, seed=2)
    _save_generator(root / "sit_other", SiT, seed=3)
    return root


# A stochastic sampler and guidance: the per-step noise and both model halves are exercised.
SDE = ["--sampler", "sde", "--steps", "2", "--cfg-scale", "1.5"]


def _argv(models: Path, out: Path, *extra: str, generator: str = "sit") -> list[str]:
    return ["sample", "--tokenizer", str(models / "tok"), "--generator", str(models / generator), "--device", "cpu",
            "--out", str(out), *extra]


@contextlib.contextmanager
def one_thread():
    """As each process of a torchrun runs: float32 sums then add in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sample(models: Path, out: Path, *extra: str, generator: str = "sit") -> dict[str, np.ndarray]:
    """Run the command in this process, on one thread."""
    with one_thread():
        assert cli.main(_argv(models, out, *extra, generator=generator)) == 0
    assert not sampling.parts_folder(out).exists()
    with np.load(out) as arrays:
        return dict(arrays)


@pytest.fixture(scope="module")
def straight(models, tmp_path_factory) -> Path:
    """7 images in batches of 2 (the last batch short), in one uninterrupted run."""
    out = tmp_path_factory.mktemp("straight") / "samples.npz"
    _sample(models, out, "--num-samples", "7", "--batch", "2", *SDE)
    return out


def _authors_uint8(images: torch.Tensor) -> np.ndarray:
    """The authors' conversion, step for step: clamp to [-1, 1], (x + 1) / 2, 255 * that clamped
    to [0, 255], NHWC, truncated to uint8."""
    x = torch.clamp(images, -1.0, 1.0)
    x = (x + 1) / 2
    return torch.clamp(255.0 * x, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()


@pytest.mark.parametrize("family, sampler", [("sit", SDE), ("dit", ["--sampler", "ddpm", "--steps", "3"])])
def test_file_holds_exactly_n_balanced_uint8_images_in_index_order(models, tmp_path, family, sampler):
    arrays = _sample(models, tmp_path / "s.npz", "--num-samples", "7", "--batch", "3", *sampler, generator=family)
    assert sorted(arrays) == ["arr_0", "arr_1"]
    images, labels = arrays["arr_0"], arrays["arr_1"]
    assert images.shape == (7, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0] and labels.dtype == np.int64
    tokenizer, generator = SoftVQVAE.from_pretrained(models / "tok"), load_generator(models / family)
    options = dict(zip(sampler[::2], sampler[1::2]))
    expected = []
    for part, (start, stop) in enumerate([(0, 3), (3, 6), (6, 7)]):  # batches of 3: parts of 3, 3 and 1
        noise = sampling.initial_noise(range(start, stop), (4, 8), seed=0)
        with one_thread():
            batch = generate(tokenizer, generator, labels[start:stop].tolist(), sampler=options["--sampler"],
                             steps=int(options["--steps"]), cfg_scale=float(options.get("--cfg-scale", 1.0)),
                             seed=sampling.part_seed(0, part), noise=noise)
        expected.append(_authors_uint8(batch))
    np.testing.assert_array_equal(images, np.concatenate(expected))


def test_per_class_gives_every_class_the_same_count(models, tmp_path):
    labels = _sample(models, tmp_path / "s.npz", "--per-class", "2", "--batch", "4", "--steps", "1")["arr_1"]
    assert labels.shape == (2 * NUM_CLASSES,) and np.bincount(labels).tolist() == [2] * NUM_CLASSES


def test_an_image_depends_on_the_seed_and_its_index_not_on_the_batch(models, tmp_path):
    ode = ["--num-samples", "5", "--sampler", "heun", "--steps", "2", "--cfg-scale", "2"]
    whole = _sample(models, tmp_path / "whole.npz", *ode, "--batch", "5")["arr_0"].astype(int)
    split = _sample(models, tmp_path / "split.npz", *ode, "--batch", "2")["arr_0"].astype(int)
    other_seed = _sample(models, tmp_path / "seed.npz", *ode, "--batch", "5", "--seed", "1")["arr_0"].astype(int)
    assert np.abs(split - whole).max() <= 1  # another batch size rounds float32 sums otherwise
    assert np.abs(other_seed - whole).mean() > 10


def test_labels_are_a_function_of_the_index():
    uniform = sampling.class_labels(range(60), NUM_CLASSES, "uniform", seed=4)
    assert torch.equal(sampling.class_labels(range(20, 30), NUM_CLASSES, "uniform", seed=4), uniform[20:30])
    assert sorted(set(uniform.tolist())) == [0, 1, 2]
    assert not torch.equal(sampling.class_labels(range(60), NUM_CLASSES, "uniform", seed=5), uniform)
    assert sampling.class_labels(range(5, 9), NUM_CLASSES).tolist() == [2, 0, 1, 2]
    noise = sampling.initial_noise(range(6), (4, 8), seed=4)
    assert torch.equal(sampling.initial_noise(range(3, 5), (4, 8), seed=4), noise[3:5])


def test_generate_checks_given_noise(models):
    tokenizer, generator = SoftVQVAE.from_pretrained(models / "tok"), load_generator(models / "sit")
    for noise, shown in ((torch.zeros(2, 4, 9), "torch.float32 (2, 4, 9)"), (torch.zeros(2, 4, 8, dtype=torch.bfloat16),
                                                                            "torch.bfloat16 (2, 4, 8)")):
        with pytest.raises(ValueError, match=rf"noise must be a float32 or float64 tensor of shape \(2, 4, 8\), got "
                                             rf"{re.escape(shown)}"):
            generate(tokenizer, generator, [0, 1], noise=noise, steps=1)


class _Interrupted(Exception):
    pass


@pytest.fixture
def interrupted(models, tmp_path, monkeypatch) -> Path:
    """The straight run's settings, stopped after 2 of its 4 batches, with the half-written part of
    a killed process beside them."""
    out = tmp_path / "samples.npz"
    write_part, written = sampling._write_part, []

    def stop_after_two(path, images, tag):
        if len(written) == 2:
            raise _Interrupted
        write_part(path, images, tag)
        written.append(path.name)

    with monkeypatch.context() as patch:
        patch.setattr(sampling, "_write_part", stop_after_two)
        with pytest.raises(_Interrupted), one_thread():
            cli.main(_argv(models, out, "--num-samples", "7", "--batch", "2", *SDE))
    parts = sampling.parts_folder(out)
    assert sorted(p.name for p in parts.glob("part-*")) == written and not out.exists()
    (parts / "part-000003.npy.tmp-1-999").write_bytes(b"half a part")
    return out


def test_resuming_an_interrupted_run_writes_the_straight_run_file(models, straight, interrupted, monkeypatch, capsys):
    sampled = []
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: sampled.append(len(k["noise"])) or generate(*a, **k))
    _sample(models, interrupted, "--num-samples", "7", "--batch", "2", *SDE)
    assert sampled == [2, 1]  # only the two missing batches
    assert "rank 0 found 2 of its batches finished" in capsys.readouterr().out
    assert interrupted.read_bytes() == straight.read_bytes()


@pytest.fixture
def no_loading(monkeypatch):
    for owner in (SoftVQVAE, AdaLNTransformer):
        monkeypatch.setattr(owner, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))


@pytest.mark.parametrize("change, named", [
    (["--seed", "1"], "seed: 0 -> 1"),
    (["--batch", "3"], "batch: 2 -> 3"),
    (["--num-samples", "8"], "num: 7 -> 8"),
    (["--cfg-scale", "2"], "cfg_scale: 1.5 -> 2.0"),
    (["--dtype", "bfloat16"], "dtype: 'float32' -> 'bfloat16'"),
    (["--labels", "uniform"], "labels: 'balanced' -> 'uniform'"),
])
def test_other_settings_are_refused_before_loading(models, interrupted, no_loading, capsys, change, named):
    options = {"--num-samples": "7", "--batch": "2", "--sampler": "sde", "--steps": "2", "--cfg-scale": "1.5"}
    options.update(zip(change[::2], change[1::2]))
    message = cli_error(_argv(models, interrupted, *[t for pair in options.items() for t in pair]), capsys)
    assert message.startswith(f"argument --out: {sampling.parts_folder(interrupted)} holds the parts of a run with "
                              f"other settings ({named})"), message


def test_other_weights_are_refused(models, interrupted, capsys):
    message = cli_error(_argv(models, interrupted, "--num-samples", "7", "--batch", "2", *SDE, generator="sit_other"),
                        capsys)
    assert "other settings (generator_sha256: the generator's weights differ)" in message


@pytest.mark.parametrize("extra, message", [
    (["--num-samples", "4", "--per-class", "2"], "argument --per-class: not allowed with argument --num-samples/--num"),
    ([], "one of the arguments --num-samples/--num --per-class is required"),
    (["--num-samples", "0"], "argument --num-samples/--num: expected an integer >= 1, got '0'"),
    (["--num", "4", "--batch", "0"], "argument --batch: expected an integer >= 1, got '0'"),
    (["--num", "4", "--out", "{tmp}/s.png"], "argument --out: expected a file name ending in .npz, got '{tmp}/s.png'"),
    (["--num", "4", "--out", "{tmp}/no/s.npz"], "argument --out: the folder '{tmp}/no' does not exist"),
    (["--num", "4", "--out", "{tmp}/exists.npz"], "argument --out: {tmp}/exists.npz exists; delete it"),
    (["--num", "4", "--labels", "random"], "argument --labels: invalid choice: 'random'"),
    (["--per-class", "2", "--labels", "uniform"], "argument --per-class: needs --labels balanced"),
    (["--num", "4", "--sampler", "ddim"], "argument --sampler: sampler='ddim': a SiT samples with one of"),
])
def test_bad_arguments_fail_first_naming_the_option(models, tmp_path, no_loading, capsys, extra, message):
    (tmp_path / "exists.npz").write_bytes(b"")
    argv = _argv(models, tmp_path / "s.npz")
    if "--out" in extra:
        argv = argv[:-2]
    message = message.format(tmp=tmp_path)
    assert cli_error(argv + [e.format(tmp=tmp_path) for e in extra], capsys).startswith(message)
    assert not any(p.name.endswith(".parts") for p in tmp_path.iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_write_the_same_file_as_one(models, straight, tmp_path):
    out = tmp_path / "samples.npz"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "softvq_fast.cli",
               *_argv(models, out, "--num-samples", "7", "--batch", "2", *SDE)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout and not sampling.parts_folder(out).exists()
    assert out.read_bytes() == straight.read_bytes()
