"""Models on the device: loaded in a background thread on first use, warmed up, unloaded when memory is short.

One loader thread per model at a time; every request that needs a model while it loads waits for that
same load and sees its progress. A model that cannot load leaves a message for the page and the others
keep serving.
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import logging
import os
import threading
import time
from collections.abc import Callable

import jax
import psutil

import paligemma
import postprocess
from paligemma import hub
from playground.registry import DEMO_NAME, ModelEntry, Registry
from postprocess.parse import SEG_TOKENS_PER_MASK

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is happening)
# Weights on disk → memory needed: bfloat16 files widen to float32 on CPU, and the cache and activations need room.
MEMORY_PER_WEIGHT_BYTE = 2.0
_WEIGHT_PATTERNS = ("*.safetensors", "*.npz")
_NOT_WEIGHTS = ("vae-oid.npz", "vqvae-encoder.npz")
DEMO_MISSING = (": the demo model ships with the repository as assets/demo/ (model.npz, tokenizer.model, "
                "vae-oid.npz); use a complete checkout (git lfs pull if it uses Git LFS)")


class ModelUnavailable(ValueError):
    """A model that could not be loaded; the message says why, for a person."""


@dataclasses.dataclass
class ReadyModel:
    entry: ModelEntry
    model: paligemma.Model
    masks: postprocess.MaskDecoder | None  # None when the checkpoint has no vae-oid.npz beside it
    load_s: float
    last_used: float = dataclasses.field(default_factory=time.monotonic)

    def info_line(self) -> str:
        """Family, resolution, size, dtype, device: e.g. 'PaliGemma 2 · Gemma 2 2B · 224px · 3.03 B parameters · …'."""
        info = self.model.info()
        size = info["parameters"]
        size_text = f"{size / 1e9:.2f} B" if size >= 1e9 else f"{size / 1e6:.1f} M"
        return f"{info['name']} · {size_text} parameters · {info['dtype']} · {info['device']}"


@dataclasses.dataclass
class _Load:
    """One load in progress, shared by everyone waiting for it."""

    fraction: float = 0.0
    message: str = "waiting for another model to finish loading"
    error: str | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


def available_bytes() -> int:
    """Free memory where the weights go: the accelerator's if it reports it, else the host's."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return int(psutil.virtual_memory().available)


