"""Gemma and Gemma 2 decoder as pure functions over big_vision-layout parameters (layers stacked).

Axis letters: B batch, T query positions, S key positions, N query heads, K kv heads, G query heads per
kv head (N = K·G), H head dim, D width, F MLP width, V vocabulary, L layers, C the k/v pair.

Attention takes the new tokens' keys/values and, optionally, a KV cache of earlier positions. The two are
scored separately and share one softmax, so the layer never writes into the cache: the caller writes all
layers' new keys/values at once, in place, outside the layer loop.

Decoding reads every weight once per token, so its speed is memory bandwidth, and on XLA's CPU backend
that depends on how a weight reaches its matmul (measured on 2 cores, 6-layer MLP stack, 1 row):
  - from a stacked [L, ...] array inside a `lax.scan`, each layer's slice is first copied: 2.9 GB/s;
    from separate per-layer arrays the same matmuls read 9.9 GB/s;
  - an einsum contracting a middle axis ("BTD,NDH->BTNH"), or w[0] and w[1] of gating, copies or
    transposes the weight on every call (1.1 GB/s); one dot_general with the leading axis as a batch
    dimension reads it in place (14.6 GB/s).
So `params["layers"]` is either stacked (each leaf [L, ...]: one `lax.scan`; checkpoints, training and
prefill use it) or a list of per-layer dicts (an unrolled loop; the decode loop on CPU, see generate.py),
and up to _IN_PLACE_MAX_ROWS rows the projections are written as in-place dots. KV caches come in the same
two forms: (k, v) stacked [L, B, K, S, H], or a list of per-layer (k, v) each [B, K, S, H] (kv heads before
positions, so attention reads them in place too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import TextConfig

ROPE_BASE = 10_000.0
_MASKED = -2.3819763e38  # most negative float32 that stays finite after softcap-free softmax


def rms_norm(x, scale, eps):
    """Gemma's RMSNorm: x / rms(x) · (1 + scale), in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def apply_rope(x, positions):
    """Rotary embedding on the two halves of the head dim. x [N, B, T, H] (heads first), positions int[B, T]."""
    half = x.shape[-1] // 2
    inv_freq = ROPE_BASE ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def softcap(x, cap):
    return x if cap is None else jnp.tanh(x / cap) * cap


def embed_tokens(params, cfg: TextConfig, tokens):
    """tokens int[B, T] -> [B, T, D], scaled by √D as Gemma's text embeddings are."""
    table = params["embedder"]["input_embedding"]
    return table[tokens] * jnp.asarray(cfg.width**0.5, table.dtype)


# Up to this many rows (B·T: decoding), weights are read in place; beyond it (prefill, training) the einsum
# lets XLA transpose each weight once into its preferred GEMM layout, which pays off over many rows.
_IN_PLACE_MAX_ROWS = 16


def _grouped_project(x, w):
    """x [B, T, In] · w [G, In, Out] -> [G, B, T, Out] (G: heads, or gate/up).

    One dot with G as a batch dimension reads w in its stored layout. XLA on CPU copies (transposes or
    slices) the weight on every call for the obvious einsums ("BTD,NDH->BTNH", or w[0] and w[1] separately),
    which made decoding 3-10x slower than the memory bandwidth allows.
    """
    b, t, d = x.shape
    g = w.shape[0]
    if b * t > _IN_PLACE_MAX_ROWS:
        return jnp.einsum("BTD,GDO->GBTO", x, w)
    y = jax.lax.dot_general(jnp.broadcast_to(x.reshape(1, b * t, d), (g, b * t, d)), w, (((2,), (1,)), ((0,), (0,))))
    return y.reshape(g, b, t, w.shape[-1])


