"""int8 weight-only decoding (quantize.py): the decoder's layer matrices become int8 with per-channel scales,
quantised one layer at a time as a checkpoint is read (never whole in float), the same from every format; and
the demo model still answers unseen scenes as in float32."""

import dataclasses
import io
import json
import shutil
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import traverse_util
from small_configs import tiny_gemma2_text

import paligemma
import postprocess
from paligemma import checkpoint, hf_export
from paligemma.config import CheckpointError, PaliGemmaConfig, VisionConfig
from paligemma.params import init_params
from paligemma.quantize import CONTRACTED_AXES
from scenes.evaluate import evaluate_model, missed_targets

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"
EVAL_SEED = 20261123  # scenes the demo model never saw in training (as in test_demo_model.py)
NUM_SCENES = 40


@pytest.fixture(scope="module")
def demo():
    return paligemma.load(str(DEMO))


@pytest.fixture(scope="module")
def demo_int8():
    return paligemma.load(str(DEMO), dtype="int8")


def _flat(params) -> dict:
    """Flat keys as params.expected_shapes names them; an int8 matrix stays one QArray."""
    return traverse_util.flatten_dict(params, sep="/", is_leaf=lambda _, x: isinstance(x, qwix.QArray))


def test_layer_matrices_become_int8_with_per_channel_scales(demo, demo_int8):
    weights, quantised = _flat(demo.params), _flat(demo_int8.params)
    for key, contracted in CONTRACTED_AXES.items():
        w, q = weights[key], quantised[key]
        assert q.qvalue.dtype == jnp.int8 and q.qvalue.shape == w.shape
        assert q.scale.shape == tuple(1 if a in contracted else n for a, n in enumerate(w.shape))
        error = np.abs(np.asarray(q.qvalue, np.float32) * np.asarray(q.scale) - np.asarray(w))
        assert error.max() <= np.asarray(q.scale).max() / 2 * (1 + 1e-5)  # rounding to the nearest step
    for key in set(weights) - set(CONTRACTED_AXES):  # the rest loads as in float32
        np.testing.assert_array_equal(quantised[key], weights[key], err_msg=key)
    assert demo_int8.info()["dtype"] == "int8"


def test_the_decode_loop_keeps_the_layer_matrices_in_int8(demo_int8):
    """Dequantised inside the loop, layer by layer: XLA must not make a float copy of every layer matrix before
    the loop (it does when the layers are separate per-layer arrays, cpu_memory.run_params)."""
    from paligemma.cpu_memory import run_params

    assert run_params(demo_int8.params) is demo_int8.params  # stacked: the layer scan slices them
    demo_int8.generate(np.zeros((28, 28, 3), np.uint8), "caption en", max_new_tokens=8)
    (_, decode) = next(fns for key, fns in demo_int8._generator._compiled.items() if key[0] == 1)
    matrices = _flat(demo_int8.params)
    float_bytes = sum(matrices[key].qvalue.size * 4 for key in CONTRACTED_AXES)
    assert decode.memory_analysis().temp_size_in_bytes < float_bytes / 2


def _sources(tmp_path, params, cfg) -> dict[str, str]:
    """The same weights as a stored .npz, a compressed one with a Fortran-ordered member, and an HF folder."""
    stored = tmp_path / "stored.npz"
    checkpoint.save_npz(str(stored), params)
    arrays = dict(np.load(stored))
    arrays["llm/layers/mlp/linear"] = np.asfortranarray(arrays["llm/layers/mlp/linear"])
    np.savez_compressed(tmp_path / "compressed.npz", **arrays)
    hf = hf_export.export(params, cfg, tmp_path / "hf")
    return {"stored npz": str(stored), "compressed npz": str(tmp_path / "compressed.npz"), "hf folder": hf}


def _no_whole_float_leaf(tensors: dict) -> dict:
    """The lazy tensors, with the quantised leaves refusing to be read whole."""

    def refuse():
        raise AssertionError("an int8 matrix was read whole in float")

    return {k: dataclasses.replace(t, load=refuse) if k in CONTRACTED_AXES else t for k, t in tensors.items()}


@pytest.mark.parametrize("kv_heads", [4, 2])  # 4: big_vision writes one qkv_einsum, which loading splits
def test_int8_load_quantises_layer_by_layer_as_qwix_does_the_whole_matrix(tmp_path, kv_heads):
    cfg = PaliGemmaConfig(
        VisionConfig(width=32, depth=1, mlp_dim=48, num_heads=2, patch_size=14, image_size=28),
        tiny_gemma2_text(300, depth=3, num_kv_heads=kv_heads),
    )
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), init_params(cfg))
    weights = _flat(params)
    for name, source in _sources(tmp_path, params, cfg).items():
        tensors, read_cfg = checkpoint.read_checkpoint(source)
        loaded = _flat(checkpoint.materialize(_no_whole_float_leaf(tensors), read_cfg, "float32", source, int8=True))
        for key, contracted in CONTRACTED_AXES.items():
            channels = tuple(a for a in range(weights[key].ndim) if a not in contracted)
            whole = qwix.quantize(
                jnp.asarray(weights[key]), jnp.int8, channelwise_axes=channels, scale_dtype=jnp.float32
            )
            np.testing.assert_array_equal(loaded[key].qvalue, whole.qvalue, err_msg=f"{name}: {key}")
            np.testing.assert_array_equal(loaded[key].scale, whole.scale, err_msg=f"{name}: {key}")
        for key in set(weights) - set(CONTRACTED_AXES):
            np.testing.assert_array_equal(loaded[key], weights[key], err_msg=f"{name}: {key}")


def test_a_truncated_layer_fails_int8_loading_with_the_file_named(tmp_path, tiny_model_dir, tokenizer_path):
    """A compressed member that ends inside its second layer (the zip itself intact)."""
    with zipfile.ZipFile(tmp_path / "model.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in np.load(tiny_model_dir / "model.npz").items():
            written = io.BytesIO()
            np.save(written, value)
            cut = value[1].nbytes // 2 if key == "llm/layers/mlp/linear" else 0
            archive.writestr(key + ".npy", written.getvalue()[: len(written.getvalue()) - cut])
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    with pytest.raises(CheckpointError, match=r"model\.npz.*llm/layers/mlp/linear\[1\].*truncated"):
        paligemma.load(str(tmp_path), dtype="int8")


def test_a_layer_count_that_does_not_match_the_header_is_refused(tiny_model_dir):
    source = str(tiny_model_dir / "model.npz")
    tensors, cfg = checkpoint.read_checkpoint(source)
    short = tensors["llm/layers/mlp/linear"]
    tensors["llm/layers/mlp/linear"] = dataclasses.replace(short, per_layer=lambda: iter(short.load()[:1]))
    with pytest.raises(CheckpointError, match="expected 2 layers"):
        checkpoint.materialize(tensors, cfg, "float32", source, int8=True)


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
