"""`python app.py` as a child process on a free loopback port, for the benchmarks and the tests that need a real server.

with app_process(registry_file, log_path) as (url, seconds_to_serve):
    ...  # the page answers at url; the server is stopped on leaving the block
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "app.py")
LOOPBACK = "127.0.0.1"
SERVE_TIMEOUT_S = 120


class ServerError(RuntimeError):
    """The app process exited, or did not serve its page in time."""


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _wait(ready, timeout_s: float, process: subprocess.Popen | None, interval_s: float, missing: str) -> float:
    """Seconds until ready() is true; raises ServerError if `process` exits first or time runs out (`missing`
    says what did not happen)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if process is not None and process.poll() is not None:
            raise ServerError(f"the server exited with code {process.returncode}")
        if ready():
            return time.monotonic() - start
        time.sleep(interval_s)  # polling a socket or a file: nothing to wait on but time
    raise ServerError(f"{missing} within {timeout_s} s")


def wait_for_page(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> float:
    """Seconds until `url` answers 200; raises ServerError if `process` exits first or time runs out."""

    def answers() -> bool:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
        return False

    return _wait(answers, timeout_s, process, 0.2, f"{url} did not answer")


def wait_for_log(log_path: str, text: str, timeout_s: float, process: subprocess.Popen | None = None) -> float:
    """Seconds until the server's log holds `text` (e.g. that the default model is prepared); raises ServerError
    if `process` exits first or time runs out."""

    def logged() -> bool:
        with open(log_path, errors="replace") as log:
            return text in log.read()

    return _wait(logged, timeout_s, process, 0.5, f"the server's log did not say {text!r}")


@contextlib.contextmanager
def app_process(
    registry_file: str,
    log_path: str,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    log_line: tuple[str, float] | None = None,
):
    """`python app.py` (the README's command, plus `args`) on a free loopback port, its output in `log_path`:
    yields (url, seconds until the page was served), and stops the server on exit. log_line: (text, timeout_s),
    also wait until the log says `text` (e.g. that the default model is prepared) before yielding."""
    port = free_port()
    command = [sys.executable, APP, "--host", LOOPBACK, "--port", str(port), "--models", registry_file, *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})},
        )
        try:
            url = f"http://{LOOPBACK}:{port}/"
            served = wait_for_page(url, SERVE_TIMEOUT_S, process)
            if log_line is not None:
                wait_for_log(log_path, *log_line, process)
            yield url, served
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
