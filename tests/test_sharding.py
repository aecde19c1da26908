"""Placement of the weights: on another device, or split over 2 and 4 devices (simulated on the CPU), a
model generates the same greedy tokens as on the default device (int8 too); which leaves are split; on one CPU device,
loading adopts host buffers without a copy and generation reads each decoder layer in place through views of
the stacked weights."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from paligemma import checkpoint, cpu_memory, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs with 4 host devices: one-device tokens, then the model split over 2 and over 4 of them.
_SPLIT = """
import json, sys
import jax, numpy as np
import paligemma
from paligemma import sharding

folder = sys.argv[1]
rng = np.random.default_rng(0)
images = [(rng.random((30, 40, 3)) * 255).astype(np.uint8) for _ in range(2)]
prompts = ["caption en", "answer en how many shapes are there?"]

def tokens(model):  # a batch of two: other images, other prompt lengths
    return list(model.run(images, prompts, max_new_tokens=12))[-1].token_ids

def devices_of(model):
    return sorted({d.id for leaf in jax.tree.leaves(model.params) for d in leaf.devices()})

report = {"devices": jax.device_count(), "one": tokens(paligemma.load(folder))}
last = paligemma.load(folder, devices=[jax.devices()[3]])
report["last"] = {"tokens": tokens(last), "devices": devices_of(last), "name": last.device}
for n, where in ((2, jax.devices()[:2]), (4, sharding.make_mesh())):  # a device list, or a mesh
    model = paligemma.load(folder, devices=where)
    q = model.params["llm"]["layers"]["attn"]["q_einsum"]["w"]
    mlp = model.params["img"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
    report[str(n)] = {"tokens": tokens(model), "devices": devices_of(model), "name": model.device,
                      "q_heads_per_device": [s.data.shape[1] for s in q.addressable_shards],
                      "image_mlp_per_device": [s.data.shape[2] for s in mlp.addressable_shards]}
int8_one = paligemma.load(folder, dtype="int8")
int8_split = paligemma.load(folder, dtype="int8", devices=sharding.make_mesh())
q = int8_split.params["llm"]["layers"]["attn"]["q_einsum"]["w"]
report["int8"] = {"one": tokens(int8_one), "4": tokens(int8_split), "devices": devices_of(int8_split),
                  "q_heads_per_device": [s.data.shape[1] for s in q.qvalue.addressable_shards],
                  "q_scale_heads_per_device": [s.data.shape[1] for s in q.scale.addressable_shards]}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_load_on_one_other_device_or_split_over_2_and_4_gives_one_device_tokens(tiny_model_dir):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "PALIGEMMA_COMPILE_CACHE": "off",
    }
    out = subprocess.run(
        [sys.executable, "-c", _SPLIT, str(tiny_model_dir)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    assert all(len(row) >= 6 for row in report["one"]), "random weights should not stop almost at once"
    assert report["last"] == {"tokens": report["one"], "devices": [3], "name": "cpu"}
    for n in ("2", "4"):
        assert report[n]["tokens"] == report["one"], n
        assert report[n]["devices"] == list(range(int(n))) and report[n]["name"] == f"cpu ×{n}"
    assert report["2"]["q_heads_per_device"] == [2, 2]  # 4 query heads, 64-wide image MLP
    assert report["4"]["q_heads_per_device"] == [1, 1, 1, 1]
    assert report["4"]["image_mlp_per_device"] == [16] * 4
    # int8 layer matrices are placed in shards as they are quantised: values and scales split by heads alike
    assert report["int8"]["4"] == report["int8"]["one"] and report["int8"]["devices"] == [0, 1, 2, 3]
    assert report["int8"]["q_heads_per_device"] == report["int8"]["q_scale_heads_per_device"] == [1, 1, 1, 1]


@pytest.mark.parametrize(
    "devices, match",
    [
        ([], "at least one device"),
        ("cpu", "list of jax devices"),
        ([0, 1], "list of jax devices"),
        (jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)), "one axis 'model'"),
    ],
)
def test_bad_devices_say_what_is_accepted(tiny_model_dir, devices, match):
    import paligemma

    with pytest.raises(ValueError, match=match):
        paligemma.load(str(tiny_model_dir), devices=devices)


