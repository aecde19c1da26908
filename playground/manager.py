"""Models on the device: loaded in a background thread on first use, warmed up, unloaded when memory is short.

One loader thread per model at a time; every request that needs a model while it loads waits for that
same load and sees its progress. A model that cannot load leaves a message for the page and the others
keep serving.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
import time
from collections.abc import Callable

import paligemma
import postprocess
from playground.registry import DEMO_NAME, ModelEntry, Registry

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is happening)
_DOWNLOAD = (0.05, 0.6)  # the share of the progress bar that downloads take
DEMO_MISSING = (
    ": the demo model ships with the repository as assets/demo/ (model.npz, tokenizer.model, "
    "vae-oid.npz); use a complete checkout (git lfs pull if it uses Git LFS)"
)


class ModelUnavailable(ValueError):
    """A model that could not be loaded; the message says why, for a person."""


@dataclasses.dataclass
class ReadyModel:
    entry: ModelEntry
    model: paligemma.Model
    masks: postprocess.MaskDecoder | None  # None when no mask decoder could be had: see mask_note
    load_s: float
    last_used: float = dataclasses.field(default_factory=time.monotonic)

    def info_line(self) -> str:
        """What the model is and where it runs, in words: e.g. 'PaliGemma 2 (3.03 billion parameters, 224 px
        input), float32 on the CPU'; the decoder's code name stays in the model's `info()`."""
        info = self.model.info()
        size = info["parameters"]
        size_text = f"{size / 1e9:.2f} billion" if size >= 1e9 else f"{size / 1e6:.1f} million"
        family = info["name"].split(" · ")[0]
        where = "the CPU" if info["device"] == "cpu" else f"the {info['device'].upper()}"
        return f"{family} ({size_text} parameters, {info['resolution']} px input), {info['dtype']} on {where}"

    @property
    def mask_note(self) -> str | None:
        """Why this model draws boxes but no masks (one line), or None when it has its mask decoder."""
        return self.model.mask_decoder_note if self.masks is None else None


@dataclasses.dataclass
class _Load:
    """One load in progress, shared by everyone waiting for it."""

    steps: list[tuple[float, str]] = dataclasses.field(
        default_factory=lambda: [(0.0, "waiting for another model to finish loading")]
    )  # (fraction done, what is happening), appended as the load goes on
    error: str | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


