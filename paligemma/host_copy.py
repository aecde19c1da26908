"""Host copies between memory orders at memory speed, for loading checkpoints.

A Hugging Face Linear weight is [out, in] and ours is [in, out] (hf_keys.py), so every such weight reaches the
loader as a transposed view, and the head splits and permutations of the attention weights are transposes too.
numpy copies a transposed view element by element across cache lines; OpenCV transposes in cache-sized tiles,
several times faster (`python -m bench.checkpoint_3b` shows the load time). `copy_into` finds the matrix
transpose inside such a view and gives it to OpenCV; `stacked` stacks views without undoing their memory order,
so that a reader who wants the HF order (out_major.py) gets a plain copy instead of two transposes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Below this many elements numpy's copy is as quick as any (and OpenCV's call costs more than the copy).
MIN_TILED_ELEMENTS = 1 << 16
# OpenCV transposes elements of these sizes; only bytes move, so any dtype of the size goes as this one.
_SAME_SIZE = {1: np.uint8, 2: np.uint16, 4: np.float32, 8: np.float64}


def copy_into(dst: np.ndarray, src) -> None:
    """dst[...] = src, cast to dst's dtype. dst: C-contiguous; src: an array of dst's shape in any memory order."""
    src = np.asarray(src)
    found = None if src.size < MIN_TILED_ELEMENTS else transposed_matrices(src)
    view = _SAME_SIZE.get(dst.dtype.itemsize)
    if found is None or view is None or not dst.flags.c_contiguous:
        dst[...] = src
        return
    import cv2  # only loads need it

    memory, (batch, rows, cols) = found
    if memory.dtype != dst.dtype:
        memory = memory.astype(dst.dtype)  # a contiguous cast first: OpenCV moves elements, it does not cast
    for out, matrix in zip(dst.reshape(batch, rows, cols).view(view), memory.view(view), strict=True):
        cv2.transpose(matrix, out)


def transposed_matrices(src: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]] | None:
    """(memory [B, C, R], (B, R, C)) where src, read as B matrices [R, C] (its leading axes, then two groups of
    axes), is each the transpose of a C-contiguous matrix in `memory`; else None (src contiguous, or laid out
    some other way). E.g. an HF query weight [N·H, D] read as ours [N, D, H]: B = N, R = D, C = H."""
    if src.ndim < 2 or src.flags.c_contiguous:
        return None
    order = _memory_order(src)
    memory = src.transpose(order)
    if not memory.flags.c_contiguous:
        return None
    n = src.ndim
    for kept in range(n - 1):
        if order[:kept] != list(range(kept)):
            break
        for split in range(kept + 1, n):
            if order[kept:] == [*range(split, n), *range(kept, split)]:
                batch, rows, cols = (math.prod(src.shape[a:b]) for a, b in ((0, kept), (kept, split), (split, n)))
                return memory.reshape(batch, cols, rows), (batch, rows, cols)
    return None


def stacked(values: Sequence[np.ndarray]) -> np.ndarray:
    """np.stack(values) (equal shapes) in a new array that keeps values[0]'s memory order below the stacked
    axis: views of HF matrices stack by contiguous copies and stay views of HF's order."""
    first = values[0]
    order = _memory_order(first)
    memory = np.empty((len(values), *(first.shape[axis] for axis in order)), first.dtype)
    out = memory.transpose(0, *(1 + int(axis) for axis in np.argsort(order)))
    for slot, value in zip(out, values, strict=True):
        slot[...] = value
    return out


def _memory_order(a: np.ndarray) -> list[int]:
    """a's axes from the slowest-varying in memory to the fastest."""
    return sorted(range(a.ndim), key=lambda axis: -a.strides[axis])
