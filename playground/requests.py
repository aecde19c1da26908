"""One run: the visitor's upload and prompt → streamed outputs for the page and the `/run` API endpoint.

Text streams while the model generates; boxes, masks, the downloads (detections JSON, annotated PNG) and the
final timing follow when it is done. Every problem a visitor can cause becomes a message for a person: a
`gr.Error` for API callers, one status line beside Run on the page (the previous result stays on screen).
The readable output never shows <loc>/<seg> tokens: what could not be drawn, an empty answer and an answer
cut by the token limit are said in words (`notice`).

Exported data (the JSON) keeps the model's labels; what a person looks at (highlighted text, the annotated
image, the PNG) names each object distinctly (`postprocess.display_labels`).

Every run records its token scores (SCORED): each object gets its confidence in the detections JSON ("score",
"confidence") and on the page's box tags, and the page's debug panel (playground/debug_panel.py) gets the run.
On the demo model scoring costs about nothing: 3.58 against 3.71 ms/token for one row and 6.08 against 5.83
for four (within the noise), so scored and unscored runs need not be told apart, and one compiled variant
serves the page, the API and the warm-up alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import logging
import math
import numbers
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Iterator

import gradio as gr
import jax
from gradio.utils import get_upload_folder, is_in_or_equal
from PIL import Image, UnidentifiedImageError

import paligemma
import postprocess
from playground import prompts
from playground.batching import Batcher
from playground.continuous import Scheduler
from playground.debug_panel import DebugRun, debug_run, tag
from playground.manager import ModelManager

log = logging.getLogger(__name__)

DECODINGS = ("greedy", "nucleus(0.1)", "nucleus(0.3)", "temperature(0.5)")
DEFAULT_MAX_NEW_TOKENS = 64
MAX_PIXELS = 4096 * 4096  # larger uploads are refused before their pixels are decoded
DISPLAY_SIDE = 1024  # the page shows boxes and masks on a copy at most this wide and high; JSON keeps full size
STREAM_EVERY_TOKENS = 8
# A run's steps come at least every TICK_S seconds (the same step again while the model works): Gradio can only
# close a run between two steps, so this bounds how long Stop takes to end it (a 3B prefill on a CPU is seconds).
TICK_S = 0.25
COMPILE_NOTICE_S = 2.0  # a run without its first tokens after this long is compiling for a new shape (or queued)
SEED = 0  # by default sampled decodings are reproducible: the same request gives the same answer
RANDOM_SEED = "random"  # the seed field's word for "a new seed each run"
SCORED = True  # every run asks for token scores (see the module's docstring for what they cost)
NO_SCORES = "This run recorded no token scores, so there is nothing to debug."
SCHEDULERS = ("auto", "batch", "continuous")
WARM_PROMPT_TOKENS = tuple(b for b in paligemma.PROMPT_BUCKETS if b <= 64)  # each compiled ahead of the first visitor
_ARRIVED = "playground_arrived"
PREPARED = "prepared for common requests:"  # the log line's words once the page says "ready" (bench.soak waits for it)
PROGRESS = gr.Progress()  # as a default it marks the handler's progress argument; Gradio passes the event's own


class ArrivalStamp:
    """ASGI middleware that notes when each HTTP request reached the server, so a run can report its queue wait."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope.setdefault("state", {})[_ARRIVED] = time.monotonic()
        await self.app(scope, receive, send)


def arrival_time(request: gr.Request | None) -> float | None:
    """When the request that queued this run arrived (`time.monotonic()`), if `ArrivalStamp` saw it."""
    scope = getattr(getattr(request, "request", None), "scope", None) or {}
    return scope.get("state", {}).get(_ARRIVED)


def read_upload(upload: dict | None) -> Image.Image:
    """The visitor's image (gr.Image's unprocessed upload) as RGB, its first frame if animated; refused with a
    clear message when missing, not an upload, unreadable or too large."""
    path = upload.get("path") if isinstance(upload, dict) else None
    if not path:
        raise paligemma.ImageError(f"Upload an image first ({paligemma.ACCEPTED}), or pick an example.")
    if not _is_upload(path):
        raise paligemma.ImageError(
            "send the image itself with the request (gradio_client: handle_file(...)); "
            "this server reads no file it was not sent"
        )
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        raise paligemma.ImageError("the uploaded image is no longer on the server; upload it again") from None
    _check_pixels(data)
    return paligemma.to_rgb(paligemma.open_image(data))


