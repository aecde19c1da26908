"""The "Debug this answer" panel: confidence filter, box-edge bands, the model's eye, token inspector, ground truth.

Everything is drawn from one stored run, so moving the slider or pasting ground truth never reruns the model:

    with gr.Blocks() as demo:
        ...
        panel = build_debug_panel()                  # inside the Blocks, where the accordion should appear
        done = run_button.click(run_fn, inputs, [..., panel.run, panel.note])   # debug_run(...) or None, and
        panel.follow(done)                            # why it is None; draws the panel from the new run

    # in run_fn, after `*_, result = model.run([image], [prompt], return_scores=True)`:
    stored = debug_run(image, result.texts[0], result.scores[0], model.tokenizer, model.config.image_size,
                       model.config.vision.patch_size, confidences=None or the page's, image_name=basename)

`update(run, threshold, bands, selected, truth_text, truth_file)` gives every output at once (`panel.inputs`
-> `panel.outputs`); the panel's own events (slider, toggle, row click, ground truth) call the parts of it
that change.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from paligemma import to_rgb
from postprocess import (
    TOKEN_COLUMNS,
    Object,
    TokenRow,
    colors_on,
    compare,
    display_labels,
    draw_annotations,
    draw_comparison,
    draw_edge_bands,
    model_eye,
    object_confidences,
    objects,
    parse,
    parse_ground_truth,
    squash_note,
    table_values,
    token_rows,
)

MAX_TRUTH_BYTES = 64 * 1024 * 1024  # a whole COCO val2017 annotation file is about 25 MB
DIM = 0.4  # brightness left outside the highlighted object
NO_RUN = "Run the model on an image: its answer's tokens, confidences and boxes are debugged here."
TRUTH_HINT = (
    "Paste PaliGemma suffix text, COCO-style JSON boxes or one JSONL line of the fine-tuning format "
    "(or upload it) to compare."
)
PICTURE_HEIGHT = 360  # the panel's pictures side by side in frames of one height
# Of TOKEN_COLUMNS, in pixels: all fit a 1400-pixel page; a phone scrolls the table sideways rather than squeeze it.
COLUMN_WIDTHS = ["44px", "130px", "110px", "540px", "200px", "150px"]
_GLUE = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}  # page only, no accelerator


@dataclasses.dataclass
class DebugRun:
    """What the page stores (in `panel.run`) per run: all the panel needs, the tokenizer's work already done.

    objects: parse(text, width, height)'s objects with the model's labels; labels: their display names;
    colors: {display name: colour}, the same in every picture of the panel; confidences: per object the
    ObjectConfidence.as_dict() fields (score, box_score, label_score, mask_score, edges, token_span); rows: the
    token inspector's rows; image_size/patch_size: the model's input square and patch; image_name: the uploaded
    file's name, to pick this image's ground truth out of a whole data set file.
    """

    image: Image.Image
    text: str
    objects: list[Object]
    labels: list[str]
    colors: dict[str, str]
    confidences: list[dict]
    rows: list[TokenRow]
    image_size: int
    patch_size: int
    image_name: str | None = None


def debug_run(
    image,
    text: str,
    scores,
    tokenizer,
    image_size: int,
    patch_size: int,
    confidences: Sequence | None = None,
    image_name: str | None = None,
    colors: Mapping[str, str] | None = None,
) -> DebugRun:
    """The stored run, built once after generation.

    scores: the row's paligemma.TokenScores, or a mapping with its fields token_ids, logprobs, top_ids,
    top_logprobs; confidences: per object an ObjectConfidence or its as_dict() (computed from scores when None);
    colors: {display name: colour} as the page drew them (by default picked for contrast on the image).
    """
    picture = to_rgb(image)
    if isinstance(scores, Mapping):
        scores = _Scores(**{key: scores[key] for key in ("token_ids", "logprobs", "top_ids", "top_logprobs")})
    pieces = parse(text, picture.width, picture.height)
    if confidences is None:
        confidences = object_confidences(pieces, scores, tokenizer)
    confidences = [c if isinstance(c, Mapping) else c.as_dict() for c in confidences]
    found = objects(pieces)
    if len(confidences) != len(found):
        raise ValueError(f"need one confidence per object: {len(found)} objects, {len(confidences)} confidences")
    rows = token_rows(
        scores.token_ids,
        scores.logprobs,
        scores.top_ids,
        scores.top_logprobs,
        tokenizer,
        picture.width,
        picture.height,
        [tuple(c["token_span"]) for c in confidences],
    )
    shown = objects(display_labels(found))
    colors = dict(colors) if colors is not None else colors_on(picture, shown)
    return DebugRun(
        picture,
        text,
        found,
        [o.label for o in shown],
        colors,
        confidences,
        rows,
        int(image_size),
        int(patch_size),
        image_name and os.path.basename(image_name),
    )


@dataclasses.dataclass(frozen=True)
class _Scores:
    token_ids: Sequence[int]
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def tag(label: str, score: float) -> str:
    """An object's tag, e.g. "cat 0.871": three places, since the demo model's scores sit close together near 0.1
    and a tag must tell apart what the slider (steps of 0.001) does."""
    return f"{label} {score:.3f}"


def shown_objects(run: DebugRun, threshold: float) -> list[int]:
    """Indices of the objects whose confidence reaches the slider's threshold."""
    return [i for i, c in enumerate(run.confidences) if c["score"] >= threshold]


