"""Beam search: exact against a brute-force search on a model with an 8-token vocabulary."""

import itertools

import jax
import numpy as np
import pytest

from paligemma import model as model_lib
from paligemma.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma.generate import Generator
from paligemma.params import init_params
from paligemma.samplers import SamplerError, parse_sampler

VOCAB, EOS, LENGTH = 8, 1, 3  # sequences of at most LENGTH tokens, EOS included
CFG = PaliGemmaConfig(
    VisionConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=14, image_size=28),
    TextConfig(
        vocab_size=VOCAB, width=32, depth=2, mlp_dim=48, num_heads=2, num_kv_heads=1, head_dim=16, query_scale=16**-0.5
    ),
)
PROMPTS = [[2, 5, 6], [2, 7], [2, 4, 4, 3]]
_forward = jax.jit(model_lib.forward, static_argnums=1)


@pytest.fixture(scope="module")
def setup():
    params = init_params(CFG, seed=1, std=1.0)  # spread enough that longer sequences win
    images = np.random.default_rng(0).random((len(PROMPTS), 28, 28, 3)).astype(np.float32) * 2 - 1
    best = [_brute_force(params, image, prompt) for image, prompt in zip(images, PROMPTS)]
    return params, images, Generator(params, CFG, valid_vocab=VOCAB, eos_id=EOS, pad_id=0), best


def _log_probs(params, image, prompt, sequences):
    """Sum of the model's log-probabilities of each sequence after `prompt`, in one batched forward pass."""
    width = len(prompt) + LENGTH - 1
    tokens = np.zeros((len(sequences), width), np.int32)
    for row, sequence in zip(tokens, sequences):
        row[: len(prompt) + len(sequence) - 1] = prompt + sequence[:-1]
    n = len(sequences)
    logits = np.asarray(
        _forward(params, CFG, np.repeat(image[None], n, 0), tokens, np.full(n, len(prompt)), np.full(n, width)),
        np.float64,
    )
    logits = logits[:, len(prompt) - 1 :]  # [n, LENGTH, V]: the distributions of the sequence's tokens
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return [float(sum(log_probs[k, i, t] for i, t in enumerate(seq))) for k, seq in enumerate(sequences)]


def _brute_force(params, image, prompt):
    """(score, sequence) of the best sequence ending in EOS within LENGTH tokens, over all of them."""
    others = [t for t in range(VOCAB) if t != EOS]
    candidates = [list(body) + [EOS] for n in range(LENGTH) for body in itertools.product(others, repeat=n)]
    return max(zip(_log_probs(params, image, prompt, candidates), candidates))


def _beam(generator, images, beams, scores=False):
    *_, last = generator.run(images, PROMPTS, LENGTH, parse_sampler(f"beam({beams})"), 0, scores=scores)
    return last


@pytest.mark.slow
def test_wide_beam_equals_brute_force(setup):
    params, images, generator, best = setup
    # 7 live sequences after one step and 49 after two: 49 beams keep every one, so the search is exact
    ids = _beam(generator, images, 49)[0]
    for row, (_, sequence) in zip(ids.tolist(), best):
        assert row[: row.index(EOS) + 1] == sequence
    assert all(len(sequence) > 1 for _, sequence in best)  # the search has to look past the first step


@pytest.mark.slow
def test_beam_scores_are_the_sequence_log_probabilities(setup):
    params, images, generator, best = setup
    ids, _, scores = _beam(generator, images, 49, scores=True)
    for row, logprobs, image, prompt in zip(ids.tolist(), scores["logprobs"], images, PROMPTS):
        n = row.index(EOS) + 1
        assert np.isclose(logprobs[:n].sum(), _log_probs(params, image, prompt, [row[:n]])[0], atol=1e-4)
        assert (scores["top_ids"][:, :n] < VOCAB).all()


@pytest.mark.slow
def test_narrow_beams_find_finished_sequences_no_better_than_the_best(setup):
    params, images, generator, best = setup
    for beams in (1, 2, 4):
        ids = _beam(generator, images, beams)[0]
        for row, image, prompt, (best_score, _) in zip(ids.tolist(), images, PROMPTS, best):
            assert EOS in row
            assert _log_probs(params, image, prompt, [row[: row.index(EOS) + 1]])[0] <= best_score + 1e-5


def test_parse_beam():
    assert parse_sampler("beam(4)").beams == 4 and str(parse_sampler(" beam( 4 ) ")) == "beam(4)"
    assert parse_sampler("greedy").beams == 0
    for bad in ["beam", "beam(0)", "beam(2.5)", "beam(65)"]:
        with pytest.raises(SamplerError):
            parse_sampler(bad)


@pytest.mark.slow
def test_model_generates_with_beam(tiny_model):
    image = np.zeros((20, 30, 3), np.uint8)
    text = tiny_model.generate(image, "caption en", max_new_tokens=8, sampler="beam(4)")
    assert isinstance(text, str)
    streamed = list(tiny_model.stream(image, "caption en", max_new_tokens=8, sampler="beam(4)"))
    assert streamed == [text]
    *_, result = tiny_model.run([image, image], ["caption en", "detect red circle"], 8, "beam(3)", return_scores=True)
    assert all(len(s.logprobs) == len(row) for s, row in zip(result.scores, result.token_ids))