def _is_upload(path) -> bool:
    """Whether `path` is in Gradio's upload folder (uploads and cached examples). With preprocess=False Gradio
    passes on a {"path": ...} that lacks FileData's meta unchecked, so a visitor could name any server file."""
    try:
        return isinstance(path, str) and is_in_or_equal(path, get_upload_folder())
    except (OSError, ValueError):  # e.g. a NUL in the path
        return False


def _check_pixels(data: bytes) -> None:
    """Reads the size from the file header only, so that a huge image is refused before it fills memory."""
    try:
        with Image.open(io.BytesIO(data), formats=paligemma.FORMATS) as probe:
            size, pixels = f"{probe.width}×{probe.height} pixels", probe.width * probe.height
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours; its error does not give the size
        size, pixels = f"over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels", None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return  # not an image we read: open_image says so with its message
    if pixels is None or pixels > MAX_PIXELS:
        raise paligemma.ImageError(
            f"the image is {size}; this server takes at most {MAX_PIXELS / 1e6:.0f} "
            f"megapixels (e.g. {int(MAX_PIXELS**0.5)}×{int(MAX_PIXELS**0.5)}). Shrink it "
            f"and retry."
        )


def _checked_prompt(prompt: str | None) -> str:
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"the prompt must be text, got {type(prompt).__name__}")
    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("Type a prompt or pick a task, e.g. 'caption en' or 'detect cat'.")
    return prompt


# Tokenise no further than this: no token is this long, and encoding megabytes of pasted text takes seconds.
MAX_PROMPT_CHARS = 64 * paligemma.MAX_PROMPT_TOKENS


def _fitted_prompt(model: paligemma.Model, prompt: str) -> str:
    """The prompt cut to the model's prompt budget, with a notice on the page, rather than refused: whoever
    pasted a long text still gets an answer about its beginning."""
    tokenizer = model.tokenizer
    budget = paligemma.MAX_PROMPT_TOKENS - len(tokenizer.encode_prompt(""))  # [bos] and "\n" take their places
    head = prompt[:MAX_PROMPT_CHARS]
    ids = tokenizer.encode(head)
    if len(ids) <= budget and head == prompt:
        return prompt
    kept = min(len(ids), budget)
    while len(tokenizer.encode(cut := tokenizer.decode(ids[:kept]))) > budget:
        kept -= 1  # decoding and encoding again can take more tokens where the cut falls
    gr.Warning(f"The prompt is longer than this model reads ({budget} tokens): only its beginning was used.")
    return cut


def _checked_tokens(value) -> int:
    """A whole number from 1 to MAX_NEW_TOKENS; the API hands over whatever was sent, not the slider's value."""
    whole = (
        isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value == int(value)
    )
    if not whole or not 1 <= value <= paligemma.MAX_NEW_TOKENS:
        raise ValueError(f"max new tokens must be a whole number from 1 to {paligemma.MAX_NEW_TOKENS}, got {value!r}")
    return int(value)


def checked_seed(value) -> int:
    """A seed from 0 to paligemma.MAX_SEED, or a fresh one for "random"; the API hands over what was sent."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", RANDOM_SEED):
            return SEED if not text else random.randint(0, paligemma.MAX_SEED)
        value = int(text) if text.isdigit() else value
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= value <= paligemma.MAX_SEED:
        raise ValueError(
            f"the seed must be a whole number from 0 to {paligemma.MAX_SEED} or {RANDOM_SEED!r}, got {value!r}"
        )
    return int(value)


_TOKEN_RE = re.compile(r"<(?:loc\d{4}|seg\d{3})>")


def readable(pieces) -> list[tuple[str, str | None]]:
    """The highlighted text's value: objects by their display names, text without <loc>/<seg> tokens."""
    shown = []
    for text, label in postprocess.highlighted_text_value(pieces):
        text = text if label is not None else _TOKEN_RE.sub("", text)
        if text.strip() or label is not None:
            shown.append((text, label))
    return shown


