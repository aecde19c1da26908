"""PaliGemma playground: an image and a prompt in; text, boxes and masks out.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--models models.json]

Also the entry point of the Hugging Face Space (sdk gradio, app_file app.py).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os

import gradio as gr
from starlette.middleware import Middleware

import paligemma
from playground import batching, gradio_cache, prompts, registry
from playground.debug_panel import NO_RUN, build_debug_panel
from playground.evaluate_tab import build_evaluate_tab
from playground.manager import ModelManager
from playground.requests import (
    DECODINGS,
    DEFAULT_MAX_NEW_TOKENS,
    MAX_PIXELS,
    PROGRESS,
    SCHEDULERS,
    SEED,
    ArrivalStamp,
    Outcome,
    Playground,
    filter_by_confidence,
    make_scheduler,
    read_upload,
    toggle_overlay,
    warm_for_requests,
)

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_DIR = os.path.join(HERE, "assets", "demo")
EXAMPLES_DIR = os.path.join(HERE, "assets", "examples")
MODELS_FILE = os.path.join(HERE, "models.json")
MAX_FILE_SIZE = "10mb"
MAX_UPLOAD_BYTES = 10 * 2**20  # the same limit for the Evaluate tab's zips
QUEUE_SIZE = 32  # waiting runs beyond this are turned away with "queue full"
STATUS_CONCURRENCY = 8  # model-status events only wait for a load; they do not use the accelerator
RUN_CONCURRENCY = 2 * batching.MAX_BATCH  # runs in flight: a batch on the model and the next one gathering
INTRO = """# PaliGemma playground
Pick an example — it runs at once — or upload an image, choose a task and press **Run**."""
LIMITS = f"PNG, JPEG, WebP, GIF or BMP · at most {MAX_FILE_SIZE.upper()} and {MAX_PIXELS // 100_000 / 10} megapixels"
IDLE = (gr.Button(visible=True), gr.Button(visible=False))  # (Run, Stop)
BUSY = (gr.Button(visible=False), gr.Button("Stop", visible=True, interactive=True))
# Stop leaves Run hidden: until the server has cancelled the stopped run, the page would drop a new Run (Gradio
# skips an event whose previous run is still pending, then its late cancel ends the new one). Run comes back with
# the stopped run's own `.then(idle)`, which Gradio fires once the cancel is done (or at once if the run had just
# finished), so the buttons never wait on anything that might not come.
STOPPING = gr.Button("Stopping…", interactive=False)


def build_app(playground: Playground, examples: list[prompts.Example]) -> gr.Blocks:
    manager = playground.manager
    offered_first = prompts.examples_for(manager.registry.default, examples)  # what the page opens with
    with gr.Blocks(title="PaliGemma playground", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Playground", id="playground"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3, min_width=320):
                        image = gr.Image(
                            label="Image", type="filepath", sources=["upload", "clipboard"], height=300, elem_id="image"
                        )
                        gr.Markdown(LIMITS, elem_classes="limits")
                    with gr.Column(scale=2, min_width=280):
                        gallery = gr.Gallery(
                            [(ex.image, ex.prompt) for ex in offered_first],
                            label="Examples: click to run",
                            columns=3,
                            height=300,
                            allow_preview=False,
                            object_fit="contain",
                            elem_id="examples",
                        )
                with gr.Row():
                    task = gr.Radio(
                        list(manager.registry.get(manager.registry.default).tasks),
                        value="caption",
                        label="Task",
                        scale=4,
                        elem_id="tasks",
                    )
                    language = gr.Dropdown(
                        prompts.LANGUAGES,
                        value=prompts.DEFAULT_LANGUAGE,
                        label="Language",
                        allow_custom_value=True,
                        scale=1,
                        min_width=100,
                    )
                with gr.Row(equal_height=True):
                    prompt = gr.Textbox(
                        prompts.compose("caption"),
                        label="Prompt",
                        placeholder="e.g. detect red circle",
                        max_lines=3,
                        scale=4,
                    )
                    run = gr.Button("Run", variant="primary", scale=1, min_width=100)
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=100, visible=False)
                    clear = gr.Button("Clear", scale=0, min_width=80)
                with gr.Row(equal_height=True):
                    status = gr.Markdown("", elem_id="status")
                    again = gr.Button("Run again", visible=False, scale=0, min_width=200, elem_id="again")
                with gr.Row():
                    model = gr.Dropdown(
                        _model_choices(manager), value=manager.registry.default, label="Model", scale=2, elem_id="model"
                    )
                    decoding = gr.Dropdown(list(DECODINGS), value=DECODINGS[0], label="Decoding", scale=1)
                model_info = gr.Markdown(playground.status(manager.registry.default), elem_id="model-info")
                with gr.Row(equal_height=False, elem_id="result"):
                    with gr.Column(scale=3):
                        annotated = gr.AnnotatedImage(
                            label="Boxes and masks (click a legend entry to hide it)",
                            height=420,
                            elem_id="annotated",
                            visible=False,
                        )  # shown with the first result
                    with gr.Column(scale=2):
                        highlighted = gr.HighlightedText(
                            label="Answer",
                            show_legend=False,
                            show_inline_category=False,
                            combine_adjacent=True,
                            elem_id="output",
                        )
                        timing_line = gr.Markdown("", elem_id="timing-line")
                        drawn = gr.File(label="Annotated picture (PNG)", elem_id="annotated-png", visible=False)
                        detections = gr.File(label="Detections (JSON)", visible=False)
                panel = build_debug_panel()  # closed until opened: confidences, the model's eye, tokens, truth
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        max_new_tokens = gr.Slider(
                            1, paligemma.MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens"
                        )
                        seed = gr.Textbox(
                            str(SEED), label="Seed (sampled decodings; a number or 'random')", max_lines=1
                        )
                    raw = gr.Textbox(label="Raw output with <loc>/<seg> tokens", lines=2, buttons=["copy"])
                    timing = gr.JSON(label="Timing (seconds)", elem_id="timing")
            build_evaluate_tab(manager, max_zip_bytes=MAX_UPLOAD_BYTES)  # opens its own tab
        # The examples the gallery shows now: from the first paint, since a click may come before the page load's
        # own update of the gallery has reached the server.
        shown = gr.State(offered_first)
        chosen = gr.State(None)  # the example clicked last
        offered = gr.State(None)  # the larger token limit the cut notice offers
        result = gr.State(None)  # the last finished run's outcome, redrawn when a legend entry is clicked

        glue = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}  # page only, no accelerator
        task.input(_retarget_prompt, [task, language, prompt], [prompt, language], **glue)
        language.input(_retarget_prompt, [task, language, prompt], [prompt, language], **glue)
        prompt.change(
            lambda text, name: _task_of_prompt(text, manager.registry.get(name).tasks),
            [prompt, model],
            [task, language],
            **glue,
        )
        image.upload(_check_upload, image, status, **glue)
        annotated.select(toggle_overlay, result, [annotated, result], **glue)
        page_outputs = [
            status,
            highlighted,
            annotated,
            raw,
            detections,
            drawn,
            timing,
            timing_line,
            again,
            offered,
            result,
        ]
        running = {
            "outputs": page_outputs,
            "concurrency_id": "run",
            "concurrency_limit": RUN_CONCURRENCY,
            "api_visibility": "private",
            "show_progress": "hidden",
        }  # the status line and Stop say it runs;
        # Gradio's own trackers would also put an "Error" badge on every output of a stopped run
        busy = {"fn": lambda: BUSY, "inputs": None, "outputs": [run, stop], **glue}
        idle = {"fn": lambda: IDLE, "inputs": None, "outputs": [run, stop], **glue}
        runs = gr.on([run.click, prompt.submit], **busy).then(
            playground.run_on_page, [image, prompt, model, decoding, max_new_tokens, seed], preprocess=False, **running
        )
        runs.then(**idle)
        debug = {"fn": _debug_of, "inputs": result, "outputs": [panel.run, panel.note], **glue}
        thresholded = {
            "fn": filter_by_confidence,
            "inputs": [result, panel.threshold],
            "outputs": [annotated, result],
            **glue,
        }  # the slider's value also holds for the next result
        panel.follow(runs.then(**thresholded).then(**debug))
        more = again.click(lambda tokens: (tokens, *BUSY), offered, [max_new_tokens, run, stop], **glue).then(
            playground.run_on_page, [image, prompt, model, decoding, max_new_tokens, seed], preprocess=False, **running
        )
        more.then(**idle)
        panel.follow(more.then(**thresholded).then(**debug))
        panel.threshold.release(**thresholded)

        def pick(evt: gr.SelectData, listed):
            example = listed[evt.index]
            return example.image, example.prompt, *BUSY, "Running the example…", example

        picked = gallery.select(pick, shown, [image, prompt, run, stop, status, chosen], **glue)
        example_runs = picked.then(playground.run_example, [chosen, model, decoding, max_new_tokens, seed], **running)
        example_runs.then(**idle).then(None, js=SHOW_RESULT, **glue)
        panel.follow(example_runs.then(**thresholded).then(**debug))
        cancelling = [runs, more, example_runs]
        stop.click(lambda: (STOPPING, "Stopped."), None, [stop, status], cancels=cancelling, **glue)
        nothing = gr.update(value=None, visible=False)
        clear.click(
            lambda: (*IDLE, None, [], nothing, "", nothing, nothing, None, "", "", nothing),
            None,
            [run, stop, image, highlighted, annotated, raw, detections, drawn, timing, timing_line, status, again],
            cancels=cancelling,
            **glue,
        )
        panel.follow(clear.click(lambda: (None, NO_RUN), None, [panel.run, panel.note], **glue))
        image.clear(lambda: IDLE, None, [run, stop], cancels=cancelling, **glue)
        working = gr.State(manager.registry.default)  # the model this visitor last used that loaded

        def load_or_fall_back(name: str, last: str, progress=PROGRESS):
            """Loads the picked model; one that cannot load leaves the page on the last one that did."""
            info = playground.load_model(name, progress)
            if name in manager.loaded or last == name or last not in manager.loaded:
                return info, gr.Dropdown(choices=_model_choices(manager), value=name), name
            said = (
                f"⚠️ **{name}** cannot run on this server, so the page is back on **{last}**. "
                f"Why: {info.removeprefix('⚠️ Cannot load: ')}"
            )
            return said, gr.Dropdown(choices=_model_choices(manager), value=last), last

        gr.on(
            [demo.load, model.input],
            load_or_fall_back,
            [model, working],
            [model_info, model, working],
            api_visibility="private",
            concurrency_id="status",
            concurrency_limit=STATUS_CONCURRENCY,
        ).then(lambda name: _examples_for(name, examples), model, [gallery, shown, language], **glue).then(
            lambda *values: _tasks_for(manager.registry, *values),
            [model, task, language, prompt],
            [task, prompt, language],
            **glue,
        )
        # The API's /run (no trigger on the page) returns plain values, which is what a gradio_client caller uses.
        gr.on(
            [],
            playground.run,
            [image, prompt, model, decoding, max_new_tokens, seed],
            [highlighted, annotated, raw, detections, drawn, timing],
            api_name="run",
            preprocess=False,
            concurrency_id="run",
            concurrency_limit=RUN_CONCURRENCY,
        )
    return demo


# After an example's result lands: bring it into view (below the fold at 1400×900, far below on a phone).
SHOW_RESULT = "() => document.getElementById('result').scrollIntoView({behavior: 'instant', block: 'start'})"
CSS = """
#status p { margin: 0; font-weight: 600; }
.limits p { font-size: 0.85em; opacity: 0.8; margin: 0; }
"""


def _model_choices(manager: ModelManager) -> list[tuple[str, str]]:
    """The model picker's entries: each name with its size, needs and whether it fits here (measured in the
    background: "checking…" until known)."""
    return [(f"{name} · {manager.requirements(name, wait=False)['text']}", name) for name in manager.registry.names]


def _examples_for(name: str, examples: list[prompts.Example]):
    """The gallery, its examples and the languages for model `name` (the demo model answers in English only)."""
    listed = prompts.examples_for(name, examples)
    languages = [prompts.DEFAULT_LANGUAGE] if name == registry.DEMO_NAME else list(prompts.LANGUAGES)
    return [(ex.image, ex.prompt) for ex in listed], listed, gr.Dropdown(choices=languages)


def _debug_of(outcome: Outcome | None):
    """The debug panel's run of the result on screen, and what the panel says when it has none."""
    if outcome is None:
        return None, NO_RUN
    return outcome.debug, outcome.debug_note


