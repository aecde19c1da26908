"""int8 weight-only decoding: the decoder's layer weights as int8 with one float scale per output channel.

Quantisation and the quantised matrix products are qwix's (Google's JAX quantisation library): `qwix.quantize`
makes a QArray (int8 values + scales, a pytree that jit, lax.scan and slicing carry like an array) and
`qwix.dot_general` / `qwix.einsum` take it in place of a weight. Our model is pure functions over a param tree,
so qwix's array-level API is all it needs (its flax-module interception is for nn.Module models).

With float activations qwix dequantises the weight into the product (int8 -> float, times the scale) and lets
XLA fuse that into the matmul: on GPU and TPU a decode step then reads one byte per weight instead of two or
four. XLA's CPU backend does not fuse it: it writes the dequantised weight out first, so on CPU int8 decodes
slower than float32 (see tests/test_int8.py and the figures in the issue notes); it is for accelerators.

Only the decoder's layer matrices are quantised: the image encoder runs once per request, and the embedding
table (also the logits' matrix) and the norms stay float.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import PaliGemmaConfig
from .params import expected_shapes

# Decoder layer weights -> their contracted (input) axes, counting the stacked layer axis L as axis 0. Every
# other axis gets its own scales (per output channel, per head, per layer).
CONTRACTED_AXES = {
    ("attn", "q_einsum", "w"): (2,),  # [L, N, D, H]
    ("attn", "kv_einsum", "w"): (3,),  # [L, C, K, D, H]
    ("attn", "attn_vec_einsum", "w"): (1, 2),  # [L, N, H, D]
    ("mlp", "gating_einsum"): (2,),  # [L, 2, D, F]
    ("mlp", "linear"): (1,),  # [L, F, D]
}


def _qwix():
    """qwix, imported on first use: it adds seconds to start-up and only int8 models need it."""
    import qwix

    return qwix


def is_quantized(w) -> bool:
    return not isinstance(w, jax.Array)


def quantize_params(params, cfg: PaliGemmaConfig):
    """Params with the decoder's stacked layer matrices as int8 QArrays (per-channel absmax scales in the
    weights' float dtype); everything else is returned as it is. Generation reads either kind."""
    qwix = _qwix()
    layers = dict(params["llm"]["layers"])
    shapes = expected_shapes(cfg)
    for path, contracted in CONTRACTED_AXES.items():
        parent, group = layers, layers
        for name in path[:-1]:  # copies of the dicts on the way, so that `params` stays as it was
            group = parent[name] = dict(parent[name])
            parent = group
        w = group[path[-1]]
        expected = shapes["llm/layers/" + "/".join(path)]
        if is_quantized(w) or not jnp.issubdtype(w.dtype, jnp.floating) or w.shape != expected:
            raise ValueError(
                f"llm/layers/{'/'.join(path)} should be a float array of shape {expected} to quantise, "
                f"got {type(w).__name__} {getattr(w, 'dtype', '')} {w.shape}"
            )
        channels = tuple(a for a in range(w.ndim) if a not in contracted)
        group[path[-1]] = qwix.quantize(w, jnp.int8, channelwise_axes=channels, scale_dtype=w.dtype)
    return {**params, "llm": {**params["llm"], "layers": layers}}


def dot_general(x, w, dimension_numbers, out_dtype=None):
    """jax.lax.dot_general for a float weight w; for an int8 one (quantize_params), qwix's."""
    if not is_quantized(w):
        return jax.lax.dot_general(x, w, dimension_numbers, preferred_element_type=out_dtype)
    return _qwix().dot_general(x, w, dimension_numbers, preferred_element_type=out_dtype)


def einsum(spec: str, x, w):
    """jnp.einsum for a float weight w; for an int8 one, qwix's."""
    return jnp.einsum(spec, x, w) if not is_quantized(w) else _qwix().einsum(spec, x, w)