def notice(prompt: str, pieces, tokens: int, max_new_tokens: int, done: bool) -> tuple[str, int | None]:
    """(what a visitor should be told about the answer, the larger token limit to offer when it was cut, or None)."""
    said = []
    broken = [p.text for p in pieces if isinstance(p, postprocess.Text) and _TOKEN_RE.search(p.text)]
    cut = done and tokens >= max_new_tokens
    larger = next((n for n in (64, 256, paligemma.MAX_NEW_TOKENS) if n > max_new_tokens), None) if cut else None
    if cut:
        unfinished = " before its last object was complete" if broken else ""
        more = f" — run again with {larger}" if larger else ""
        said.append(f"The answer was cut at {max_new_tokens} tokens{unfinished}{more}.")
    elif broken:
        parts = "; ".join(f"“{_TOKEN_RE.sub('', b).strip(' ;') or 'a location'}”" for b in broken)
        said.append(f"Could not draw {parts}: its location or mask tokens are incomplete (see the raw output).")
    elif done:
        said.append(_not_found(prompt, pieces))
    return " ".join(filter(None, said)), larger


def _not_found(prompt: str, pieces) -> str:
    """What a whole answer leaves out: "No blue square found." for an empty detect or segment answer, "No dog
    found." when "detect cat ; dog" found only cats; "" when nothing is missing (or the model named what it
    found in other words than the prompt's)."""
    empty = not any(p.text.strip() for p in pieces)
    task, _, argument = prompts.split(prompt)
    if task is None or task.keyword not in ("detect", "segment"):
        return "The model gave an empty answer." if empty else ""
    names = [name.strip() for name in argument.split(";") if name.strip()]
    found = {obj.label.lower() for obj in postprocess.objects(pieces)}
    missing = [name for name in names if name.lower() not in found]
    if empty:
        return f"No {' or '.join(names) or 'object'} found."
    return f"No {' or '.join(missing)} found." if len(names) > 1 and 0 < len(missing) < len(names) else ""


@dataclasses.dataclass
class Outcome:
    """One step of a run: everything the page and the API show."""

    pieces: list  # display-size pieces with display labels (and masks once decoded)
    text: str  # the raw output
    timing: dict
    notice: str = ""  # what the readable output leaves unsaid: empty, cut, undrawable parts
    annotated: tuple | None = None  # gr.AnnotatedImage's value, once done
    colors: dict = dataclasses.field(default_factory=dict)  # {display label: colour}
    detections: str | None = None  # the JSON file, once done and if anything was found
    drawn: str | None = None  # the PNG file, likewise
    display: Image.Image | None = None
    more_tokens: int | None = None  # the larger token limit to offer, when the answer was cut
    hidden: frozenset = frozenset()  # display labels whose overlay the visitor switched off in the legend
    confidences: list[dict] | None = None  # per object, ObjectConfidence.as_dict(); None for an unscored run
    min_score: float = 0.0  # the page leaves out objects whose confidence is below this
    debug: DebugRun | None = None  # what the debug panel draws, once done
    debug_note: str = ""  # why `debug` is None

    @property
    def highlighted(self) -> list[tuple[str, str | None]]:
        return readable(self.pieces)

    def shown_objects(self) -> list[tuple[postprocess.Object, dict | None]]:
        """The objects the page's annotated image shows (confidence at least min_score), with their confidence."""
        found = postprocess.objects(self.pieces)
        scored = self.confidences or [None] * len(found)
        return [(obj, c) for obj, c in zip(found, scored) if c is None or c["score"] >= self.min_score]

    def page_annotated(self) -> tuple[tuple, dict[str, str]]:
        """The page's annotated image and its colour map: each tag with its object's confidence ("cat 0.871"),
        the objects below min_score left out (legend entry and all), the hidden ones drawn empty."""
        shown = self.shown_objects()
        tagged = [
            dataclasses.replace(obj, label=obj.label if c is None else tag(obj.label, c["score"])) for obj, c in shown
        ]
        colors = {t.label: self.colors[obj.label] for t, (obj, _) in zip(tagged, shown)}
        hidden = {t.label for t, (obj, _) in zip(tagged, shown) if obj.label in self.hidden}
        value, _ = postprocess.annotated_image_value(self.display, tagged, colors, hidden)
        return value, colors

    def plain(self) -> tuple:
        """The API's outputs: highlighted text, annotated image, raw text, JSON file, PNG file, timing."""
        return self.highlighted, self.annotated, self.text, self.detections, self.drawn, self.timing


