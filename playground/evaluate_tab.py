"""The app's "Evaluate" tab: upload a zipped data set, score a model on it, look at the figures and the worst images.

    with gr.Blocks() as demo:
        ...
        build_evaluate_tab(manager)      # opens gr.Tab("Evaluate") itself; one call inside the Blocks

Pressing Evaluate runs three events: `begin` (a fresh EvaluationRun in the page's state), `load_model` (waits for
the model; Stop cancels it) and, once loaded, `evaluate` (paligemma.evaluate_zip). Stop during the evaluation
sets the run's stop flag instead of cancelling, so that the evaluator ends after its current batch and the report
of the images done so far, flagged as stopped, still reaches the page.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import shutil
import tempfile
import threading

import gradio as gr

import paligemma
from playground.manager import ModelManager
from playground.requests import PROGRESS, failure_message

log = logging.getLogger(__name__)

KEEP_REPORTS = 16  # report folders kept on disk; older ones are removed (the page has a copy in its cache)
EVALUATION_CONCURRENCY = 1  # evaluations hold the model for minutes: one at a time, the others queue
_PRIVATE = {"api_visibility": "private"}
_GLUE = {"queue": False, "show_progress": "hidden", **_PRIVATE}  # page only, no accelerator


@dataclasses.dataclass
class EvaluationRun:
    """One press of Evaluate: the flag the evaluator polls between batches, and how far the run got."""

    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    evaluating: bool = False
    finished: bool = False


class EvaluateTab:
    """The tab's handlers (callable without a server, as the tests do) and, after `build`, its components."""

    def __init__(
        self,
        manager: ModelManager,
        max_zip_bytes: int | None = None,
        max_images: int | None = None,
        batch_size: int | None = None,
    ):
        self.manager = manager
        self.max_zip_bytes = max_zip_bytes or paligemma.MAX_ZIP_BYTES
        self.max_images = max_images or paligemma.MAX_ZIP_IMAGES
        self.batch_size = batch_size  # None: as the evaluator sizes it for the device
        self._reports = tempfile.mkdtemp(prefix="paligemma-eval-reports-")

    def limits(self) -> str:
        """The line under the upload: what the zip must hold, and its bounds."""
        return (
            f"A .zip of at most {self.max_zip_bytes / 2**20:.0f} MiB with at most {self.max_images} images "
            f"(PNG, JPEG, WebP, GIF or BMP) and one data file, image paths relative to it: a **.jsonl** in the "
            f'fine-tuning format (one `{{"image", "prefix", "suffix"}}` per line) or a **COCO** annotation '
            f".json (each label becomes a `detect <label>` prompt)."
        )

    def build(self) -> EvaluateTab:
        """The tab's components and events; call inside a gr.Blocks."""
        with gr.Tab("Evaluate", id="evaluate"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=320):
                    self.upload = gr.File(
                        label="Data set (.zip)", file_types=[".zip"], type="filepath", elem_id="eval-upload"
                    )
                    gr.Markdown(self.limits(), elem_classes="limits")
                with gr.Column(scale=2, min_width=260):
                    self.model = gr.Dropdown(
                        self.manager.registry.names,
                        value=self.manager.registry.default,
                        label="Model",
                        elem_id="eval-model",
                    )
                    with gr.Row():
                        self.start = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
                        self.stop_button = gr.Button("Stop", variant="stop", elem_id="eval-stop")
            self.status = gr.Markdown("", elem_id="eval-status")
            self.summary = gr.Markdown("", elem_id="eval-summary")
            self.worst = gr.Gallery(
                label="Worst images: false boxes (red), misses (orange), matched (blue)",
                columns=4,
                height=520,
                object_fit="contain",
                format="png",
                elem_id="eval-worst",
            )
            self.files = gr.File(
                label="Report: report.html (figures and worst images) and report.json",
                file_count="multiple",
                interactive=False,
                elem_id="eval-files",
            )
            self.run = gr.State(None)

        results = [self.status, self.summary, self.worst, self.files]
        started = self.start.click(self.begin, None, [self.run, *results], **_GLUE)
        loading = started.then(
            self.load_model,
            [self.upload, self.model],
            self.status,
            show_progress="full",
            concurrency_id="evaluate-load",
            concurrency_limit=None,
            **_PRIVATE,
        )
        loading.success(
            self.evaluate,
            [self.upload, self.model, self.run],
            results,
            show_progress="full",
            concurrency_id="evaluate",
            concurrency_limit=EVALUATION_CONCURRENCY,
            **_PRIVATE,
        )
        self.stop_button.click(self.stop, self.run, self.status, cancels=[loading], **_GLUE)
        return self

    def begin(self):
        """A fresh run, and the previous results cleared."""
        return EvaluationRun(), "", "", None, None

    def load_model(self, upload: str | None, name: str, progress=PROGRESS) -> str:
        """Waits for the model (the evaluation follows only if this succeeds); problems as gr.Error."""
        if not upload:
            raise gr.Error("Choose a .zip to evaluate first.", print_exception=False)
        try:
            ready = self.manager.get(name, progress=lambda fraction, what: progress(fraction, desc=f"{name}: {what}"))
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return f"Evaluating with {ready.info_line()}…"

    def evaluate(self, upload: str | None, name: str, run: EvaluationRun | None, progress=PROGRESS):
        """status, summary, worst images, report files: a refused upload or a failure says why in the status."""
        run = run or EvaluationRun()
        run.evaluating = True
        try:
            if not upload:
                raise ValueError("choose a .zip to evaluate first")
            if run.stop.is_set():
                return "Stopped before the evaluation began.", "", None, None
            model = self.manager.get(name).model
            progress(0, desc="Unpacking the zip")
            report = paligemma.evaluate_zip(
                model,
                upload,
                max_bytes=self.max_zip_bytes,
                max_images=self.max_images,
                batch_size=self.batch_size,
                stop=run.stop,
                progress=lambda done, total: progress((done, total), desc="Evaluating", unit="images"),
            )
        except ValueError as err:
            return f"⚠️ {err}", "", None, None
        except Exception as err:  # the page says so and the server keeps serving
            log.exception("evaluation failed (model %r)", name)
            return f"⚠️ {failure_message(err)}", "", None, None
        finally:
            run.finished = True
        paths = paligemma.write_eval_report(report, self._report_folder())
        data = report.as_dict(with_lines=False)
        status = "Stopped: the figures cover the images evaluated before Stop." if data["stopped"] else "Done."
        # opened on the first image: a grid of few pictures would show each one page wide, cropped
        worst = gr.Gallery(worst_images(report), selected_index=0, format="png") if report.worst else None
        return status, summary_markdown(data), worst, list(paths)

    def stop(self, run: EvaluationRun | None) -> str:
        """Ends the run: a waiting model load is cancelled (cancels=); an evaluation ends after its batch."""
        if run is None or run.finished:
            return "Nothing to stop."
        run.stop.set()
        if run.evaluating:
            return "Stopping after the current batch; the report of the images done so far follows."
        return "Stopped."

    def _report_folder(self) -> str:
        folder = tempfile.mkdtemp(prefix="run-", dir=self._reports)
        for old in sorted(glob.glob(os.path.join(self._reports, "run-*")), key=os.path.getmtime)[:-KEEP_REPORTS]:
            shutil.rmtree(old, ignore_errors=True)
        return folder


