"""`softvq-fast encode-dataset`: shard contents, manifest, resume (and what it refuses or encodes
again), unreadable images, symbolic links, odd names, bad arguments, 2-process gloo run."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from support.cli import cli_error
from support.numerics import rel_err
from support.paths import ROOT
from support.tokenizer_files import SAMPLES, save_tiny_tokenizer, write_sample_images

from softvq_fast import cli, data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    model = save_tiny_tokenizer(root / "model")
    write_sample_images(root / "images")
    return root, model


def _argv(root, out, images=None, model=None, **options) -> list[str]:
    """encode-dataset's arguments; `options` override the defaults (batch_size="0": --batch-size 0)."""
    settings = {"shard_size": 2, "batch_size": 1, "num_workers": 0, "device": "cpu", **options}
    flags = [x for key, value in settings.items() for x in (f"--{key.replace('_', '-')}", str(value))]
    return ["encode-dataset", "--model", str(model or root / "model"), "--images", str(images or root / "images"),
            "--out", str(out), *flags]


def _run(root, out, *extra, images=None, model=None) -> None:
    assert cli.main(_argv(root, out, images, model) + list(extra)) == 0


def _copy_images(root, destination):
    shutil.copytree(root / "images", destination)
    return destination


def _shards(out) -> dict[str, dict[str, torch.Tensor]]:
    # cloned: load_file may map the file, and tests overwrite shard files afterwards
    return {p.name: {k: v.clone() for k, v in load_file(str(p)).items()} for p in sorted(out.glob("shard-*.safetensors"))}


def _merged(out) -> dict[str, torch.Tensor]:
    shards = list(_shards(out).values())
    return {key: torch.cat([s[key] for s in shards]) for key in shards[0]}


def _manifest(out) -> dict:
    return json.loads((out / data.MANIFEST_NAME).read_text())


def _stamp(path) -> tuple[int, int]:
    status = path.stat()
    return status.st_ino, status.st_mtime_ns


def _encoded(model, folder, files) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(torch.stack([data.load_image(folder / f, 32) for f in files]))


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
    assert list(_shards(tmp_path)) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    merged = _merged(tmp_path)
    files = data.read_file_list(tmp_path)
    assert files == sorted(SAMPLES)
    assert merged["indices"].tolist() == list(range(5))
    assert merged["labels"].tolist() == [0, 1, 1, 1, 1]  # cats/ then misc/
    images = torch.stack([data.load_image(root / "images" / f, 32) for f in files])
    with torch.no_grad():
        assert rel_err(merged["latents"], model.encode(images)) <= 1e-5
        assert rel_err(merged["latents_flip"], model.encode(images.flip(-1))) <= 1e-5
    manifest = _manifest(tmp_path)
    assert manifest["complete"] and manifest["num_images"] == 5 and manifest["latent_shape"] == [4, 8]
    assert manifest["classes"] == ["cats", "misc"] and manifest["skipped"] == []
    assert [(s["start"], s["stop"], s["count"]) for s in manifest["shards"]] == [(0, 2, 2), (2, 4, 2), (4, 5, 1)]
    assert manifest["latent_mean"] == pytest.approx(merged["latents"].double().mean().item(), rel=1e-9)
    assert manifest["latent_std"] == pytest.approx(merged["latents"].double().std(unbiased=False).item(), rel=1e-6)
    assert (manifest["vq_mean"], manifest["vq_std"]) == (model.config.vq_mean, model.config.vq_std)
    assert set(manifest["model_sha256"]) == {"config.json", "model.safetensors"}
    assert manifest["model_sha256"]["model.safetensors"] == data.file_sha256(root / "model" / "model.safetensors")


def test_resume_skips_finished_shards(setup, tmp_path):
    root, _ = setup
    _run(root, tmp_path)
    first = _shards(tmp_path)
    stamp = _stamp(tmp_path / "shard-00000.safetensors")
    (tmp_path / "shard-00001.safetensors").unlink()
    (tmp_path / "shard-00002.safetensors").write_bytes(b"damaged")
    _run(root, tmp_path)
    assert _manifest(tmp_path)["complete"]
    assert _stamp(tmp_path / "shard-00000.safetensors") == stamp
    again = _shards(tmp_path)
    for name, tensors in first.items():
        for key, value in tensors.items():
            assert torch.equal(again[name][key], value), (name, key)


