"""float16 (GPUs without bfloat16, e.g. the T4) gives float32's greedy tokens on a model whose activations pass
float16's range, because the values that grow are kept in float32 (devices.wide_dtype); without that they
overflow. And the default dtype follows the device."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_configs import tiny_gemma2_text

from paligemma import devices, gemma, siglip
from paligemma import model as model_lib
from paligemma.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma.generate import Generator
from paligemma.params import init_params
from paligemma.samplers import parse_sampler

FLOAT16_MAX = float(jnp.finfo(jnp.float16).max)  # 65504
VOCAB = 96
VISION = VisionConfig(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=14, image_size=56)
TEXT = {
    "gemma2": tiny_gemma2_text(VOCAB),
    "gemma1": TextConfig(
        vocab_size=VOCAB, width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=32, query_scale=32**-0.5
    ),
}
# standard deviations of weights that make the residual streams (and the logits) reach ~1e5, while every weight
# still fits float16
STDS = {
    "llm/embedder/input_embedding": 3000.0,
    "llm/layers/mlp/linear": 9000.0,
    "img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel": 9000.0,
    "img/head/kernel": 8000.0,
}


def _params(cfg, dtype):
    params = init_params(cfg, seed=7, std=1.0)
    for path, std in STDS.items():
        *parents, leaf = path.split("/")
        group = params
        for name in parents:
            group = group[name]
        group[leaf] = group[leaf] * std
    # the final norm multiplies by 2^-11 (exact in float16), so that logits of ~1e5 become ~50: below Gemma 2's
    # soft cap, which would otherwise make every token tie at 30
    params["llm"]["final_norm"]["scale"] = jnp.full_like(params["llm"]["final_norm"]["scale"], 2.0**-11 - 1)
    return jax.tree.map(lambda a: a.astype(dtype), params)


def _greedy(cfg, dtype):
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, VISION.image_size, VISION.image_size, 3)).astype(np.float32)
    prompts = [list(rng.integers(2, VOCAB, 9)), list(rng.integers(2, VOCAB, 5))]
    generator = Generator(_params(cfg, dtype), cfg, VOCAB, eos_id=1, pad_id=0)
    *_, (tokens, _) = generator.run(images, prompts, 12, parse_sampler("greedy"), seed=0)
    return tokens


@pytest.fixture(params=sorted(TEXT))
def cfg(request):
    return PaliGemmaConfig(VISION, TEXT[request.param])


@pytest.mark.slow
def test_activations_pass_float16_range(cfg):
    params = _params(cfg, jnp.float32)
    text = gemma.embed_tokens(params["llm"], cfg.text, jnp.arange(VOCAB)[None])
    image = siglip.encode_images(params["img"], cfg.vision, jnp.ones((1, VISION.image_size, VISION.image_size, 3)))
    assert float(jnp.abs(text).max()) > FLOAT16_MAX and float(jnp.abs(image).max()) > FLOAT16_MAX
    assert max(float(jnp.abs(w).max()) for w in jax.tree.leaves(params)) < FLOAT16_MAX  # yet every weight fits


@pytest.mark.slow
def test_float16_gives_float32_greedy_tokens(cfg):
    np.testing.assert_array_equal(_greedy(cfg, jnp.float16), _greedy(cfg, jnp.float32))


def test_without_float32_guards_float16_overflows(cfg, monkeypatch):
    for module in (gemma, siglip):
        monkeypatch.setattr(module, "wide_dtype", lambda dtype: dtype)  # everything in float16
    images = np.zeros((1, VISION.image_size, VISION.image_size, 3), np.float32)
    tokens = np.arange(2, 10, dtype=np.int32)[None]
    logits = model_lib.forward(_params(cfg, jnp.float16), cfg, images, tokens, np.array([4]), np.array([8]))
    assert not np.isfinite(np.asarray(logits)).all()


def test_bfloat16_and_float32_compute_as_before():
    assert devices.wide_dtype(jnp.bfloat16) == jnp.bfloat16 and devices.wide_dtype(jnp.float32) == jnp.float32
    assert devices.wide_dtype(jnp.float16) == jnp.float32


@pytest.mark.parametrize(
    "platform, capability, expected",
    [
        ("cpu", None, jnp.float32),
        ("tpu", None, jnp.bfloat16),
        ("gpu", "7.5", jnp.float16),  # T4
        ("gpu", "7.0", jnp.float16),
        ("gpu", "8.0", jnp.bfloat16),
        ("gpu", "9.0", jnp.bfloat16),  # V100, A100, H100
    ],
)
def test_default_dtype_follows_the_device(platform, capability, expected):
    device = types.SimpleNamespace(platform=platform, compute_capability=capability)
    assert devices.default_dtype(device) == expected