def boxes_picture(
    run: DebugRun | None, threshold: float = 0.0, bands: bool = False, selected: int | None = None
) -> Image.Image | None:
    """The image with the shown boxes tagged "label 0.87", their edge bands when asked, and the selected object
    (shown even below the threshold, since a person asked for it) highlighted by dimming the rest; None before
    the first run."""
    if run is None:
        return None
    shown = sorted(set(shown_objects(run, threshold)) | ({selected} if selected is not None else set()))
    tags = [tag(run.labels[i], run.confidences[i]["score"]) for i in shown]
    pieces = [dataclasses.replace(run.objects[i], label=text, mask=None) for i, text in zip(shown, tags)]
    colors = {text: run.colors[run.labels[i]] for i, text in zip(shown, tags)}
    picture = draw_annotations(run.image, pieces, colors)
    if bands and shown:
        picture = draw_edge_bands(
            picture,
            [run.objects[i].box for i in shown],
            [run.confidences[i]["edges"] for i in shown],
            [run.colors[run.labels[i]] for i in shown],
        )
    if selected is not None:
        picture = _highlighted(picture, run.objects[selected].box, run.colors[run.labels[selected]])
    return picture


def eye_view(run: DebugRun) -> tuple[Image.Image, str]:
    """The model's eye and the sentence on how the image was squashed."""
    return (
        model_eye(run.image, run.text, run.image_size, run.patch_size, run.colors),
        squash_note(run.image.width, run.image.height, run.image_size, run.patch_size),
    )


def token_table(run: DebugRun) -> list[list]:
    return table_values(run.rows, run.labels)


def selected_object(run: DebugRun | None, event: gr.SelectData) -> int | None:
    """The object of the clicked token row, or None for a token of no object. The row is found by its "#" cell,
    so a table sorted in the browser still points at the right token."""
    if run is None:
        return None
    if event.row_value:
        token = int(event.row_value[0])
    elif isinstance(event.index, Sequence):
        token = int(event.index[0])
    else:
        return None
    return run.rows[token].object_index if 0 <= token < len(run.rows) else None


def comparison_view(
    run: DebugRun | None, threshold: float, truth_text: str | None, truth_file: str | None
) -> tuple[Image.Image | None, str]:
    """The shown boxes against the ground truth (the file when one is uploaded, else the text), drawn, and a
    Markdown summary with precision/recall and each match's IoU; a reading error is shown, not raised."""
    if run is None:
        return None, ""
    try:
        source = _read_truth_file(truth_file) if truth_file else (truth_text or "")
        if not source.strip():
            return None, TRUTH_HINT
        truth = parse_ground_truth(source, run.image.width, run.image.height, run.image_name)
    except ValueError as err:
        return None, f"⚠️ {err}"
    shown = shown_objects(run, threshold)
    predicted = [run.objects[i] for i in shown]
    comparison = compare(predicted, truth)
    lines = [f"**{comparison.summary()}**"]
    lines += [f"- match: {run.labels[shown[m.predicted]]} IoU {m.iou:.2f}" for m in comparison.matches]
    lines += [f"- missed: {truth[t].label or 'object'} {list(truth[t].box)}" for t in comparison.misses]
    lines += [f"- false box: {run.labels[shown[p]]} {list(predicted[p].box)}" for p in comparison.false_boxes]
    return draw_comparison(run.image, predicted, truth, comparison), "\n".join(lines)


def update(
    run: DebugRun | None,
    threshold: float,
    bands: bool,
    selected: int | None,
    truth_text: str | None,
    truth_file: str | None,
) -> tuple:
    """Every output of the panel (`DebugPanel.outputs`) from one stored run: boxes picture, model's eye, its
    note, token table, ground-truth picture, its note. With no run yet, empty outputs."""
    if run is None:
        return None, None, "", [], None, ""
    return (
        boxes_picture(run, threshold, bands, selected),
        *eye_view(run),
        token_table(run),
        *comparison_view(run, threshold, truth_text, truth_file),
    )


