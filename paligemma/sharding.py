"""Placing a model over several devices (GPUs, TPU cores) so PaliGemma 2 10B/28B fit: tensor parallelism.

A 1-D mesh with one axis, "model". Attention is split by heads (query heads, and kv heads when their count
divides the mesh), the MLPs by their hidden width, in the image encoder and the decoder alike; the KV
cache follows its kv heads. Everything else (embedding table, norms, biases of the outputs, the image
patch embedding) is replicated. XLA's partitioner inserts the all-reduces after the attention output
and the MLP down projection, so the model code is the same on one device or many.

    mesh = sharding.make_mesh()                       # all devices, or make_mesh(jax.devices()[:4])
    params, cfg = checkpoint.load_params(path, mesh=mesh)   # each leaf placed straight into its shards
    model = paligemma.Model(params, cfg, tokenizer)   # generation follows the params' mesh
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import PaliGemmaConfig

AXIS = "model"
_ATTN = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
_MLP = "img/Transformer/encoderblock/MlpBlock_0/"
# flat parameter key -> the axis split across devices (layers are stacked on axis 0)
SPLIT_AXIS = {
    "llm/layers/attn/q_einsum/w": 1,  # [L, N, D, H]
    "llm/layers/attn/kv_einsum/w": 2,  # [L, 2, K, D, H]
    "llm/layers/attn/attn_vec_einsum/w": 1,  # [L, N, H, D]
    "llm/layers/mlp/gating_einsum": 3,  # [L, 2, D, F]
    "llm/layers/mlp/linear": 1,  # [L, F, D]
    **{f"{_ATTN}{name}/kernel": 2 for name in ("query", "key", "value")},  # [L, W, N, Hd]
    **{f"{_ATTN}{name}/bias": 1 for name in ("query", "key", "value")},  # [L, N, Hd]
    _ATTN + "out/kernel": 1,  # [L, N, Hd, W]
    _MLP + "Dense_0/kernel": 2,  # [L, W, M]
    _MLP + "Dense_0/bias": 1,  # [L, M]
    _MLP + "Dense_1/kernel": 1,  # [L, M, W]
}
CACHE_SPLIT_AXIS = 2  # KV cache [L, B, K, S, H]: by kv heads


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D "model" mesh over `devices` (default: all devices of the default backend)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("a mesh needs at least one device; got an empty device list")
    return Mesh(np.asarray(devices), (AXIS,))


def spec(shape: Sequence[int], axis: int | None, mesh_size: int) -> PartitionSpec:
    """Split `axis` over the mesh when it divides evenly; otherwise replicate (correct, just not spread)."""
    if axis is None or mesh_size == 1 or shape[axis] % mesh_size:
        return PartitionSpec()
    return PartitionSpec(*([None] * axis), AXIS)


def param_sharding(key: str, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """Sharding of one leaf, by its flat key (as in params.expected_shapes)."""
    return NamedSharding(mesh, spec(shape, SPLIT_AXIS.get(key), mesh.size))


def param_shardings(shapes: Mapping[str, Sequence[int]], mesh: Mesh) -> dict[str, NamedSharding]:
    return {key: param_sharding(key, shape, mesh) for key, shape in shapes.items()}


def cache_sharding(cfg: PaliGemmaConfig, mesh: Mesh) -> NamedSharding:
    """KV cache [L, B, K, S, H] split by kv heads, like the kv projection that writes it."""
    shape = (cfg.text.depth, 1, cfg.text.num_kv_heads, 1, cfg.text.head_dim)
    return NamedSharding(mesh, spec(shape, CACHE_SPLIT_AXIS, mesh.size))


def mesh_of(params) -> Mesh | None:
    """The mesh the params were placed on, or None when they live on a single device."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None