def _last_of_each_phase(steps: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """The last step of each run of one phase (the text before ':', e.g. one file's download): a waiter that
    polls now and then still hears of every file and phase, without every byte count in between."""
    phase = [message.split(":")[0] for _, message in steps]
    return [step for i, step in enumerate(steps) if i + 1 == len(steps) or phase[i + 1] != phase[i]]


def available_bytes() -> int:
    """Free memory where the weights go: the default accelerator's, else the host's."""
    return paligemma.free_memory()[0]


def describe_requirements(found: paligemma.Requirements, free: int, remote: bool = True) -> dict:
    """The page's view of a model's sizes: download and memory bytes, gated, fits (None: unknown), one line. The
    need is that of the dtype a load would take with `free` bytes (a smaller one where the default does not fit)."""
    need = found.fitting(free)
    fits = None if need is None else need.total <= free
    stepped_down = (
        f" — {found.need.dtype} would need {paligemma.format_bytes(found.need.total)}" if need is not found.need else ""
    )
    parts = [
        f"{paligemma.format_bytes(found.download)} {'download' if remote else 'on disk'}" if found.download else None,
        "gated: needs HF_TOKEN with the licence accepted" if found.gated else None,
        paligemma.describe_fit(need, free) + f" ({paligemma.format_bytes(free)} free){stepped_down}"
        if need
        else "memory need unknown",
    ]
    text = " · ".join(p for p in parts if p)
    if need is None and found.download is None:
        text = "size unknown" + (f": {found.unknown_because}" if found.unknown_because else "")
    return {
        "download_bytes": found.download,
        "memory_bytes": need.total if need else None,
        "dtype": need.dtype if need else None,
        "gated": found.gated,
        "fits": fits,
        "free_bytes": free,
        "text": text,
    }


class ModelManager:
    def __init__(
        self,
        registry: Registry,
        memory: Callable[[], int] = available_bytes,
        warm: Callable[[paligemma.Model], None] | None = None,
    ):
        """warm: compiles a loaded model for the requests it will serve, before it counts as ready (the app's:
        through the scheduler that runs them, `requests.warm_for_requests`); None: it compiles on first use."""
        self.registry = registry
        self.warm = warm
        self._memory = memory
        self._lock = threading.Lock()  # guards the three dicts below
        self._ready: dict[str, ReadyModel] = {}
        self._loads: dict[str, _Load] = {}
        self._failures: dict[str, str] = {}
        self._requirements: dict[str, paligemma.Requirements | threading.Event] = {}
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
            seen = 0
            while True:
                finished = load.done.wait(poll_s)
                new = load.steps[seen:]
                seen += len(new)
                for step in _last_of_each_phase(new) if progress is not None else ():
                    progress(*step)
                if finished:
                    break
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

    def requirements(self, name: str, wait: bool = True) -> dict:
        """What model `name` asks of this machine before anyone loads it: {"download_bytes", "memory_bytes",
        "dtype", "gated", "fits", "free_bytes", "text"} (None where unknown; text e.g. '6.1 GB download · 12.2 GB
        (float32) · fits (31.0 GB free)' or 'size unknown: …'). Measured once per model (a Hub repo: its metadata
        and config.json, a few KB) and cached; wait=False never blocks: it starts the measurement in the
        background and answers {"text": "size: checking…", ... None} until it is done."""
        entry = self.registry.get(name)
        with self._lock:
            known = self._requirements.get(name)
            if known is None:
                known = self._requirements[name] = threading.Event()
                threading.Thread(target=self._measure, args=(entry, known), name=f"size {name}", daemon=True).start()
        if isinstance(known, threading.Event):
            if not wait:
                return {
                    "download_bytes": None,
                    "memory_bytes": None,
                    "dtype": None,
                    "gated": None,
                    "fits": None,
                    "free_bytes": None,
                    "text": "size: checking…",
                }
            known.wait()
            with self._lock:
                known = self._requirements[name]
        return describe_requirements(known, self._memory(), remote=entry.remote)

    def _measure(self, entry: ModelEntry, done: threading.Event) -> None:
        try:
            found = paligemma.requirements(entry.source, entry.dtype)
        except Exception as err:  # noqa: BLE001 - a size is a nicety: never let it break the page
            log.warning("could not measure model %r: %s", entry.name, err)
            found = paligemma.Requirements(None, None, None, f"{type(err).__name__}")
        with self._lock:
            self._requirements[entry.name] = found
        done.set()

    def status(self, name: str) -> str:
        """One line for the page: what the model is and whether it is ready, loading or broken."""
        entry = self.registry.get(name)
        with self._lock:
            ready, load, failure = self._ready.get(name), self._loads.get(name), self._failures.get(name)
        notes = f" — {entry.notes}" if entry.notes else ""
        if ready is not None:
            masks = f" · ⚠️ boxes only, no masks: {ready.mask_note}" if ready.mask_note else ""
            smaller = f" · {ready.model.dtype_note}" if ready.model.dtype_note else ""
            return f"**{ready.info_line()}** · ready (loaded in {ready.load_s:.1f} s){smaller}{masks}{notes}"
        if load is not None:
            fraction, message = load.steps[-1]
            return f"Loading: {message} ({fraction:.0%}){notes}"
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
                if ready.model.cpu_form is not None:
                    log.info("model %r runs in %s", entry.name, ready.model.cpu_form.describe())
                with self._lock:
                    self._ready[entry.name] = ready
                    self._failures.pop(entry.name, None)
                    del self._loads[entry.name]
            load.done.set()

    def _build(self, entry: ModelEntry, load: _Load) -> ReadyModel:
        def step(fraction: float, message: str) -> None:
            load.steps.append((fraction, message))

        def downloading(file: str, done: int, total: int) -> None:
            low, high = _DOWNLOAD
            of = f" of {paligemma.format_bytes(total)}" if total else ""
            step(
                low + (high - low) * (done / total if total else 0.0),
                f"downloading {file}: {paligemma.format_bytes(done)}{of}",
            )

        step(0.02, "checking the model's size")
        if not entry.remote and not os.path.exists(entry.source):
            missing = DEMO_MISSING if entry.name == DEMO_NAME else ""
            raise ModelUnavailable(f"{entry.source} does not exist on this server{missing}")
        need = self.requirements(entry.name)["memory_bytes"]
        if need:
            step(0.04, "making room in memory")
            self._make_room(need, keep=entry.name)
        step(_DOWNLOAD[0], f"fetching {entry.source}" if entry.remote else "finding the weights")
        model = paligemma.load(
            entry.source,
            dtype=entry.dtype,
            tokenizer=entry.tokenizer,
            mask_decoder=entry.mask_decoder,
            progress=downloading,
            status=lambda message: step(_DOWNLOAD[1], message),
        )
        masks = postprocess.MaskDecoder.load(model.mask_decoder_path) if model.mask_decoder_path else None
        if self.warm is not None:
            step(0.7, "compiling (warm-up run)")
            self.warm(model)
            if masks is not None:
                masks([[0] * paligemma.SEG_TOKENS_PER_MASK])  # compiles the decoder for one mask, the common case
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
    if paligemma.is_out_of_memory(err):
        return f"{entry.name}: not enough memory to load it; pick a smaller model or free the accelerator"
    if isinstance(err, (ValueError, OSError)):
        return f"{entry.name}: {err}"
    return f"{entry.name}: unexpected {type(err).__name__} while loading; the server log has the details"
