"""SigLIP So400m/14 image encoder, as PaliGemma uses it: patch tokens after the final LayerNorm, then a
linear projection to the decoder width (the big_vision `img/head`).

Axis letters: B batch, R image side in pixels, P patches (query positions in attention), S patches as key
positions, K the pixels of one patch (patch·patch·3), W width, N heads, H head dim, M MLP width, D decoder
width.

Parameters follow the big_vision layout with blocks stacked on a leading axis, which lets one `lax.scan`
run all blocks and keeps compile time independent of depth. Beyond gemma.QUERY_BLOCK patches (448 and 896 px)
attention scores one block of queries at a time, as the decoder's prefill does. float16 weights keep the
residual stream in float32 (devices.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import VisionConfig
from .devices import wide_dtype
from .gemma import QUERY_BLOCK, in_query_blocks


def layer_norm(x, scale, bias, eps, dtype=None):
    """LayerNorm computed in float32 whatever the parameter dtype; the result in `dtype` (default: x's)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype or x.dtype)


def _patchify(images, patch: int):
    """[B, R, R, 3] -> [B, P, K], each patch's pixels in (dy, dx, channel) order to match the conv kernel."""
    b, r, _, c = images.shape
    g = r // patch
    x = images.reshape(b, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5)  # [B, grid y, grid x, dy, dx, 3]
    return x.reshape(b, g * g, patch * patch * c)


def _attend(q, k, v):
    """q [B, P, N, H] (scaled), k/v [B, S, N, H] -> context [B, P, N, H]; scores in float32."""
    logits = jnp.einsum("BPNH,BSNH->BNPS", q, k, preferred_element_type=wide_dtype(q.dtype)).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("BNPS,BSNH->BPNH", weights, v)


def _encoder_block(cfg: VisionConfig, x, p, dtype):
    """One pre-LayerNorm transformer block; `p` holds this block's slice of the stacked params. x [B, P, W] is
    the residual stream; the matrices are fed in `dtype`, the weights'."""
    wide = x.dtype
    attn = p["MultiHeadDotProductAttention_0"]
    h = layer_norm(x, p["LayerNorm_0"]["scale"], p["LayerNorm_0"]["bias"], cfg.eps, dtype)
    q = jnp.einsum("BPW,WNH->BPNH", h, attn["query"]["kernel"]) + attn["query"]["bias"]
    k = jnp.einsum("BPW,WNH->BPNH", h, attn["key"]["kernel"]) + attn["key"]["bias"]
    v = jnp.einsum("BPW,WNH->BPNH", h, attn["value"]["kernel"]) + attn["value"]["bias"]
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    if q.shape[1] > QUERY_BLOCK:
        ctx = in_query_blocks(
            lambda start: _attend(jax.lax.dynamic_slice_in_dim(q, start, QUERY_BLOCK, axis=1), k, v),
            q.shape[1],
            1,
            QUERY_BLOCK,
        )
    else:
        ctx = _attend(q, k, v)
    x = x + jnp.einsum("BPNH,NHW->BPW", ctx, attn["out"]["kernel"], preferred_element_type=wide) + attn["out"]["bias"]

    mlp = p["MlpBlock_0"]
    h = layer_norm(x, p["LayerNorm_1"]["scale"], p["LayerNorm_1"]["bias"], cfg.eps, dtype)
    h = jnp.einsum("BPW,WM->BPM", h, mlp["Dense_0"]["kernel"]) + mlp["Dense_0"]["bias"]
    h = jax.nn.gelu(h, approximate=True)
    h = jnp.einsum("BPM,MW->BPW", h, mlp["Dense_1"]["kernel"], preferred_element_type=wide) + mlp["Dense_1"]["bias"]
    return x + h


def encode_images(params, cfg: VisionConfig, images):
    """images float[B, R, R, 3] in [-1, 1] -> image tokens [B, P, D] in the decoder's width (unscaled), in the
    weights' dtype (float32 for float16 weights)."""
    dtype = params["embedding"]["kernel"].dtype
    wide = wide_dtype(dtype)
    kernel = params["embedding"]["kernel"]  # [patch, patch, 3, W]
    patches = _patchify(images.astype(dtype), cfg.patch_size)
    # the patch conv as a matmul: kernel [patch, patch, 3, W] read as [K, W]
    x = jnp.einsum("BPK,KW->BPW", patches, kernel.reshape(-1, kernel.shape[-1]), preferred_element_type=wide)
    x = x + params["embedding"]["bias"] + params["pos_embedding"].astype(wide)

    def body(x, block_params):
        return _encoder_block(cfg, x, block_params, dtype), None

    x, _ = jax.lax.scan(body, x, params["Transformer"]["encoderblock"])
    norm = params["Transformer"]["encoder_norm"]
    x = layer_norm(x, norm["scale"], norm["bias"], cfg.eps, dtype)
    return jnp.einsum("BPW,WD->BPD", x, params["head"]["kernel"], preferred_element_type=wide) + params["head"]["bias"]
