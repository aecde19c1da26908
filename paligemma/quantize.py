"""int8 weight-only decoding: the decoder's layer weights as int8 with one float scale per output channel.

Quantisation and the quantised matrix products are qwix's (Google's JAX quantisation library): `qwix.quantize`
makes a QArray (int8 values + scales, a pytree that jit, lax.scan and slicing carry like an array) and
`qwix.dot_general` / `qwix.einsum` take it in place of a weight. Our model is pure functions over a param tree,
so qwix's array-level API is all it needs (its flax-module interception is for nn.Module models).

With float activations qwix dequantises the weight into the product (int8 -> float, times the scale), which
XLA's GPU and TPU backends can fuse into the matmul, so that a decode step reads one byte per weight instead of
two or four (not yet measured here: no accelerator has been lent to this project). XLA's CPU backend does not
fuse it: it writes the dequantised weight out first, so on CPU int8 decodes slower than float32 (see
bench/checkpoint_3b.py and the figures in the issue notes); it is for accelerators.

A checkpoint is quantised while it is read (checkpoint.materialize), one layer of one matrix at a time, so
loading in int8 never holds a matrix in float: the peak is the int8 model plus one float layer, and
memory_fit.py counts the int8 bytes. Generation keeps the matrices stacked (cpu_memory.run_params), so each
layer is dequantised inside the layer scan and XLA cannot hoist float copies of them out of the decode loop.

Only the decoder's layer matrices are quantised: the image encoder runs once per request, and the embedding
table (also the logits' matrix) and the norms stay float.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from . import host_copy
from .cpu_memory import aligned_empty

INT8 = "int8"  # the dtype name that asks for int8 layer matrices (paligemma.load, memory_fit)
# Decoder layer weights (flat keys, as params.expected_shapes) -> their contracted (input) axes, counting the
# stacked layer axis L as axis 0. Every other axis gets its own scales (per output channel, per head, per layer).
CONTRACTED_AXES = {
    "llm/layers/attn/q_einsum/w": (2,),  # [L, N, D, H]
    "llm/layers/attn/kv_einsum/w": (3,),  # [L, C, K, D, H]
    "llm/layers/attn/attn_vec_einsum/w": (1, 2),  # [L, N, H, D]
    "llm/layers/mlp/gating_einsum": (2,),  # [L, 2, D, F]
    "llm/layers/mlp/linear": (1,),  # [L, F, D]
}


def _qwix():
    """qwix, imported on first use: it adds seconds to start-up and only int8 models need it."""
    import qwix

    return qwix


def is_quantized(w) -> bool:
    return hasattr(w, "qvalue")  # a qwix QArray (a float weight is an array, or out_major.OutMajor)


def scale_shape(shape: tuple[int, ...], contracted: tuple[int, ...]) -> tuple[int, ...]:
    """The scales' shape of a stacked matrix: 1 on its contracted axes, one scale per index elsewhere."""
    return tuple(1 if a in contracted else n for a, n in enumerate(shape))


def quantize_layers(layers: Iterable[np.ndarray], shape: tuple[int, ...], contracted: tuple[int, ...], dtype):
    """A stacked matrix [L, ...], given one float layer at a time, as host arrays: int8 values [L, ...] and
    per-channel absmax scales in `dtype` (1 on the contracted axes). Quantising layer by layer keeps one
    layer in float beside the int8 result, where quantising the loaded leaf held all of it in float."""
    qwix = _qwix()
    channels = tuple(a - 1 for a in range(1, len(shape)) if a not in contracted)  # per layer: axis 0 is gone
    values = aligned_empty(shape, np.int8)
    scales = aligned_empty(scale_shape(shape, contracted), dtype)
    count = 0
    with jax.default_device(jax.local_devices(backend="cpu")[0]):  # the host holds the result anyway
        for count, layer in enumerate(layers, 1):
            if count > shape[0]:
                break
            if not layer.flags.c_contiguous:  # a view in Hugging Face's order: a tiled transpose, not numpy's
                host_copy.copy_into(contiguous := aligned_empty(layer.shape, dtype), layer)
                layer = contiguous
            q = qwix.quantize(jnp.asarray(layer, dtype), jnp.int8, channelwise_axes=channels, scale_dtype=dtype)
            values[count - 1], scales[count - 1] = np.asarray(q.qvalue), np.asarray(q.scale)
    if count != shape[0]:
        raise ValueError(f"expected {shape[0]} layers of {shape[1:]}, got {'more' if count > shape[0] else count}")
    return values, scales


def int8_array(values: jax.Array, scales: jax.Array):
    """The placed values and scales of quantize_layers as the array generation takes (a qwix QArray)."""
    return _qwix().QArray(values, scales, None, jnp.int8)


def dot_general(x, w, dimension_numbers, out_dtype=None):
    """jax.lax.dot_general for a float weight w; for an int8 one (quantize_layers, int8_array), qwix's."""
    if not is_quantized(w):
        return jax.lax.dot_general(x, w, dimension_numbers, preferred_element_type=out_dtype)
    return _qwix().dot_general(x, w, dimension_numbers, preferred_element_type=out_dtype)


def einsum(spec: str, x, w):
    """jnp.einsum for a float weight w; for an int8 one, qwix's."""
    return jnp.einsum(spec, x, w) if not is_quantized(w) else _qwix().einsum(spec, x, w)