def make_scheduler(kind: str = "auto") -> Batcher | Scheduler | BySize:
    """What concurrent runs share a model through: `continuous` batching (requests join and leave a running
    decode) or `batch` (requests with the same settings that arrive together share one generate call). `auto`:
    continuous on accelerators, where a decode step of 16 rows costs little more than one; on CPU, continuous
    for small models and batch for large ones (BySize). A CPU server expecting crowds on a large model should
    pass `--scheduler continuous`."""
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; accepted: {', '.join(SCHEDULERS)}")
    settings = {"seed": SEED, "chunk": STREAM_EVERY_TOKENS}
    if kind == "auto" and jax.default_backend() == "cpu":
        return BySize(**settings)
    return (Batcher if kind == "batch" else Scheduler)(**settings)


class BySize:
    """`auto` on CPU: continuous batching for small models, the batcher for large ones (paligemma.large_on_cpu:
    a 3B and up). Through the app on 2 cores (bench/soak.py) continuous
    gave one client what batch gives (1.02-1.07x) and 4-16 clients 1.11-1.54x the throughput (demo) and
    1.67-2.08x (mid) with 0.11-0.46x the p95 time to first token; its slot engines compile in seconds for
    those. At 3B-224 they compile for 50 s more and hold all their rows of KV cache while in use (0.8 GB for 8
    slots of 64-token answers), so large models keep the batcher."""

    def __init__(self, **settings):
        self.continuous, self.batch = Scheduler(**settings), Batcher(**settings)

    def of(self, model: paligemma.Model) -> Batcher | Scheduler:
        return self.batch if paligemma.large_on_cpu(model.config) else self.continuous

    def submit(self, model: paligemma.Model, *args, **kwargs):
        return self.of(model).submit(model, *args, **kwargs)

    def warmup(self, model: paligemma.Model, scores=False, max_new_tokens=None, later=False) -> None:
        """Compiles what the model's requests run, through the scheduler that will serve them."""
        self.of(model).warmup(model, scores, max_new_tokens, later)


def warm_for_requests(scheduler: Batcher | Scheduler | BySize, model: paligemma.Model) -> None:
    """The app's warm-up of a loaded model (ModelManager's `warm`): what the page's requests run (token scores,
    the default token limit) through the scheduler that serves them, and nothing they do not run (a slot engine
    for a continuously batched model, not Model.run's loop). The row counts only overlapping requests use compile
    once the model is idle (Scheduler.warmup's `later`)."""
    scheduler.warmup(model, SCORED, DEFAULT_MAX_NEW_TOKENS, later=True)