@dataclasses.dataclass
class DebugPanel:
    run: gr.State
    note: gr.Markdown  # why the panel is empty (no run yet, or a run without token scores), else nothing
    selected: gr.State
    threshold: gr.Slider
    bands: gr.Checkbox
    boxes: gr.Image
    eye: gr.Image
    eye_note: gr.Markdown
    tokens: gr.Dataframe
    truth_text: gr.Textbox
    truth_file: gr.File
    comparison: gr.Image
    comparison_note: gr.Markdown
    update = staticmethod(update)

    @property
    def inputs(self) -> list:
        return [self.run, self.threshold, self.bands, self.selected, self.truth_text, self.truth_file]

    @property
    def outputs(self) -> list:
        return [self.boxes, self.eye, self.eye_note, self.tokens, self.comparison, self.comparison_note]

    def follow(self, event):
        """After `event` (which stored a new DebugRun in self.run): clear the selection and draw everything."""
        return event.then(
            _fresh,
            [self.run, self.threshold, self.bands, self.truth_text, self.truth_file],
            [self.selected, *self.outputs],
            **_GLUE,
        )


def _fresh(run: DebugRun | None, threshold: float, bands: bool, truth_text: str | None, truth_file: str | None):
    return (None, *update(run, threshold, bands, None, truth_text, truth_file))


def build_debug_panel() -> DebugPanel:
    """Creates the panel's components and events inside the current gr.Blocks; returns them."""
    with gr.Accordion("Debug this answer", open=False, elem_id="debug-panel"):
        run, selected = gr.State(None), gr.State(None)
        note = gr.Markdown(NO_RUN, elem_id="debug-note")
        with gr.Row():
            threshold = gr.Slider(
                0.0, 1.0, value=0.0, step=0.001, label="Hide boxes below confidence", elem_id="debug-threshold"
            )
            bands = gr.Checkbox(label="Show box-edge uncertainty", elem_id="debug-bands")
        with gr.Row():
            boxes = gr.Image(
                label="Boxes with confidence",
                type="pil",
                format="png",
                interactive=False,
                height=PICTURE_HEIGHT,
                elem_id="debug-boxes",
            )
            with gr.Column():
                eye = gr.Image(
                    label="The model's eye",
                    type="pil",
                    format="png",
                    interactive=False,
                    height=PICTURE_HEIGHT,
                    elem_id="debug-eye",
                )
                eye_note = gr.Markdown(elem_id="debug-eye-note")
        tokens = gr.Dataframe(
            headers=TOKEN_COLUMNS,
            label="Tokens (click a row to highlight its object)",
            interactive=False,
            wrap=True,
            max_height=420,
            column_widths=COLUMN_WIDTHS,
            elem_id="debug-tokens",
        )
        with gr.Row():
            with gr.Column():
                truth_text = gr.Textbox(
                    label="Ground truth",
                    lines=3,
                    elem_id="debug-truth",
                    placeholder="<loc0100><loc0200><loc0300><loc0400> cat ; ... or JSON",
                )
                truth_file = gr.File(
                    label="Ground truth file (.json, .jsonl, .txt)",
                    type="filepath",
                    file_types=[".json", ".jsonl", ".txt"],
                    height=120,
                    elem_id="debug-truth-file",
                )
                comparison_note = gr.Markdown(TRUTH_HINT, elem_id="debug-comparison-note")
            comparison = gr.Image(
                label="Against the ground truth",
                type="pil",
                format="png",
                interactive=False,
                height=PICTURE_HEIGHT,
                elem_id="debug-comparison",
            )
    panel = DebugPanel(
        run,
        note,
        selected,
        threshold,
        bands,
        boxes,
        eye,
        eye_note,
        tokens,
        truth_text,
        truth_file,
        comparison,
        comparison_note,
    )
    threshold.release(comparison_view, [run, threshold, truth_text, truth_file], [comparison, comparison_note], **_GLUE)
    redraw = {"fn": boxes_picture, "inputs": [run, threshold, bands, selected], "outputs": boxes, **_GLUE}
    gr.on([threshold.release, bands.change], **redraw)
    tokens.select(selected_object, run, selected, **_GLUE).then(**redraw)
    gr.on(
        [truth_text.change, truth_file.change],
        comparison_view,
        [run, threshold, truth_text, truth_file],
        [comparison, comparison_note],
        **_GLUE,
    )
    return panel


def _highlighted(picture: Image.Image, box, color: str) -> Image.Image:
    pixels = np.asarray(picture, np.float32)
    x1, y1, x2, y2 = box
    dimmed = pixels * DIM
    dimmed[y1:y2, x1:x2] = pixels[y1:y2, x1:x2]
    out = Image.fromarray(dimmed.round().astype(np.uint8))
    stroke = max(3, min(picture.size) // 60)
    ImageDraw.Draw(out).rectangle(
        (x1 - stroke, y1 - stroke, x2 - 1 + stroke, y2 - 1 + stroke), outline=color, width=stroke
    )
    return out


def _read_truth_file(path: str) -> str:
    size = os.path.getsize(path)
    if size > MAX_TRUTH_BYTES:
        raise ValueError(
            f"the ground truth file is {size / 2**20:.0f} MB; at most {MAX_TRUTH_BYTES // 2**20} MB "
            f"is read. Keep only this image's part."
        )
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("the ground truth file is not UTF-8 text (JSON, JSONL or suffix text)") from None
