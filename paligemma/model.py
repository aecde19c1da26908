"""Image + text -> one sequence, and the prefix-LM attention mask PaliGemma was trained with.

Sequence per row: image tokens, then [bos] + prompt + "\\n" (the prefix: everything in it attends to
everything in it), then the suffix with causal attention, then padding that nobody attends to.

Axis letters: B batch, R image side in pixels, P image tokens, T text positions, D decoder width,
V vocabulary, L layers, N heads.
"""

from __future__ import annotations

import jax.numpy as jnp

from . import gemma, siglip
from .config import PaliGemmaConfig


def prefix_lm_mask(prefix_end, seq_end, length: int):
    """bool[B, length, length]: query i sees key j iff j is real (j < seq_end) and in the prefix or not after i.

    prefix_end, seq_end: int[B], counted in sequence positions (image tokens included).
    """
    i = jnp.arange(length)[:, None]
    j = jnp.arange(length)[None, :]
    real = j < seq_end[:, None, None]
    return real & ((j < prefix_end[:, None, None]) | (j <= i))


def embed_sequence(params, cfg: PaliGemmaConfig, images, tokens):
    """images [B, R, R, 3] in [-1, 1], tokens int[B, T] -> [B, P + T, D] (image tokens unscaled)."""
    image_tokens = siglip.encode_images(params["img"], cfg.vision, images)
    text = gemma.embed_tokens(params["llm"], cfg.text, tokens)
    return jnp.concatenate([image_tokens.astype(text.dtype), text], axis=1)


def forward(params, cfg: PaliGemmaConfig, images, tokens, prefix_len, seq_len, with_attention: bool = False):
    """Logits float32[B, T, V] at the text positions; used by training and the parity tests.

    prefix_len / seq_len: int[B] text tokens in the prefix / in prefix + suffix (the rest is padding).
    with_attention: also return where each text position looks, float32 [L, B, N, T, P + T] (every layer and
    head; keys are the whole sequence, image tokens first).
    """
    x = embed_sequence(params, cfg, images, tokens)
    n = cfg.num_image_tokens
    length = x.shape[1]
    mask = prefix_lm_mask(n + prefix_len, n + seq_len, length)
    positions = jnp.broadcast_to(jnp.arange(length), x.shape[:2])
    hidden, _, attention = gemma.run_layers(params["llm"], cfg.text, x, positions, mask, with_attention=with_attention)
    logits = gemma.logits_from_hidden(params["llm"], cfg.text, hidden[:, n:])
    return (logits, attention[:, :, :, n:]) if with_attention else logits
