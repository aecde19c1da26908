"""Our JAX PaliGemma equals transformers' on the same random weights, in every checkpoint format."""

import os

import jax
import numpy as np
import pytest
import torch
from hf_models import NAMINGS, build_hf_model, hf_inputs, rename_keys, save_hf_folder

import paligemma
from paligemma import checkpoint
from paligemma import model as model_lib
from paligemma.preprocess import preprocess
from paligemma.tokenizer import Tokenizer

PROMPTS = ["detect red circle", "answer en how many shapes are there?"]
CASES = [(1, 28), (1, 56), (2, 28), (2, 56)]  # (PaliGemma generation, image size)


def _image(seed, size=(70, 50)):
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module", params=CASES, ids=[f"pg{g}-{s}px" for g, s in CASES])
def case(request, tokenizer_path, tmp_path_factory):
    generation, size = request.param
    tok = Tokenizer(tokenizer_path)
    hf = build_hf_model(generation, size, tok.vocab_size, seed=generation * 100 + size)
    root = tmp_path_factory.mktemp(f"pg{generation}_{size}")
    folder = save_hf_folder(hf, str(root / "saved"), tokenizer_path)
    params, _ = checkpoint.load_params(folder, "float32")  # the same weights as a big_vision .npz beside it
    checkpoint.save_npz(str(root / "model.npz"), params)
    os.symlink(os.path.join(folder, "tokenizer.model"), root / "tokenizer.model")
    return hf, folder, tok, root


def _hf_logits(hf, pixels, ids):
    with torch.no_grad():
        return hf(**hf_inputs(hf, pixels, ids)).logits[0, -len(ids) :].numpy()


def _our_logits(params, cfg, pixels, ids):
    tokens = np.asarray([ids], np.int32)
    n = np.asarray([len(ids)], np.int32)
    return np.asarray(model_lib.forward(params, cfg, pixels[None], tokens, n, n))[0]


@pytest.mark.slow
def test_prefill_logits_match_for_every_format(case):
    hf, folder, tok, root = case
    pixels = preprocess(_image(1), hf.config.vision_config.image_size)
    sources = {"saved": folder}
    for naming in NAMINGS:
        sources[naming] = rename_keys(folder, str(root / naming), naming)
    reference_params = None
    for name, source in sources.items():
        params, cfg = checkpoint.load_params(source, "float32")
        for prompt in PROMPTS:
            ids = tok.encode_prompt(prompt)
            ours, theirs = _our_logits(params, cfg, pixels, ids), _hf_logits(hf, pixels, ids)
            diff = np.abs(ours - theirs).max()
            print(f"{name} {prompt!r}: max |logit diff| = {diff:.2e}")
            assert diff < 1e-4, (name, prompt, diff)
        if reference_params is None:
            reference_params = params
        else:  # every format yields the very same tensors
            jax.tree.map(np.testing.assert_array_equal, params, reference_params)
    npz_params, _ = checkpoint.load_params(str(root / "model.npz"), "float32")
    jax.tree.map(np.testing.assert_array_equal, npz_params, reference_params)


def test_npz_written_with_published_key_names(case):
    hf, _, _, root = case
    keys = set(np.load(root / "model.npz", allow_pickle=False).keys())
    text = hf.config.text_config
    attention = (
        ["llm/layers/attn/qkv_einsum/w"]
        if text.num_attention_heads == text.num_key_value_heads
        else ["llm/layers/attn/q_einsum/w", "llm/layers/attn/kv_einsum/w"]
    )  # as big_vision reads them
    published = {
        *attention,
        "img/embedding/kernel",
        "img/pos_embedding",
        "img/head/kernel",
        "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel",
        "img/Transformer/encoderblock/MlpBlock_0/Dense_1/bias",
        "img/Transformer/encoder_norm/scale",
        "llm/embedder/input_embedding",
        "llm/final_norm/scale",
        "llm/layers/attn/attn_vec_einsum/w",
        "llm/layers/mlp/gating_einsum",
        "llm/layers/mlp/linear",
        "llm/layers/pre_attention_norm/scale",
        "llm/layers/pre_ffw_norm/scale",
    }
    assert published <= keys


def _hf_greedy(hf, pixels, ids, steps, tokenizer_size):
    inputs = hf_inputs(hf, pixels, ids)
    vocab = hf.config.text_config.vocab_size
    with torch.no_grad():
        out = hf.generate(
            **inputs,
            max_new_tokens=steps,
            do_sample=False,
            suppress_tokens=list(range(tokenizer_size, vocab)),
            eos_token_id=1,
            pad_token_id=0,
        )
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    return new[: new.index(1)] if 1 in new else new


@pytest.mark.slow
def test_greedy_tokens_match_single_and_batched(case):
    hf, _, tok, root = case
    model = paligemma.load(str(root / "model.npz"), dtype="float32")
    images = [_image(2), _image(3, (40, 90))]
    size = hf.config.vision_config.image_size
    expected = [
        _hf_greedy(hf, preprocess(im, size), tok.encode_prompt(p), 16, tok.vocab_size) for im, p in zip(images, PROMPTS)
    ]
    assert max(len(e) for e in expected) >= 8, "random weights should not stop almost at once"
    single = [list(model.run([im], [p], max_new_tokens=16))[-1].token_ids[0] for im, p in zip(images, PROMPTS)]
    batched = list(model.run(images, PROMPTS, max_new_tokens=16))[-1].token_ids
    assert single == expected
    assert batched == expected
    assert model.generate(images[0], PROMPTS[0], max_new_tokens=16) == tok.decode(expected[0])
