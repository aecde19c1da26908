"""The parameter tree of a config: expected shapes (to validate checkpoints) and random init (to train).

Keys are big_vision's, "/"-joined, without the optional 'params/' prefix; layers are stacked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .config import PaliGemmaConfig

_BLOCK = "img/Transformer/encoderblock/"


def expected_shapes(cfg: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    v, t = cfg.vision, cfg.text
    L, W, M, N, Hv = v.depth, v.width, v.mlp_dim, v.num_heads, v.width // v.num_heads
    shapes = {
        "img/embedding/kernel": (v.patch_size, v.patch_size, 3, W),
        "img/embedding/bias": (W,),
        "img/pos_embedding": (1, v.num_patches, W),
        _BLOCK + "LayerNorm_0/scale": (L, W),
        _BLOCK + "LayerNorm_0/bias": (L, W),
        _BLOCK + "LayerNorm_1/scale": (L, W),
        _BLOCK + "LayerNorm_1/bias": (L, W),
        _BLOCK + "MlpBlock_0/Dense_0/kernel": (L, W, M),
        _BLOCK + "MlpBlock_0/Dense_0/bias": (L, M),
        _BLOCK + "MlpBlock_0/Dense_1/kernel": (L, M, W),
        _BLOCK + "MlpBlock_0/Dense_1/bias": (L, W),
        _BLOCK + "MultiHeadDotProductAttention_0/out/kernel": (L, N, Hv, W),
        _BLOCK + "MultiHeadDotProductAttention_0/out/bias": (L, W),
        "img/Transformer/encoder_norm/scale": (W,),
        "img/Transformer/encoder_norm/bias": (W,),
        "img/head/kernel": (W, t.width),
        "img/head/bias": (t.width,),
        "llm/embedder/input_embedding": (t.vocab_size, t.width),
        "llm/final_norm/scale": (t.width,),
        "llm/layers/attn/q_einsum/w": (t.depth, t.num_heads, t.width, t.head_dim),
        "llm/layers/attn/kv_einsum/w": (t.depth, 2, t.num_kv_heads, t.width, t.head_dim),
        "llm/layers/attn/attn_vec_einsum/w": (t.depth, t.num_heads, t.head_dim, t.width),
        "llm/layers/mlp/gating_einsum": (t.depth, 2, t.width, t.mlp_dim),
        "llm/layers/mlp/linear": (t.depth, t.mlp_dim, t.width),
        "llm/layers/pre_attention_norm/scale": (t.depth, t.width),
        "llm/layers/pre_ffw_norm/scale": (t.depth, t.width),
    }
    for name in ("query", "key", "value"):
        shapes[_BLOCK + f"MultiHeadDotProductAttention_0/{name}/kernel"] = (L, W, N, Hv)
        shapes[_BLOCK + f"MultiHeadDotProductAttention_0/{name}/bias"] = (L, N, Hv)
    if t.post_norms:
        shapes["llm/layers/post_attention_norm/scale"] = (t.depth, t.width)
        shapes["llm/layers/post_ffw_norm/scale"] = (t.depth, t.width)
    return shapes


def _init_leaf(key: str, shape: tuple[int, ...], rng: np.random.Generator, std: float) -> np.ndarray:
    if key.endswith("/bias") or key.startswith("llm/") and key.endswith("/scale"):
        return np.zeros(shape, np.float32)  # Gemma's RMSNorm scale is used as (1 + scale)
    if key.endswith("/scale"):
        return np.ones(shape, np.float32)
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)


def init_params(cfg: PaliGemmaConfig, seed: int = 0, std: float = 0.02, dtype=jnp.float32):
    """Random params for training from scratch and for tests: normal(std) weights, identity norms."""
    rng = np.random.default_rng(seed)
    flat = {k: jnp.asarray(_init_leaf(k, s, rng, std), dtype) for k, s in expected_shapes(cfg).items()}
    return traverse_util.unflatten_dict(flat, sep="/")


def flatten(params) -> dict[str, jax.Array]:
    return traverse_util.flatten_dict(params, sep="/")


def count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
