"""The demo model's starting weights: random, with geometry built in.

A model this small, trained from scratch on a CPU, learns positions too slowly from random embeddings alone.
So the image encoder starts with 2D sin-cos patch position embeddings, and the `<locNNNN>` embeddings start
from codes that vary smoothly with their bin: nearby boxes start out alike, and a box the encoder sees maps
linearly onto the tokens that write it (see scenes.vision_pretrain).

`python -m scenes.from_scratch --data DIR --out DIR --tokenizer T [--config demo]` is `python -m paligemma.train`
starting from these weights instead of plain random ones (it takes the same options).
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np

from paligemma import train
from paligemma.config import PaliGemmaConfig
from paligemma.params import init_params
from paligemma.tokenizer import NUM_LOC, Tokenizer


def sincos_codes(positions: np.ndarray, width: int, longest: float, shortest_period: float = 8.0) -> np.ndarray:
    """[N] positions -> [N, width] sines and cosines at geometric frequencies, unit RMS.

    Periods run from 2 * longest down to shortest_period. Dot products of two codes fall off smoothly with the
    distance between their positions, over about a quarter of the shortest period.
    """
    frequencies = np.pi / longest * np.geomspace(1.0, 2.0 * longest / shortest_period, width // 2)
    angles = positions[:, None] * frequencies[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def loc_codes(width: int) -> np.ndarray:
    """[1024, width] codes of the location bins, smooth at the scale of a few pixels: the start of the `<locNNNN>`
    embeddings (structured_init) and the read-out space of the encoder's box targets (scenes.vision_pretrain),
    so that a box the encoder sees maps linearly onto the token that writes it."""
    return sincos_codes(np.arange(NUM_LOC, dtype=np.float32), width, NUM_LOC, shortest_period=32.0)


def structured_init(params, cfg: PaliGemmaConfig, tokenizer: Tokenizer, std: float = 0.02):
    """Starts a from-scratch model with geometry built in: 2D sin-cos patch position embeddings and
    loc token embeddings that vary smoothly with their bin, so nearby boxes start out alike."""
    grid = cfg.vision.image_size // cfg.vision.patch_size
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    half = cfg.vision.width // 2
    position = np.concatenate([sincos_codes(rows, half, grid), sincos_codes(cols, half, grid)], axis=1)
    # patch embeddings of a random init have an RMS near 0.5 on these images; positions must not drown in them
    params["img"]["pos_embedding"] = jnp.asarray(position[None] * 0.5)
    if tokenizer.loc_ids is not None:
        codes = loc_codes(cfg.text.width)
        embedding = params["llm"]["embedder"]["input_embedding"]
        params["llm"]["embedder"]["input_embedding"] = embedding.at[np.asarray(tokenizer.loc_ids)].set(codes * std)
    return params


def fresh_params(cfg: PaliGemmaConfig, tokenizer: Tokenizer, seed: int):
    """The starting point of training from scratch: random weights with structured_init's geometry."""
    return structured_init(init_params(cfg, seed), cfg, tokenizer)


def main(argv=None) -> int:
    return train.main(argv, fresh_params=fresh_params, prog="python -m scenes.from_scratch")


if __name__ == "__main__":
    sys.exit(main())
