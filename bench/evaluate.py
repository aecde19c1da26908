"""Whole-dataset evaluation throughput against a plain loop of `model.generate`, on the demo model.

    python -m bench.evaluate [--scenes 16] [--batches 1,4,8,16] [--max-new-tokens 64] [--repeats 2]

Writes a data set of synthetic scenes (a caption, a detect and a segment prompt each), then measures images/s
(one image + prompt line = one image) of `paligemma.evaluate.evaluate` end to end (image decoding, generation
with token scores, parsing, masks, COCOeval, the worst images drawn) at each batch size, and of calling
`model.generate` one image at a time in a loop (image decoding + generation only). Every shape is compiled
before it is timed, and each case keeps the best of --repeats runs (the machine may be shared). Prints one JSON
line per case, then the machine and a table of ratios against the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax

import paligemma
from paligemma.cpu_kind import cpu
from paligemma.eval_data import read_examples
from paligemma.evaluate import evaluate
from scenes.dataset import write_dataset
from scenes.tasks import TaskMix
from scenes.vqvae_train import load_vqvae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "assets", "demo")
MIX = TaskMix(caption=1, detect=1, segment=1, count=0, colour=0, yes_no=0)
SEED = 20261204


def machine() -> dict:
    """The CPU (paligemma.cpu_kind) and JAX's devices: printed with every table."""
    return {**cpu(), "jax_devices": [str(d) for d in jax.devices()], "jax": jax.__version__}


def loop_images_per_s(model, data: str, max_new_tokens: int, repeats: int) -> float:
    """One image at a time: open it, `model.generate`, for every line (after one warm call)."""
    examples, _ = read_examples(data)
    first = examples[0]
    model.generate(paligemma.to_rgb(paligemma.open_image(first.image)), first.prefix, max_new_tokens=max_new_tokens)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for example in examples:
            image = paligemma.to_rgb(paligemma.open_image(example.image))
            model.generate(image, example.prefix, max_new_tokens=max_new_tokens)
        best = min(best, time.perf_counter() - start)
    return len(examples) / best


def evaluate_images_per_s(model, data: str, batch: int, max_new_tokens: int, repeats: int) -> dict:
    evaluate(model, data, batch_size=batch, limit=batch, max_new_tokens=max_new_tokens)  # compiles this shape
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        report = evaluate(model, data, batch_size=batch, max_new_tokens=max_new_tokens)
        seconds = min(seconds, time.perf_counter() - start)
    return {
        "batch": batch,
        "images_per_s": len(report.lines) / seconds,
        "seconds": seconds,
        "ap50": report.metrics["detection"]["ap50"],
        "devices": report.throughput["data_parallel"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    paligemma.enable_compile_cache()
    model = paligemma.load(DEMO)
    with tempfile.TemporaryDirectory() as folder:
        write_dataset(folder, args.scenes, SEED, load_vqvae(DEMO), MIX, valid_fraction=0.0)
        data = os.path.join(folder, "train.jsonl")
        loop = loop_images_per_s(model, data, args.max_new_tokens, args.repeats)
        print(json.dumps({"case": "generate loop", "images_per_s": round(loop, 3)}))
        rows = []
        for batch in batches:
            rows.append(evaluate_images_per_s(model, data, batch, args.max_new_tokens, args.repeats))
            print(
                json.dumps(
                    {"case": "evaluate", **{k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}}
                )
            )
    print(json.dumps(machine()))
    best = max(rows, key=lambda row: row["images_per_s"])
    print(f"{'case':<28}{'images/s':>10}{'× loop':>9}")
    print(f"{'generate, one at a time':<28}{loop:>10.2f}{1.0:>9.2f}")
    for row in rows:
        name = f"evaluate, batch {row['batch']}" + (" (best)" if row is best else "")
        print(f"{name:<28}{row['images_per_s']:>10.2f}{row['images_per_s'] / loop:>9.2f}")


if __name__ == "__main__":
    main()
