"""Host memory on XLA's CPU backend: buffers XLA adopts without a copy, and per-layer views of stacked weights.

On CPU a device buffer *is* host memory, and XLA adopts a 64-byte-aligned host buffer through DLPack
without copying it. Two things follow:
  - a checkpoint leaf read into an aligned buffer becomes a device array at no extra memory (checkpoint.py);
  - each layer's row of a stacked [L, ...] weight can be adopted as an array of its own, so generation
    runs on per-layer arrays (fast on CPU, see gemma.py) that share the stacked weights' memory.

A per-layer view keeps its stacked array alive by itself: the view's memory is exported by an object that
holds the stacked array, and XLA holds that object until the view is freed. The stacked array must still not
be donated or deleted explicitly (that frees its memory regardless of references): `check_alive` refuses.
"""

from __future__ import annotations

import jax
import numpy as np

ALIGNMENT = 64  # what XLA on CPU needs to adopt a host buffer without copying it


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ALIGNMENT-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class _DeviceMemory:
    """The memory of a CPU jax.Array as a numpy array interface; holding it holds the jax.Array."""

    def __init__(self, array: jax.Array):
        self.array = array
        self.__array_interface__ = {
            "data": (array.unsafe_buffer_pointer(), False),
            "shape": array.shape,
            "typestr": np.dtype(array.dtype).str,
            "version": 3,
        }


def layer_views(stacked) -> list[jax.Array] | None:
    """[L, ...] -> L arrays [...] sharing the stacked array's memory, or None where that cannot be done.

    Each view is adopted from a numpy row whose `.base` chain ends at a _DeviceMemory holding `stacked`;
    DLPack keeps that numpy row referenced until XLA frees the view, so the stacked array lives as long as
    any of its views. The views land on the default device (where DLPack puts them).
    """
    if not isinstance(stacked, jax.Array) or stacked.ndim < 2 or jax.default_backend() != "cpu":
        return None
    if stacked.devices() != {jax.devices()[0]} or np.dtype(stacked.dtype).kind not in "fiu":  # no bfloat16 DLPack
        return None
    row_bytes = stacked.nbytes // stacked.shape[0]
    if stacked.unsafe_buffer_pointer() % ALIGNMENT or row_bytes % ALIGNMENT:
        return None
    host = np.asarray(_DeviceMemory(stacked))
    return [jax.dlpack.from_dlpack(host[i], copy=False) for i in range(stacked.shape[0])]


def run_params(params, per_layer: bool = True):
    """The params generation (prefill and decode loop) runs on: on CPU the decoder layers as a list of per-layer
    dicts of views of the stacked arrays; elsewhere, where a view is impossible, for int8 layers, or where
    per_layer is False (the stacked form measured faster on this CPU, see cpu_forms.py), the params as they are.

    int8 layers stay stacked: as separate per-layer arrays their dequantisation does not depend on the step,
    and XLA hoists it out of the decode loop, so every layer's float copy is made before the loop and held
    through it (int8 then costs more memory than float32, and reads float per token). Stacked, each layer's
    dequantisation reads the layer scan's slice and stays inside the loop."""
    leaves = jax.tree.leaves(params["llm"]["layers"])  # int8 layers flatten to values and scales
    if not per_layer or any(leaf.dtype == np.int8 for leaf in leaves):
        return params
    layers = per_layer_views(params["llm"]["layers"])
    return params if layers is None else {**params, "llm": {**params["llm"], "layers": layers}}


def per_layer_views(layers) -> list | None:
    """Stacked decoder layers {name: [L, ...]} as L per-layer dicts of views, or None where any leaf has none."""
    leaves, structure = jax.tree.flatten(layers)
    views = [layer_views(leaf) for leaf in leaves]
    if not views or any(v is None for v in views):
        return None
    return [jax.tree.unflatten(structure, [v[i] for v in views]) for i in range(len(views[0]))]


def check_alive(params) -> None:
    """Donated or deleted decoder weights have freed their memory (views of them would read it); refuse."""
    if any(leaf.is_deleted() for leaf in jax.tree.leaves(params["llm"]["layers"])):
        raise RuntimeError(
            "the model's decoder weights were deleted (donated to another computation?); "
            "give the model live params with replace_params() before generating"
        )
