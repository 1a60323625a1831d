"""A Hugging Face Hub cache written by hand, in huggingface_hub's layout, for offline tests."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest


def use_offline_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point huggingface_hub at `cache` with HF_HUB_OFFLINE=1: the variables for subprocesses, and
    the module constants for this process (huggingface_hub reads both once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def add_snapshot(cache: Path, repo_id: str, files: dict[str, Path], *, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `files` (name in the repo -> file holding its content) into `cache` as one commit of
    the model repo `repo_id`: models--owner--name/blobs/<hash> (here a link to the content),
    snapshots/<commit>/<name> linking to the blob, refs/<ref> naming the commit. Returns the
    snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        blob = repo / "blobs" / hashlib.sha256(str(source.resolve()).encode()).hexdigest()
        if not blob.exists():
            blob.symlink_to(source.resolve())
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot
