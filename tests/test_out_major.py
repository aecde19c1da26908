"""The MLP matrices held out-major (paligemma/out_major.py) are the same model: read from the checkpoint layer by
layer into transposed storage, they give the usual layout's greedy tokens and scores alone, in a batch (the
few-rows decode products) and in the continuous-batching engine, and code reading a matrix (export) sees the
usual layout."""

import dataclasses

import jax
import numpy as np
import pytest

import paligemma
from paligemma import checkpoint, cpu_forms, hf_export
from paligemma.cpu_forms import Choice, CpuForm
from paligemma.out_major import OutMajor, read_transposed
from paligemma.params import expected_shapes
from paligemma.preprocess import preprocess
from paligemma.slots import SlotEngine

OUT_MAJOR = CpuForm("float32", True, out_major=True)
_rng = np.random.default_rng(1)
IMAGES = [(_rng.random((30, 40, 3)) * 255).astype(np.uint8) for _ in range(3)]
PROMPTS = ["caption en", "detect red circle", "answer en how many shapes are there? is there a green square?"]


def load_out_major(source) -> paligemma.Model:
    """A model loaded as on a CPU whose measurement picked the out-major form."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_forms, "applies", lambda cfg, device: True)
        patch.setattr(cpu_forms, "choose", lambda cfg, dtype=None, measuring=None: Choice(OUT_MAJOR, {}, 0.0))
        return paligemma.load(str(source))


@pytest.fixture(scope="module")
def out_major_model(tiny_model_dir):
    return load_out_major(tiny_model_dir)


def test_layers_are_read_into_transposed_storage():
    stacked = _rng.standard_normal((3, 2, 4, 5)).astype(np.float32)
    stored = read_transposed(iter(stacked), stacked.shape, np.float32)
    assert stored.shape == (3, 2, 5, 4) and stored.ctypes.data % 64 == 0
    np.testing.assert_array_equal(stored, np.swapaxes(stacked, -1, -2))
    np.testing.assert_array_equal(OutMajor(stored)[1, 0], stacked[1, 0])
    assert OutMajor(stored).shape == stacked.shape
    with pytest.raises(ValueError, match="a layer holds"):
        read_transposed(iter(stacked[:, :, :3]), stacked.shape, np.float32)
    with pytest.raises(ValueError, match="got 2"):
        read_transposed(iter(stacked[:2]), stacked.shape, np.float32)
    with pytest.raises(ValueError, match="got more"):
        read_transposed(iter(np.concatenate([stacked, stacked])), stacked.shape, np.float32)


def test_the_mlp_matrices_load_out_major(out_major_model, tiny_model):
    mlp = out_major_model.params["llm"]["layers"]["mlp"]
    shapes = expected_shapes(out_major_model.config)
    for name in ("gating_einsum", "linear"):
        assert isinstance(mlp[name], OutMajor) and mlp[name].shape == shapes[f"llm/layers/mlp/{name}"]
        usual = np.asarray(tiny_model.params["llm"]["layers"]["mlp"][name])
        np.testing.assert_array_equal(np.asarray(mlp[name].stored), np.swapaxes(usual, -1, -2))
    assert out_major_model.dtype_name == "float32"  # not taken for int8
    assert isinstance(out_major_model._generator.run_params["llm"]["layers"], list)  # per-layer views kept


@pytest.mark.parametrize("rows", [1, 3])
def test_same_tokens_and_scores_as_the_usual_layout(out_major_model, tiny_model, rows):
    def run(model):
        return list(model.run(IMAGES[:rows], PROMPTS[:rows], 12, return_scores=True))[-1]

    ours, usual = run(out_major_model), run(tiny_model)
    assert ours.token_ids == usual.token_ids
    for a, b in zip(ours.scores, usual.scores, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-4)


def test_the_continuous_engine_gives_the_solo_tokens(out_major_model, tiny_model):
    engine = SlotEngine(out_major_model, slots=2, chunk=4, max_new_tokens=12)
    slots = []
    for image, prompt in zip(IMAGES[:2], PROMPTS[1:], strict=True):
        pixels = preprocess(image, out_major_model.config.image_size)
        ids = out_major_model.encode_prompt(prompt)
        slots.append(engine.admit(pixels, ids, 12, paligemma.parse_sampler("greedy"), 0, False))
    while any(slot in engine.live for slot in slots):
        engine.advance()
    for slot, image, prompt in zip(slots, IMAGES, PROMPTS[1:], strict=False):
        alone = list(tiny_model.run([image], [prompt], 12))[-1].token_ids[0]
        assert tiny_model.tokenizer.until_eos(engine.read(slot).token_ids) == alone


def test_export_reads_the_usual_layout(out_major_model, tiny_model):
    usual = dict(hf_export.hf_tensors(tiny_model.params, tiny_model.config))
    for name, make in hf_export.hf_tensors(out_major_model.params, out_major_model.config):
        if ".mlp." in name:
            np.testing.assert_array_equal(make(), usual[name]())


def test_a_transformers_folder_loads_out_major_too(out_major_model, tiny_model, tmp_path):
    """HF keeps each layer's matrices [Out, In] apart: read through the same layer-by-layer path."""
    hf_export.export(tiny_model.params, tiny_model.config, str(tmp_path / "hf"), tiny_model.tokenizer.path)
    from_hf = load_out_major(tmp_path / "hf")
    linear = from_hf.params["llm"]["layers"]["mlp"]["linear"]
    np.testing.assert_array_equal(
        np.asarray(linear.stored), np.asarray(out_major_model.params["llm"]["layers"]["mlp"]["linear"].stored)
    )
    assert (
        list(from_hf.run(IMAGES[:1], PROMPTS[:1], 8))[-1].token_ids
        == list(tiny_model.run(IMAGES[:1], PROMPTS[:1], 8))[-1].token_ids
    )