class Playground:
    def __init__(self, manager: ModelManager, scheduler: str | Batcher | Scheduler | BySize = "auto"):
        """scheduler: a kind (make_scheduler) or one made already (the one the manager's warm-up goes through)."""
        self.manager = manager
        self._downloads = tempfile.TemporaryDirectory(prefix="playground-downloads-")  # removed at exit
        self._download_numbers = itertools.count(1)
        self.scheduler = make_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
        self._cache: dict[tuple[str, str, str], Outcome] = {}  # (model, image, prompt) → final outcome
        self._preparing: dict[str, threading.Event] = {}  # model → set once `prepare` is done with it

    def prepare_in_background(self, model: str, examples: list[prompts.Example]) -> None:
        """Loads `model`, compiles it for the common requests (`warm`) and computes its examples' answers, in a
        background thread; until then the page says it is preparing, not ready."""
        done = self._preparing[model] = threading.Event()

        def prepare():
            start = time.monotonic()
            try:
                self.manager.get(model)
                self.warm(model)
                self.precompute(model, examples)
                log.info("%s %r in %.1f s", PREPARED, model, time.monotonic() - start)
            except ValueError as err:  # the page says why the model is unavailable
                log.warning("preparing %r: %s", model, err)
            finally:
                done.set()

        # Not a daemon: the interpreter waits for a compile in progress rather than abort in the middle of it.
        threading.Thread(target=prepare, name=f"prepare {model}").start()

    def warm(self, model: str) -> None:
        """Compiles `model` for one request at a time, every prompt length up to 64 tokens and the default token
        limit, through the path a run takes (batcher, streaming chunks), so no common request waits for XLA. Each
        run stops at its first token, by which its executables are compiled."""
        ready = self.manager.get(model)
        blank = Image.new("RGB", (ready.model.config.image_size,) * 2)
        for tokens in WARM_PROMPT_TOKENS:
            prompt = _prompt_of_length(ready.model.tokenizer, tokens)
            steps = self.outcomes(
                lambda: blank, prompt, model, DECODINGS[0], DEFAULT_MAX_NEW_TOKENS, SEED, warming=True
            )
            with contextlib.closing(steps):
                next(step for step in steps if step.timing.get("new_tokens"))

    def status(self, model: str) -> str:
        """The model's info line, which says "ready" only once the model is prepared (`prepare_in_background`)."""
        preparing = self._preparing.get(model)
        if preparing is not None and not preparing.is_set() and model in self.manager.loaded:
            return "Loading: preparing the model for common prompt lengths (first time only)…"
        return self.manager.status(model)

    def load_model(self, model: str, progress=PROGRESS) -> str:
        """Loads `model` in the background, showing its progress; returns its info line (which says why, when the
        model cannot load: once, there, rather than in a toast as well)."""
        with contextlib.suppress(ValueError):
            self.manager.get(model, progress=lambda fraction, message: progress(fraction, desc=message))
        preparing = self._preparing.get(model)
        if preparing is not None:
            progress(0.9, desc="preparing the model for common prompt lengths (first time only)")
            preparing.wait()
        return self.status(model)

    def run(
        self,
        image: dict | None,
        prompt: str,
        model: str,
        decoding: str,
        max_new_tokens: float,
        seed: str | int = SEED,
        request: gr.Request = None,
        progress=PROGRESS,
    ) -> Iterator[tuple]:
        """Runs a PaliGemma model on one image and prompt; the text streams while the model generates.

        Outputs, in order: the highlighted text as [token, label] pairs, where each object found is one token
        named by its display name (repeated labels numbered, e.g. "cat 2"; unlabelled objects "object") and plain
        text has no label (never <loc>/<seg> tokens: those are in the raw output); the annotated image (at most
        1024 pixels a side) with one overlay image per object and its display name; the raw output with its
        <locNNNN>/<segNNN> tokens; a JSON file of the objects at the image's full size, with the labels as the
        model wrote them, boxes in pixels and masks as COCO RLE (null when nothing was found); a PNG of the image
        with the objects drawn (null when nothing was found); the timing in seconds. A request that cannot run
        raises an error whose message says what to change.

        Parameters:
            image: the image file (PNG, JPEG, WebP, GIF or BMP), sent with the request: handle_file(path).
            prompt: e.g. 'caption en', 'answer en what is this?', 'detect cat ; dog', 'segment cat'.
            model: one of the server's model names.
            decoding: greedy, nucleus(P) with 0 < P ≤ 1 or temperature(T) with T > 0.
            max_new_tokens: the most tokens to generate, 1 to 1024.
            seed: for sampled decodings, a whole number (default 0: the same request gives the same answer) or
                "random".
        """
        # Wired with preprocess=False: the image arrives as gr.Image's upload record ({"path": ...}), unread, so
        # that a bad file gets our message rather than Gradio's generic one.
        with (
            _as_gr_errors(model, prompt),
            contextlib.closing(
                self.outcomes(
                    lambda: read_upload(image),
                    prompt,
                    model,
                    decoding,
                    max_new_tokens,
                    seed,
                    arrival_time(request),
                    progress,
                )
            ) as steps,
        ):
            for step in steps:
                yield step.plain()

    def outcomes(
        self,
        picture_of,
        prompt: str,
        model: str,
        decoding: str,
        max_new_tokens,
        seed,
        arrived: float | None = None,
        progress=None,
        image_name: str | None = None,
        warming: bool = False,
    ) -> Iterator[Outcome]:
        """The steps of one run (text so far, then the final result); picture_of() gives the image (image_name:
        its file's name, for the debug panel to pick its ground truth from a data set's file; warming: a `warm`
        run, closed at its first token on purpose, so its closing is no cancel worth a log line). Raises
        ValueError for a request that cannot run. Runs in flight at the same time share the model through the
        scheduler (make_scheduler); closing this cancels the run."""
        started = time.monotonic()
        picture = picture_of()
        prompt = _checked_prompt(prompt)
        sampler = paligemma.parse_sampler(decoding)
        max_new = _checked_tokens(max_new_tokens)
        seed = checked_seed(seed)

        def loading(fraction, message):
            if progress is not None:
                progress(fraction, desc=f"{model}: {message}")

        ready = self.manager.get(model, progress=loading)
        prompt = _fitted_prompt(ready.model, prompt)
        timing = {
            "queue_s": None if arrived is None else round(started - arrived, 4),
            "load_wait_s": round(time.monotonic() - started, 4),
        }
        if sampler.kind != "greedy":
            timing["seed"] = seed
        display = picture.copy()
        display.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
        text, tokens, scores = "", 0, None
        shown = Outcome([], text, timing, display=display)
        yield shown
        submitted = time.monotonic()
        submit = self.scheduler.submit
        try:
            with contextlib.closing(
                submit(ready.model, picture, prompt, max_new, sampler, seed, tick_s=TICK_S, return_scores=SCORED)
            ) as updates:
                for update in updates:
                    if update is None:
                        waited = time.monotonic() - submitted
                        if not text and waited >= COMPILE_NOTICE_S:
                            yield Outcome(
                                [],
                                text,
                                timing,
                                display=display,
                                notice=(
                                    f"Preparing the model for this prompt length (first time only) · {waited:.0f} s"
                                ),
                            )
                        else:
                            yield shown
                        continue
                    text, tokens, scores = update.text, update.tokens, update.scores
                    timing.update(update.timing)
                    shown = Outcome(
                        postprocess.display_labels(_pieces(text, display, None)), text, timing, display=display
                    )
                    yield shown
        except GeneratorExit:  # the page stopped, cleared or replaced the run, or left: the scheduler frees its slot
            if not warming:
                log.info("run of %r on %r cancelled after %d tokens", prompt, model, tokens)
            raise
        finished = time.monotonic()
        outcome = self._annotations(text, picture, display, ready.masks, scores, ready.model.tokenizer)
        outcome.debug, outcome.debug_note = _debug_run(outcome, scores, ready.model, image_name)
        timing["postprocess_s"] = round(time.monotonic() - finished, 4)
        outcome.text, outcome.timing = text, timing
        said, outcome.more_tokens = notice(prompt, outcome.pieces, tokens, max_new, done=True)
        outcome.notice = " ".join(filter(None, (outcome.notice, said)))
        yield outcome

    def run_on_page(
        self,
        image: dict | None,
        prompt: str,
        model: str,
        decoding: str,
        max_new_tokens: float,
        seed: str = str(SEED),
        request: gr.Request = None,
        progress=PROGRESS,
    ) -> Iterator[tuple]:
        """`run` for the page (outputs: PAGE_OUTPUTS): each label in its colour, the notice and any error in the
        status line beside Run, and on an error the previous result left as it was."""
        name = (image.get("orig_name") or image.get("path")) if isinstance(image, dict) else None
        yield from self._page_steps(
            lambda: read_upload(image),
            prompt,
            model,
            decoding,
            max_new_tokens,
            seed,
            arrival_time(request),
            progress,
            name,
        )

    def run_example(
        self,
        example: prompts.Example,
        model: str,
        decoding: str,
        max_new_tokens: float,
        seed: str = str(SEED),
        progress=PROGRESS,
    ) -> Iterator[tuple]:
        """A gallery example: its answer at once when computed ahead (`precompute`), else run live."""
        cached = self._cache.get((model, example.image, example.prompt))
        if cached is not None and (decoding, max_new_tokens) == (DECODINGS[0], DEFAULT_MAX_NEW_TOKENS):
            yield _page_values(cached, "Done (computed ahead for this example).")
            return
        yield from self._page_steps(
            lambda: _open_example(example.image),
            example.prompt,
            model,
            decoding,
            max_new_tokens,
            seed,
            None,
            progress,
            example.image,
        )

    def precompute(self, model: str, examples: list[prompts.Example]) -> None:
        """Runs the examples once with the default settings so that a click shows the answer at once."""
        for example in examples:
            try:
                *_, last = self.outcomes(
                    lambda e=example: _open_example(e.image),
                    example.prompt,
                    model,
                    DECODINGS[0],
                    DEFAULT_MAX_NEW_TOKENS,
                    SEED,
                    image_name=example.image,
                )
            except ValueError as err:
                log.warning("example %r on %r: %s", example.prompt, model, err)
                continue
            self._cache[(model, example.image, example.prompt)] = last

    def _page_steps(self, picture_of, prompt, model, decoding, max_new_tokens, seed, arrived, progress, image_name):
        try:
            with contextlib.closing(
                self.outcomes(picture_of, prompt, model, decoding, max_new_tokens, seed, arrived, progress, image_name)
            ) as steps:
                for step in steps:
                    yield _page_values(step, "Running…" if step.annotated is None and not step.notice else "")
        except ValueError as err:
            yield _page_error(str(err))
        except Exception as err:
            log.exception("run failed (model %r, prompt %r)", model, prompt)
            yield _page_error(failure_message(err))

    def _annotations(
        self, text: str, picture: Image.Image, display: Image.Image, masks, scores=None, tokenizer=None
    ) -> Outcome:
        """The final outcome's pictures: the annotated image's value (display size), and the detections JSON and
        the annotated PNG at full size (files, or None when nothing was found). Given the run's token scores
        (and the tokenizer that reads them), each object's confidence too, in the outcome and in the JSON."""
        confidences, unscored = _confidences(text, picture, scores, tokenizer)
        shown = postprocess.display_labels(_pieces(text, display, masks))
        full = shown if display.size == picture.size else postprocess.display_labels(_pieces(text, picture, masks))
        said = ""
        if masks is None and any(obj.seg_codes for obj in postprocess.objects(shown)):
            said = "This model has no mask decoder (vae-oid.npz) beside its weights: boxes are drawn, masks not."
        annotated, colors = postprocess.annotated_image_value(display, shown)
        scored = None if confidences is None else [c.as_dict() for c in confidences]
        outcome = Outcome(
            shown, text, {}, said, annotated, colors, display=display, confidences=scored, debug_note=unscored
        )
        if not postprocess.objects(full):
            return outcome
        number = next(self._download_numbers)
        outcome.detections = os.path.join(self._downloads.name, f"detections-{number}.json")
        with open(outcome.detections, "w", encoding="utf-8") as f:
            json.dump(postprocess.to_json(_pieces(text, picture, masks), *picture.size, confidences), f)
        outcome.drawn = os.path.join(self._downloads.name, f"annotated-{number}.png")
        postprocess.draw_annotations(picture, full, colors).save(outcome.drawn)
        return outcome


