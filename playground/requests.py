"""One run: the visitor's upload and prompt → streamed outputs for the page and the `/run` API endpoint.

Text streams while the model generates; boxes, masks, the JSON download and the final timing follow when
it is done. Every problem a visitor can cause reaches the page as a `gr.Error` with a message for a person.
"""

from __future__ import annotations

import html
import io
import itertools
import json
import logging
import math
import numbers
import os
import tempfile
import time
from collections.abc import Iterator

import gradio as gr
from gradio.utils import get_upload_folder, is_in_or_equal
from PIL import Image, UnidentifiedImageError

import paligemma
import postprocess
from paligemma.generate import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS
from paligemma.preprocess import ACCEPTED, FORMATS, ImageError, open_image, to_rgb
from paligemma.samplers import parse_sampler
from playground.batching import Batcher
from playground.manager import ModelManager

log = logging.getLogger(__name__)

DECODINGS = ("greedy", "nucleus(0.1)", "nucleus(0.3)", "temperature(0.5)")
DEFAULT_MAX_NEW_TOKENS = 64
MAX_PIXELS = 4096 * 4096  # larger uploads are refused before their pixels are decoded
DISPLAY_SIDE = 1024  # the page shows boxes and masks on a copy at most this wide and high; JSON keeps full size
STREAM_EVERY_TOKENS = 8
SEED = 0  # sampled decodings are reproducible: the same request gives the same answer
_ARRIVED = "playground_arrived"
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
        raise ImageError(f"Upload an image first ({ACCEPTED}), or pick an example.")
    if not _is_upload(path):
        raise ImageError("send the image itself with the request (gradio_client: handle_file(...)); this server "
                         "reads no file it was not sent")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        raise ImageError("the uploaded image is no longer on the server; upload it again") from None
    _check_pixels(data)
    return to_rgb(open_image(data))


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
        with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
            size, pixels = f"{probe.width}×{probe.height} pixels", probe.width * probe.height
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours; its error does not give the size
        size, pixels = f"over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels", None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return  # not an image we read: open_image says so with its message
    if pixels is None or pixels > MAX_PIXELS:
        raise ImageError(f"the image is {size}; this server takes at most {MAX_PIXELS / 1e6:.0f} megapixels "
                         f"(e.g. {int(MAX_PIXELS ** 0.5)}×{int(MAX_PIXELS ** 0.5)}). Shrink it and retry.")


def _checked_prompt(prompt: str | None) -> str:
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"the prompt must be text, got {type(prompt).__name__}")
    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("Type a prompt or pick a task, e.g. 'caption en' or 'detect cat'.")
    return prompt


# Tokenise no further than this: no token is this long, and encoding megabytes of pasted text takes seconds.
MAX_PROMPT_CHARS = 64 * MAX_PROMPT_TOKENS


