"""Where a model comes from: a local path, a Hugging Face Hub repo id, or a `kaggle:` handle.

Downloads report (file name, bytes done, bytes total) to a `progress` callback so the page can draw a bar and
the CLI a tqdm line; every failure a person can fix (gated repo, bad token, no network, full disk, a
connection dropped mid-file) becomes a CheckpointError that says what happened and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import re
from collections.abc import Callable, Iterator

from .config import CheckpointError

Progress = Callable[[str, int, int], None]  # (file name, bytes done, bytes total)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
KAGGLE_PREFIX = "kaggle:"
# What a PaliGemma repo needs; skips e.g. duplicate .bin weights and README images.
_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.npz"]


def is_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not os.path.exists(source)


def is_kaggle(source: str) -> bool:
    return source.startswith(KAGGLE_PREFIX)


def weights_in(path: str, source: str | None = None) -> str:
    """The weights of a resolved source: a file as it is, a Hugging Face folder (config.json) as it is, or the
    single weights .npz anywhere under a folder (companion .npz files do not count)."""
    from .companions import NOT_WEIGHTS  # companions builds on this module

    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "config.json")):
        return path
    found = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(path)
        for name in names
        if name.endswith(".npz") and name not in NOT_WEIGHTS
    )
    if len(found) != 1:
        listed = ", ".join(os.path.relpath(p, path) for p in found) or "none"
        raise CheckpointError(
            f"{source or path} should hold a Hugging Face model (config.json + *.safetensors) or "
            f"exactly one weights .npz; found: {listed}"
        )
    return found[0]


def resolve(source: str | os.PathLike, token: str | None = None, progress: Progress | None = None) -> str:
    """A local file/folder as it is, or the local copy of a Hub repo or Kaggle model (downloaded once, then
    cached)."""
    source = os.fspath(source)
    if os.path.exists(source):
        return source
    if is_kaggle(source):
        from . import kaggle

        return kaggle.download(source[len(KAGGLE_PREFIX) :], progress)
    if not is_repo_id(source):
        raise CheckpointError(
            f"'{source}' is neither an existing file or folder, a Hugging Face repo id like "
            f"'google/paligemma2-3b-mix-224', nor a Kaggle handle like "
            f"'kaggle:google/paligemma-2/jax/paligemma2-3b-mix-224'"
        )
    return download(source, token, progress)


def _token(token: str | None) -> str | None:
    return token or os.environ.get("HF_TOKEN") or None


def download(
    repo_id: str, token: str | None = None, progress: Progress | None = None, patterns: list[str] | None = None
) -> str:
    """The local snapshot folder of a model repo, fetching each wanted file with its own progress; offline or
    unreachable, the cached snapshot if there is one."""
    from huggingface_hub import HfApi, snapshot_download

    patterns = patterns or _PATTERNS
    token = _token(token)
    with _clear_errors(repo_id):
        try:
            info = HfApi().repo_info(repo_id, token=token)
        except _offline_errors():
            return snapshot_download(repo_id, allow_patterns=patterns, token=token, local_files_only=True)
        names = [s.rfilename for s in info.siblings or [] if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)]
        # By branch name, not info.sha: that records refs/main, which an offline run needs to find the snapshot.
        paths = [_fetch(repo_id, name, "model", None, token, progress) for name in names]
    if not paths:
        raise CheckpointError(f"{repo_id} holds no weights or config files ({', '.join(patterns)})")
    return paths[0][: -len(names[0])].rstrip(os.sep)  # .../snapshots/<commit>/<name> -> the snapshot folder


def repo_summary(repo_id: str, token: str | None = None) -> tuple[dict[str, int], bool]:
    """({file: bytes} of what `download` would fetch, whether the repo is gated): metadata only, no weights;
    it answers for gated repos without a token too."""
    from huggingface_hub import HfApi

    api, token = HfApi(), _token(token)
    with _clear_errors(repo_id):
        gated = bool(api.repo_info(repo_id, token=token).gated)
        files = {
            f.path: int(f.size or 0)
            for f in api.list_repo_tree(repo_id, recursive=True, token=token)
            if getattr(f, "size", None) is not None and any(fnmatch.fnmatch(f.path, p) for p in _PATTERNS)
        }
    return files, gated


def download_file(
    repo_id: str, filename: str, repo_type: str = "model", token: str | None = None, progress: Progress | None = None
) -> str:
    """One file of a repo (e.g. a Space's vae-oid.npz, or a config.json before the weights), cached."""
    with _clear_errors(repo_id, filename):
        return _fetch(repo_id, filename, repo_type, None, _token(token), progress)


def _fetch(repo_id, filename, repo_type, revision, token, progress) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(
        repo_id,
        filename,
        repo_type=repo_type,
        revision=revision,
        token=token,
        tqdm_class=_progress_bar_class(progress, filename) if progress else None,
    )


def _progress_bar_class(progress: Progress, filename: str):
    """A tqdm class that forwards the bytes of one file to `progress` (huggingface_hub creates the bar)."""
    from tqdm.auto import tqdm

    class Reporting(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)  # huggingface_hub's own tqdm option
            kwargs["disable"] = True  # the callback draws; tqdm only counts
            super().__init__(*args, **kwargs)
            self.n = kwargs.get("initial", 0)
            progress(filename, self.n, self.total or 0)

        def update(self, n=1):
            self.n += n
            progress(filename, self.n, self.total or 0)

    return Reporting


def cli_progress() -> Progress:
    """A progress callback drawing one tqdm bar per file on stderr, for the command line."""
    from tqdm.auto import tqdm

    bars: dict[str, tqdm] = {}

    def report(name: str, done: int, total: int) -> None:
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = tqdm(total=total or None, desc=name, unit="B", unit_scale=True, leave=True)
        bar.update(done - bar.n)
        if total and done >= total:
            bar.close()

    return report


def _offline_errors() -> tuple[type[BaseException], ...]:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return (OfflineModeIsEnabled, httpx2.ConnectError, httpx2.ConnectTimeout)


@contextlib.contextmanager
def _clear_errors(repo_id: str, filename: str | None = None) -> Iterator[None]:
    """Turns the Hub client's exceptions into one line a person can act on."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    what = f"{filename} from {repo_id}" if filename else repo_id
    try:
        yield
    except GatedRepoError as err:
        status = err.response.status_code if err.response is not None else 401
        raise CheckpointError(
            f"{repo_id} is gated: accept its licence on huggingface.co/{repo_id} and set HF_TOKEN to a token of "
            f"that account" + (" (the token given has no access yet)" if status == 403 else "")
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id} was not found on the Hugging Face Hub (or it is private and HF_TOKEN lacks access)"
        ) from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"could not download {what}: the Hugging Face Hub cannot be reached and no cached copy exists. "
            f"Download it where there is internet and pass the local folder instead"
        ) from None
    except EntryNotFoundError:
        raise CheckpointError(f"{repo_id} has no file {filename}") from None
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code == 401:
            raise CheckpointError(
                "the Hugging Face token was refused (invalid or expired): create a new one at "
                "huggingface.co/settings/tokens and set HF_TOKEN to it"
            ) from None
        raise CheckpointError(f"could not download {what}: the Hub answered {err}") from None
    except (httpx2.ConnectError, httpx2.ConnectTimeout):
        raise CheckpointError(
            f"could not download {what}: the Hugging Face Hub cannot be reached (no network?) and no cached copy exists"
        ) from None
    except (httpx2.TransportError, httpx2.StreamError):
        raise CheckpointError(
            f"the connection dropped while downloading {what}; run the same command again to continue "
            f"(files already complete are kept in {constants.HF_HUB_CACHE})"
        ) from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise CheckpointError(
                f"the disk is full while downloading {what} into {constants.HF_HUB_CACHE}: free some space or set "
                f"HF_HOME to a folder on a larger disk"
            ) from None
        if "Consistency check failed" in str(err):
            raise CheckpointError(
                f"the download of {what} ended early (the connection dropped); run the same command again"
            ) from None
        raise CheckpointError(f"could not download {what}: {err.__class__.__name__}: {err}") from None