def _tasks_for(models: registry.Registry, name: str, task: str, language: str, prompt: str):
    """The task chips of model `name` (only the tasks it was taught); a task it lacks gives way to its first."""
    offered = models.get(name).tasks
    if task in offered:
        return gr.Radio(choices=list(offered)), gr.skip(), gr.skip()
    return gr.Radio(choices=list(offered), value=offered[0]), *_retarget_prompt(offered[0], language, prompt)


def _check_upload(upload: str | None) -> str:
    """The upload's problem at once, before any Run, or nothing."""
    if not upload:
        return ""
    try:
        read_upload({"path": upload})
    except ValueError as err:
        return f"⚠️ {err}"
    return ""


def _retarget_prompt(task: str, language: str, prompt: str):
    takes_language = prompts.task_named(task).takes_language
    return prompts.retarget(prompt, task, language), gr.Dropdown(visible=takes_language)


def _task_of_prompt(prompt: str, offered: tuple[str, ...]):
    """The chip of the task the prompt names, when the model offers it (a typed prompt may name any)."""
    task, language, _ = prompts.split(prompt)
    if task is None or task.name not in offered:
        return gr.skip(), gr.skip()
    return task.name, gr.Dropdown(value=language or prompts.DEFAULT_LANGUAGE, visible=task.takes_language)