def test_interrupted_run_loses_nothing_written(setup, tmp_path):
    root, model = setup
    listing = data.list_images(root / "images")
    plan = data.ShardPlan(len(listing.files), 2)
    dataset = data.ImageFolderDataset(root / "images", listing.files, listing.labels, 32)
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


def test_stale_temporary_files_are_removed_and_nothing_else(setup, tmp_path, capsys):
    root, _ = setup
    _run(root, tmp_path)
    stale = ["shard-00001.safetensors.tmp-0-4242", "shard-00007.safetensors.tmp-3-17", "manifest.json.partial",
             "files.jsonl.partial"]
    kept = ["notes.txt", "shard-00001.safetensors.tmp", "other.safetensors.tmp-0-1"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"left behind")
    capsys.readouterr()
    _run(root, tmp_path)
    assert f"removed {len(stale)} temporary files" in capsys.readouterr().out
    assert all(not (tmp_path / name).exists() for name in stale)
    assert all((tmp_path / name).read_bytes() == b"left behind" for name in kept)


def test_changed_settings_are_refused(setup, tmp_path, capsys):
    root, _ = setup
    _run(root, tmp_path)
    message = cli_error(_argv(root, tmp_path, shard_size=3), capsys)
    assert message.startswith(f"--out: {tmp_path} holds a run with different settings (shard_size: 2 -> 3)")


def test_bf16_switch_is_refused_on_resume(setup, tmp_path, capsys):
    root, _ = setup
    _run(root, tmp_path)
    assert "different settings (bf16: False -> True)" in cli_error(_argv(root, tmp_path) + ["--bf16"], capsys)


def test_a_tokenizer_changed_in_place_is_refused_on_resume(setup, tmp_path, capsys):
    root, _ = setup
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    _run(root, tmp_path / "out", model=model)
    save_tiny_tokenizer(model, seed=1)  # same config, other weights, same folder
    message = cli_error(_argv(root, tmp_path / "out", model=model), capsys)
    assert "different settings (model_sha256: the tokenizer's model.safetensors changed)" in message
    save_tiny_tokenizer(model, seed=0)
    config = (model / "config.json").read_bytes()
    (model / "config.json").write_text(json.dumps({**json.loads(config), "note": "edited"}))
    message = cli_error(_argv(root, tmp_path / "out", model=model), capsys)
    assert "(model_sha256: the tokenizer's config.json changed)" in message
    (model / "config.json").write_bytes(config)
    shutil.move(model, tmp_path / "moved")  # the same files elsewhere: the content is what counts
    _run(root, tmp_path / "out", model=tmp_path / "moved")


def test_a_changed_image_has_its_shard_encoded_again(setup, tmp_path, capsys):
    root, model = setup
    images, out = _copy_images(root, tmp_path / "images"), tmp_path / "out"
    _run(root, out, images=images)
    files = data.read_file_list(out)
    stamps = {p.name: _stamp(p) for p in out.glob("shard-*")}
    before = _merged(out)["latents"]
    changed = images / "misc" / "camera.png"  # position 2: shard 1
    Image.open(images / "misc" / "rocket.png").transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(changed)
    capsys.readouterr()
    _run(root, out, images=images)
    assert "encoding shards 1 again" in capsys.readouterr().out
    assert {p.name: _stamp(p) for p in out.glob("shard-*")}.items() - stamps.items() == {
        ("shard-00001.safetensors", _stamp(out / "shard-00001.safetensors"))}
    after = _merged(out)["latents"]
    assert rel_err(after, _encoded(model, images, files)) <= 1e-5 and rel_err(after[2], before[2]) > 1e-2
    recorded = [json.loads(line) for line in (out / data.FILES_NAME).read_text().splitlines()]
    assert recorded[2]["size"] == changed.stat().st_size and recorded[2]["mtime_ns"] == changed.stat().st_mtime_ns
    touched = images / "cats" / "chelsea.png"  # same bytes, new mtime: shard 0
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    before = _stamp(out / "shard-00000.safetensors")
    _run(root, out, images=images)
    assert _stamp(out / "shard-00000.safetensors") != before


