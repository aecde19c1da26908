"""int8 weight-only decoding (quantize.py): the decoder's layer matrices become int8 with per-channel scales,
and the demo model still answers unseen scenes as in float32."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paligemma
import postprocess
from paligemma.quantize import CONTRACTED_AXES, quantize_params
from scenes.evaluate import evaluate_model, missed_targets

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"
EVAL_SEED = 20261123  # scenes the demo model never saw in training (as in test_demo_model.py)
NUM_SCENES = 40


@pytest.fixture(scope="module")
def demo():
    return paligemma.load(str(DEMO))


@pytest.fixture(scope="module")
def demo_int8(demo):
    return paligemma.Model(quantize_params(demo.params, demo.config), demo.config, demo.tokenizer)


def _layer_weight(params, path):
    group = params["llm"]["layers"]
    for name in path:
        group = group[name]
    return group


def test_layer_matrices_become_int8_with_per_channel_scales(demo, demo_int8):
    for path, contracted in CONTRACTED_AXES.items():
        w, q = _layer_weight(demo.params, path), _layer_weight(demo_int8.params, path)
        assert q.qvalue.dtype == jnp.int8 and q.qvalue.shape == w.shape
        assert q.scale.shape == tuple(1 if a in contracted else n for a, n in enumerate(w.shape))
        error = np.abs(np.asarray(q.qvalue, np.float32) * np.asarray(q.scale) - np.asarray(w))
        assert error.max() <= np.asarray(q.scale).max() / 2 * (1 + 1e-5)  # rounding to the nearest step
    for key in ("embedder", "final_norm"):  # the rest stays as it was
        jax.tree.map(np.testing.assert_array_equal, demo_int8.params["llm"][key], demo.params["llm"][key])
    assert demo_int8.params["img"] is demo.params["img"]


def test_int8_decoder_layers_are_served_as_per_layer_views(demo_int8):
    """The fast CPU decode path (cpu_memory.decode_params) also takes int8 values and their scales."""
    from paligemma.cpu_memory import decode_params

    layers = decode_params(demo_int8.params)["llm"]["layers"]
    assert isinstance(layers, list) and len(layers) == demo_int8.config.text.depth


def test_quantising_twice_is_refused(demo_int8):
    with pytest.raises(ValueError, match="should be a float array"):
        quantize_params(demo_int8.params, demo_int8.config)


def _recorded(model, outputs):
    def generate(images, prompts):
        result = list(model.run(images, prompts, max_new_tokens=64))[-1]
        outputs.extend(result.token_ids)
        return result.texts

    return generate


@pytest.mark.slow
def test_int8_answers_unseen_scenes_as_float32(demo, demo_int8):
    decoder = postprocess.MaskDecoder.load(DEMO / "vae-oid.npz")
    float_ids, int8_ids = [], []
    float_figures = evaluate_model(_recorded(demo, float_ids), NUM_SCENES, EVAL_SEED, decoder, batch_size=16)
    int8_figures = evaluate_model(_recorded(demo_int8, int8_ids), NUM_SCENES, EVAL_SEED, decoder, batch_size=16)
    same_answers = np.mean([a == b for a, b in zip(float_ids, int8_ids)])
    positions = [max(len(a), len(b)) for a, b in zip(float_ids, int8_ids)]
    same_tokens = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(float_ids, int8_ids)) / sum(positions)
    print(
        json.dumps(
            {
                "answers": len(float_ids),
                "identical_answers": same_answers,
                "token_agreement": same_tokens,
                "float32": float_figures,
                "int8": int8_figures,
            },
            indent=1,
        )
    )
    assert len(float_ids) == len(int8_ids) >= 5 * NUM_SCENES
    assert same_answers >= 0.95 and same_tokens >= 0.98
    # every demo target float32 meets on these scenes, int8 meets too
    assert set(missed_targets(int8_figures)) <= set(missed_targets(float_figures)), missed_targets(int8_figures)
