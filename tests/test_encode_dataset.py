"""`softvq-fast encode-dataset`: shard contents, manifest, resume, interruption, 2-process gloo run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from support.numerics import rel_err
from support.paths import ROOT
from safetensors.torch import load_file
from support.tokenizer_files import SAMPLES, save_tiny_tokenizer, write_sample_images

from softvq_fast import cli, data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    model = save_tiny_tokenizer(root / "model")
    write_sample_images(root / "images")
    return root, model


def _run(root, out, *extra) -> None:
    args = ["encode-dataset", "--model", str(root / "model"), "--images", str(root / "images"), "--out", str(out),
            "--shard-size", "2", "--batch-size", "1", "--num-workers", "0", "--device", "cpu", *extra]
    assert cli.main(args) == 0


def _shards(out) -> dict[str, dict[str, torch.Tensor]]:
    # cloned: load_file may map the file, and tests overwrite shard files afterwards
    return {p.name: {k: v.clone() for k, v in load_file(str(p)).items()} for p in sorted(out.glob("shard-*.safetensors"))}


def test_plan_and_sampler_keep_batches_inside_shards():
    plan = data.ShardPlan(num_images=11, shard_size=4)
    assert plan.num_shards == 3 and plan.bounds(2) == (8, 11)
    assert plan.owned(0, 2) == [0, 2] and plan.owned(1, 2) == [1]
    sampler = data.DistributedShardSampler(plan, [0, 2], batch_size=3)
    assert list(sampler) == [[0, 1, 2], [3], [8, 9, 10]]
    assert len(sampler) == 3


def test_shards_hold_latents_labels_flips_and_stats(setup, tmp_path):
    root, model = setup
    _run(root, tmp_path, "--hflip", "--num-workers", "1")
    shards = _shards(tmp_path)
    assert list(shards) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    merged = {k: torch.cat([s[k] for s in shards.values()]) for k in shards["shard-00000.safetensors"]}
    files = (tmp_path / "files.txt").read_text().split()
    assert files == sorted(SAMPLES)
    assert merged["indices"].tolist() == list(range(5))
    assert merged["labels"].tolist() == [0, 1, 1, 1, 1]  # cats/ then misc/
    images = torch.stack([data.load_image(root / "images" / f, 32) for f in files])
    with torch.no_grad():
        assert rel_err(merged["latents"], model.encode(images)) <= 1e-5
        assert rel_err(merged["latents_flip"], model.encode(images.flip(-1))) <= 1e-5
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_images"] == 5 and manifest["latent_shape"] == [4, 8]
    assert [s["count"] for s in manifest["shards"]] == [2, 2, 1]
    assert manifest["latent_mean"] == pytest.approx(merged["latents"].double().mean().item(), rel=1e-9)
    assert manifest["latent_std"] == pytest.approx(merged["latents"].double().std(unbiased=False).item(), rel=1e-6)
    assert (manifest["vq_mean"], manifest["vq_std"]) == (model.config.vq_mean, model.config.vq_std)


def test_resume_skips_finished_shards(setup, tmp_path):
    root, _ = setup
    _run(root, tmp_path)
    first = _shards(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*")}
    (tmp_path / "shard-00001.safetensors").unlink()
    (tmp_path / "shard-00002.safetensors").write_bytes(b"damaged")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    settings = {k: v for k, v in manifest.items()
                if k not in ("files", "files_sha256", "complete", "shards", "latent_mean", "latent_std")}
    data.write_manifest_start(tmp_path, settings, (tmp_path / "files.txt").read_text().split())  # a resumed run's start
    assert not json.loads((tmp_path / "manifest.json").read_text())["complete"]
    _run(root, tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"]
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns == stamps["shard-00000.safetensors"]
    again = _shards(tmp_path)
    for name, tensors in first.items():
        for key, value in tensors.items():
            assert torch.equal(again[name][key], value), (name, key)


def test_interrupted_run_loses_nothing_written(setup, tmp_path):
    root, model = setup
    files, labels = data.list_images(root / "images")
    plan = data.ShardPlan(len(files), 2)
    dataset = data.ImageFolderDataset(root / "images", files, labels, 32)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=data.DistributedShardSampler(plan, [0, 1, 2], 1))
    calls = []

    def encode_then_die(images):
        calls.append(1)
        if len(calls) == 4:  # the second image of shard 1: the process "is killed" mid-shard
            raise KeyboardInterrupt
        return model.encode(images)

    with pytest.raises(KeyboardInterrupt):
        data.encode_shards(encode_then_die, loader, plan, tmp_path, hflip=False, with_labels=True, metadata={}, tag="t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors"]
    assert data.shard_complete(tmp_path / "shard-00000.safetensors")


def test_changed_settings_are_refused(setup, tmp_path):
    root, _ = setup
    _run(root, tmp_path)
    with pytest.raises(ValueError, match="different settings \\(shard_size\\)"):
        cli.main(["encode-dataset", "--model", str(root / "model"), "--images", str(root / "images"),
                  "--out", str(tmp_path), "--shard-size", "3", "--num-workers", "0", "--device", "cpu"])


def test_bf16_switch_is_refused_on_resume(setup, tmp_path):
    root, _ = setup
    _run(root, tmp_path)
    with pytest.raises(ValueError, match="different settings \\(bf16\\)"):
        _run(root, tmp_path, "--bf16")


def test_a_rank_with_another_image_list_is_refused(setup, tmp_path):
    root, _ = setup
    _run(root, tmp_path)
    files = (tmp_path / data.FILES_NAME).read_text().splitlines()
    data.check_same_files(tmp_path, files)
    with pytest.raises(ValueError, match=f"lists {len(files) - 1} images, not the {len(files)}"):
        data.check_same_files(tmp_path, files[:-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_equals_one_process(setup, tmp_path):
    root, _ = setup
    single, double = tmp_path / "single", tmp_path / "double"
    _run(root, single, "--hflip")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "softvq_fast.cli",
               "encode-dataset", "--model", str(root / "model"), "--images", str(root / "images"), "--out", str(double),
               "--shard-size", "2", "--batch-size", "1", "--num-workers", "0", "--device", "cpu", "--hflip"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1: wrote 1 shards" in result.stdout and "rank 0: wrote 2 shards" in result.stdout
    one, two = _shards(single), _shards(double)
    assert one.keys() == two.keys()
    for name in one:
        for key in one[name]:
            # fp32: each torchrun process has its own thread count, so sums run in another order
            assert rel_err(two[name][key], one[name][key]) <= 1e-5, (name, key)
    manifest_one = json.loads((single / "manifest.json").read_text())
    manifest_two = json.loads((double / "manifest.json").read_text())
    assert manifest_two["shards"] == manifest_one["shards"] and manifest_two["complete"]