def test_heads_and_mlp_split_the_rest_replicated():
    shapes = {
        "llm/layers/attn/q_einsum/w": (26, 8, 2304, 256),
        "llm/layers/attn/kv_einsum/w": (26, 2, 4, 2304, 256),
        "llm/layers/mlp/linear": (26, 9216, 2304),
        "llm/embedder/input_embedding": (257216, 2304),
        "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel": (27, 1152, 4304),
    }
    specs = {k: sharding.spec(s, sharding.SPLIT_AXIS.get(k), 4) for k, s in shapes.items()}
    assert specs["llm/layers/attn/q_einsum/w"] == PartitionSpec(None, "model")
    assert specs["llm/layers/attn/kv_einsum/w"] == PartitionSpec(None, None, "model")
    assert specs["llm/layers/mlp/linear"] == PartitionSpec(None, "model")
    assert specs["llm/embedder/input_embedding"] == PartitionSpec()
    assert specs["img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] == PartitionSpec(None, None, "model")
    # PaliGemma 1 has one kv head: with 8 devices it cannot be split, so it is replicated
    assert (
        sharding.spec((18, 2, 1, 2048, 256), sharding.SPLIT_AXIS["llm/layers/attn/kv_einsum/w"], 8) == PartitionSpec()
    )


def test_make_mesh_refuses_no_devices():
    with pytest.raises(ValueError, match="at least one device"):
        sharding.make_mesh([])


def test_npz_members_of_every_layout_load_alike(tiny_model_dir, tmp_path):
    """Stored (np.savez), compressed and Fortran-ordered .npz members give the same tensors."""
    arrays = dict(np.load(tiny_model_dir / "model.npz"))
    arrays["llm/layers/mlp/linear"] = np.asfortranarray(arrays["llm/layers/mlp/linear"])
    np.savez_compressed(tmp_path / "model.npz", **arrays)
    reference, _ = checkpoint.load_params(str(tiny_model_dir / "model.npz"), "float32")
    loaded, _ = checkpoint.load_params(str(tmp_path / "model.npz"), "float32")
    jax.tree.map(np.testing.assert_array_equal, loaded, reference)


def test_one_device_placement_adopts_the_host_buffer_without_a_copy():
    host = cpu_memory.aligned_empty((64, 32), np.float32)
    host[:] = np.arange(host.size).reshape(host.shape)
    placed = checkpoint.place(host, np.float32)
    assert placed.unsafe_buffer_pointer() == host.ctypes.data  # the same memory, not a copy
    cast = checkpoint.place(host, np.float16)  # a cast makes one aligned copy, then adopts it
    assert cast.dtype == np.float16 and cast.unsafe_buffer_pointer() % cpu_memory.ALIGNMENT == 0
    np.testing.assert_array_equal(np.asarray(cast), host.astype(np.float16))


def test_decoder_layers_are_served_as_views_of_the_stacked_weights(tiny_model):
    """Generation on CPU reads each layer's weights in place: per-layer arrays sharing the stacked memory."""
    from paligemma.cpu_memory import run_params

    stacked = tiny_model.params["llm"]["layers"]["mlp"]["linear"]  # [L, F, D]
    layers = run_params(tiny_model.params)["llm"]["layers"]
    assert isinstance(layers, list) and len(layers) == stacked.shape[0]
    for i, layer in enumerate(layers):
        view = layer["mlp"]["linear"]
        assert view.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + i * stacked.nbytes // stacked.shape[0]
        np.testing.assert_array_equal(np.asarray(view), np.asarray(stacked[i]))


def test_generating_with_donated_weights_is_refused(tiny_model_dir):
    import paligemma

    model = paligemma.load(str(tiny_model_dir))
    jax.tree.map(lambda x: x.delete(), model.params["llm"]["layers"])
    with pytest.raises(RuntimeError, match="deleted"):
        model.generate(np.zeros((20, 20, 3), np.uint8), "caption en", max_new_tokens=2)
