"""A loopback stand-in for the Hugging Face Hub's HTTP API, enough for huggingface_hub 2.4's downloads.

It answers what `hf_hub_download` / `snapshot_download` / `HfApi.repo_info` / `list_repo_tree` ask:
  GET  /api/{models,spaces}/{repo}[/revision/{rev}]        repo info: sha and siblings
  GET  /api/{models,spaces}/{repo}/tree/{rev}[?recursive]  the file list
  HEAD /{repo}/resolve/{rev}/{file}, /spaces/{repo}/resolve/{rev}/{file}
       with X-Repo-Commit, ETag and Content-Length (no Xet headers: files come over plain HTTP)
  GET  the same, honouring `Range: bytes=N-` with 206 replies; and any path put in `static` (a bucket stand-in).
A gated repo answers 401 without a token and 403 with one (X-Error-Code: GatedRepo, as the Hub does); the token
"hf_bad" gets the Hub's 401 "Invalid credentials" reply. `cut_file(name, after, retries_to_kill)` makes the next
GET of a file close the connection after `after` bytes and the next `retries_to_kill` GETs die before their first byte;
`slow_file(name, seconds_per_chunk)` drips a file out. Serves on 127.0.0.1 only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest

SHA = "0123456789abcdef0123456789abcdef01234567"
BAD_TOKEN = "hf_bad"
_CHUNK = 64 * 1024
_API = re.compile(r"^/api/(models|spaces)/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(/.*)?)?$")
_RESOLVE = re.compile(r"^(/spaces)?/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class HubStandIn:
    """`with HubStandIn() as hub: hub.add_repo("org/name", {"config.json": b"..."}); hub.url ...`"""

    def __init__(self):
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self.gated: set[str] = set()
        self.static: dict[str, bytes] = {}  # plain files by path, e.g. a stand-in for the public bucket
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._cuts: dict[str, _Cut] = {}
        self._slow: dict[str, float] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", gated: bool = False) -> None:
        self.repos[(repo_type, repo_id)] = dict(files)
        if gated:
            self.gated.add(repo_id)

    def cut_file(self, name: str, after: int, retries_to_kill: int = 0) -> None:
        self._cuts[name] = _Cut(after, retries_to_kill)

    def slow_file(self, name: str, seconds_per_chunk: float) -> None:
        self._slow[name] = seconds_per_chunk

    def gets_of(self, name: str) -> list[str | None]:
        """The Range header of every GET of a file (None for a whole-file GET)."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith("/" + name)]

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclasses.dataclass
class _Cut:
    after: int  # bytes sent before the first GET is cut
    retries_to_kill: int  # later GETs that die before their first byte
    cut_once: bool = False


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if self.headers.get("Authorization") == f"Bearer {BAD_TOKEN}":
                return self._error(401, "Invalid credentials in Authorization header", None)
            if path in hub.static:
                return self._plain(hub.static[path], body)
            if match := _API.match(path):
                kind, repo_id, what = match.group(1), match.group(2), match.group(3)
                return self._api("space" if kind == "spaces" else "model", repo_id, what)
            if match := _RESOLVE.match(path):
                repo_type = "space" if match.group(1) else "model"
                return self._file(repo_type, match.group(2), match.group(4), body)
            self._error(404, "Not found", None)

        def _api(self, repo_type, repo_id, what):
            files = hub.repos.get((repo_type, repo_id))
            if files is None:
                return self._error(401, "Repository not found", "RepoNotFound")
            if what == "tree":
                listing = [{"type": "file", "path": n, "size": len(d), "oid": _etag(d)[:40]} for n, d in files.items()]
                return self._json(listing)
            self._json(
                {
                    "id": repo_id,
                    "sha": SHA,
                    "private": False,
                    "gated": repo_id in hub.gated,
                    "siblings": [{"rfilename": n} for n in files],
                }
            )

        def _file(self, repo_type, repo_id, name, body):
            files = hub.repos.get((repo_type, repo_id))
            if files is None:
                return self._error(401, "Repository not found", "RepoNotFound")
            if repo_id in hub.gated:
                authorised = self.headers.get("Authorization")
                return self._error(403 if authorised else 401, f"Access to model {repo_id} is restricted.", "GatedRepo")
            if name not in files:
                return self._error(404, "Entry not found", "EntryNotFound")
            data = files[name]
            start = int(re.match(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-")).group(1))
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", SHA)
            self.send_header("ETag", f'"{_etag(data)}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if body:
                self._send_body(name, data, start)

        def _send_body(self, name, data, start):
            end = len(data)
            cut = hub._cuts.get(name)
            if cut is not None and not cut.cut_once:
                end, cut.cut_once = max(start, min(cut.after, len(data))), True
            elif cut is not None and cut.retries_to_kill > 0:
                end, cut.retries_to_kill = start, cut.retries_to_kill - 1  # a retry dies before any byte
            for offset in range(start, end, _CHUNK):
                self.wfile.write(data[offset : min(offset + _CHUNK, end)])
                self.wfile.flush()
                if name in hub._slow:
                    time.sleep(hub._slow[name])
            if end < len(data):
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

        def _plain(self, data, body):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _error(self, status, message, code):
            payload = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _json(self, value):
            payload = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def point_huggingface_hub_at(server: HubStandIn, monkeypatch, cache: str) -> None:
    """This process's huggingface_hub talks to `server` (its endpoint was read at import, so the constants are
    patched), keeps its files in `cache`, does not pause between retries and has no token."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(_http.time, "sleep", lambda s: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def point_companions_at(server: HubStandIn, monkeypatch, cache: str) -> None:
    """The companion files' bucket is `server`'s /big_vision, and their cache `cache`."""
    from paligemma import companions

    monkeypatch.setattr(companions, "BUCKET", server.url + "/big_vision")
    monkeypatch.setenv(companions.CACHE_ENV, cache)


def publish_mask_decoder(server: HubStandIn, decoder_bytes: bytes) -> None:
    """The mask decoder where it is published: vae-oid.npz in the big-vision/paligemma Space."""
    from paligemma import companions

    server.add_repo(companions.SPACE, {"vae-oid.npz": decoder_bytes, "app.py": b""}, repo_type="space")


def _as_hf_files(model_dir, folder) -> dict[str, bytes]:
    """The .npz model in `model_dir` exported to a Hugging Face-format repo: {file name: bytes}."""
    from paligemma.checkpoint import load_params
    from paligemma.hf_export import export

    params, cfg = load_params(str(model_dir / "model.npz"))
    export(params, cfg, folder, tokenizer_path=str(model_dir / "tokenizer.model"))
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


@pytest.fixture(scope="module", name="hf_repo_files")
def hf_repo_files_fixture(tmp_path_factory, tiny_model_dir):
    """A tiny Hugging Face-format PaliGemma (config.json + safetensors + tokenizer.model), without vae-oid.npz."""
    return _as_hf_files(tiny_model_dir, tmp_path_factory.mktemp("hf_tiny"))


@pytest.fixture(scope="module", name="taught_hf_files")
def taught_hf_files_fixture(tmp_path_factory, taught_model_dir):
    """The taught model (it answers 'segment red circle' with seg tokens) as a Hugging Face repo, no vae-oid.npz."""
    return _as_hf_files(taught_model_dir, tmp_path_factory.mktemp("taught_hf"))