def test_out_major_is_a_one_device_float_form(tiny_model_dir):
    tensors, cfg = checkpoint.read_checkpoint(str(tiny_model_dir / "model.npz"))
    with pytest.raises(ValueError, match="one-device float"):
        checkpoint.materialize(tensors, cfg, np.float32, "tiny", int8=True, out_major=True)


def test_a_layer_count_that_does_not_match_the_header_is_a_checkpoint_error(tiny_model_dir):
    source = str(tiny_model_dir / "model.npz")
    tensors, cfg = checkpoint.read_checkpoint(source)
    short = tensors["llm/layers/mlp/linear"]
    tensors["llm/layers/mlp/linear"] = dataclasses.replace(short, per_layer=lambda: iter(short.load()[:1]))
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.npz: tensor 'llm/layers/mlp/linear': expected 2"):
        checkpoint.materialize(tensors, cfg, "float32", source, out_major=True)


def test_weights_in_either_layout_replace_a_models_in_its_own(tiny_model_dir, tiny_model):
    """replace_params (training, weights from elsewhere) puts the MLP matrices in the layout the model holds, so
    the compiled functions serve them; a weight of another shape is named."""
    out_major, usual = load_out_major(tiny_model_dir), paligemma.load(str(tiny_model_dir))
    other = jax.tree.map(lambda w: w * 1.5, tiny_model.params)  # other weights of the same shapes, usual layout
    out_major.replace_params(other)
    usual.replace_params(other)
    assert isinstance(out_major.params["llm"]["layers"]["mlp"]["linear"], OutMajor)
    tokens = list(usual.run(IMAGES[:2], PROMPTS[:2], 12))[-1].token_ids
    assert list(out_major.run(IMAGES[:2], PROMPTS[:2], 12))[-1].token_ids == tokens
    usual.replace_params(out_major.params)  # and back: out-major weights into a usual model
    assert not isinstance(usual.params["llm"]["layers"]["mlp"]["linear"], OutMajor)
    assert list(usual.run(IMAGES[:2], PROMPTS[:2], 12))[-1].token_ids == tokens
    narrow = {**other, "llm": {**other["llm"], "final_norm": {"scale": other["llm"]["final_norm"]["scale"][:-1]}}}
    with pytest.raises(ValueError, match=r"llm/final_norm/scale is float32\[\d+\], this model's is float32\[\d+\]"):
        out_major.replace_params(narrow)