@contextlib.contextmanager
def _as_gr_errors(model: str, prompt: str):
    """Problems as gr.Error with a message for a person; a bug is logged, never shown as a stack trace."""
    try:
        yield
    except ValueError as err:
        # As plain text: the page's error modal sanitises what it shows (Gradio renders the message as HTML
        # through its allow-list sanitiser), and API callers must get the message as it is.
        raise gr.Error(str(err), print_exception=False) from None
    except Exception as err:
        log.exception("run failed (model %r, prompt %r)", model, prompt)
        raise gr.Error(failure_message(err), print_exception=False) from None


def failure_message(err: Exception) -> str:
    """What a visitor reads when the server failed (not their request)."""
    if paligemma.is_out_of_memory(err):
        return "Out of memory for this request: try fewer new tokens, a smaller image or another model."
    return (
        "Something went wrong on the server while running the model (it is logged). Try again, or pick another model."
    )


def _confidences(text: str, picture: Image.Image, scores, tokenizer) -> tuple[list | None, str]:
    """(each object's postprocess.ObjectConfidence, or None with the reason there are none)."""
    if scores is None or tokenizer is None:
        return None, NO_SCORES
    try:
        return postprocess.object_confidences(postprocess.parse(text, *picture.size), scores, tokenizer), ""
    except ValueError as err:
        log.warning("no confidences for %r: %s", text, err)
        return None, f"No confidences for this answer: {err}."


