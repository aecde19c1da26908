"""Command line: `python -m paligemma predict --model SRC --image IMG --prompt "detect cat" [--json]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m paligemma", description="PaliGemma in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    predict = sub.add_parser("predict", help="generate text (and boxes/masks) for one image and prompt")
    predict.add_argument("--model", default=DEFAULT_MODEL,
                         help="a .npz file, a folder (big_vision or Hugging Face format) or a Hub repo id; "
                              "default: the embedded demo model")
    predict.add_argument("--image", required=True, help="image file (PNG, JPEG, WebP, GIF, BMP …)")
    predict.add_argument("--prompt", required=True, help='e.g. "caption en", "detect cat", "segment red circle"')
    predict.add_argument("--max-new-tokens", type=int, default=64)
    predict.add_argument("--sampler", default="greedy", help="greedy | temperature(T) | nucleus(P)")
    predict.add_argument("--seed", type=int, default=0)
    predict.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: by device)")
    predict.add_argument("--json", action="store_true", help="print JSON with text, objects and timing")
    return parser


def predict(args) -> dict:
    import paligemma
    import postprocess
    from paligemma.preprocess import open_image, to_rgb

    start = time.perf_counter()
    model = paligemma.load(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - start
    image = to_rgb(open_image(args.image))
    result = None
    for result in model.run([image], [args.prompt], args.max_new_tokens, args.sampler, args.seed):
        pass
    text = result.texts[0]
    pieces = postprocess.parse(text, image.width, image.height)
    if model.mask_decoder_path:
        pieces = postprocess.MaskDecoder.load(model.mask_decoder_path).attach_masks(pieces, image.width, image.height)
    objects = postprocess.to_json(pieces, image.width, image.height)["objects"]
    return {"text": text, "objects": objects, "timing": {"load_s": round(load_s, 3), **result.timing.as_dict()}}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        output = predict(args)
    except ValueError as err:  # bad input of any kind: a message for a person, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(output, ensure_ascii=False))
    else:
        print(output["text"])
        for obj in output["objects"]:
            print(f"  {obj['label'] or '(no label)'}: box {obj['box']}" + (" + mask" if obj.get("mask") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
