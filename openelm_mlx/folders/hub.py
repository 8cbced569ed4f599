"""Fetching model files from the Hugging Face Hub (honours HF_HOME and HF_HUB_OFFLINE)."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import CheckpointError, HubError

# What loading or converting a model needs; pytorch_model*.bin is fetched only when these hold no weights.
MODEL_FILES = (
    "config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
)


def download(repo_id: str, patterns: Sequence[str] = MODEL_FILES, revision: str | None = None) -> Path:
    """Download only the files matching `patterns` from `repo_id`; return the local snapshot folder.

    With HF_HUB_OFFLINE=1 the local cache is used and nothing is fetched.

    Raises:
        HubError: naming the repo, when it is unknown, gated, or not cached while offline.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    not_an_id = HubError(f"{repo_id}: not a local path, nor a Hugging Face repo id like 'apple/OpenELM-270M'")
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        raise not_an_id
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns), revision=revision))
    except HFValidationError:
        raise not_an_id from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such Hugging Face repo (or it is gated: run `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"{repo_id}: not in the local Hugging Face cache and downloads are off or unreachable "
            "(HF_HUB_OFFLINE is set, or no network)"
        ) from None
    except HfHubHTTPError as e:
        raise HubError(f"{repo_id}: download failed ({e})") from None
    except (OSError, ValueError) as e:  # a full cache disk, a bad revision, any other Hub library failure
        raise HubError(f"{repo_id}: download failed ({' '.join(str(e).split())[:200]})") from None


def local_path(path_or_repo: str | Path) -> Path | None:
    """The local path `path_or_repo` names, or None when nothing is there (it may be a repo id).

    Raises:
        CheckpointError: the path is a link that leads nowhere (a loop, a dangling link) or cannot be read.
    """
    path = Path(path_or_repo)
    try:
        os.stat(path)
        return path
    except FileNotFoundError:
        if not os.path.lexists(path):
            return None
        raise CheckpointError(f"{path}: a symbolic link to nothing (its target does not exist)") from None
    except (NotADirectoryError, OSError) as e:
        if isinstance(e, NotADirectoryError) or e.errno == errno.ENAMETOOLONG:
            return None  # no such path: maybe a repo id
        raise CheckpointError(f"{path}: {(e.strerror or str(e)).lower()}") from None


def resolve(path_or_repo: str | Path, patterns: Sequence[str] = MODEL_FILES) -> Path:
    """A local folder as is; anything else is treated as a Hub repo id and downloaded."""
    path = local_path(path_or_repo)
    return path if path is not None else download(str(path_or_repo), patterns)