def test_unreadable_images_are_skipped_listed_and_encoded_once_fixed(setup, tmp_path, capsys):
    root, model = setup
    images, out = _copy_images(root, tmp_path / "images"), tmp_path / "out"
    (images / "cats" / "empty.jpg").write_bytes(b"")
    (images / "misc" / "a_broken.png").write_bytes(b"not an image")  # first of its batch, a good image second
    _run(root, out, "--batch-size", "2", images=images)
    errors = capsys.readouterr().err
    files = data.read_file_list(out)
    assert files.index("cats/empty.jpg") == 1 and files.index("misc/a_broken.png") == 2
    for name in ("cats/empty.jpg", "misc/a_broken.png"):
        assert f"warning: {images / name}: skipped, cannot be read (UnidentifiedImageError" in errors
    manifest = _manifest(out)
    assert [(s["index"], s["path"]) for s in manifest["skipped"]] == [(1, "cats/empty.jpg"), (2, "misc/a_broken.png")]
    assert all(s["reason"].startswith("UnidentifiedImageError: ") for s in manifest["skipped"])
    assert [s["count"] for s in manifest["shards"]] == [1, 1, 2, 1]
    merged = _merged(out)
    readable = [0, 3, 4, 5, 6]
    assert merged["indices"].tolist() == readable
    assert merged["labels"].tolist() == [data.list_images(images).labels[i] for i in readable] == [0, 1, 1, 1, 1]
    assert rel_err(merged["latents"], _encoded(model, images, [files[i] for i in readable])) <= 1e-5
    shutil.copy(images / "misc" / "rocket.png", images / "misc" / "a_broken.png")  # fixed: encoded on the rerun
    _run(root, out, images=images)
    assert [s["index"] for s in _manifest(out)["skipped"]] == [1]
    assert _merged(out)["indices"].tolist() == [0, 2, 3, 4, 5, 6]


def test_no_readable_image_is_an_error(setup, tmp_path, capsys):
    root, _ = setup
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"not an image")
    message = cli_error(_argv(root, tmp_path / "out", images=tmp_path / "images"), capsys)
    assert message.startswith("--images: none of the 1 images could be read")
    assert _manifest(tmp_path / "out")["skipped"][0]["path"] == "a.png"


