"""The decode loops update the loop-carried KV cache in place: no step copies a layer's cache.

A copy of the whole cache per layer and step costs more than the step's attention once the cache is long (a
1024-token engine row) or the batch is wide. XLA copies a loop-carried buffer that is still read after it was
updated, so each layer writes the fed token's keys and values first and attends to the written cache. Read from
the optimised HLO of the compiled loops. With one row (or one kv head) XLA copies either way, and the layer keeps
the form that copies least (see gemma._attention).
"""

import re

import numpy as np
import pytest

from paligemma.generate import MAX_PROMPT_TOKENS
from paligemma.slots import SlotEngine

IMAGE = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)


def _cache_copies(hlo: str, shape: tuple[int, ...]) -> list[str]:
    """The float arrays of `shape` in an optimised HLO module and the copy instructions among them."""
    dims = rf"f32\[{','.join(map(str, shape))}\]"
    arrays = [line.strip() for line in hlo.splitlines() if re.search(dims, line)]
    assert arrays, f"no {shape} array in the module: the test does not look where the cache is"
    return [line for line in arrays if re.search(rf"= {dims}\S* copy\(", line)]


def _generator_decode(model, rows: int) -> tuple[str, tuple[int, ...]]:
    """Runs `rows` greedy prompts: (the optimised HLO of the decode loop that served them, one cache array's shape)."""
    model.generate_batch([IMAGE] * rows, ["caption en"] * rows, max_new_tokens=16)
    (_, prompt, max_new, _, _), (_, decode) = next(
        (key, fns) for key, fns in model._generator._compiled.items() if key[0] == rows and not key[3]
    )
    text = model.config.text
    return decode.as_text(), (rows, text.num_kv_heads, model.config.num_image_tokens + prompt + max_new, text.head_dim)


@pytest.mark.parametrize("rows", [2, 4])
def test_the_generator_decode_loop_copies_no_cache(tiny_model, rows):
    assert _cache_copies(*_generator_decode(tiny_model, rows)) == []


def test_one_row_keeps_to_two_copies_of_each_cache_array(tiny_model):
    copies = _cache_copies(*_generator_decode(tiny_model, 1))
    assert len(copies) <= 2 * 2 * tiny_model.config.text.depth  # k and v of each layer, twice


def test_the_slot_engine_decode_loop_copies_no_cache(tiny_model):
    engine = SlotEngine(tiny_model, slots=4, chunk=4, max_new_tokens=16)
    engine.precompile()
    text = tiny_model.config.text
    cache_len = tiny_model.config.num_image_tokens + MAX_PROMPT_TOKENS + 16
    for rows in (2, 4):
        shape = (rows, text.num_kv_heads, cache_len, text.head_dim)
        assert _cache_copies(engine._advance_fn(False, rows).as_text(), shape) == []
