"""bench/layouts.py measures the model's own decoder matrices, and both layouts compute the same product."""

import jax
import numpy as np

from bench import layouts
from paligemma.config import tiny_config
from paligemma.params import expected_shapes


def test_the_matrices_are_the_models_own():
    cfg = tiny_config(300)
    shapes = expected_shapes(cfg)
    t = cfg.text
    stored = {
        "q [N, D, H]": shapes["llm/layers/attn/q_einsum/w"][1:],
        "kv [2K, D, H]": (2 * t.num_kv_heads, *shapes["llm/layers/attn/kv_einsum/w"][3:]),
        "attn_vec [N·H, D]": (t.num_heads * t.head_dim, shapes["llm/layers/attn/attn_vec_einsum/w"][-1]),
        "gating [2, D, F]": shapes["llm/layers/mlp/gating_einsum"][1:],
        "linear [F, D]": shapes["llm/layers/mlp/linear"][1:],
    }
    assert {name: shape for name, (_, shape) in layouts.layer_matrices(cfg).items()} == stored


def test_both_layouts_give_the_same_product():
    rng = np.random.default_rng(0)
    for kind, shape in layouts.layer_matrices(tiny_config(300)).values():
        w = rng.standard_normal(shape).astype(np.float32)
        x = rng.standard_normal((3, shape[-2])).astype(np.float32)
        stored = np.asarray(jax.jit(layouts._stored(kind))(x, w))
        out = np.asarray(jax.jit(layouts._out_major)(x, np.swapaxes(w, -1, -2)))
        stored = stored.reshape(shape[0], 3, shape[-1]) if kind == "grouped" else stored  # [R, M, O] / [M, O]
        np.testing.assert_allclose(out, stored, rtol=1e-5, atol=1e-5)


def test_the_table_prints_every_matrix_and_the_layer(monkeypatch, capsys):
    monkeypatch.setattr(layouts, "COPIES_BYTES", 1)  # two copies of the tiny matrices: a smoke test
    layouts.main(["--config", "tiny", "--rows", "1", "2"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 * (len(layouts.layer_matrices(tiny_config(300))) + 1)
    assert '"vector_flags"' in lines[0]