def test_symbolic_links_to_folders_and_files_are_followed(setup, tmp_path, caplog):
    root, _ = setup
    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (images / "cats").mkdir(parents=True)
    (images / "misc").mkdir()
    (elsewhere / "dogs").mkdir(parents=True)
    shutil.copy(root / "images" / "cats" / "chelsea.png", images / "cats" / "chelsea.png")
    shutil.copy(root / "images" / "misc" / "coffee.jpg", elsewhere / "dogs" / "coffee.jpg")
    shutil.copy(root / "images" / "misc" / "rocket.png", elsewhere / "rocket.png")
    (images / "dogs").symlink_to(elsewhere / "dogs", target_is_directory=True)  # a linked class folder
    (images / "misc" / "rocket.png").symlink_to(elsewhere / "rocket.png")
    (images / "misc" / "loop").symlink_to(images, target_is_directory=True)
    (images / "misc" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    with caplog.at_level(logging.WARNING, logger="softvq_fast"):
        listing = data.list_images(images)
    assert listing.files == ["cats/chelsea.png", "dogs/coffee.jpg", "misc/rocket.png"]
    assert listing.labels == [0, 1, 2] and listing.classes == ["cats", "dogs", "misc"]
    assert f"{images / 'misc' / 'loop'}: skipped, a link back to a folder that contains it" in caplog.text
    assert f"{images / 'misc' / 'dangling.png'}: skipped, a link to nothing" in caplog.text
    _, image, label, error = data.ImageFolderDataset(images, listing.files, listing.labels, 32)[1]
    assert error == "" and label == 1 and torch.equal(image, data.load_image(elsewhere / "dogs" / "coffee.jpg", 32))


def test_listing_warns_when_labels_are_off_or_a_folder_is_no_class(setup, tmp_path, caplog):
    root, _ = setup
    (tmp_path / "mixed" / "cats").mkdir(parents=True)
    (tmp_path / "classes" / "cats").mkdir(parents=True)
    (tmp_path / "classes" / "dogs").mkdir()  # holds no image
    for path in ("mixed/cats/a.png", "mixed/top.png", "classes/cats/a.png"):
        shutil.copy(root / "images" / "cats" / "chelsea.png", tmp_path / path)
    with caplog.at_level(logging.WARNING, logger="softvq_fast"):
        mixed = data.list_images(tmp_path / "mixed")
        classes = data.list_images(tmp_path / "classes")
    assert mixed.labels is None and "no class labels: 1 of 2 images sit directly in the folder (top.png" in caplog.text
    assert classes.classes == ["cats"] and "1 folders hold no image and are not classes: dogs" in caplog.text


def test_an_unreadable_folder_is_an_error(setup, tmp_path, monkeypatch):
    root, _ = setup
    images = _copy_images(root, tmp_path / "images")
    scandir = os.scandir

    def refuse_misc(path):
        if os.fspath(path) == os.fspath(images / "misc"):
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_misc)  # root ignores file modes: refuse by hand
    with pytest.raises(data.DatasetError, match=f"images: cannot read the folder {images / 'misc'} "
                                                 "\\(Permission denied\\)"):
        data.list_images(images)


def test_any_file_name_round_trips_through_the_file_list(setup, tmp_path):
    root, _ = setup
    images, out = _copy_images(root, tmp_path / "images"), tmp_path / "out"
    (images / "misc" / "rocket.png").rename(images / "misc" / "rock\net \\n.png")
    _run(root, out, images=images)
    listing = data.list_images(images)
    assert "misc/rock\net \\n.png" in listing.files
    assert data.read_file_list(out) == listing.files
    assert len((out / data.FILES_NAME).read_text().splitlines()) == len(listing.files)
    assert _manifest(out)["files"] == data.FILES_NAME


def test_a_folder_from_before_files_jsonl_reads_but_does_not_resume(setup, tmp_path, capsys):
    root, _ = setup
    _run(root, tmp_path)
    files = data.read_file_list(tmp_path)
    manifest = _manifest(tmp_path)
    del manifest["model_sha256"]
    (tmp_path / data.MANIFEST_NAME).write_text(json.dumps({**manifest, "files": data.LEGACY_FILES_NAME}))
    (tmp_path / data.LEGACY_FILES_NAME).write_text("\n".join(files) + "\n")
    (tmp_path / data.FILES_NAME).unlink()
    assert data.read_file_list(tmp_path) == files
    message = cli_error(_argv(root, tmp_path), capsys)
    assert "files: 'files.txt' -> 'files.jsonl'" in message
    assert "model_sha256: not recorded (started by an older softvq-fast)" in message


def test_a_rank_with_another_image_list_is_refused(setup, tmp_path):
    root, _ = setup
    _run(root, tmp_path)
    files = data.read_file_list(tmp_path)
    data.check_same_files(tmp_path, files)
    with pytest.raises(data.DatasetError, match=f"lists {len(files) - 1} images, not the {len(files)}"):
        data.check_same_files(tmp_path, files[:-1])


@pytest.fixture
def bad_paths(setup, tmp_path):
    """Folders and files for the bad-argument cases, under tmp_path."""
    root, _ = setup
    (tmp_path / "a_file.png").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "readme.txt").write_text("no images here")
    (tmp_path / "orphan_shards").mkdir()
    shutil.copy(root / "model" / "model.safetensors", tmp_path / "orphan_shards" / "shard-00000.safetensors")
    (tmp_path / "bad_manifest").mkdir()
    (tmp_path / "bad_manifest" / "manifest.json").write_text("{not json")
    (tmp_path / "config_only").mkdir()
    shutil.copy(root / "model" / "config.json", tmp_path / "config_only")
    return tmp_path


