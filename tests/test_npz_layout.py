"""save_npz writes the attention weights as big_vision's Gemma reads them: one qkv_einsum [L, 3, N, D, H] when
query and kv heads are equal, q_einsum [L, N, D, H] + kv_einsum [L, 2, K, D, H] otherwise; loading gives back
the very same arrays."""

import jax
import numpy as np
import pytest

from paligemma import checkpoint
from paligemma.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma.params import init_params

ATTN = "llm/layers/attn/"
VISION = VisionConfig(width=32, depth=1, mlp_dim=48, num_heads=2, patch_size=14, image_size=28)


def _config(heads: int, kv_heads: int) -> PaliGemmaConfig:
    return PaliGemmaConfig(
        VISION,
        TextConfig(
            vocab_size=300,
            width=64,
            depth=3,
            mlp_dim=96,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=16,
            query_scale=16**-0.5,
        ),
    )


def _random_params(cfg: PaliGemmaConfig):
    rng = np.random.default_rng(5)
    return jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), init_params(cfg))


@pytest.mark.parametrize(
    "heads, kv_heads, written",
    [
        (4, 4, {"qkv_einsum/w": (3, 3, 4, 64, 16)}),
        (4, 2, {"q_einsum/w": (3, 4, 64, 16), "kv_einsum/w": (3, 2, 2, 64, 16)}),
        (4, 1, {"q_einsum/w": (3, 4, 64, 16), "kv_einsum/w": (3, 2, 1, 64, 16)}),
    ],
)
def test_attention_keys_follow_big_vision_and_load_back_identically(tmp_path, heads, kv_heads, written):
    cfg = _config(heads, kv_heads)
    params = _random_params(cfg)
    checkpoint.save_npz(str(tmp_path / "model.npz"), params)
    with np.load(tmp_path / "model.npz", allow_pickle=False) as npz:
        shapes = {k.removeprefix(ATTN): npz[k].shape for k in npz.files if k.startswith(ATTN)}
        qkv = npz[ATTN + "qkv_einsum/w"] if heads == kv_heads else None
    assert shapes == {**written, "attn_vec_einsum/w": (3, heads, 16, 64)}
    q, kv = params["llm"]["layers"]["attn"]["q_einsum"]["w"], params["llm"]["layers"]["attn"]["kv_einsum"]["w"]
    if qkv is not None:  # [L, 3, N, D, H]: q, then k and v, per layer
        np.testing.assert_array_equal(qkv[:, 0], q)
        np.testing.assert_array_equal(qkv[:, 1:], kv)
    loaded, loaded_cfg = checkpoint.load_params(str(tmp_path / "model.npz"), "float32")
    assert loaded_cfg == cfg
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
