"""Release folders from the Hugging Face Hub: a repo id "owner/name" (the authors publish theirs
as e.g. "SoftVQVAE/softvq-l-64" and "SoftVQVAE/sit-xl_softvq-l-64", config.json and
model.safetensors at the repo root) resolved to its snapshot folder in huggingface_hub's cache.

huggingface_hub is imported only when an argument is not an existing local folder (install it
with `pip install 'softvq-fast[hub]'`). It downloads into its cache (HF_HUB_CACHE, HF_HOME) and,
with HF_HUB_OFFLINE=1, only reads that cache. An existing local folder always wins over a repo id
of the same spelling.
"""
from __future__ import annotations

import re
from pathlib import Path

from softvq_fast.models.checkpoint import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME, CheckpointError

# owner/name of letters, digits, '-', '_', '.', not starting or ending with '-' or '.'; '--' and
# '..' are refused as the Hub does (the cache joins owner and name with '--').
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(f"{_NAME}/{_NAME}")


def is_repo_id(text: str) -> bool:
    """Whether `text` is spelled like a Hub repo id "owner/name"."""
    return bool(_REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text


def resolve(path_or_repo_id: str | Path, *, revision: str | None = None) -> Path:
    """The local folder holding a release: `path_or_repo_id` itself when it is an existing folder,
    else, when it is spelled "owner/name", the snapshot folder of that Hub repo at `revision`
    (a branch, tag or commit; default main) in huggingface_hub's cache, holding config.json and
    the weights (model.safetensors, else pytorch_model.bin), downloaded unless cached. Anything
    else is returned as a Path: the loader then names what is missing there.

    Raises CheckpointError naming the repo id and what is missing (the repo, the revision,
    config.json, the weights, huggingface_hub itself, or the cache entry when offline)."""
    local = Path(path_or_repo_id)
    if local.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repo ids, but {str(local)!r} is a local folder")
        return local
    if not is_repo_id(str(path_or_repo_id)):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repo ids, but {str(path_or_repo_id)!r} is neither "
                             "a local folder nor a repo id 'owner/name'")
        return local
    return _snapshot(str(path_or_repo_id), revision)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
        )
    except ImportError as exc:
        raise CheckpointError(
            f"{where} is not a local folder; loading it as a Hugging Face Hub repo id needs huggingface_hub "
            "(pip install 'softvq-fast[hub]')"
        ) from exc

    from softvq_fast import __version__

    why = "HF_HUB_OFFLINE is set: nothing is downloaded" if constants.HF_HUB_OFFLINE else "and the Hub could not be reached"
    not_cached = f"not in the Hugging Face cache at {constants.HF_HUB_CACHE} ({why})"

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=revision, library_name="softvq-fast",
                                    library_version=__version__))

    # First match wins: a gated repo is also "not found", a missing cache entry also a missing file.
    failures = (
        (GatedRepoError, f"Hub repo {where} is gated: accept its terms on the Hub, then set HF_TOKEN or log in"),
        (RepositoryNotFoundError, f"{where} is neither a local folder nor a Hub repo that can be read "
                                  "(not found, or private: set HF_TOKEN or log in)"),
        (RevisionNotFoundError, f"Hub repo {repo_id!r} has no revision {revision!r}"),
        (LocalEntryNotFoundError, f"{where} is not a local folder, and as a Hub repo id its {CONFIG_NAME} is {not_cached}"),
        (EntryNotFoundError, f"Hub repo {where} has no {CONFIG_NAME}: not a release folder"),
    )
    try:
        config = fetch(CONFIG_NAME)
    except tuple(kind for kind, _ in failures) as exc:
        raise CheckpointError(next(message for kind, message in failures if isinstance(exc, kind))) from exc
    missing = []
    for weights in (SAFETENSORS_NAME, PICKLE_NAME):
        try:
            fetch(weights)
            return config.parent
        except LocalEntryNotFoundError:
            missing.append(f"{weights} {not_cached}")
        except EntryNotFoundError:
            missing.append(f"{weights} (not in the repo)")
    raise CheckpointError(f"Hub repo {where} has {CONFIG_NAME} but no weights: " + ", ".join(missing))
