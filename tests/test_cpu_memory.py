"""CPU memory: aligned host buffers, per-layer views that keep their stacked weights alive, the liveness check."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma import cpu_memory


def _stacked(layers=4, rows=64, cols=256, offset=1.0):
    """A fresh [L, rows, cols] device array, 64 KiB per layer, no other reference to it."""
    return jnp.arange(layers * rows * cols, dtype=jnp.float32).reshape(layers, rows, cols) + offset


@pytest.mark.parametrize("shape, dtype", [((3, 5), np.float32), ((7,), np.int8), ((2, 3, 5), np.float16)])
def test_aligned_empty_starts_on_the_boundary(shape, dtype):
    out = cpu_memory.aligned_empty(shape, dtype)
    assert out.shape == shape and out.dtype == dtype and out.flags.c_contiguous and out.flags.writeable
    assert out.ctypes.data % cpu_memory.ALIGNMENT == 0


def test_views_share_the_stacked_memory():
    stacked = _stacked()
    views = cpu_memory.layer_views(stacked)
    assert len(views) == stacked.shape[0]
    for i, view in enumerate(views):
        assert view.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + i * stacked.nbytes // stacked.shape[0]
        np.testing.assert_array_equal(np.asarray(view), np.asarray(stacked[i]))


def test_views_keep_the_stacked_array_alive_on_their_own():
    stacked = _stacked()
    expected = np.array(stacked)
    alive = weakref.ref(stacked)
    views = cpu_memory.layer_views(stacked)
    del stacked
    gc.collect()
    assert alive() is not None
    # memory freed now would be handed out again and overwritten here
    overwrite = [jnp.full(expected.shape, -7.0) for _ in range(8)] + [np.full(expected.shape, -5.0) for _ in range(8)]
    for i, view in enumerate(views):
        np.testing.assert_array_equal(np.asarray(view), expected[i])
        np.testing.assert_array_equal(np.asarray(view @ jnp.ones(expected.shape[-1])), expected[i].sum(-1))
    del views, view, overwrite
    gc.collect()
    assert alive() is None  # and the last view dropped frees it


def test_run_params_outlive_the_params_they_came_from():
    params = {
        "llm": {
            "layers": {"mlp": {"linear": _stacked()}, "norm": {"scale": _stacked(cols=16, offset=3.0)}},
            "final": jnp.ones(3),
        }
    }
    expected = jax.tree.map(np.array, params)
    layers = cpu_memory.run_params(params)["llm"]["layers"]
    del params
    gc.collect()
    [jnp.full((4, 64, 256), -1.0) for _ in range(8)]
    assert isinstance(layers, list) and len(layers) == 4
    for i, layer in enumerate(layers):
        np.testing.assert_array_equal(np.asarray(layer["mlp"]["linear"]), expected["llm"]["layers"]["mlp"]["linear"][i])
        np.testing.assert_array_equal(np.asarray(layer["norm"]["scale"]), expected["llm"]["layers"]["norm"]["scale"][i])


@pytest.mark.parametrize("leaf", [jnp.ones((4, 64, 256), jnp.bfloat16), jnp.ones((4, 3), jnp.float32), jnp.ones(64)])
def test_params_that_cannot_be_viewed_are_served_as_they_are(leaf):
    """bfloat16 has no DLPack code; a 12-byte row would break the alignment; a 1-D leaf has no layers."""
    params = {"llm": {"layers": {"a": _stacked(), "b": leaf}}}
    assert cpu_memory.run_params(params) is params


def test_deleted_or_donated_weights_are_refused():
    live = {"llm": {"layers": {"w": _stacked()}}}
    cpu_memory.check_alive(live)
    deleted = {"llm": {"layers": {"w": _stacked()}}}
    deleted["llm"]["layers"]["w"].delete()
    with pytest.raises(RuntimeError, match="deleted"):
        cpu_memory.check_alive(deleted)
    donated = {"llm": {"layers": {"w": _stacked()}}}
    jax.jit(lambda w: w + 1, donate_argnums=0)(donated["llm"]["layers"]["w"])
    with pytest.raises(RuntimeError, match="deleted"):
        cpu_memory.check_alive(donated)
