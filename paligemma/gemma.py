"""Gemma and Gemma 2 decoder as pure functions over big_vision-layout parameters (layers stacked).

Axis letters: B batch, T query positions, S key positions, N query heads, K kv heads, G query heads per
kv head (N = K·G), H head dim, D width, F MLP width, V vocabulary, L layers, C the k/v pair.

Attention takes the new tokens' keys/values and, optionally, a KV cache of earlier positions. The two are
scored separately and share one softmax, so the layer never writes into the cache: the caller writes all
layers' new keys/values at once, in place, outside the layer loop.
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
    """Rotary embedding on the two halves of the head dim. x [B, T, N, H], positions int[B, T]."""
    half = x.shape[-1] // 2
    inv_freq = ROPE_BASE ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, H/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def softcap(x, cap):
    return x if cap is None else jnp.tanh(x / cap) * cap


def embed_tokens(params, cfg: TextConfig, tokens):
    """tokens int[B, T] -> [B, T, D], scaled by √D as Gemma's text embeddings are."""
    table = params["embedder"]["input_embedding"]
    return table[tokens] * jnp.asarray(cfg.width**0.5, table.dtype)


def _attention(cfg: TextConfig, p, x, positions, mask_new, cache_kv, mask_cache):
    """x [B, T, D] -> ([B, T, D], (k, v) of the new tokens, each [B, T, K, H])."""
    b, t, _ = x.shape
    k_heads, groups = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    q = jnp.einsum("BTD,NDH->BTNH", x, p["q_einsum"]["w"])
    k, v = jnp.einsum("BTD,CKDH->CBTKH", x, p["kv_einsum"]["w"])
    q = apply_rope(q, positions) * jnp.asarray(cfg.query_scale, x.dtype)
    k = apply_rope(k, positions)
    q = q.reshape(b, t, k_heads, groups, cfg.head_dim)

    def scores(keys, mask):  # -> [B, K, G, T, S] float32, masked
        s = jnp.einsum("BTKGH,BSKH->BKGTS", q, keys).astype(jnp.float32)
        return jnp.where(mask[:, None, None], softcap(s, cfg.attn_softcap), _MASKED)

    parts = [scores(k, mask_new)]
    if cache_kv is not None:
        parts.insert(0, scores(cache_kv[0], mask_cache))
    weights = jax.nn.softmax(jnp.concatenate(parts, axis=-1), axis=-1).astype(v.dtype)
    if cache_kv is None:
        ctx = jnp.einsum("BKGTS,BSKH->BTKGH", weights, v)
    else:
        s_cache = cache_kv[1].shape[1]
        ctx = jnp.einsum("BKGTS,BSKH->BTKGH", weights[..., :s_cache], cache_kv[1])
        ctx = ctx + jnp.einsum("BKGTS,BSKH->BTKGH", weights[..., s_cache:], v)
    out = jnp.einsum("BTNH,NHD->BTD", ctx.reshape(b, t, cfg.num_heads, cfg.head_dim), p["attn_vec_einsum"]["w"])
    return out, (k, v)


def _mlp(p, x):
    gate = jnp.einsum("BTD,DF->BTF", x, p["gating_einsum"][0])
    up = jnp.einsum("BTD,DF->BTF", x, p["gating_einsum"][1])
    return jnp.einsum("BTF,FD->BTD", jax.nn.gelu(gate, approximate=True) * up, p["linear"])


def _block(cfg: TextConfig, x, p, positions, mask_new, cache_kv, mask_cache):
    h = rms_norm(x, p["pre_attention_norm"]["scale"], cfg.eps)
    h, new_kv = _attention(cfg, p["attn"], h, positions, mask_new, cache_kv, mask_cache)
    if cfg.post_norms:
        h = rms_norm(h, p["post_attention_norm"]["scale"], cfg.eps)
    x = x + h
    h = _mlp(p["mlp"], rms_norm(x, p["pre_ffw_norm"]["scale"], cfg.eps))
    if cfg.post_norms:
        h = rms_norm(h, p["post_ffw_norm"]["scale"], cfg.eps)
    return x + h, new_kv


def run_layers(params, cfg: TextConfig, x, positions, mask_new, cache=None, mask_cache=None):
    """All decoder layers over x [B, T, D].

    mask_new bool[B, T, T] says which new tokens each query sees; with a cache (k, v each [L, B, S, K, H])
    mask_cache bool[B, T, S] says which cached positions it sees. Returns (hidden [B, T, D] after the final
    norm, new keys/values each [L, B, T, K, H]).
    """

    def body(x, layer):
        layer_params, layer_cache = layer
        return _block(cfg, x, layer_params, positions, mask_new, layer_cache, mask_cache)

    x, new_kv = jax.lax.scan(body, x, (params["layers"], cache))
    return rms_norm(x, params["final_norm"]["scale"], cfg.eps), new_kv


def logits_from_hidden(params, cfg: TextConfig, x):
    """[B, T, D] -> float32 [B, T, V] with the tied embedding table (read as [V, D], no transpose)."""
    logits = jnp.einsum("BTD,VD->BTV", x, params["embedder"]["input_embedding"]).astype(jnp.float32)
    return softcap(logits, cfg.final_softcap)
