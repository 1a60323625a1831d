"""Hugging Face Hub repo ids in every loader and command, offline: a cache folder written by the
test in huggingface_hub's layout, HF_HUB_OFFLINE=1, no network."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.hub_cache import add_snapshot, use_offline_cache

from softvq_fast import cli, hub
from softvq_fast.generation import load_generator
from softvq_fast.models import DiT, SiT, SoftVQVAE
from softvq_fast.models.checkpoint import CheckpointError

MAIN, OTHER = "1" * 40, "2" * 40  # commit hashes


def _release_files(folder):
    return {name: folder / name for name in ("config.json", "model.safetensors")}


@pytest.fixture
def cache(reference_dir, tmp_path, monkeypatch):
    """Offline cache holding the reference tokenizer, SiT and DiT as softvq/tok, softvq/sit, softvq/dit."""
    folder = tmp_path / "hub"
    use_offline_cache(folder, monkeypatch)
    vectors = reference_dir / "vectors"
    for repo, name in (("softvq/tok", "tokenizer_tiny"), ("softvq/sit", "sit_tiny"), ("softvq/dit", "dit_tiny")):
        add_snapshot(folder, repo, _release_files(vectors / name), commit=MAIN)
    return folder


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tokenizer_from_a_repo_id_is_the_cached_snapshot(cache, reference_dir):
    model = SoftVQVAE.from_pretrained("softvq/tok")
    assert model.load_report.weights_file == str(cache / "models--softvq--tok" / "snapshots" / MAIN / "model.safetensors")
    assert _same_weights(model, SoftVQVAE.from_pretrained(reference_dir / "vectors" / "tokenizer_tiny"))


def test_generators_from_repo_ids(cache, reference_dir):
    vectors = reference_dir / "vectors"
    for repo, family, name in (("softvq/sit", SiT, "sit_tiny"), ("softvq/dit", DiT, "dit_tiny")):
        loaded = load_generator(repo)
        assert type(loaded) is family
        assert _same_weights(loaded, family.from_pretrained(vectors / name))
        assert _same_weights(family.from_pretrained(repo), loaded)


def test_revision_by_branch_and_by_commit(cache, reference_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(reference_dir / "vectors" / "sit_tiny", other)
    state = load_file(str(other / "model.safetensors"))
    save_file({k: v + 1 for k, v in state.items()}, str(other / "changed.safetensors"))
    add_snapshot(cache, "softvq/sit", {"config.json": other / "config.json", "model.safetensors": other / "changed.safetensors"},
                 commit=OTHER, refs=("v1",))
    main = load_generator("softvq/sit")
    for revision in ("v1", OTHER):
        changed = load_generator("softvq/sit", revision=revision)
        assert torch.equal(changed.pos_embed, main.pos_embed + 1)
    assert _same_weights(load_generator("softvq/sit", revision="main"), main)


def test_offline_errors_name_the_repo_and_what_is_missing(cache, reference_dir):
    note = f"not in the Hugging Face cache at {cache} (HF_HUB_OFFLINE is set: nothing is downloaded)"
    with pytest.raises(CheckpointError) as failure:
        SoftVQVAE.from_pretrained("softvq/absent")
    assert str(failure.value) == f"'softvq/absent' is not a local folder, and as a Hub repo id its config.json is {note}"
    with pytest.raises(CheckpointError, match=r"'softvq/sit' \(revision 'v9'\) is not a local folder"):
        SiT.from_pretrained("softvq/sit", revision="v9")
    add_snapshot(cache, "softvq/config-only", {"config.json": reference_dir / "vectors" / "dit_tiny" / "config.json"},
                 commit=MAIN)
    with pytest.raises(CheckpointError) as failure:
        load_generator("softvq/config-only")
    assert str(failure.value) == (f"Hub repo 'softvq/config-only' has config.json but no weights: model.safetensors {note}, "
                                  f"pytorch_model.bin {note}")


def test_a_repo_with_pytorch_model_bin_only(cache, reference_dir, tmp_path):
    folder = reference_dir / "vectors" / "dit_tiny"
    torch.save(load_file(str(folder / "model.safetensors")), tmp_path / "pytorch_model.bin")
    add_snapshot(cache, "softvq/dit-bin", {"config.json": folder / "config.json",
                                           "pytorch_model.bin": tmp_path / "pytorch_model.bin"}, commit=MAIN)
    model = load_generator("softvq/dit-bin")
    assert model.load_report.weights_file.endswith("pytorch_model.bin")
    assert _same_weights(model, DiT.from_pretrained(folder))


def test_a_local_folder_wins_over_the_repo_id_of_the_same_spelling(cache, reference_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(reference_dir / "vectors" / "dit_tiny", tmp_path / "softvq" / "sit")
    assert type(load_generator("softvq/sit")) is DiT  # the local folder, not the cached SiT
    with pytest.raises(ValueError, match="revision='v1' applies to Hub repo ids, but 'softvq/sit' is a local folder"):
        load_generator("softvq/sit", revision="v1")


@pytest.mark.parametrize("path", ["./softvq/absent", "/no/such/folder", "a/b/c", "a--b/c", "softvq/.hidden", "name"])
def test_paths_that_are_not_repo_ids_keep_the_local_error(path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # the Hub must not be asked
    assert not hub.is_repo_id(path)
    for loader in (SoftVQVAE.from_pretrained, load_generator, SiT.from_pretrained):
        with pytest.raises(CheckpointError, match="config.json: not found"):
            loader(path)


def test_missing_huggingface_hub_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match=r"'softvq/tok' is not a local folder; loading it as a Hugging Face Hub "
                                              r"repo id needs huggingface_hub \(pip install 'softvq-fast\[hub\]'\)"):
        SoftVQVAE.from_pretrained("softvq/tok")


def _hub_error(name: str) -> Exception:
    """A huggingface_hub error of that class (built without the HTTP response its __init__ wants)."""
    from huggingface_hub import errors

    cls = getattr(errors, name)
    return cls.__new__(cls)


@pytest.mark.parametrize("error, message", [
    ("GatedRepoError", "Hub repo 'softvq/x' (revision 'v2') is gated: accept its terms on the Hub, then set HF_TOKEN "
                       "or log in"),
    ("RepositoryNotFoundError", "'softvq/x' (revision 'v2') is neither a local folder nor a Hub repo that can be read "
                                "(not found, or private: set HF_TOKEN or log in)"),
    ("RevisionNotFoundError", "Hub repo 'softvq/x' has no revision 'v2'"),
    ("EntryNotFoundError", "Hub repo 'softvq/x' (revision 'v2') has no config.json: not a release folder"),
])
def test_online_hub_errors_name_the_repo_and_what_is_missing(error, message, monkeypatch):
    import huggingface_hub

    def download(repo_id, filename, **kwargs):
        raise _hub_error(error)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(CheckpointError) as failure:
        load_generator("softvq/x", revision="v2")
    assert str(failure.value) == message


def test_a_repo_without_weights_is_named(reference_dir, monkeypatch):
    import huggingface_hub

    def download(repo_id, filename, **kwargs):
        if filename == "config.json":
            return str(reference_dir / "vectors" / "sit_tiny" / "config.json")
        raise _hub_error("EntryNotFoundError")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(CheckpointError) as failure:
        SiT.from_pretrained("softvq/x")
    assert str(failure.value) == ("Hub repo 'softvq/x' has config.json but no weights: model.safetensors (not in the repo), "
                                  "pytorch_model.bin (not in the repo)")


def test_huggingface_hub_is_imported_only_for_repo_ids(reference_dir):
    vectors = reference_dir / "vectors"
    code = (
        "import sys\n"
        "from softvq_fast.models import SoftVQVAE\n"
        "from softvq_fast.generation import load_generator\n"
        f"SoftVQVAE.from_pretrained({str(vectors / 'tokenizer_tiny')!r})\n"
        f"load_generator({str(vectors / 'sit_tiny')!r})\n"
        "assert 'huggingface_hub' not in sys.modules, 'imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_generate_command_takes_repo_ids_through_the_environment(cache, tmp_path):
    """A fresh process: HF_HUB_CACHE and HF_HUB_OFFLINE reach huggingface_hub as users set them."""
    out = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "softvq_fast.cli", "generate", "--tokenizer", "softvq/tok", "--generator", "softvq/sit",
         "--classes", "0,1", "--steps", "1", "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    missing = subprocess.run(
        [sys.executable, "-m", "softvq_fast.cli", "generate", "--tokenizer", "softvq/nothing", "--generator", "softvq/sit",
         "--classes", "0", "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        "softvq-fast generate: error: argument --tokenizer: 'softvq/nothing' is not a local folder, and as a Hub "
        f"repo id its config.json is not in the Hugging Face cache at {cache} (HF_HUB_OFFLINE is set: nothing is "
        "downloaded)"
    )


def test_profile_and_reconstruct_take_repo_ids(cache, tmp_path, capsys):
    from PIL import Image

    trace = tmp_path / "trace.json"
    assert cli.main(["profile", "--generator", "softvq/dit", "--steps", "1", "--batch", "1", "--device", "cpu",
                     "--dtype", "float32", "--out", str(trace)]) == 0
    assert "traceEvents" in json.loads(trace.read_text())
    image = tmp_path / "gray.png"
    Image.new("RGB", (80, 64), (120, 130, 140)).save(image)
    assert cli.main(["reconstruct", "--model", "softvq/tok", str(image), "--out", str(tmp_path / "recon"),
                     "--device", "cpu"]) == 0
    assert (tmp_path / "recon" / "gray_reconstruction.png").is_file()
