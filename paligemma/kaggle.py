"""`kaggle:OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]` sources: big_vision .npz checkpoints fetched with kagglehub.

kagglehub reads the credentials itself (KAGGLE_USERNAME + KAGGLE_KEY, KAGGLE_API_TOKEN, or ~/.kaggle/kaggle.json)
and caches under KAGGLEHUB_CACHE (default ~/.cache/kagglehub); nothing here reads or logs them. A handle with a
version is served from that cache without any network call.
"""

from __future__ import annotations

import os
import re
import threading

from .config import CheckpointError
from .hub import Progress, weights_in

_HANDLE = re.compile(r"^[\w.-]+/[\w.-]+/[\w.-]+/[\w.-]+(/\d+)?$")
_POLL_S = 0.5


def download(handle: str, progress: Progress | None = None) -> str:
    """The path of the one weights .npz inside the downloaded (or cached) Kaggle model."""
    if not _HANDLE.match(handle):
        raise CheckpointError(
            f"'kaggle:{handle}' is not a Kaggle model handle: expected kaggle:OWNER/MODEL/FRAMEWORK/VARIATION"
            f"[/VERSION], e.g. kaggle:google/paligemma-2/jax/paligemma2-3b-mix-224"
        )
    try:
        import kagglehub
    except ImportError:
        raise CheckpointError("kaggle: sources need the kagglehub package: pip install kagglehub") from None
    with _watch_folder(handle, progress):
        try:
            folder = kagglehub.model_download(handle)
        except Exception as err:  # noqa: BLE001 - kagglehub raises many kinds; each becomes one clear line
            raise _clear_error(handle, err) from None
    return weights_in(folder, f"kaggle:{handle}")


def _clear_error(handle: str, err: Exception) -> CheckpointError:
    import requests
    from kagglehub.exceptions import KaggleApiHTTPError, UnauthenticatedError

    status = getattr(getattr(err, "response", None), "status_code", None)
    page = f"https://www.kaggle.com/models/{'/'.join(handle.split('/')[:2])}"
    if isinstance(err, UnauthenticatedError) or status in (401, 403):
        return CheckpointError(
            f"Kaggle refused kaggle:{handle} ({status or 'not signed in'}): accept the model's licence at {page} and "
            f"set KAGGLE_USERNAME and KAGGLE_KEY (or put kaggle.json in ~/.kaggle)"
        )
    if status == 404:
        return CheckpointError(f"kaggle:{handle} was not found on Kaggle: check the handle against {page}")
    if isinstance(err, requests.ConnectionError | requests.Timeout):
        return CheckpointError(
            f"could not download kaggle:{handle}: Kaggle cannot be reached (no network?) and it is not in the "
            f"kagglehub cache; give the version (…/VARIATION/VERSION) to use a cached copy offline"
        )
    if isinstance(err, OSError | KaggleApiHTTPError):
        return CheckpointError(f"could not download kaggle:{handle}: {err.__class__.__name__}: {err}")
    return CheckpointError(f"could not download kaggle:{handle}: {err.__class__.__name__}")


class _watch_folder:  # noqa: N801 - used as a context manager
    """Reports the bytes written under kagglehub's folder for this model while it downloads (kagglehub draws
    its own tqdm bars but offers no callback); the total is unknown (0) until the download ends."""

    def __init__(self, handle: str, progress: Progress | None):
        from kagglehub.config import get_cache_folder

        parts = handle.split("/")
        self.folder = os.path.join(get_cache_folder(), "models", *parts[:4])
        self.name, self.progress, self.stop = parts[3], progress, threading.Event()

    def _bytes(self) -> int:
        return sum(
            os.path.getsize(os.path.join(r, n))
            for r, _, ns in os.walk(self.folder)
            for n in ns
            if os.path.isfile(os.path.join(r, n))
        )

    def _run(self) -> None:
        while not self.stop.wait(_POLL_S):
            self.progress(self.name, self._bytes(), 0)

    def __enter__(self):
        if self.progress:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.stop.set()
            self.thread.join()
            done = self._bytes()
            self.progress(self.name, done, done)
