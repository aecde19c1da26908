"""PaliGemma playground: an image and a prompt in; text, boxes and masks out.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--models models.json]

Also the entry point of the Hugging Face Space (sdk gradio, app_file app.py).
"""

from __future__ import annotations

import argparse
import logging
import os

import gradio as gr
from starlette.middleware import Middleware

from paligemma.generate import MAX_NEW_TOKENS
from playground import batching, prompts, registry
from playground.manager import ModelManager
from playground.requests import DECODINGS, DEFAULT_MAX_NEW_TOKENS, ArrivalStamp, Playground

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_DIR = os.path.join(HERE, "assets", "demo")
EXAMPLES_DIR = os.path.join(HERE, "assets", "examples")
MODELS_FILE = os.path.join(HERE, "models.json")
MAX_FILE_SIZE = "10mb"
QUEUE_SIZE = 32  # waiting runs beyond this are turned away with "queue full"
STATUS_CONCURRENCY = 8  # model-status events only wait for a load; they do not use the accelerator
RUN_CONCURRENCY = 2 * batching.MAX_BATCH  # runs in flight: a batch on the model and the next one gathering
INTRO = """# PaliGemma playground
Upload an image, pick a task (or type any prompt) and press **Run**. Detections and segmentations are
drawn on the image; their labels share the colours of the highlighted text."""


def build_app(playground: Playground, examples: list[prompts.Example]) -> gr.Blocks:
    manager = playground.manager
    with gr.Blocks(title="PaliGemma playground", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], height=360,
                                 elem_id="image")
                with gr.Row():
                    task = gr.Radio(prompts.TASK_NAMES, value="caption", label="Task", scale=3)
                    language = gr.Dropdown(prompts.LANGUAGES, value=prompts.DEFAULT_LANGUAGE, label="Language",
                                           allow_custom_value=True, scale=1, min_width=100)
                prompt = gr.Textbox(prompts.compose("caption"), label="Prompt", placeholder="e.g. detect cat ; dog",
                                    max_lines=3)
                model = gr.Dropdown(manager.registry.names, value=manager.registry.default, label="Model")
                model_info = gr.Markdown(manager.status(manager.registry.default), elem_id="model-info")
                with gr.Row():
                    decoding = gr.Dropdown(list(DECODINGS), value=DECODINGS[0], label="Decoding")
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=1,
                                               label="Max new tokens")
                with gr.Row():
                    run = gr.Button("Run", variant="primary")
                    clear = gr.ClearButton(value="Clear")
            with gr.Column():
                highlighted = gr.HighlightedText(label="Output", show_legend=False, show_inline_category=False,
                                                 combine_adjacent=True, elem_id="output")
                show_raw = gr.Checkbox(label="Show the raw output with <loc>/<seg> tokens")
                raw = gr.Textbox(label="Raw output", visible=False, lines=2, buttons=["copy"])
                annotated = gr.AnnotatedImage(label="Boxes and masks", height=360, elem_id="annotated")
                detections = gr.File(label="Detections (JSON)")
                timing = gr.JSON(label="Timing (seconds)", elem_id="timing")
        gr.Examples([[ex.image, ex.prompt] for ex in examples], inputs=[image, prompt], examples_per_page=12,
                    label="Examples: one per task and more")

        clear.add([image, highlighted, raw, annotated, detections, timing])
        glue = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}  # page only, no accelerator
        task.input(_retarget_prompt, [task, language, prompt], [prompt, language], **glue)
        language.input(_retarget_prompt, [task, language, prompt], [prompt, language], **glue)
        prompt.change(_task_of_prompt, prompt, [task, language], **glue)
        show_raw.change(lambda shown: gr.Textbox(visible=shown), show_raw, raw, **glue)
        gr.on([demo.load, model.change], playground.load_model, model, model_info, api_visibility="private",
              concurrency_id="status", concurrency_limit=STATUS_CONCURRENCY)
        gr.on([run.click, prompt.submit], playground.run,
              [image, prompt, model, decoding, max_new_tokens], [highlighted, annotated, raw, detections, timing],
              api_name="run", preprocess=False, concurrency_id="run", concurrency_limit=RUN_CONCURRENCY)
    return demo


def _retarget_prompt(task: str, language: str, prompt: str):
    takes_language = prompts.task_named(task).takes_language
    return prompts.retarget(prompt, task, language), gr.Dropdown(visible=takes_language)


def _task_of_prompt(prompt: str):
    task, language, _ = prompts.split(prompt)
    if task is None:
        return gr.skip(), gr.skip()
    return task.name, gr.Dropdown(value=language or prompts.DEFAULT_LANGUAGE, visible=task.takes_language)


def serve(demo: gr.Blocks, models: registry.Registry, host: str, port: int, share: bool = False,
          block: bool = True):
    """Queue bounded (runs share the accelerator through playground.batching); uploads capped; nothing served
    but the app's own files."""
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                       max_file_size=MAX_FILE_SIZE, allowed_paths=[], blocked_paths=models.local_sources(),
                       app_kwargs={"middleware": [Middleware(ArrivalStamp)]}, show_error=False, quiet=not block)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the PaliGemma playground.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    parser.add_argument("--models", default=MODELS_FILE if os.path.isfile(MODELS_FILE) else None,
                        help=f"model registry, JSON or YAML (default: models.json here); more models can come "
                             f"from ${registry.ENV_VAR}")
    parser.add_argument("--no-preload", action="store_true", help="load the default model on first use, not at start")
    return parser.parse_args(argv)


def create_app(models_file: str | None, preload: bool = True) -> tuple[gr.Blocks, registry.Registry]:
    """The page over the demo model, the registry file's models and those of $PALIGEMMA_MODELS."""
    models = registry.build(DEMO_DIR, models_file, os.environ.get(registry.ENV_VAR))
    manager = ModelManager(models, warmup_tokens=DEFAULT_MAX_NEW_TOKENS)
    if preload:
        manager.start(models.default)
    return build_app(Playground(manager), prompts.load_examples(EXAMPLES_DIR)), models


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    demo, models = create_app(args.models, preload=not args.no_preload)
    serve(demo, models, args.host, args.port, args.share)


if __name__ == "__main__":
    main()