def serve(demo: gr.Blocks, models: registry.Registry, host: str, port: int, share: bool = False, block: bool = True):
    """Queue bounded (runs share the accelerator through playground.batching); uploads capped; nothing served
    but the app's own files; pictures cached by rename, so concurrent visitors never get a truncated one."""
    gradio_cache.install()
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        max_file_size=MAX_FILE_SIZE,
        allowed_paths=[],
        blocked_paths=models.local_sources(),
        app_kwargs={"middleware": [Middleware(ArrivalStamp)]},
        show_error=False,
        quiet=not block,
        css=CSS,
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the PaliGemma playground.")
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to listen on (0.0.0.0 for every interface)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    parser.add_argument(
        "--models",
        default=MODELS_FILE if os.path.isfile(MODELS_FILE) else None,
        help=f"model registry, JSON or YAML (default: models.json here); more models can come from ${registry.ENV_VAR}",
    )
    parser.add_argument("--no-preload", action="store_true", help="load the default model on first use, not at start")
    parser.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default="auto",
        help="how concurrent runs share the model: continuous batching or same-settings batches "
        "(auto: continuous on accelerators and for small models on CPU; batches for large models on CPU, where "
        "continuous serves crowds better but compiles longer and holds more KV cache: bench/soak.py)",
    )
    return parser.parse_args(argv)


def create_app(
    models_file: str | None, preload: bool = True, scheduler: str = "auto"
) -> tuple[gr.Blocks, registry.Registry]:
    """The page over the demo model, the registry file's models and those of $PALIGEMMA_MODELS."""
    models = registry.build(DEMO_DIR, models_file, os.environ.get(registry.ENV_VAR))
    runs = make_scheduler(scheduler)
    manager = ModelManager(models, warm=functools.partial(warm_for_requests, runs))  # compiled for what runs use
    playground = Playground(manager, runs)
    examples = prompts.load_examples(EXAMPLES_DIR)
    if preload:
        manager.start(models.default)
        playground.prepare_in_background(models.default, prompts.examples_for(models.default, examples))
    return build_app(playground, examples), models


def main(argv=None) -> None:
    args = parse_args(argv)
    paligemma.enable_compile_cache()  # a restarted server answers its first request without compiling again
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    demo, models = create_app(args.models, preload=not args.no_preload, scheduler=args.scheduler)
    serve(demo, models, args.host, args.port, args.share)


if __name__ == "__main__":
    main()
