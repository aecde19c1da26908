"""Exporting our params as a transformers folder: our loader reads back the same tensors, transformers the
same model (same logits), whole or in shards."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from hf_models import hf_inputs
from small_configs import tiny_gemma2_text
from transformers import PaliGemmaForConditionalGeneration

from paligemma import checkpoint, hf_export
from paligemma import model as model_lib
from paligemma.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma.params import init_params
from paligemma.preprocess import preprocess

VISION = VisionConfig(width=32, depth=2, mlp_dim=48, num_heads=2, patch_size=14, image_size=28)
CONFIGS = {
    "pg1": PaliGemmaConfig(
        VISION,
        TextConfig(
            vocab_size=300,
            width=64,
            depth=2,
            mlp_dim=96,
            num_heads=4,
            num_kv_heads=1,
            head_dim=16,
            query_scale=16**-0.5,
        ),
    ),
    "pg2": PaliGemmaConfig(
        VISION,
        tiny_gemma2_text(300, query_scale=24**-0.5),
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    rng = np.random.default_rng(1)  # every leaf random, norms and biases too
    params = jax.tree.map(lambda x: rng.normal(0, 0.15, x.shape).astype(np.float32), init_params(cfg))
    folder = hf_export.export(params, cfg, tmp_path_factory.mktemp(request.param) / "hf")
    return params, cfg, folder


def test_our_loader_reads_back_identical_tensors_and_config(exported):
    params, cfg, folder = exported
    loaded, loaded_cfg = checkpoint.load_params(folder, "float32")
    assert loaded_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_transformers_gives_our_logits(exported):
    params, cfg, folder = exported
    hf, info = PaliGemmaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    pixels = preprocess((np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8), cfg.image_size)
    ids = [2, 17, 40, 5, 108]
    with torch.no_grad():
        theirs = hf.eval()(**hf_inputs(hf, pixels, ids)).logits[0, -len(ids) :].numpy()
    n = np.asarray([len(ids)], np.int32)
    ours = np.asarray(model_lib.forward(params, cfg, pixels[None], np.asarray([ids], np.int32), n, n))[0]
    assert np.abs(ours - theirs).max() < 1e-4


def test_sharded_export_has_an_index_and_loads_the_same(tmp_path):
    cfg = CONFIGS["pg2"]
    params = init_params(cfg, seed=3)
    folder = hf_export.export(params, cfg, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(params))
    loaded, _ = checkpoint.load_params(folder, "float32")
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_unexportable_gemma1_query_scale_is_refused(tmp_path):
    cfg = CONFIGS["pg1"]
    odd = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, query_scale=0.5))
    with pytest.raises(ValueError, match="query scale"):
        hf_export.export(init_params(odd), odd, tmp_path / "out")
    assert not (tmp_path / "out").exists()
