"""Loading copies Hugging Face tensors into our layouts with tiled transposes (paligemma/host_copy.py): the same
values as numpy's copy for every layout hf_keys.py applies, in any dtype pair, and the same loaded model."""

import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from paligemma import checkpoint, hf_keys, host_copy
from paligemma.out_major import read_transposed

HEADS = {hf_keys.VISION: 4, hf_keys.TEXT: 8, hf_keys.KV: 2}
# our key -> an HF tensor shape for its layout (at least MIN_TILED_ELEMENTS elements), and whether that layout
# holds a matrix transpose (the conv kernel's permutation does not: numpy copies it)
CASES = {
    "llm/layers/attn/q_einsum/w": ((8 * 64, 256), True),  # [N·H, D] -> [N, D, H]
    "llm/layers/attn/kv_einsum/w": ((2 * 64, 512), True),  # [K·H, D] -> [K, D, H]
    "llm/layers/attn/attn_vec_einsum/w": ((256, 8 * 64), True),  # [D, N·H] -> [N, H, D]
    "llm/layers/mlp/linear": ((256, 384), True),  # [D, F] -> [F, D]
    "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel": ((4 * 64, 288), True),
    "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel": ((288, 4 * 64), True),
    "img/embedding/kernel": ((128, 3, 14, 14), False),  # conv [O, I, kh, kw] -> [kh, kw, I, O]
}
LAYOUTS = {entry.ours: entry.layout for entry in hf_keys.entries(post_norms=True)}
rng = np.random.default_rng(0)


@pytest.mark.parametrize("key", CASES)
@pytest.mark.parametrize("dtypes", [("float32", "float32"), ("bfloat16", "float32"), ("float32", "bfloat16")])
def test_every_hf_layout_copies_to_numpys_values(key, dtypes):
    shape, transposed = CASES[key]
    source, target = (np.dtype(getattr(ml_dtypes, d, d)) for d in dtypes)
    view = LAYOUTS[key].to_ours(rng.standard_normal(shape).astype(source), HEADS)
    assert view.size >= host_copy.MIN_TILED_ELEMENTS
    assert (host_copy.transposed_matrices(view) is not None) == transposed  # the tiled path runs where it can
    out = np.empty(view.shape, target)
    host_copy.copy_into(out, view)
    np.testing.assert_array_equal(out, view.astype(target))


def test_contiguous_arrays_and_leading_axes_are_told_apart():
    a = rng.standard_normal((3, 40, 600)).astype(np.float32)
    assert host_copy.transposed_matrices(a) is None  # nothing to transpose
    memory, (batch, rows, cols) = host_copy.transposed_matrices(np.swapaxes(a, 1, 2))
    assert (batch, rows, cols) == (3, 600, 40) and np.shares_memory(memory, a)  # found, not copied
    _, sizes = host_copy.transposed_matrices(a.transpose(1, 2, 0))  # [40, 600, 3]: one [40·600, 3] matrix
    assert sizes == (1, 40 * 600, 3)
    out = np.empty((40, 600, 3), np.float32)
    host_copy.copy_into(out, a.transpose(1, 2, 0))
    np.testing.assert_array_equal(out, a.transpose(1, 2, 0))


def test_stacking_views_keeps_their_memory_order():
    """gate and up of one layer stack into [2, D, F] that still lies as HF's [2, F, D]: out_major.py copies it."""
    gate, up = (rng.standard_normal((384, 256)).astype(np.float32) for _ in range(2))  # HF [F, D]
    views = [hf_keys.TRANSPOSE.to_ours(w, HEADS) for w in (gate, up)]
    pair = host_copy.stacked(views)
    np.testing.assert_array_equal(pair, np.stack(views))
    assert np.swapaxes(pair, -1, -2).flags.c_contiguous
    assert host_copy.stacked([np.ones((4, 5))]).flags.c_contiguous  # contiguous values stack contiguously


def test_out_major_storage_is_the_same_from_either_memory_order():
    layers = [rng.standard_normal((2, 256, 384)).astype(np.float32) for _ in range(3)]  # ours [2, D, F]
    hf_order = [host_copy.stacked([np.ascontiguousarray(m.T).T for m in layer]) for layer in layers]
    expected = np.swapaxes(np.stack(layers), -1, -2)
    for given in (layers, hf_order):
        np.testing.assert_array_equal(read_transposed(iter(given), (3, 2, 256, 384), np.float32), expected)


def test_a_transformers_folder_loads_the_same_values_through_tiled_copies(tmp_path, tokenizer_path, monkeypatch):
    from hf_models import build_hf_model, save_hf_folder

    from paligemma.tokenizer import Tokenizer

    folder = save_hf_folder(build_hf_model(2, 28, Tokenizer(tokenizer_path).vocab_size), str(tmp_path), tokenizer_path)
    monkeypatch.setattr(host_copy, "MIN_TILED_ELEMENTS", 1 << 62)  # numpy's copies only
    plain, _ = checkpoint.load_params(folder)
    monkeypatch.setattr(host_copy, "MIN_TILED_ELEMENTS", 0)  # every transposed tensor tiled, however small
    tiled, _ = checkpoint.load_params(folder)
    a, b = (traverse_util.flatten_dict(p, sep="/") for p in (plain, tiled))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_a_float32_folder_loaded_in_bfloat16_never_holds_a_stacked_leaf_in_float32(
    tmp_path, tokenizer_path, monkeypatch
):
    """A GPU loads a published float32 folder in bfloat16: each per-layer HF tensor goes straight into the
    bfloat16 leaf (a 10B's gate/up pair would otherwise be 17 GB of float32 host memory at once)."""
    from hf_models import build_hf_model, save_hf_folder

    from paligemma.tokenizer import Tokenizer

    folder = save_hf_folder(build_hf_model(2, 28, Tokenizer(tokenizer_path).vocab_size), str(tmp_path), tokenizer_path)
    tensors, cfg = checkpoint.read_checkpoint(folder)
    allocated = []
    aligned_empty = checkpoint.aligned_empty
    monkeypatch.setattr(
        checkpoint,
        "aligned_empty",
        lambda shape, dtype: allocated.append((shape, np.dtype(dtype))) or aligned_empty(shape, dtype),
    )
    params = traverse_util.flatten_dict(checkpoint.materialize(tensors, cfg, ml_dtypes.bfloat16, folder), sep="/")
    gating = tensors["llm/layers/mlp/gating_einsum"].shape
    assert (gating, np.dtype(ml_dtypes.bfloat16)) in allocated and (gating, np.dtype(np.float32)) not in allocated
    reference, _ = checkpoint.load_params(folder)  # float32
    expected = np.asarray(reference["llm"]["layers"]["mlp"]["gating_einsum"]).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(params["llm/layers/mlp/gating_einsum"]), expected)