def _debug_run(outcome: Outcome, scores, model: paligemma.Model, image_name: str | None):
    """(the debug panel's run of this outcome, or None with the reason there is none)."""
    if outcome.confidences is None:
        return None, outcome.debug_note
    config = model.config
    run = debug_run(
        outcome.display,
        outcome.text,
        scores,
        model.tokenizer,
        config.image_size,
        config.vision.patch_size,
        confidences=outcome.confidences,
        image_name=image_name,
        colors=outcome.colors,
    )
    return run, ""


def _pieces(text: str, image: Image.Image, masks) -> list:
    """The output's pieces at the size of `image`, with the model's labels and, given a decoder, masks."""
    pieces = postprocess.parse(text, *image.size)
    return pieces if masks is None else masks.attach_masks(pieces, *image.size)


def _highlighted(text: str, display: Image.Image) -> list[tuple[str, str | None]]:
    """The output as highlighted text: each object as its display name, labelled with it."""
    return readable(postprocess.display_labels(postprocess.parse(text, *display.size)))


PAGE_OUTPUTS = 11  # status, highlighted, annotated, raw, detections, drawn, timing JSON, timing line, again, offered,
# and the final outcome (for the legend's toggles)


def _page_values(step: Outcome, status: str) -> tuple:
    highlighted = gr.HighlightedText(step.highlighted, color_map=step.colors)
    annotated = None
    if step.annotated is not None:
        value, colors = step.page_annotated() if step.confidences is not None else (step.annotated, step.colors)
        annotated = gr.AnnotatedImage(value, color_map=colors, visible=True)
    said = " ".join(filter(None, (step.notice, status)))
    again = gr.Button(f"Run again with {step.more_tokens} tokens", visible=step.more_tokens is not None)
    detections = gr.update(value=step.detections, visible=step.detections is not None)  # no empty download panels
    drawn = gr.update(value=step.drawn, visible=step.drawn is not None)
    return (
        said,
        highlighted,
        annotated,
        step.text,
        detections,
        drawn,
        step.timing,
        timing_line(step.timing),
        again,
        step.more_tokens,
        gr.skip() if step.annotated is None else step,
    )


