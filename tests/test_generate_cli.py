"""Bad arguments of generate() and of the generate, profile and env commands: one error naming the
argument, raised before any model loads or moves (the commands exit with status 2, argparse's)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image
from support.cli import cli_error
from support.tokenizer_files import save_tiny_tokenizer

import softvq_fast
from softvq_fast import cli
from softvq_fast.generation import load_generator, sample_latents
from softvq_fast.models import SoftVQVAE
from softvq_fast.models.adaln_transformer import AdaLNTransformer


@pytest.fixture(scope="module")
def tiny(reference_dir):
    vectors = reference_dir / "vectors"
    return (SoftVQVAE.from_pretrained(vectors / "tokenizer_tiny"), load_generator(vectors / "sit_tiny"),
            load_generator(vectors / "dit_tiny"))


# (family, keyword arguments, the expected message); the tiny generators have 10 classes.
GENERATE_CASES = [
    ("sit", dict(steps=0), "steps must be a positive integer, got 0"),
    ("sit", dict(steps=2.5), "steps must be a positive integer, got 2.5"),
    ("sit", dict(steps=True), "steps must be a positive integer, got True"),
    ("dit", dict(steps=1001), "steps must be at most 1000 for a DiT"),
    ("sit", dict(cfg_scale=math.nan), "cfg_scale must be a finite number, got nan"),
    ("sit", dict(cfg_scale=math.inf), "cfg_scale must be a finite number, got inf"),
    ("sit", dict(cfg_scale="2"), "cfg_scale must be a finite number, got '2'"),
    ("sit", dict(guidance_interval=(0.6, 0.2)), r"guidance_interval must have low <= high, got \(0.6, 0.2\)"),
    ("sit", dict(guidance_interval=(-0.1, 1.0)), "guidance_interval low must be a finite number >= 0 and <= 1, got -0.1"),
    ("sit", dict(guidance_interval=(0.0, 1.5)), "guidance_interval high must be a finite number >= 0 and <= 1, got 1.5"),
    ("sit", dict(guidance_interval=(0.0, math.nan)), "guidance_interval high must be a finite number"),
    ("sit", dict(guidance_interval=0.5), r"guidance_interval must be a pair \(low, high\), got 0.5"),
    ("sit", dict(sampler="ddim"), "sampler='ddim': a SiT samples with one of"),
    ("dit", dict(sampler="euler"), "sampler='euler': a DiT samples with one of"),
    ("sit", dict(path="edm"), "path must be one of 'linear', 'cosine', got 'edm'"),
    ("dit", dict(path="linear"), "path='linear' applies to SiT"),
    ("sit", dict(seed=-1), "seed must be an integer >= 0, got -1"),
    ("sit", dict(seed=1.5), "seed must be an integer >= 0, got 1.5"),
    ("sit", dict(cuda_graph="yes"), "cuda_graph must be true or false, got 'yes'"),
    ("sit", dict(class_labels=[10]), r"class_labels must lie in \[0, 10\) .*got \[10\]"),
    ("sit", dict(class_labels=[-1, 2]), r"class_labels must lie in \[0, 10\)"),
    ("sit", dict(class_labels=[]), r"class_labels must lie in \[0, 10\) \(a non-empty sequence of integers\), got \[\]"),
    ("sit", dict(class_labels=[1.5]), r"class_labels must lie in \[0, 10\) .*got \[1.5\]"),
    ("sit", dict(class_labels=torch.tensor([1.0])), r"class_labels must lie in \[0, 10\)"),
    ("sit", dict(class_labels=[True]), r"class_labels must lie in \[0, 10\) .*got \[True\]"),
    ("sit", dict(class_labels="3"), r"class_labels must lie in \[0, 10\) .*got '3'"),
    ("sit", dict(dtype=torch.float64), "dtype must be one of torch.float32, torch.bfloat16, torch.float16 or None"),
    ("sit", dict(dtype="bfloat16"), "dtype must be one of"),
    ("sit", dict(device="gpu"), "device must be a torch device such as 'cpu' or 'cuda:0', got 'gpu'"),
]


@pytest.mark.parametrize("family, kwargs, message", GENERATE_CASES)
def test_generate_names_a_bad_argument_before_any_work(tiny, family, kwargs, message, monkeypatch):
    tokenizer, sit, dit = tiny
    generator = sit if family == "sit" else dit
    monkeypatch.setattr(AdaLNTransformer, "to", lambda *a, **k: pytest.fail("the generator was moved"))
    monkeypatch.setattr(SoftVQVAE, "to", lambda *a, **k: pytest.fail("the tokenizer was moved"))
    arguments = {"class_labels": [1, 2], "dtype": torch.bfloat16, **kwargs}
    with pytest.raises(ValueError, match=message):
        softvq_fast.generate(tokenizer, generator, arguments.pop("class_labels"), **arguments)


@pytest.mark.parametrize("family, kwargs, message", [case for case in GENERATE_CASES if "dtype" not in case[1]
                                                     and "device" not in case[1]])
def test_sample_latents_checks_the_same_arguments(tiny, family, kwargs, message):
    _, sit, dit = tiny
    arguments = {"class_labels": [1, 2], **kwargs}
    with pytest.raises(ValueError, match=message):
        sample_latents(sit if family == "sit" else dit, arguments.pop("class_labels"), **arguments)


def test_guidance_needs_a_null_class(tiny):
    tokenizer, _, _ = tiny
    torch.manual_seed(0)
    no_null = softvq_fast.models.SiT(input_size=8, in_channels=16, hidden_size=24, depth=1, num_heads=2, num_classes=10,
                                      class_dropout_prob=0.0, vae_1d=True)
    with pytest.raises(ValueError, match="cfg_scale=2.0 needs a null class for guidance"):
        softvq_fast.generate(tokenizer, no_null, [1], cfg_scale=2.0, steps=1)


@pytest.fixture
def folders(reference_dir, tmp_path):
    vectors = reference_dir / "vectors"
    return {"tok": str(vectors / "tokenizer_tiny"), "sit": str(vectors / "sit_tiny"), "dit": str(vectors / "dit_tiny"),
            "tmp": tmp_path}


@pytest.fixture
def no_loading(monkeypatch):
    """Any weights loaded fail the test: every argument is checked first."""
    for owner in (SoftVQVAE, AdaLNTransformer):
        monkeypatch.setattr(owner, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))


def _generate(folders, *extra, generator="sit"):
    return ["generate", "--tokenizer", folders["tok"], "--generator", folders[generator], "--classes", "0-3",
            "--device", "cpu", "--out", str(folders["tmp"] / "grid.png"), *extra]


@pytest.mark.parametrize("extra, generator, message", [
    (["--out", "{tmp}/missing/grid.png"], "sit", "argument --out: the folder '{tmp}/missing' does not exist"),
    (["--out", "{tmp}/grid"], "sit", "argument --out: expected a file name ending in .png, .jpg, .jpeg, .webp, "
                                      ".bmp, .tif, .tiff, got '{tmp}/grid'"),
    (["--out", "{tmp}/grid.txt"], "sit", "argument --out: expected a file name ending in .png"),
    (["--cfg-scale", "nan"], "sit", "argument --cfg-scale: expected a finite number, got 'nan'"),
    (["--cfg-scale=-inf"], "sit", "argument --cfg-scale: expected a finite number, got '-inf'"),
    (["--nrow", "-1"], "sit", "argument --nrow: expected an integer >= 1, got '-1'"),
    (["--nrow", "0"], "sit", "argument --nrow: expected an integer >= 1, got '0'"),
    (["--steps", "0"], "sit", "argument --steps: expected an integer >= 1, got '0'"),
    (["--steps", "2.5"], "sit", "argument --steps: expected an integer >= 1, got '2.5'"),
    (["--steps", "1001"], "dit", "argument --steps: steps must be at most 1000 for a DiT (its training steps), got 1001"),
    (["--classes", "3,10"], "sit", "argument --classes: class_labels must lie in [0, 10) (a non-empty sequence of "
                                   "integers), got [3, 10]"),
    (["--classes", "-1"], "sit", "argument --classes: expected class labels such as \"1,2,3\", \"1 2 3\" or \"0-7\" "
                                 "(integers >= 0), got '-1'"),
    (["--classes", "1.5"], "sit", "argument --classes: expected class labels"),
    (["--classes", "3-1"], "sit", "argument --classes: the range '3-1' is empty (write low-high with low <= high)"),
    (["--classes", " , "], "sit", "argument --classes: no class labels in ' , '"),
    (["--sampler", "ddim"], "sit", "argument --sampler: sampler='ddim': a SiT samples with one of ('euler', 'heun', 'sde')"),
    (["--sampler", "euler"], "dit", "argument --sampler: sampler='euler': a DiT samples with one of ('ddpm', 'ddim')"),
    (["--path", "cosine"], "dit", "argument --path: path='cosine' applies to SiT (flow) sampling"),
    (["--guidance-low", "0.8", "--guidance-high", "0.2"], "sit", "argument --guidance-low: 0.8 is above --guidance-high 0.2"),
    (["--guidance-high", "1.5"], "sit", "argument --guidance-high: expected a number in [0, 1], got '1.5'"),
    (["--seed", "-1"], "sit", "argument --seed: expected an integer >= 0, got '-1'"),
    (["--device", "gpu"], "sit", "argument --device: expected a torch device such as cpu, cuda or cuda:1, got 'gpu'"),
    (["--tokenizer", "{tmp}/nope"], "sit", "argument --tokenizer: '{tmp}/nope' is neither a folder nor a Hugging Face "
                                           "Hub repo id 'owner/name'"),
])
def test_generate_command_names_the_argument_before_loading(folders, no_loading, capsys, extra, generator, message):
    tmp = str(folders["tmp"])
    argv = _generate(folders, *[part.format(tmp=tmp) for part in extra], generator=generator)
    assert cli_error(argv, capsys).startswith(message.format(tmp=tmp))


def test_generate_command_names_a_folder_of_the_wrong_kind(folders, no_loading, capsys, tmp_path):
    swapped = _generate(folders) + ["--tokenizer", folders["sit"], "--generator", folders["tok"]]
    assert cli_error(swapped, capsys).startswith(f"argument --tokenizer: {folders['sit']}/config.json: not a SoftVQ "
                                                 "tokenizer config: no image_size")
    wrong_generator = _generate(folders) + ["--generator", folders["tok"]]
    assert cli_error(wrong_generator, capsys).startswith(f"argument --generator: {folders['tok']}/config.json does not "
                                                         "describe a SiT")
    save_tiny_tokenizer(tmp_path / "small")
    pair = _generate(folders) + ["--tokenizer", str(tmp_path / "small")]
    assert cli_error(pair, capsys) == ("argument --generator: the generator takes samples of shape (8, 16) but the "
                                       "tokenizer's latents are (num_latent_tokens, codebook_embed_dim) = (4, 8)")
    no_null = tmp_path / "no_null"
    no_null.mkdir()
    shutil.copy(f"{folders['sit']}/config.json", no_null / "config.json")
    values = json.loads((no_null / "config.json").read_text())
    (no_null / "config.json").write_text(json.dumps({**values, "class_dropout_prob": 0.0}))
    guided = _generate(folders, "--cfg-scale", "2") + ["--generator", str(no_null)]
    assert cli_error(guided, capsys).startswith("argument --cfg-scale: cfg_scale=2.0 needs a null class for guidance")


def test_generate_command_names_a_bad_weights_file(folders, capsys, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(folders["sit"], damaged)
    (damaged / "model.safetensors").chmod(0o644)
    (damaged / "model.safetensors").write_bytes(b"not a safetensors file")
    message = cli_error(_generate(folders, "--steps", "1") + ["--generator", str(damaged)], capsys)
    assert message.startswith(f"argument --generator: {damaged}/model.safetensors: cannot be read as safetensors")


def test_generate_command_lays_out_rows_of_nrow(folders, capsys):
    out = folders["tmp"] / "column.jpg"
    argv = _generate(folders, "--steps", "1", "--nrow", "1", "--out", str(out))
    assert cli.main(argv) == 0
    assert Image.open(out).size == (64, 4 * 64)
    assert "4 x 1 grid" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["--batch", "-1"], "argument --batch: expected an integer >= 1, got '-1'"),
    (["--tokens", "0"], "argument --tokens: expected an integer >= 1, got '0'"),
    (["--channels", "x"], "argument --channels: expected an integer >= 1, got 'x'"),
    (["--top", "0"], "argument --top: expected an integer >= 1, got '0'"),
    (["--cfg-scale", "nan"], "argument --cfg-scale: expected a finite number, got 'nan'"),
    (["--out", "{tmp}/missing/trace.json"], "argument --out: the folder '{tmp}/missing' does not exist"),
    (["--out", "{tmp}/trace.txt"], "argument --out: expected a file name ending in .json, got '{tmp}/trace.txt'"),
    (["--preset", "SiT-Q/1"], "argument --preset: unknown generator preset 'SiT-Q/1'; expected e.g. 'SiT-XL/1' or "
                              "'DiT-B/2' (sizes ['S', 'B', 'L', 'XL'])"),
    (["--device", "gpu"], "argument --device: expected a torch device such as cpu, cuda or cuda:1, got 'gpu'"),
])
def test_profile_command_names_the_argument(folders, capsys, extra, message):
    tmp = str(folders["tmp"])
    argv = ["profile", "--preset", "SiT-S/1", "--out", f"{tmp}/trace.json", *[part.format(tmp=tmp) for part in extra]]
    assert cli_error(argv, capsys).startswith(message.format(tmp=tmp))


def test_profile_command_names_a_bad_generator(folders, capsys):
    tmp = folders["tmp"]
    assert cli_error(["profile", "--generator", f"{tmp}/nope"], capsys) == (
        f"argument --generator: '{tmp}/nope' is neither a folder nor a Hugging Face Hub repo id 'owner/name'")
    message = cli_error(["profile", "--generator", folders["tok"], "--device", "cpu", "--out", f"{tmp}/t.json"], capsys)
    assert message.startswith(f"argument --generator: {folders['tok']}/config.json does not describe a SiT")


def test_env_command_takes_no_arguments(capsys):
    assert cli_error(["env", "--device", "cpu"], capsys) == "unrecognized arguments: --device cpu"
