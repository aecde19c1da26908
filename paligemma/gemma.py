"""Gemma and Gemma 2 decoder as pure functions over big_vision-layout parameters (layers stacked).

Axis letters: B batch, T query positions, S key positions, N query heads, K kv heads, G query heads per
kv head (N = K·G), H head dim, D width, F MLP width, V vocabulary, L layers, C the k/v pair, R the stacked
matrices of one projection weight (N query heads, C·K key/value heads, or the gate/up pair), O their output
width (H or F).

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
accelerators use it) or a list of per-layer dicts (an unrolled loop; generation on one CPU device, see
generate.py), and up to _IN_PLACE_MAX_ROWS rows the projections are written as in-place dots. KV caches come in
the same two forms: (k, v) stacked [L, B, K, S, H], or a list of per-layer (k, v) each [B, K, S, H] (kv heads
before positions, so attention reads them in place too).

Long prefills (448 and 896 px: 1,024 and 4,096 image tokens) score QUERY_BLOCK queries at a time, so that the
float32 scores of a layer are [B, N, QUERY_BLOCK, S] rather than [B, N, T, S]. float16 weights keep the
residual stream and everything that feeds or grows it in float32 (devices.py). The layer weights may be int8
(quantize.py); the projections then go through qwix. The MLP matrices may be held out-major (out_major.py,
on CPUs where that form measured fastest); their products then read them as stored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import quantize
from .config import TextConfig
from .devices import wide_dtype
from .out_major import OutMajor, rows_times

ROPE_BASE = 10_000.0
_MASKED = -2.3819763e38  # most negative float32 that stays finite after softcap-free softmax


def rms_norm(x, scale, eps, dtype=None):
    """Gemma's RMSNorm: x / rms(x) · (1 + scale), in float32; the result in `dtype` (default: x's)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(dtype or x.dtype)


def apply_rope(x, positions):
    """Rotary embedding on the two halves of the head dim. x [N or K, B, T, H] (heads first), positions int[B, T]."""
    half = x.shape[-1] // 2
    inv_freq = ROPE_BASE ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def softcap(x, cap):
    return x if cap is None else jnp.tanh(x / cap) * cap


def embed_tokens(params, cfg: TextConfig, tokens):
    """tokens int[B, T] -> [B, T, D], scaled by √D as Gemma's text embeddings are; in the residual stream's
    dtype (float32 for float16 weights: the scaled embeddings may pass float16's range)."""
    table = params["embedder"]["input_embedding"]
    dtype = wide_dtype(table.dtype)
    return table[tokens].astype(dtype) * jnp.asarray(cfg.width**0.5, dtype)


# Up to this many rows (B·T: decoding), weights are read in place; beyond it (prefill, training) the einsum
# lets XLA transpose each weight once into its preferred GEMM layout, which pays off over many rows.
_IN_PLACE_MAX_ROWS = 16


def _matmul(x, w, out_dtype=None):
    """x [M, In] · w [In, Out] -> [M, Out], w float, int8 (quantize.py) or out-major (out_major.py); out_dtype:
    see devices.wide_dtype."""
    if isinstance(w, OutMajor):
        return rows_times(x, w, out_dtype)
    return quantize.dot_general(x, w, (((1,), (0,)), ((), ())), out_dtype)


def _grouped_project(x, w):
    """x [B, T, D] · w [R, D, O] -> [R, B, T, O]: R projections of the same rows.

    One dot with R as a batch dimension reads w in its stored layout. XLA on CPU copies (transposes or
    slices) the weight on every call for the obvious einsums ("BTD,NDH->BTNH", or w[0] and w[1] separately),
    which made decoding 3-10x slower than the memory bandwidth allows.
    """
    b, t, d = x.shape
    r = w.shape[0]
    if isinstance(w, OutMajor):
        return rows_times(x.reshape(b * t, d), w).reshape(r, b, t, w.shape[-1])
    if b * t > _IN_PLACE_MAX_ROWS:
        return quantize.einsum("BTD,RDO->RBTO", x, w)
    rows = jnp.broadcast_to(x.reshape(1, b * t, d), (r, b * t, d))  # [R, B·T, D]
    y = quantize.dot_general(rows, w, (((2,), (1,)), ((0,), (0,))))  # contract D, batch R: [R, B·T, O]
    return y.reshape(r, b, t, w.shape[-1])


