"""The decoder's MLP matrices stored out-major on CPU: the contracted (input) axis last, as torch keeps a Linear.

XLA's CPU dot streams a weight whose contracted axis is its last near memory bandwidth (so the embedding
table, [V, D], is read for the logits), and big_vision's [In, Out] matrices more slowly: 1.08-1.43x slower
with one row per decode step, 2.1-4.1x with 4-16 rows (`python -m bench.layouts`, AVX-512 + AMX Xeon). The
MLP's two matrices are nine tenths of a decoder layer's bytes. Where cpu_forms.py measures this form fastest,
load stores them transposed, read from the checkpoint layer by layer straight into the transposed buffer (no
second copy of a matrix), and wraps them in OutMajor, whose products gemma.py uses. Shape and indexing stay
big_vision's, so code that reads a layer's matrix (export) sees the usual layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from . import host_copy
from .cpu_memory import aligned_empty

KEYS = ("llm/layers/mlp/gating_einsum", "llm/layers/mlp/linear")  # [L, 2, D, F], [L, F, D]
# Measured on the AVX-512 + AMX Xeon, a 3B's gate/up pair: with the weight first, 1-2.3x faster than rows first
# up to 64 rows; in a prefill (272 rows) one GEMM with the rows first made the MLP 1.4x faster.
WEIGHT_FIRST_MAX_ROWS = 64


def swapped_last_two(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A matrix's stored shape from its logical one ([..., In, Out] -> [..., Out, In]) and back."""
    return (*shape[:-2], shape[-1], shape[-2])


@jax.tree_util.register_pytree_node_class
class OutMajor:
    """A matrix [..., In, Out] held as `stored` [..., Out, In]; jit, lax.scan and per-layer views carry it as
    they carry its stored array."""

    def __init__(self, stored):
        self.stored = stored

    @property
    def shape(self) -> tuple[int, ...]:
        return swapped_last_two(self.stored.shape)

    @property
    def dtype(self):
        return self.stored.dtype

    def __getitem__(self, index):
        """The logical [In, Out] matrix at `index` (leading axes only: layer, pair)."""
        return jnp.swapaxes(self.stored[index], -1, -2)

    def tree_flatten(self):
        return (self.stored,), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


def in_layout_of(params, reference):
    """params with each MLP matrix in the layout `reference` holds it in (out-major or usual), transposed where
    the two differ: weights made elsewhere (training, export, another model) can replace an out-major model's."""
    flat, held = (traverse_util.flatten_dict(tree, sep="/") for tree in (params, reference))
    for key in KEYS:
        if key not in flat or key not in held or isinstance(flat[key], OutMajor) == isinstance(held[key], OutMajor):
            continue
        w = flat[key]
        flat[key] = jnp.swapaxes(w.stored, -1, -2) if isinstance(w, OutMajor) else OutMajor(jnp.swapaxes(w, -1, -2))
    return traverse_util.unflatten_dict(flat, sep="/")


def read_transposed(layers: Iterable[np.ndarray], shape: tuple[int, ...], dtype) -> np.ndarray:
    """A stacked matrix [L, ..., In, Out], given one layer at a time, as an aligned host array [L, ..., Out, In]
    (what XLA on CPU adopts without a copy): transposed in tiles from a contiguous layer (big_vision), copied
    from a view of an out-major one (Hugging Face's Linear). Raises ValueError for a layer of another shape or
    count."""
    stored = aligned_empty(swapped_last_two(shape), dtype)
    count, transposing = 0, None
    with ThreadPoolExecutor(1) as pool:  # one layer transposes while the next is read (both release the GIL)
        for count, layer in enumerate(layers, 1):
            if count > shape[0]:
                raise ValueError(f"expected {shape[0]} layers of {shape[1:]}, got more")
            if tuple(layer.shape) != shape[1:]:
                raise ValueError(f"a layer holds {tuple(layer.shape)}, expected {shape[1:]}")
            if transposing is not None:
                transposing.result()
            transposing = pool.submit(host_copy.copy_into, stored[count - 1], np.swapaxes(layer, -1, -2))
        if transposing is not None:
            transposing.result()
    if count != shape[0]:
        raise ValueError(f"expected {shape[0]} layers of {shape[1:]}, got {count}")
    return stored


def rows_times(x, w: OutMajor, out_dtype=None):
    """x [M, In] · w [..., In, Out] -> [..., M, Out], contracting w's stored last axis. Up to
    WEIGHT_FIRST_MAX_ROWS rows (decoding) the weight goes first, the form XLA streams fastest; beyond (prefill)
    the rows go first against w as one [.. · Out, In] matrix: one GEMM for the gate/up pair."""
    stored = w.stored
    *lead, out, inputs = stored.shape
    if x.shape[0] <= WEIGHT_FIRST_MAX_ROWS:
        y = jax.lax.dot_general(stored, x, (((stored.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype)
        return jnp.swapaxes(y, -1, -2)  # [..., Out, M] -> [..., M, Out]
    flat = stored.reshape(-1, inputs)  # [.. · Out, In]: no copy
    y = jax.lax.dot_general(x, flat, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)  # [M, .. · Out]
    return jnp.moveaxis(y.reshape(x.shape[0], *lead, out), 0, -2)
