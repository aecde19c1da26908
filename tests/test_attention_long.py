"""Prefill with many image tokens (448 px: 1,024) scores a block of queries at a time: the same logits as
scoring all queries at once, without the whole [B, N, T, S] float32 score tensor in memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_configs import tiny_gemma2_text

from paligemma import gemma, siglip
from paligemma import model as model_lib
from paligemma.config import PaliGemmaConfig, VisionConfig
from paligemma.params import init_params

# 448 px / 14 px patches = 1,024 image tokens, Gemma 2 style (soft caps, grouped kv heads), tiny widths
CFG = PaliGemmaConfig(
    VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=14, image_size=448),
    tiny_gemma2_text(128),
)
TEXT = 16
LENGTH = CFG.num_image_tokens + TEXT


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=3, std=0.3)


def _inputs():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (1, CFG.image_size, CFG.image_size, 3)).astype(np.float32)
    tokens = rng.integers(0, CFG.text.vocab_size, (1, TEXT)).astype(np.int32)
    return images, tokens, np.array([6], np.int32), np.array([TEXT], np.int32)


def _forward(params):
    return np.asarray(jax.jit(model_lib.forward, static_argnums=1)(params, CFG, *_inputs()))


def _whole(monkeypatch):
    """Attention over all queries at once, as below QUERY_BLOCK (the reference)."""
    monkeypatch.setattr(gemma, "QUERY_BLOCK", 10**6)
    monkeypatch.setattr(siglip, "QUERY_BLOCK", 10**6)


def test_blockwise_prefill_equals_whole_attention(params, monkeypatch):
    assert LENGTH > 2 * gemma.QUERY_BLOCK and CFG.num_image_tokens > gemma.QUERY_BLOCK  # several blocks, one padded
    blockwise = _forward(params)
    _whole(monkeypatch)
    whole = _forward(params)
    np.testing.assert_allclose(blockwise, whole, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(blockwise.argmax(-1), whole.argmax(-1))  # the greedy tokens


# 896 px: 4,096 image tokens. Only compiled (memory_analysis), never run.
CFG_896 = dataclasses.replace(CFG, vision=dataclasses.replace(CFG.vision, image_size=896))
LENGTH_896 = CFG_896.num_image_tokens + TEXT


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _decoder_temp_bytes():
    """Scratch memory of a prefill through the decoder layers; mask and positions are inputs, as in generate."""
    x = jax.ShapeDtypeStruct((1, LENGTH_896, CFG_896.text.width), jnp.float32)
    positions = jax.ShapeDtypeStruct((1, LENGTH_896), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, LENGTH_896, LENGTH_896), jnp.bool_)
    run = jax.jit(lambda p, *args: gemma.run_layers(p, CFG_896.text, *args)[0])
    params = _abstract(init_params(CFG_896)["llm"])
    return run.lower(params, x, positions, mask).compile().memory_analysis().temp_size_in_bytes


def _encoder_temp_bytes():
    images = jax.ShapeDtypeStruct((1, CFG_896.image_size, CFG_896.image_size, 3), jnp.float32)
    run = jax.jit(lambda p, im: siglip.encode_images(p, CFG_896.vision, im))
    return run.lower(_abstract(init_params(CFG_896)["img"]), images).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "part, temp_bytes, heads, length",
    [
        ("decoder", _decoder_temp_bytes, CFG.text.num_heads, LENGTH_896),
        ("encoder", _encoder_temp_bytes, CFG.vision.num_heads, CFG_896.num_image_tokens),
    ],
)
def test_prefill_at_896px_never_holds_all_scores(part, temp_bytes, heads, length, monkeypatch):
    full_scores = heads * length * length * 4  # one row's float32 [N, T, S]
    blockwise = temp_bytes()
    _whole(monkeypatch)
    whole = temp_bytes()
    print(
        f"{part}: full scores {full_scores / 2**20:.1f} MiB, scratch blockwise {blockwise / 2**20:.1f} MiB, "
        f"whole {whole / 2**20:.1f} MiB"
    )
    assert whole >= full_scores  # what the blocks avoid
    assert blockwise < full_scores / 4