def toggle_overlay(shown: Outcome | None, evt: gr.SelectData) -> tuple:
    """A click on a legend entry: hides that object's overlay, or shows it again (its entry stays)."""
    if shown is None or shown.annotated is None:
        return gr.skip(), gr.skip()
    label = shown.shown_objects()[evt.index][0].label
    shown = dataclasses.replace(shown, hidden=shown.hidden ^ {label})
    value, colors = shown.page_annotated()
    return gr.AnnotatedImage(value, color_map=colors), shown


def filter_by_confidence(shown: Outcome | None, threshold: float) -> tuple:
    """The debug panel's confidence slider: the annotated image without the objects scored below `threshold`
    (redrawn from the stored outcome; the model does not run again)."""
    if shown is None or shown.annotated is None or shown.confidences is None or threshold == shown.min_score:
        return gr.skip(), gr.skip()
    shown = dataclasses.replace(shown, min_score=threshold)
    value, colors = shown.page_annotated()
    return gr.AnnotatedImage(value, color_map=colors), shown


def _page_error(message: str) -> tuple:
    """Only the status line changes: the previous result stays on screen."""
    return (f"⚠️ {message}",) + (gr.skip(),) * (PAGE_OUTPUTS - 1)


def timing_line(timing: dict) -> str:
    """E.g. "0.31 s · 7 tokens · 480 tok/s"; no rate before there is one to say (a run streaming its first token,
    an answer of one token), rather than "0 tok/s"."""
    if "new_tokens" not in timing:
        return ""
    seconds = timing.get("prefill_s", 0) + timing.get("decode_s", 0) + timing.get("postprocess_s", 0)
    count = timing["new_tokens"]
    parts = [f"{seconds:.2f} s", f"{count} token{'' if count == 1 else 's'}"]
    if timing.get("tokens_per_s"):
        parts.append(f"{timing['tokens_per_s']:.0f} tok/s")
    if timing.get("compiled"):
        parts.append("compiled for this prompt length first (first time only)")
    if "seed" in timing:
        parts.append(f"seed {timing['seed']}")
    return " · ".join(parts)


def _prompt_of_length(tokenizer, most: int) -> str:
    """A question whose prompt takes nearly `most` tokens (and no more): it lands in that prompt-length bucket."""
    words = 0
    while len(tokenizer.encode_prompt("answer en" + " what" * (words + 1))) <= most:
        words += 1
    return "answer en" + " what" * words


def _open_example(path: str) -> Image.Image:
    with open(path, "rb") as f:
        return paligemma.to_rgb(paligemma.open_image(f.read()))
