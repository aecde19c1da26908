"""SigLIP So400m/14 image encoder, as PaliGemma uses it: patch tokens after the final LayerNorm, then a
linear projection to the decoder width (the big_vision `img/head`).

Parameters follow the big_vision layout with blocks stacked on a leading axis, which lets one `lax.scan`
run all blocks and keeps compile time independent of depth.
Axis letters: B batch, P patches, W width, N heads, H head dim, M MLP width, D decoder width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import VisionConfig


def layer_norm(x, scale, bias, eps):
    """LayerNorm computed in float32 whatever the parameter dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _patchify(images, patch: int):
    """[B, R, R, 3] -> [B, P, patch*patch*3], rows in (dy, dx, channel) order to match the conv kernel."""
    b, r, _, c = images.shape
    g = r // patch
    x = images.reshape(b, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * g, patch * patch * c)


def _encoder_block(cfg: VisionConfig, x, p):
    """One pre-LayerNorm transformer block; `p` holds this block's slice of the stacked params."""
    attn = p["MultiHeadDotProductAttention_0"]
    h = layer_norm(x, p["LayerNorm_0"]["scale"], p["LayerNorm_0"]["bias"], cfg.eps)
    q = jnp.einsum("BPW,WNH->BPNH", h, attn["query"]["kernel"]) + attn["query"]["bias"]
    k = jnp.einsum("BPW,WNH->BPNH", h, attn["key"]["kernel"]) + attn["key"]["bias"]
    v = jnp.einsum("BPW,WNH->BPNH", h, attn["value"]["kernel"]) + attn["value"]["bias"]
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("BPNH,BSNH->BNPS", q, k).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    ctx = jnp.einsum("BNPS,BSNH->BPNH", weights, v)
    x = x + jnp.einsum("BPNH,NHW->BPW", ctx, attn["out"]["kernel"]) + attn["out"]["bias"]

    mlp = p["MlpBlock_0"]
    h = layer_norm(x, p["LayerNorm_1"]["scale"], p["LayerNorm_1"]["bias"], cfg.eps)
    h = jnp.einsum("BPW,WM->BPM", h, mlp["Dense_0"]["kernel"]) + mlp["Dense_0"]["bias"]
    h = jax.nn.gelu(h, approximate=True)
    h = jnp.einsum("BPM,MW->BPW", h, mlp["Dense_1"]["kernel"]) + mlp["Dense_1"]["bias"]
    return x + h


def encode_images(params, cfg: VisionConfig, images):
    """images float[B, R, R, 3] in [-1, 1] -> image tokens [B, P, D] in the decoder's width (unscaled)."""
    dtype = params["embedding"]["kernel"].dtype
    kernel = params["embedding"]["kernel"]  # [patch, patch, 3, W]
    patches = _patchify(images.astype(dtype), cfg.patch_size)
    x = jnp.einsum("BPK,KW->BPW", patches, kernel.reshape(-1, kernel.shape[-1])) + params["embedding"]["bias"]
    x = x + params["pos_embedding"].astype(dtype)

    def body(x, block_params):
        return _encoder_block(cfg, x, block_params), None

    x, _ = jax.lax.scan(body, x, params["Transformer"]["encoderblock"])
    norm = params["Transformer"]["encoder_norm"]
    x = layer_norm(x, norm["scale"], norm["bias"], cfg.eps)
    return jnp.einsum("BPW,WD->BPD", x, params["head"]["kernel"]) + params["head"]["bias"]
