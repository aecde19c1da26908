"""Files written whole: readers, and a process started after a kill, see the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def written_whole(path: str, mode: str = "wb"):
    """Yields a file open on a temporary name beside `path` (`path.PID.partial`: never taken for `path`'s kind,
    e.g. not an `.npz` a checkpoint folder would load, and never another process's) and renames it to `path` once
    the block ends; on an error the temporary file goes and `path` is left as it was."""
    temporary = f"{path}.{os.getpid()}.partial"
    try:
        with open(temporary, mode) as f:
            yield f
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
