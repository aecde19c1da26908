"""Token scores from generation: the log-probabilities of the distribution each token was drawn from."""

import numpy as np
import pytest
import torch
from hf_models import build_hf_model, hf_inputs, save_hf_folder

import paligemma
from paligemma.preprocess import preprocess

PROMPT = "detect red circle"
IMAGE = (np.random.default_rng(2).random((70, 50, 3)) * 255).astype(np.uint8)
STEPS = 16


@pytest.fixture(scope="module")
def models(tokenizer_path, tmp_path_factory):
    """The same random PaliGemma 2 in transformers and here."""
    tok = paligemma.Tokenizer(tokenizer_path)
    hf = build_hf_model(2, 28, tok.vocab_size, seed=7)
    folder = save_hf_folder(hf, str(tmp_path_factory.mktemp("scores") / "hf"), tokenizer_path)
    return hf, paligemma.load(folder, dtype="float32")


def _hf_log_softmax(hf, ours, tokens):
    """log_softmax over the tokenizer's ids of transformers' logits for each of `tokens`, fed the ones before."""
    ids = ours.encode_prompt(PROMPT)
    inputs = hf_inputs(hf, preprocess(IMAGE, hf.config.vision_config.image_size), ids + tokens[:-1])
    inputs["token_type_ids"][0, len(inputs["token_type_ids"][0]) - len(tokens) + 1 :] = 1  # generated: causal
    with torch.no_grad():
        logits = hf(**inputs).logits[0, -len(tokens) :, : ours.tokenizer.vocab_size].double()
    return logits


def _run(model, sampler="greedy", seed=0, scores=True):
    return list(model.run([IMAGE], [PROMPT], STEPS, sampler, seed, return_scores=scores))[-1]


def test_greedy_logprobs_equal_transformers_log_softmax(models):
    hf, ours = models
    result = _run(ours)
    scores = result.scores[0]
    tokens = result.token_ids[0]
    assert len(tokens) >= 8 and scores.token_ids == tokens
    expected = torch.log_softmax(_hf_log_softmax(hf, ours, tokens), -1).numpy()
    assert scores.logprobs.shape == (len(tokens),)
    assert scores.top_ids.shape == scores.top_logprobs.shape == (len(tokens), 5)
    np.testing.assert_allclose(scores.logprobs, expected[np.arange(len(tokens)), tokens], atol=1e-4)
    order = np.argsort(-expected, axis=-1)[:, :5]
    np.testing.assert_array_equal(scores.top_ids, order)
    np.testing.assert_allclose(scores.top_logprobs, np.take_along_axis(expected, order, -1), atol=1e-4)
    assert (scores.top_ids[:, 0] == tokens).all()  # greedy takes the best
    assert (np.diff(scores.top_logprobs, axis=-1) <= 0).all()


def test_sampled_logprobs_are_those_of_the_sampling_distribution(models):
    hf, ours = models
    for sampler, seed in [("temperature(0.7)", 3), ("nucleus(0.6)", 5)]:
        result = _run(ours, sampler, seed)
        tokens, scores = result.token_ids[0], result.scores[0]
        logits = _hf_log_softmax(hf, ours, tokens)
        if sampler.startswith("temperature"):
            expected = torch.log_softmax(logits / 0.7, -1).numpy()
        else:  # renormalised over the smallest top set reaching 0.6
            probs = torch.softmax(logits, -1).numpy()
            ranked = np.sort(probs, -1)[:, ::-1]
            before = np.cumsum(ranked, -1) - ranked
            floor = np.where(before < 0.6, ranked, np.inf).min(-1, keepdims=True)
            kept = np.where(probs >= floor, probs, 0.0)
            with np.errstate(divide="ignore"):
                expected = np.log(kept / kept.sum(-1, keepdims=True))
            assert (np.isinf(scores.top_logprobs) == np.isinf(np.take_along_axis(expected, scores.top_ids, -1))).all()
        np.testing.assert_allclose(scores.logprobs, expected[np.arange(len(tokens)), tokens], atol=1e-4)
        finite = np.isfinite(scores.top_logprobs)
        recorded = np.take_along_axis(expected, scores.top_ids, -1)
        np.testing.assert_allclose(scores.top_logprobs[finite], recorded[finite], atol=1e-4)


@pytest.mark.parametrize("sampler", ["greedy", "temperature(1.0)", "nucleus(0.9)"])
def test_tokens_identical_with_and_without_scores(models, sampler):
    _, ours = models
    for seed in (0, 1):
        plain, scored = _run(ours, sampler, seed, scores=False), _run(ours, sampler, seed)
        assert plain.scores is None
        assert scored.token_ids == plain.token_ids and scored.texts == plain.texts


def test_scores_are_cut_like_the_tokens_in_a_batch(models):
    _, ours = models
    result = list(ours.run([IMAGE, IMAGE[::-1]], [PROMPT, "caption en"], STEPS, return_scores=True))[-1]
    for row, scores in zip(result.token_ids, result.scores):
        assert scores.token_ids == row and len(scores.logprobs) == len(row) == len(scores.top_ids)
        assert (scores.logprobs <= 0).all()


def test_streamed_scores_grow_with_the_tokens(models):
    _, ours = models
    steps = list(ours.run([IMAGE], [PROMPT], STEPS, chunk=4, return_scores=True))
    assert len(steps) >= 2
    final = steps[-1].scores[0]
    for step in steps:
        n = len(step.token_ids[0])
        np.testing.assert_array_equal(step.scores[0].logprobs, final.logprobs[:n])