def _batched_dot(a, b, contract_a: int, contract_b: int, out_dtype=None):
    """Per (batch, kv head) matrix product over [B, K, ...] operands, e.g. queries · cached keys."""
    return jax.lax.dot_general(
        a, b, (((contract_a,), (contract_b,)), ((0, 1), (0, 1))), preferred_element_type=out_dtype
    )


# Prefills of more query positions than this score one block of queries at a time (a loop over blocks): a
# Gemma 2B layer at 896 px (4,096 image tokens + the prompt) would otherwise hold 8 heads × 4,128² float32
# scores, 545 MB per row, twice (scores and probabilities); a block holds a sixteenth of that. Each query's row
# is computed exactly as in one piece. jax.nn.dot_product_attention (jax 0.10) is no alternative: by default
# it runs the same unfused XLA attention, and its fused cuDNN kernel has no logit soft cap (Gemma 2's).
QUERY_BLOCK = 256


def in_query_blocks(fn, t: int, axis: int, block: int):
    """fn(start) -> the result for the `block` queries from `start` on (queries on `axis`), for all t > block
    queries, one block at a time, into one result. The last block starts at t - block, redoing rows of the one
    before it (the same values again), so that neither queries nor masks are padded or copied."""
    shape = jax.eval_shape(fn, 0)
    out = jnp.zeros((*shape.shape[:axis], t, *shape.shape[axis + 1 :]), shape.dtype)

    def one_block(i, out):
        start = jnp.minimum(i * block, t - block)
        return jax.lax.dynamic_update_slice_in_dim(out, fn(start), start, axis)

    return jax.lax.fori_loop(0, -(-t // block), one_block, out)


def _context(cfg: TextConfig, q, parts):
    """Queries q [B, K, G·T, H] against `parts` (keys [B, K, S_i, H], values [B, K, S_i, H], mask bool[B, T,
    S_i]) that share one softmax -> (context [B, K, G·T, H], weights float32 [B, K, G, T, ΣS_i])."""
    b, k_heads, rows, _ = q.shape
    wide = wide_dtype(q.dtype)

    def scores(keys, mask):  # -> [B, K, G, T, S] float32, soft-capped and masked
        t, s = mask.shape[1], keys.shape[2]
        # [B, K, G·T, H] · [B, K, S, H], contracting H -> [B, K, G·T, S]
        logits = _batched_dot(q, keys, 3, 3, wide).reshape(b, k_heads, rows // t, t, s).astype(jnp.float32)
        return jnp.where(mask[:, None, None], softcap(logits, cfg.attn_softcap), _MASKED)

    probs = jax.nn.softmax(jnp.concatenate([scores(k, mask) for k, _, mask in parts], axis=-1), axis=-1)
    values = [v for _, v, _ in parts]
    weights = probs.astype(values[0].dtype).reshape(b, k_heads, rows, probs.shape[-1])  # [B, K, G·T, S]
    ctx, start = None, 0
    for v in values:  # [B, K, G·T, S_i] · [B, K, S_i, H] -> [B, K, G·T, H]
        part = _batched_dot(weights[..., start : start + v.shape[2]], v, 3, 2)
        ctx, start = part if ctx is None else ctx + part, start + v.shape[2]
    return ctx, probs


def _blockwise_context(cfg: TextConfig, q, parts):
    """_context's context, QUERY_BLOCK queries at a time: only one block's scores exist at once."""
    b, k_heads, rows, h = q.shape
    t = parts[0][2].shape[1]
    groups = rows // t
    q = q.reshape(b, k_heads, groups, t, h)

    def one_block(start):  # -> [B, K, G, QUERY_BLOCK, H]
        q_block = jax.lax.dynamic_slice_in_dim(q, start, QUERY_BLOCK, axis=3)
        masks = [jax.lax.dynamic_slice_in_dim(mask, start, QUERY_BLOCK, axis=1) for _, _, mask in parts]
        ctx, _ = _context(
            cfg,
            q_block.reshape(b, k_heads, groups * QUERY_BLOCK, h),
            [(k, v, mask) for (k, v, _), mask in zip(parts, masks)],
        )
        return ctx.reshape(b, k_heads, groups, QUERY_BLOCK, h)

    return in_query_blocks(one_block, t, 3, QUERY_BLOCK).reshape(b, k_heads, rows, h)


def _attention(cfg: TextConfig, p, x, positions, mask, cache_kv, index, with_weights: bool):
    """x [B, T, D] -> ([B, T, D] in the residual stream's dtype, kv, weights float32 [B, N, T, S] when the
    whole-sequence path computed them, else None).

    Without a cache the queries see the new tokens (mask [B, T, T]) and kv is their (k, v), each [B, K, T, H].
    With one (decode, T = 1), the new keys and values are written into it at `index`, kv is the written cache,
    and mask [B, T, S] says which of its positions the queries see, the written ones included. They attend to
    the written cache: the old one then has no reader after the write, so XLA updates the loop-carried cache in
    place, where attending to the old cache made XLA copy every layer's cache twice per decode step. That holds
    only when no axis of the cache is 1: with one row, or one kv head (Gemma 2B, PaliGemma 1), the attention
    reads the cache through a reshape that drops the axis, XLA repeats the write for that reader and copies
    four times. There the queries read the unwritten cache and the fed token beside it (two copies)."""
    b, t, d = x.shape
    k_heads, groups, h = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    q = apply_rope(_grouped_project(x, p["q_einsum"]["w"]), positions) * jnp.asarray(cfg.query_scale, x.dtype)
    # kv_einsum [C, K, D, H] read as [C·K, D, H] -> [C·K, B, T, H] -> [C, K, B, T, H]
    kv = _grouped_project(x, p["kv_einsum"]["w"].reshape(2 * k_heads, d, h)).reshape(2, k_heads, b, t, h)
    k = apply_rope(kv[0], positions).transpose(1, 0, 2, 3)  # [B, K, T, H], the cache layout
    v = kv[1].transpose(1, 0, 2, 3)
    # [N, B, T, H] -> [B, K, G·T, H]: each kv head's query heads as rows of one matrix
    q = q.reshape(k_heads, groups, b, t, h).transpose(2, 0, 1, 3, 4).reshape(b, k_heads, groups * t, h)
    if cache_kv is None:
        kv, parts = (k, v), [(k, v, mask)]
    else:
        kv = tuple(_write(c, n, index) for c, n in zip(cache_kv, (k, v)))
        if b > 1 and k_heads > 1:
            parts = [(*kv, mask)]
        else:  # the unwritten cache without the fed slot, and the fed token beside it under one softmax
            fed = jnp.arange(mask.shape[-1]) == jnp.reshape(index, (-1, 1, 1))  # [B or 1, 1, S]
            parts = [(*cache_kv, mask & ~fed), (k, v, jnp.ones((b, t, t), bool))]
    if t > QUERY_BLOCK and not with_weights:
        ctx, probs = _blockwise_context(cfg, q, parts), None
    else:
        ctx, probs = _context(cfg, q, parts)
        probs = probs.reshape(b, cfg.num_heads, t, probs.shape[-1])
    # [B, K, G·T, H] -> [B·T, N·H], N in (K, G) order as the weights store it
    ctx = ctx.reshape(b, k_heads, groups, t, h).transpose(0, 3, 1, 2, 4).reshape(b * t, cfg.num_heads * h)
    # attn_vec_einsum [N, H, D] read as [N·H, D]
    out = _matmul(ctx, p["attn_vec_einsum"]["w"].reshape(cfg.num_heads * h, d), wide_dtype(x.dtype))
    return out.reshape(b, t, d), kv, probs


def _write(cache, new, index):
    """new [B, K, T, H] into cache [B, K, S, H] at sequence `index`: one int32 for every row, or int32[B], each
    row at its own (one dynamic_update_slice per row, which XLA does in place where a scatter of all rows,
    vmap's form, copied the whole cache)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=2)
    for row in range(cache.shape[0]):
        cache = jax.lax.dynamic_update_slice(cache, new[row : row + 1], (row, 0, index[row], 0))
    return cache


def _mlp(p, x):
    """x [B, T, D] -> [B, T, D] in the residual stream's dtype."""
    b, t, _ = x.shape
    if b * t > _IN_PLACE_MAX_ROWS and not isinstance(p["gating_einsum"], OutMajor):
        # two large GEMMs: slicing w[0], w[1] costs little next to them (out-major: one, see out_major.py)
        gate, up = (quantize.einsum("BTD,DF->BTF", x, p["gating_einsum"][c]) for c in range(2))
    else:
        gate, up = _grouped_project(x, p["gating_einsum"])  # [R=2, D, F] -> 2 × [B, T, F]
    f = gate.shape[-1]
    hidden = (jax.nn.gelu(gate, approximate=True) * up).reshape(b * t, f)
    return _matmul(hidden, p["linear"], wide_dtype(x.dtype)).reshape(b, t, -1)


def _block(cfg: TextConfig, x, p, positions, mask, cache_kv, index, dtype, with_weights: bool):
    """x [B, T, D] is the residual stream; `dtype` the weights' float dtype, in which the matrices are fed."""
    h = rms_norm(x, p["pre_attention_norm"]["scale"], cfg.eps, dtype)
    h, new_kv, weights = _attention(cfg, p["attn"], h, positions, mask, cache_kv, index, with_weights)
    if cfg.post_norms:
        h = rms_norm(h, p["post_attention_norm"]["scale"], cfg.eps)
    x = x + h
    h = _mlp(p["mlp"], rms_norm(x, p["pre_ffw_norm"]["scale"], cfg.eps, dtype))
    if cfg.post_norms:
        h = rms_norm(h, p["post_ffw_norm"]["scale"], cfg.eps)
    return x + h, new_kv, weights


def run_layers(params, cfg: TextConfig, x, positions, mask, cache=None, index=None, with_attention: bool = False):
    """All decoder layers over x [B, T, D].

    Without a cache (prefill, training) mask bool[B, T, T] says which of the tokens each query sees, and the
    second result is their keys and values in the cache form of the layers: stacked [L, B, K, T, H] or per
    layer [B, K, T, H]. With one (decode), the tokens' keys and values are written into it at sequence `index`
    (one int32, or int32[B] for a row each), mask bool[B, T, S] says which cache positions each query sees
    (the written ones included), and the second result is the written cache. The third is the attention
    weights of every layer and head, float32 [L, B, N, T, S], when with_attention asks for them (for training),
    else None.

    x is the residual stream (embed_tokens' dtype); the hidden states come back in the weights' dtype.
    """
    layers = params["layers"]
    dtype = params["embedder"]["input_embedding"].dtype  # the float dtype even where layer weights are int8
    if isinstance(layers, list | tuple):
        new_kv, weights = [], []
        for i, layer_params in enumerate(layers):
            layer_cache = None if cache is None else cache[i]
            x, kv, w = _block(cfg, x, layer_params, positions, mask, layer_cache, index, dtype, with_attention)
            new_kv.append(kv)
            weights.append(w)
        weights = jnp.stack(weights) if with_attention else None
    else:

        def body(x, layer):
            layer_params, layer_cache = layer
            x, kv, w = _block(cfg, x, layer_params, positions, mask, layer_cache, index, dtype, with_attention)
            return x, (kv, w if with_attention else None)

        x, (new_kv, weights) = jax.lax.scan(body, x, (layers, cache))
    return rms_norm(x, params["final_norm"]["scale"], cfg.eps, dtype), new_kv, weights


def map_cache(fn, cache):
    """Applies fn(array, seq_axis) to every k and v of a cache in either form."""
    if isinstance(cache, list):
        return [tuple(fn(c, 2) for c in kv) for kv in cache]  # per layer [B, K, S, H]
    return tuple(fn(c, 3) for c in cache)  # stacked [L, B, K, S, H]


def cache_length(cache) -> int:
    """S, the number of positions a cache (either form) holds."""
    return cache[0][0].shape[2] if isinstance(cache, list) else cache[0].shape[3]


def logits_from_hidden(params, cfg: TextConfig, x):
    """[B, T, D] -> float32 [B, T, V] with the tied embedding table, read as stored ([V, D], no transpose).

    For a few rows XLA on CPU reads the table about twice as fast as [V, D] · [D, rows] (measured at 4 rows);
    for many rows (training) the usual order avoids transposing a large [V, rows] result.
    """
    table = params["embedder"]["input_embedding"]
    b, t, d = x.shape
    wide = wide_dtype(table.dtype)
    if b * t <= _IN_PLACE_MAX_ROWS:
        # [V, D] · [B·T, D], contracting D -> [V, B·T] -> [B, T, V]
        logits = jax.lax.dot_general(
            table, x.reshape(b * t, d), (((1,), (1,)), ((), ())), preferred_element_type=wide
        ).T.reshape(b, t, -1)
    else:
        logits = jnp.einsum("BTD,VD->BTV", x, table, preferred_element_type=wide)
    return softcap(logits.astype(jnp.float32), cfg.final_softcap)