BAD_ARGUMENTS = [
    ({"num_workers": "-1"}, "argument --num-workers: expected an integer >= 0, got '-1'"),
    ({"batch_size": "0"}, "argument --batch-size: expected an integer >= 1, got '0'"),
    ({"batch_size": "two"}, "argument --batch-size: expected an integer >= 1, got 'two'"),
    ({"shard_size": "-3"}, "argument --shard-size: expected an integer >= 1, got '-3'"),
    ({"device": "gpu0"}, "argument --device: expected a torch device such as cpu, cuda or cuda:1, got 'gpu0'"),
    ({"device": "meta"}, "argument --device: meta holds no data"),
    ({"device": "cuda:99"}, "--device: cuda:99 is not usable here ("),
    ({"images": "nowhere"}, "--images: {tmp}/nowhere does not exist"),
    ({"images": "a_file.png"}, "--images: {tmp}/a_file.png is not a folder"),
    ({"images": "empty"}, "--images: no image files (.bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp) under {tmp}/empty"),
    ({"images": "texts"}, "--images: no image files (.bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp) under {tmp}/texts"),
    ({"out": "a_file.png"}, "--out: {tmp}/a_file.png exists and is not a folder"),
    ({"out": "orphan_shards"}, "--out: {tmp}/orphan_shards holds shard files but no manifest.json"),
    ({"out": "bad_manifest"}, "--out: {tmp}/bad_manifest/manifest.json cannot be read (Expecting property name"),
    ({"model": "nowhere"}, "--model: {tmp}/nowhere/config.json: not found"),
    ({"model": "config_only"}, "--model: {tmp}/config_only"),
]


@pytest.mark.parametrize("options,expected", BAD_ARGUMENTS, ids=[str(o) for o, _ in BAD_ARGUMENTS])
def test_bad_arguments_fail_first_with_one_line_naming_the_argument(setup, bad_paths, capsys, options, expected):
    root, _ = setup
    options = dict(options)
    paths = {key: bad_paths / options.pop(key) for key in ("images", "out", "model") if key in options}
    out = paths.pop("out", bad_paths / "out")
    before = {p: p.stat().st_mtime_ns for p in bad_paths.rglob("*")}
    message = cli_error(_argv(root, out, **paths, **options), capsys)
    assert message.startswith(expected.format(tmp=bad_paths)), message
    assert {p: p.stat().st_mtime_ns for p in bad_paths.rglob("*")} == before  # nothing written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_equals_one_process(setup, tmp_path):
    root, _ = setup
    images = _copy_images(root, tmp_path / "images")
    (images / "misc" / "broken.png").write_bytes(b"not an image")  # each run skips it alike
    single, double = tmp_path / "single", tmp_path / "double"
    _run(root, single, "--hflip", images=images)
    double.mkdir()
    (double / "shard-00001.safetensors.tmp-1-999").write_bytes(b"a killed run's")  # rank 0 removes it
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "softvq_fast.cli",
               *_argv(root, double, images=images), "--hflip"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1: wrote 1 shards" in result.stdout and "rank 0: wrote 2 shards" in result.stdout
    assert "removed 1 temporary files" in result.stdout
    one, two = _shards(single), _shards(double)
    assert one.keys() == two.keys()
    for name in one:
        for key in one[name]:
            # fp32: each torchrun process has its own thread count, so sums run in another order
            assert rel_err(two[name][key], one[name][key]) <= 1e-5, (name, key)
    manifest_one, manifest_two = _manifest(single), _manifest(double)
    assert manifest_two["shards"] == manifest_one["shards"] and manifest_two["complete"]
    assert manifest_two["skipped"] == manifest_one["skipped"] and manifest_one["skipped"][0]["path"] == "misc/broken.png"