def _batched_dot(a, b, contract_a: int, contract_b: int):
    """Per (batch, kv head) matrix product over [B, K, ...] operands, e.g. queries · cached keys."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0, 1), (0, 1))))


def _attention(cfg: TextConfig, p, x, positions, mask_new, cache_kv, mask_cache):
    """x [B, T, D] -> ([B, T, D], (k, v) of the new tokens, each [B, K, T, H], weights [B, N, T, S] float32)."""
    b, t, d = x.shape
    k_heads, groups, h = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    q = apply_rope(_grouped_project(x, p["q_einsum"]["w"]), positions) * jnp.asarray(cfg.query_scale, x.dtype)
    kv = _grouped_project(x, p["kv_einsum"]["w"].reshape(2 * k_heads, d, h)).reshape(2, k_heads, b, t, h)
    k = apply_rope(kv[0], positions).transpose(1, 0, 2, 3)  # [B, K, T, H], the cache layout
    v = kv[1].transpose(1, 0, 2, 3)
    q = q.reshape(k_heads, groups, b, t, h).transpose(2, 0, 1, 3, 4).reshape(b, k_heads, groups * t, h)

    def scores(keys, mask):  # keys [B, K, S, H] -> [B, K, G, T, S] float32, masked
        s = _batched_dot(q, keys, 3, 3).reshape(b, k_heads, groups, t, keys.shape[2]).astype(jnp.float32)
        return jnp.where(mask[:, None, None], softcap(s, cfg.attn_softcap), _MASKED)

    parts = [scores(k, mask_new)]
    if cache_kv is not None:
        parts.insert(0, scores(cache_kv[0], mask_cache))
    probs = jax.nn.softmax(jnp.concatenate(parts, axis=-1), axis=-1)  # [B, K, G, T, S]
    weights = probs.astype(v.dtype).reshape(b, k_heads, groups * t, probs.shape[-1])
    if cache_kv is None:
        ctx = _batched_dot(weights, v, 3, 2)  # [B, K, G·T, H]
    else:
        s_cache = cache_kv[1].shape[2]
        ctx = _batched_dot(weights[..., :s_cache], cache_kv[1], 3, 2) + _batched_dot(weights[..., s_cache:], v, 3, 2)
    ctx = ctx.reshape(b, k_heads, groups, t, h).transpose(0, 3, 1, 2, 4).reshape(b * t, cfg.num_heads * h)
    out = ctx @ p["attn_vec_einsum"]["w"].reshape(cfg.num_heads * h, d)  # [N, H, D] read as [N·H, D]
    return out.reshape(b, t, d), (k, v), probs.reshape(b, cfg.num_heads, t, probs.shape[-1])


def _mlp(p, x):
    b, t, _ = x.shape
    if b * t > _IN_PLACE_MAX_ROWS:  # two large GEMMs: slicing w[0], w[1] costs little next to them
        gate, up = (jnp.einsum("BTD,DF->BTF", x, p["gating_einsum"][c]) for c in range(2))
    else:
        gate, up = _grouped_project(x, p["gating_einsum"])  # [2, D, F] -> 2 × [B, T, F]
    f = gate.shape[-1]
    return ((jax.nn.gelu(gate, approximate=True) * up).reshape(b * t, f) @ p["linear"]).reshape(b, t, -1)


def _block(cfg: TextConfig, x, p, positions, mask_new, cache_kv, mask_cache):
    h = rms_norm(x, p["pre_attention_norm"]["scale"], cfg.eps)
    h, new_kv, weights = _attention(cfg, p["attn"], h, positions, mask_new, cache_kv, mask_cache)
    if cfg.post_norms:
        h = rms_norm(h, p["post_attention_norm"]["scale"], cfg.eps)
    x = x + h
    h = _mlp(p["mlp"], rms_norm(x, p["pre_ffw_norm"]["scale"], cfg.eps))
    if cfg.post_norms:
        h = rms_norm(h, p["post_ffw_norm"]["scale"], cfg.eps)
    return x + h, new_kv, weights


def run_layers(params, cfg: TextConfig, x, positions, mask_new, cache=None, mask_cache=None,
               with_attention: bool = False):
    """All decoder layers over x [B, T, D].

    mask_new bool[B, T, T] says which new tokens each query sees; with a cache mask_cache bool[B, T, S] says
    which cached positions it sees. Returns (hidden [B, T, D] after the final norm, the new tokens' keys and
    values in the cache form of the layers: stacked [L, B, K, T, H] or per layer [B, K, T, H], and the
    attention weights of every layer and head, float32 [L, B, N, T, S], when with_attention asks for them
    (for training) else None).
    """
    layers = params["layers"]
    if isinstance(layers, list | tuple):
        new_kv, weights = [], []
        for i, layer_params in enumerate(layers):
            x, kv, w = _block(cfg, x, layer_params, positions, mask_new, None if cache is None else cache[i],
                              mask_cache)
            new_kv.append(kv)
            weights.append(w)
        weights = jnp.stack(weights) if with_attention else None
    else:
        def body(x, layer):
            layer_params, layer_cache = layer
            x, kv, w = _block(cfg, x, layer_params, positions, mask_new, layer_cache, mask_cache)
            return x, (kv, w if with_attention else None)

        x, (new_kv, weights) = jax.lax.scan(body, x, (layers, cache))
    return rms_norm(x, params["final_norm"]["scale"], cfg.eps), new_kv, weights


def map_cache(fn, cache):
    """Applies fn(array, seq_axis) to every k and v of a cache in either form."""
    if isinstance(cache, list):
        return [tuple(fn(c, 2) for c in kv) for kv in cache]  # per layer [B, K, S, H]
    return tuple(fn(c, 3) for c in cache)  # stacked [L, B, K, S, H]


def cache_length(cache) -> int:
    """S, the number of positions a cache (either form) holds."""
    return cache[0][0].shape[2] if isinstance(cache, list) else cache[0].shape[3]


def unstack_cache(cache):
    """A stacked cache (k, v each [L, ...]) as the per-layer list."""
    return [(k, v) for k, v in zip(*cache)]


def write_cache(cache, new_kv, index):
    """Writes the new tokens' keys/values (as run_layers returns them) into the cache at sequence `index`."""
    if isinstance(cache, list):
        return [tuple(jax.lax.dynamic_update_slice_in_dim(c, n, index, axis=2) for c, n in zip(kv, new))
                for kv, new in zip(cache, new_kv)]
    return tuple(jax.lax.dynamic_update_slice_in_dim(c, n, index, axis=3) for c, n in zip(cache, new_kv))


def logits_from_hidden(params, cfg: TextConfig, x):
    """[B, T, D] -> float32 [B, T, V] with the tied embedding table, read as stored ([V, D], no transpose).

    For a few rows XLA on CPU reads the table about twice as fast as [V, D] · [D, rows] (measured at 4 rows);
    for many rows (training) the usual order avoids transposing a large [V, rows] result.
    """
    table = params["embedder"]["input_embedding"]
    b, t, d = x.shape
    if b * t <= _IN_PLACE_MAX_ROWS:
        logits = jax.lax.dot_general(table, x.reshape(b * t, d), (((1,), (1,)), ((), ()))).T.reshape(b, t, -1)
    else:
        logits = jnp.einsum("BTD,VD->BTV", x, table)
    return softcap(logits.astype(jnp.float32), cfg.final_softcap)
