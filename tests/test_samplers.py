"""Samplers: the nucleus is the set its definition names, found without sorting the vocabulary, and drawn tokens
follow the sampling distribution (samplers.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from paligemma import samplers
from paligemma.samplers import _nucleus

VOCAB = 257152  # the published vocabulary, where a sort per row cost more than a decode step


def reference_nucleus(logits: np.ndarray, p: float) -> tuple[np.ndarray, float]:
    """The definition, in float64 by sorting: (kept mask, how close the edge's probability-above came to P)."""
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    before = np.cumsum(probs[order]) - probs[order]  # probability of the tokens sorted above each one
    cutoff = logits[order][before < p].min()
    margin = np.abs(before - p).min()
    return logits >= cutoff, margin


@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 10.0, 30.0])
@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.9, 0.99])
def test_the_nucleus_is_the_smallest_top_set_reaching_p(scale, p):
    rng = np.random.default_rng(int(scale * 100) + int(p * 1000))
    logits = (rng.standard_normal((3, VOCAB)) * scale).astype(np.float32)
    kept = np.isfinite(np.asarray(jax.jit(_nucleus)(logits, np.float32(p))))
    compared = 0
    for row, got in zip(logits, kept):
        want, margin = reference_nucleus(row.astype(np.float64), p)
        if margin < 5e-8:  # an edge within float32 rounding of P: either answer is the nucleus
            continue
        compared += 1
        assert np.array_equal(got, want), (scale, p, got.sum(), want.sum())
        assert got[np.argmax(row)]  # the top token always
    assert compared >= 2


def test_ties_at_the_edge_are_kept_masked_ids_never_and_p_one_keeps_every_token():
    logits = np.full((1, 10), -np.inf, np.float32)
    logits[0, :6] = [5.0, 3.0, 3.0, 3.0, 1.0, 0.0]
    kept = np.isfinite(np.asarray(_nucleus(logits, np.float32(0.9))))[0]
    # softmax: 0.80, 0.06, 0.06, 0.06, ...: the first 3.0 is needed to reach 0.9, so every 3.0 is kept.
    assert kept.tolist() == [True, True, True, True, False, False, False, False, False, False]
    every = np.isfinite(np.asarray(_nucleus(logits, np.float32(1.0))))[0]
    assert every.tolist() == [True] * 6 + [False] * 4  # ids the tokenizer cannot decode stay out
    negative = np.asarray([[-7.0, -2.5, -9.0, -2.5001]], np.float32)  # all below zero: the key order holds
    assert np.isfinite(np.asarray(_nucleus(negative, np.float32(0.3))))[0].tolist() == [False, True, False, False]


def test_nucleus_sampling_draws_only_from_the_nucleus_in_proportion():
    logits = np.log(np.asarray([[0.5, 0.3, 0.15, 0.05]], np.float32))
    draw = jax.jit(lambda key: samplers.sample(logits, samplers.KINDS.index("nucleus"), np.float32(0.75), key))
    counts = np.bincount([int(draw(jax.random.key(seed))[0]) for seed in range(600)], minlength=4)
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 reaches 0.75: the rest is outside
    assert 0.55 < counts[0] / 600 < 0.70  # 0.5 / 0.8 = 0.625


@pytest.mark.parametrize("kind, value", [("temperature", 1.0), ("temperature", 0.5), ("nucleus", 1.0)])
def test_drawn_tokens_follow_the_sampling_distribution(kind, value):
    probs = np.asarray([0.4, 0.0, 0.25, 0.2, 0.1, 0.05], np.float32)
    logits = np.log(np.maximum(probs, 1e-30))[None]
    logits[0, 1] = -np.inf  # an id the tokenizer cannot decode
    draw = jax.jit(jax.vmap(lambda key: samplers.sample(logits, samplers.KINDS.index(kind), np.float32(value), key)))
    tokens = np.asarray(draw(jax.random.split(jax.random.key(0), 4000)))[:, 0]
    expected = np.exp(np.asarray(samplers.sampling_log_probs(logits, samplers.KINDS.index(kind), np.float32(value))))
    counts = np.bincount(tokens, minlength=6)
    assert counts[1] == 0
    assert np.abs(counts / 4000 - expected[0]).max() < 0.025  # binomial sd at 4000 draws: at most 0.008