def weight_bytes(path: str) -> int:
    """Size on disk of the weight files of a checkpoint file or folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    files = {f for pattern in _WEIGHT_PATTERNS for f in glob.glob(os.path.join(path, pattern))}
    return sum(os.path.getsize(f) for f in files if os.path.basename(f) not in _NOT_WEIGHTS)


class ModelManager:
    def __init__(self, registry: Registry, warmup_tokens: int | None = 64,
                 memory: Callable[[], int] = available_bytes):
        """warmup_tokens: the new-token budget whose compiled functions are built at load time (None: none)."""
        self.registry = registry
        self.warmup_tokens = warmup_tokens
        self._memory = memory
        self._lock = threading.Lock()  # guards the three dicts below
        self._ready: dict[str, ReadyModel] = {}
        self._loads: dict[str, _Load] = {}
        self._failures: dict[str, str] = {}
        self._one_load_at_a_time = threading.Lock()  # two loads at once would misjudge the free memory

    @property
    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._ready)

    def start(self, name: str) -> None:
        """Begins loading `name` in the background unless it is loaded or loading already."""
        self._start(self.registry.get(name))

    def get(self, name: str, progress: Progress | None = None, poll_s: float = 0.2) -> ReadyModel:
        """The loaded model, loading it first if needed and reporting the load's progress while waiting."""
        entry = self.registry.get(name)
        load = self._start(entry)
        if load is not None:
            shown = None
            while not load.done.wait(poll_s):
                if progress is not None and (load.fraction, load.message) != shown:
                    shown = (load.fraction, load.message)
                    progress(*shown)
            if load.error is not None:
                raise ModelUnavailable(load.error)
            if progress is not None:
                progress(1.0, "ready")
        with self._lock:
            ready = self._ready.get(name)
            if ready is None:  # unloaded again between the load and now: memory is that short
                raise ModelUnavailable(f"model {name!r} was unloaded to make room for another; run again to reload it")
            ready.last_used = time.monotonic()
            return ready

    def status(self, name: str) -> str:
        """One line for the page: what the model is and whether it is ready, loading or broken."""
        entry = self.registry.get(name)
        with self._lock:
            ready, load, failure = self._ready.get(name), self._loads.get(name), self._failures.get(name)
        notes = f" — {entry.notes}" if entry.notes else ""
        if ready is not None:
            return f"**{ready.info_line()}** · ready (loaded in {ready.load_s:.1f} s){notes}"
        if load is not None:
            return f"Loading: {load.message} ({load.fraction:.0%}){notes}"
        if failure is not None:
            return f"⚠️ Cannot load: {failure}"
        return f"Loads on first use from `{entry.source}`{notes}"

    def unload(self, name: str) -> bool:
        with self._lock:
            if self._ready.pop(name, None) is None:
                return False
        log.info("unloaded model %r", name)
        gc.collect()  # the params go with the last reference; collect cycles now rather than later
        return True

    def _start(self, entry: ModelEntry) -> _Load | None:
        with self._lock:
            if entry.name in self._ready:
                return None
            load = self._loads.get(entry.name)
            if load is None:
                load = self._loads[entry.name] = _Load()
                threading.Thread(target=self._load, args=(entry, load), name=f"load {entry.name}", daemon=True).start()
            return load

    def _load(self, entry: ModelEntry, load: _Load) -> None:
        with self._one_load_at_a_time:
            start = time.monotonic()
            try:
                ready = self._build(entry, load)
            except Exception as err:  # whatever went wrong, the page must say so and keep serving
                message = _explain(entry, err)
                if not isinstance(err, (ValueError, OSError, MemoryError)):
                    log.exception("loading model %r failed", entry.name)
                else:
                    log.warning("model %r is unavailable: %s", entry.name, message)
                with self._lock:
                    self._failures[entry.name] = message
                    del self._loads[entry.name]
                load.error = message
            else:
                ready.load_s = time.monotonic() - start
                log.info("model %r ready in %.1f s", entry.name, ready.load_s)
                with self._lock:
                    self._ready[entry.name] = ready
                    self._failures.pop(entry.name, None)
                    del self._loads[entry.name]
            load.done.set()

    def _build(self, entry: ModelEntry, load: _Load) -> ReadyModel:
        def step(fraction: float, message: str) -> None:
            load.fraction, load.message = fraction, message

        step(0.05, f"downloading {entry.source} from the Hugging Face Hub" if entry.on_hub else "finding the weights")
        if not entry.on_hub and not os.path.exists(entry.source):
            raise ModelUnavailable(f"{entry.source} does not exist on this server" + (DEMO_MISSING if entry.name == DEMO_NAME else ""))
        path = hub.resolve(entry.source)
        step(0.3, "making room in memory")
        self._make_room(int(weight_bytes(path) * MEMORY_PER_WEIGHT_BYTE), keep=entry.name)
        step(0.35, "reading the weights")
        model = paligemma.load(path, dtype=entry.dtype)
        masks = postprocess.MaskDecoder.load(model.mask_decoder_path) if model.mask_decoder_path else None
        if self.warmup_tokens is not None:
            step(0.7, "compiling (warm-up run)")
            model.warmup(max_new_tokens=self.warmup_tokens)
            if masks is not None:
                masks([[0] * SEG_TOKENS_PER_MASK])  # compiles the decoder for one mask, the common case
        return ReadyModel(entry, model, masks, load_s=0.0)

    def _make_room(self, needed: int, keep: str) -> None:
        """Unloads the least recently used models until `needed` bytes are free or none is left to unload."""
        while self._memory() < needed:
            with self._lock:
                others = sorted((r for n, r in self._ready.items() if n != keep), key=lambda r: r.last_used)
            if not others:
                return  # try anyway: the estimate is rough, and a failure reports itself
            self.unload(others[0].entry.name)


def _explain(entry: ModelEntry, err: Exception) -> str:
    """A message for a person; never the environment (HF_TOKEN stays out of every message)."""
    if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err):
        return f"{entry.name}: not enough memory to load it; pick a smaller model or free the accelerator"
    if isinstance(err, (ValueError, OSError)):
        return f"{entry.name}: {err}"
    return f"{entry.name}: unexpected {type(err).__name__} while loading; the server log has the details"
