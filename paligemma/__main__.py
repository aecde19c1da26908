"""Command line: `python -m paligemma predict --model SRC --image IMG --prompt "detect cat" [--json]`.

Each subcommand is a parser built by one function and a `run` function it names (set_defaults(run=...)); `run`
takes the parsed arguments and returns the exit status. Downloads draw tqdm bars on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import paligemma

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m paligemma", description="PaliGemma in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_predict(sub)
    _add_evaluate(sub)
    return parser


def _add_predict(sub) -> None:
    predict = sub.add_parser("predict", help="generate text (and boxes/masks) for one image and prompt")
    predict.set_defaults(run=_run_predict)
    predict.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a .npz file, a folder (big_vision or Hugging Face format), a Hub repo id or "
        "kaggle:OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]; default: the embedded demo model",
    )
    predict.add_argument(
        "--tokenizer",
        default=None,
        help="SentencePiece tokenizer file (default: beside the weights, cached, or downloaded)",
    )
    predict.add_argument(
        "--mask-decoder",
        default=None,
        help="vae-oid.npz mask decoder (default: beside the weights, cached, or downloaded)",
    )
    predict.add_argument("--image", required=True, help="image file (PNG, JPEG, WebP, GIF, BMP …)")
    predict.add_argument("--prompt", required=True, help='e.g. "caption en", "detect cat", "segment red circle"')
    predict.add_argument("--max-new-tokens", type=int, default=64)
    predict.add_argument("--sampler", default="greedy", help="greedy | temperature(T) | nucleus(P) | beam(N)")
    predict.add_argument("--seed", type=int, default=0)
    predict.add_argument(
        "--dtype",
        default=None,
        help=" | ".join(paligemma.DTYPE_NAMES)
        + " (default: by device; on CPU a large model's is measured once per CPU kind; int8 is for accelerators)",
    )
    predict.add_argument(
        "--json",
        action="store_true",
        help="print JSON with text, objects and timing (and warnings, e.g. why masks are missing)",
    )


def _add_evaluate(sub) -> None:
    from paligemma import evaluate

    parser = sub.add_parser("evaluate", help="score a model on a JSONL or COCO data set (AP, accuracy, a report)")
    parser.set_defaults(run=evaluate.run)
    evaluate.add_arguments(parser)


def predict(args) -> dict:
    import postprocess

    start = time.perf_counter()
    model = paligemma.load(
        args.model,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        mask_decoder=args.mask_decoder,
        progress=paligemma.cli_progress(),
    )
    load_s = time.perf_counter() - start
    if model.cpu_form is not None and not model.cpu_form.remembered:  # the first load on this CPU kind: say why
        print(f"measured this CPU's fastest form: {model.cpu_form.describe()}", file=sys.stderr)
    image = paligemma.to_rgb(paligemma.open_image(args.image))
    *_, result = model.run([image], [args.prompt], args.max_new_tokens, args.sampler, args.seed, return_scores=True)
    text = result.texts[0]
    pieces = postprocess.parse(text, image.width, image.height)
    confidences = postprocess.object_confidences(pieces, result.scores[0], model.tokenizer)
    if model.mask_decoder_path:
        pieces = postprocess.MaskDecoder.load(model.mask_decoder_path).attach_masks(pieces, image.width, image.height)
    objects = postprocess.to_json(pieces, image.width, image.height, confidences)["objects"]
    output = {"text": text, "objects": objects, "timing": {"load_s": round(load_s, 3), **result.timing.as_dict()}}
    warnings = [f"weights in {model.dtype_note}"] if model.dtype_note else []
    warnings += [f"masks unavailable: {model.mask_decoder_note}"] if model.mask_decoder_note else []
    if warnings:
        output["warnings"] = warnings
    return output


def _run_predict(args) -> int:
    output = predict(args)
    if args.json:
        print(json.dumps(output, ensure_ascii=False))
        return 0
    print(output["text"])
    for obj in output["objects"]:
        mask = " + mask" if obj.get("mask") else ""
        print(f"  {obj['label'] or '(no label)'}: box {obj['box']}{mask}, confidence {obj['score']:.3f}")
    for warning in output.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    paligemma.enable_compile_cache()  # the next call starts without compiling again
    try:
        return args.run(args)
    except ValueError as err:  # bad input of any kind: a message for a person, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