def _fitted_prompt(model: paligemma.Model, prompt: str) -> str:
    """The prompt cut to the model's prompt budget, with a notice on the page, rather than refused: whoever
    pasted a long text still gets an answer about its beginning."""
    tokenizer = model.tokenizer
    budget = MAX_PROMPT_TOKENS - len(tokenizer.encode_prompt(""))  # [bos] and "\n" take their places
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
    whole = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
             and value == int(value))
    if not whole or not 1 <= value <= MAX_NEW_TOKENS:
        raise ValueError(f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, got {value!r}")
    return int(value)


class Playground:
    """Runs requests against the models of a `ModelManager`; its methods are the page's event handlers."""

    def __init__(self, manager: ModelManager):
        self.manager = manager
        self._downloads = tempfile.TemporaryDirectory(prefix="playground-downloads-")  # removed at exit
        self._download_numbers = itertools.count(1)
        self.batcher = Batcher(seed=SEED, chunk=STREAM_EVERY_TOKENS)  # concurrent runs share generate calls

    def load_model(self, model: str, progress=PROGRESS) -> str:
        """Loads `model` in the background, showing its progress; returns its info line."""
        try:
            self.manager.get(model, progress=lambda fraction, message: progress(fraction, desc=message))
        except ValueError as err:
            gr.Warning(str(err))
        return self.manager.status(model)

    def run(self, image: dict | None, prompt: str, model: str, decoding: str, max_new_tokens: float,
            request: gr.Request = None, progress=PROGRESS) -> Iterator[tuple]:
        """Runs a PaliGemma model on one image and prompt.

        Wired with `preprocess=False`: the image arrives as gr.Image's upload record ({"path": ...}, already
        checked by Gradio to be an upload), unread, so that a bad file gets our message rather than Gradio's
        generic error; the model name is checked against the registry here. Runs in flight at the same
        time with the same model and decoding share one generate call (see playground/batching.py).

        Parameters:
            image: the image file (PNG, JPEG, WebP, GIF or BMP).
            prompt: e.g. 'caption en', 'answer en what is this?', 'detect cat ; dog', 'segment cat'.
            model: one of the server's model names.
            decoding: greedy, nucleus(0.1), nucleus(0.3) or temperature(0.5).
            max_new_tokens: the most tokens to generate.
        Returns:
            highlighted text, annotated image, raw output with loc/seg tokens, detections JSON file, timing.
        """
        started = time.monotonic()
        arrived = arrival_time(request)
        try:
            picture = read_upload(image)
            prompt = _checked_prompt(prompt)
            sampler = parse_sampler(decoding)
            max_new = _checked_tokens(max_new_tokens)
            ready = self.manager.get(model, progress=lambda f, message: progress(f, desc=f"{model}: {message}"))
            prompt = _fitted_prompt(ready.model, prompt)
            timing = {"queue_s": None if arrived is None else round(started - arrived, 4),
                      "load_wait_s": round(time.monotonic() - started, 4)}
            display = picture.copy()
            display.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
            text = ""
            yield _highlighted(text, display), None, text, None, timing
            for update in self.batcher.submit(ready.model, picture, prompt, max_new, sampler):
                text = update.text
                timing.update(update.timing)
                yield _highlighted(text, display), None, text, None, timing
            finished = time.monotonic()
            annotated, detections = self._annotations(text, picture, display, ready.masks)
            timing["postprocess_s"] = round(time.monotonic() - finished, 4)
            yield _highlighted(text, display), annotated, text, detections, timing
        except ValueError as err:
            raise gr.Error(html.escape(str(err), quote=False), print_exception=False) from None
        except Exception as err:  # a bug must not reach the page as a stack trace
            log.exception("run failed (model %r, prompt %r)", model, prompt)
            if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err):
                raise gr.Error("Out of memory for this request: try fewer new tokens, a smaller image or another "
                               "model.", print_exception=False) from None
            raise gr.Error("Something went wrong on the server while running the model (it is logged). "
                           "Try again, or pick another model.", print_exception=False) from None

    def _annotations(self, text: str, picture: Image.Image, display: Image.Image, masks) -> tuple:
        """The annotated image for the page (display size) and the detections file (full size, or None)."""
        shown = _pieces(text, display, masks)
        full = shown if display.size == picture.size else _pieces(text, picture, masks)
        if masks is None and any(obj.seg_codes for obj in postprocess.objects(shown)):
            gr.Warning("This model has no mask decoder (vae-oid.npz) beside its weights: boxes are drawn, masks not.")
        colors = postprocess.label_colors(obj.label for obj in postprocess.objects(shown))
        annotated = gr.AnnotatedImage(postprocess.annotated_image_value(display, shown), color_map=colors)
        if not postprocess.objects(full):
            return annotated, None
        path = os.path.join(self._downloads.name, f"detections-{next(self._download_numbers)}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(postprocess.to_json(full, *picture.size), f)
        return annotated, path


def _pieces(text: str, image: Image.Image, masks) -> list:
    pieces = postprocess.parse(text, *image.size, unique_labels=True)
    return pieces if masks is None else masks.attach_masks(pieces, *image.size)


def _highlighted(text: str, display: Image.Image) -> gr.HighlightedText:
    """The output as highlighted text, each object's label in the colour of its box and mask."""
    pieces = postprocess.parse(text, *display.size, unique_labels=True)
    colors = postprocess.label_colors(obj.label for obj in postprocess.objects(pieces))
    return gr.HighlightedText(postprocess.highlighted_text_value(pieces), color_map=colors)
