"""Time parse + mask decode + placement + drawing for 10 masks on a 1024×768 image.

Run from the repository root:  python -m bench.postprocess [--repeats 20] [--vqvae assets/demo/vae-oid.npz]
Without a checkpoint the decoder has random weights of the published size (D = 512):
the time does not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

import postprocess

WIDTH, HEIGHT, NUM_OBJECTS = 1024, 768, 10
LABELS = ("cat", "dog", "person", "car", "traffic light")


def sample_output(rng: np.random.Generator) -> str:
    """A segmentation output with NUM_OBJECTS objects, written the way PaliGemma writes it."""
    formatted = []
    for index in range(NUM_OBJECTS):
        x1, y1 = rng.uniform(0, WIDTH * 0.7), rng.uniform(0, HEIGHT * 0.7)
        x2, y2 = x1 + rng.uniform(40, WIDTH * 0.3), y1 + rng.uniform(40, HEIGHT * 0.3)
        codes = rng.integers(0, 128, 16)
        formatted.append(postprocess.format_object(LABELS[index % len(LABELS)], (x1, y1, x2, y2), WIDTH, HEIGHT, codes))
    return postprocess.join_objects(formatted)


def timed(function, repeats: int) -> tuple[float, object]:
    """Median milliseconds over `repeats` calls, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--vqvae", type=Path, default=Path("assets/demo/vae-oid.npz"))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    text = sample_output(rng)
    image = Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    if args.vqvae.exists():
        decoder, weights = postprocess.MaskDecoder.load(args.vqvae), str(args.vqvae)
    else:
        decoder, weights = postprocess.MaskDecoder(postprocess.init_decoder_params(jax.random.key(0))), "random, D=512"

    parse_ms, pieces = timed(lambda: postprocess.parse(text, WIDTH, HEIGHT), args.repeats)
    codes = [obj.seg_codes for obj in postprocess.objects(pieces)]
    start = time.perf_counter()
    decoder(codes)
    first_decode_ms = (time.perf_counter() - start) * 1e3
    decode_ms, masks = timed(lambda: decoder(codes), args.repeats)
    boxes = [obj.box for obj in postprocess.objects(pieces)]

    def place():
        return [postprocess.mask_to_image(m, b, WIDTH, HEIGHT) for m, b in zip(masks, boxes)]

    place_ms, _ = timed(place, args.repeats)
    with_masks = decoder.attach_masks(pieces, WIDTH, HEIGHT)
    draw_ms, _ = timed(lambda: postprocess.draw_annotations(image, with_masks), args.repeats)
    json_ms, _ = timed(lambda: postprocess.to_json(with_masks, WIDTH, HEIGHT), args.repeats)

    def end_to_end():
        found = decoder.attach_masks(postprocess.parse(text, WIDTH, HEIGHT), WIDTH, HEIGHT)
        return postprocess.draw_annotations(image, found)

    total_ms, _ = timed(end_to_end, args.repeats)

    print(f"postprocess: {NUM_OBJECTS} masks on {WIDTH}x{HEIGHT}, median of {args.repeats}, "
          f"{jax.devices()[0].platform}, VQ-VAE weights: {weights}")  # fmt: skip
    for name, ms in [
        ("parse", parse_ms),
        ("decode 10 masks (first call, compiles)", first_decode_ms),
        ("decode 10 masks", decode_ms),
        ("place 10 masks into the image", place_ms),
        ("draw masks, boxes and labels", draw_ms),
        ("JSON export with RLE masks", json_ms),
        ("parse + decode + place + draw", total_ms),
    ]:
        print(f"  {name:<40} {ms:9.2f} ms")


if __name__ == "__main__":
    main()