def build_evaluate_tab(
    manager: ModelManager,
    max_zip_bytes: int | None = None,
    max_images: int | None = None,
    batch_size: int | None = None,
) -> EvaluateTab:
    """Adds gr.Tab("Evaluate") to the Blocks being built. Bounds default to paligemma.MAX_ZIP_BYTES and
    MAX_ZIP_IMAGES; the server's own upload limit (launch's max_file_size) must be at least max_zip_bytes."""
    return EvaluateTab(manager, max_zip_bytes, max_images, batch_size).build()


def summary_markdown(data: dict) -> str:
    """The figures of report.as_dict() as Markdown: the run, box and mask AP, text accuracy, speed, skipped lines."""
    speed = data["throughput"]
    per_s = "—" if speed["images_per_s"] is None else f"{speed['images_per_s']:g}"
    out = [
        f"**{_md(data['data'])}**: {data['evaluated']} of {data['examples']} examples evaluated"
        + (" (**stopped early**)" if data["stopped"] else "")
        + f", {len(data['skipped'])} skipped · "
        f"{per_s} images/s on {_md(speed['device'])}, batch {speed['batch_size']}"
    ]
    located = [(name, data[key]) for name, key in (("boxes", "detection"), ("masks", "segmentation")) if data[key]]
    if located:
        out += ["", "| | AP | AP50 | AP75 | recall | lines | true | predicted |", "|---|---|---|---|---|---|---|---|"]
        out += [
            f"| {name} | {_figure(m['ap'])} | {_figure(m['ap50'])} | {_figure(m['ap75'])} | "
            f"{_figure(m['recall'])} | {m['lines']} | {m['truth']} | {m['predicted']} |"
            for name, m in located
        ]
    if data["text"]:
        text = data["text"]
        out += ["", "| task | lines | exact match |", "|---|---|---|"]
        out += [f"| {_md(task)} | {v['lines']} | {_figure(v['exact_match'])} |" for task, v in text["per_task"].items()]
        out.append(f"| **all text** | {text['lines']} | {_figure(text['exact_match'])} |")
    if data["skipped"]:
        out += ["", "Skipped:"] + [f"- line {p['line']}: {_md(p['reason'])}" for p in data["skipped"]]
    return "\n".join(out)


def worst_images(report) -> list[tuple]:
    """(picture, caption) per worst line, for the gallery."""
    shown = []
    for review in report.worst:
        facts = review.as_dict()
        lowest = "—" if facts["lowest_iou"] is None else f"{facts['lowest_iou']:.2f}"
        caption = (
            f"line {facts['line']}: {facts['prefix']} · {facts['false_boxes']} false, {facts['misses']} "
            f"missed, lowest IoU {lowest}"
        )
        shown.append((review.picture, caption))
    return shown


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _md(text) -> str:
    """Text from the upload, shown literally in Markdown (no markup, no table breaks)."""
    return "".join("\\" + c if c in "\\`*_{}[]<>()#+-!|~" else c for c in str(text))
