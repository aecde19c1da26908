"""Files a checkpoint needs but may not ship: the mask decoder `vae-oid.npz` and the SentencePiece tokenizer.

Looked up in this order: an explicit path, beside the weights, the local caches (~/.cache/paligemma and the
Hugging Face cache), then where they are published: the Hub Space `big-vision/paligemma` (mask decoder) and
big_vision's public bucket over HTTPS. A download happens once; every file is checked by its layout before use
(shapes for the decoder, loading for the tokenizer, never unpickled).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable

from .config import CheckpointError
from .hub import Progress

BUCKET_ENV = "PALIGEMMA_BUCKET"  # a mirror of the bucket (or, in tests, a dead loopback address)
BUCKET = os.environ.get(BUCKET_ENV, "https://storage.googleapis.com/big_vision")  # HTTPS face of gs://big_vision
SPACE = "big-vision/paligemma"
CACHE_ENV = "PALIGEMMA_CACHE"
MASK_DECODER_NAME = "vae-oid.npz"
TOKENIZER_NAMES = ("paligemma_tokenizer.model", "tokenizer.model")  # the published name first
TRAIN_STATE_NAME = "train_state.npz"  # `python -m paligemma.train --resume`'s state, beside its checkpoint mid-run
# .npz files a checkpoint folder may hold beside the weights: the mask decoder, the VQ-VAE encoder that training
# the demo model's masks uses (older checkouts kept it in assets/demo), and a resumable training run's state.
NOT_WEIGHTS = frozenset({MASK_DECODER_NAME, "vqvae-encoder.npz", TRAIN_STATE_NAME})


class CompanionMissing(CheckpointError):
    """A companion file that is neither given, beside the weights, cached, nor downloadable now."""


@dataclasses.dataclass(frozen=True)
class Companion:
    what: str  # for messages
    file_name: str  # the published name, also looked for beside the weights and in the cache
    other_names: tuple[str, ...]  # more names accepted beside the weights
    bucket_path: str  # under BUCKET
    in_space: bool  # also in the Hub Space SPACE
    argument: str  # load(...) keyword, CLI flag and registry field are derived from it
    check: Callable[[str], None]

    @property
    def published(self) -> str:
        space = f"the Hugging Face Space {SPACE} (file {self.file_name}) and " if self.in_space else ""
        return f"{space}{BUCKET}/{self.bucket_path}"

    def missing(self, reason: str) -> CompanionMissing:
        flag = "--" + self.argument.replace("_", "-")
        return CompanionMissing(
            f"no {self.what} ({self.file_name}) beside the weights or in the cache, and {reason}. It is published at "
            f"{self.published}; download it and pass {self.argument}=PATH (CLI {flag} PATH, registry field "
            f'"{self.argument}")'
        )


def _check_mask_decoder(path: str) -> None:
    from postprocess.vqvae import load_vqvae_params  # compares every array with the published shapes

    try:
        load_vqvae_params(path)
    except ValueError as err:
        raise CheckpointError(f"{path} is not a usable mask decoder: {err}") from None


def _check_tokenizer(path: str) -> None:
    from .tokenizer import Tokenizer

    try:
        Tokenizer(path)
    except (ValueError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{path} is not a usable SentencePiece tokenizer: {err}") from None


MASK_DECODER = Companion(
    "mask decoder", MASK_DECODER_NAME, (), "paligemma/vae-oid.npz", True, "mask_decoder", _check_mask_decoder
)
TOKENIZER = Companion(
    "tokenizer",
    TOKENIZER_NAMES[0],
    TOKENIZER_NAMES[1:],
    "paligemma_tokenizer.model",
    False,
    "tokenizer",
    _check_tokenizer,
)


def cache_folder() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "paligemma")


def find_mask_decoder(
    weights_folder: str | None,
    explicit: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: Progress | None = None,
) -> str:
    return find(MASK_DECODER, weights_folder, explicit, offline, progress)


def find_tokenizer(
    weights_folder: str | None,
    explicit: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: Progress | None = None,
) -> str:
    return find(TOKENIZER, weights_folder, explicit, offline, progress)


def find(
    companion: Companion,
    weights_folder: str | None,
    explicit=None,
    offline: bool | None = None,
    progress: Progress | None = None,
) -> str:
    """The checked local path of a companion file; CompanionMissing when it cannot be had."""
    if explicit is not None:
        path = os.fspath(explicit)
        if not os.path.isfile(path):
            raise CheckpointError(f"{companion.argument}={path!r}: no such file")
        companion.check(path)
        return path
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    for folder in filter(None, (weights_folder, cache_folder())):
        for name in (companion.file_name, *companion.other_names):
            if os.path.isfile(os.path.join(folder, name)):
                path = os.path.join(folder, name)
                companion.check(path)
                return path
    path = _from_space(companion, offline, progress) or (None if offline else _from_bucket(companion, progress))
    if path is None:
        raise companion.missing("this machine is offline" if offline else "neither published copy could be downloaded")
    companion.check(path)
    return path


def _from_space(companion: Companion, offline: bool, progress: Progress | None) -> str | None:
    """The Space's copy through huggingface_hub (which caches it); None when the Hub cannot deliver it. A cached
    copy needs no network; otherwise one metadata request first, because it fails at once where the Hub cannot
    be reached, while the download itself would retry for about 20 s."""
    if not companion.in_space:
        return None
    from huggingface_hub import HfApi, hf_hub_download

    from .hub import _progress_bar_class

    def fetch(local_files_only: bool) -> str:
        return hf_hub_download(
            SPACE,
            companion.file_name,
            repo_type="space",
            local_files_only=local_files_only,
            tqdm_class=_progress_bar_class(progress, companion.file_name) if progress else None,
        )

    try:
        return fetch(local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: download it unless offline
        if offline:
            return None
    try:
        HfApi().repo_info(SPACE, repo_type="space")
        return fetch(local_files_only=False)
    except Exception:  # noqa: BLE001 - any Hub failure means: try the bucket
        return None


def _from_bucket(companion: Companion, progress: Progress | None, chunk: int = 1 << 20) -> str | None:
    """Downloads the bucket's copy into the cache folder (complete files only appear there); None on failure."""
    target = os.path.join(cache_folder(), companion.file_name)
    os.makedirs(cache_folder(), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_folder(), suffix=".incomplete", delete=False) as out:
        try:
            with urllib.request.urlopen(f"{BUCKET}/{companion.bucket_path}", timeout=30) as response:
                total, done = int(response.headers.get("Content-Length") or 0), 0
                while block := response.read(chunk):
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(companion.file_name, done, total)
        except (urllib.error.URLError, OSError):
            done, total = -1, 0
    if done < 0 or (total and done != total):
        os.unlink(out.name)
        return None
    os.replace(out.name, target)
    return target
