"""Where a model comes from: a local path, or a Hugging Face Hub repo id downloaded with huggingface_hub."""

from __future__ import annotations

import os
import re

from .config import CheckpointError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# What a PaliGemma repo needs; skips e.g. duplicate .bin weights and README images.
_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.npz"]


def is_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not os.path.exists(source)


def resolve(source: str | os.PathLike, token: str | None = None) -> str:
    """A local file/folder as it is, or the local snapshot of a Hub repo (downloaded once, then cached)."""
    source = os.fspath(source)
    if os.path.exists(source):
        return source
    if not is_repo_id(source):
        raise CheckpointError(
            f"'{source}' is neither an existing file or folder nor a Hugging Face repo id like "
            f"'google/paligemma2-3b-mix-224'")
    return download(source, token)


def download(repo_id: str, token: str | None = None) -> str:
    # Imported here: the Hub client is only needed when a model actually comes from the Hub.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError)

    token = token or os.environ.get("HF_TOKEN") or None
    try:
        return snapshot_download(repo_id, allow_patterns=_PATTERNS, token=token)
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id} is gated: accept its licence on huggingface.co and set HF_TOKEN to a token of that account") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id} was not found on the Hugging Face Hub (or it is private and HF_TOKEN lacks access)") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"could not download {repo_id}: the Hugging Face Hub cannot be reached and no cached copy exists. "
            f"Download it where there is internet and pass the local folder instead") from None
    except OSError as err:  # network errors of the HTTP client are OSErrors too
        raise CheckpointError(f"could not download {repo_id} from the Hugging Face Hub: {err.__class__.__name__}") from None
