"""Generation: samplers, streaming, batching, buckets and how many compilations they cost."""

import numpy as np
import pytest

from paligemma import MAX_BATCH
from paligemma.samplers import Sampler, SamplerError, parse_sampler

IMAGE = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)


def test_greedy_is_deterministic(tiny_model):
    a = tiny_model.generate(IMAGE, "caption en", max_new_tokens=12)
    assert a == tiny_model.generate(IMAGE, "caption en", max_new_tokens=12)
    assert len(a) > 0


@pytest.mark.parametrize("sampler", ["temperature(1.0)", "nucleus(0.9)"])
def test_sampling_is_reproducible_per_seed_and_varies_across_seeds(tiny_model, sampler):
    runs = {seed: tiny_model.generate(IMAGE, "caption en", 12, sampler, seed) for seed in range(4)}
    assert runs[0] == tiny_model.generate(IMAGE, "caption en", 12, sampler, 0)
    assert len(set(runs.values())) > 1


def test_tiny_nucleus_equals_greedy(tiny_model):
    greedy = tiny_model.generate(IMAGE, "detect red circle", 12)
    assert tiny_model.generate(IMAGE, "detect red circle", 12, "nucleus(1e-6)", seed=3) == greedy


def test_stream_grows_to_the_generated_text(tiny_model):
    pieces = list(tiny_model.stream(IMAGE, "caption en", max_new_tokens=20, chunk_tokens=4))
    final = tiny_model.generate(IMAGE, "caption en", max_new_tokens=20)
    assert pieces[-1] == final
    assert len(pieces) >= 2
    assert all(b.startswith(a) or len(a) == 0 for a, b in zip(pieces, pieces[1:]))


def test_max_new_tokens_is_respected(tiny_model):
    result = list(tiny_model.run([IMAGE], ["caption en"], max_new_tokens=5))[-1]
    assert len(result.token_ids[0]) <= 5
    assert result.timing.new_tokens <= 5


def test_prompts_in_one_bucket_reuse_compiled_code(tiny_model_dir):
    import paligemma

    model = paligemma.load(str(tiny_model_dir))
    assert model.compile_count == 0
    model.generate(IMAGE, "caption en", max_new_tokens=10)
    assert model.compile_count == 2  # one prefill + one decode loop
    prompts = ["detect red circle", "yes", "segment blue", ""]
    assert len({len(model.encode_prompt(p)) for p in prompts}) == len(prompts)  # all lengths differ
    assert max(len(model.encode_prompt(p)) for p in prompts) <= 16  # and share the first bucket
    for prompt in prompts:
        model.generate(IMAGE, prompt, max_new_tokens=10)
    model.generate(IMAGE, "caption en", max_new_tokens=12, sampler="temperature(0.5)", seed=4)
    list(model.stream(IMAGE, "caption en", max_new_tokens=9, chunk_tokens=3))
    assert model.compile_count == 2  # other lengths, samplers, budgets and chunking: same bucket
    model.generate_batch([IMAGE, IMAGE], ["caption en", "detect red circle"], max_new_tokens=10)
    assert model.compile_count == 4  # batch of 2 is a new bucket


def test_batch_rows_equal_single_requests(tiny_model):
    images = [IMAGE, IMAGE[::-1].copy(), IMAGE[:, ::-1].copy()]
    prompts = ["caption en", "detect red circle", "answer en is there a blue square?"]
    batched = tiny_model.generate_batch(images, prompts, max_new_tokens=10)
    assert batched == [tiny_model.generate(i, p, max_new_tokens=10) for i, p in zip(images, prompts)]


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("greedy", Sampler()),
        (" nucleus(0.3) ", Sampler("nucleus", 0.3)),
        ("temperature(0.5)", Sampler("temperature", 0.5)),
        ("nucleus(1)", Sampler("nucleus", 1.0)),
    ],
)
def test_sampler_specs_parse(spec, expected):
    assert parse_sampler(spec) == expected


@pytest.mark.parametrize(
    "spec", ["beam", "beam(0)", "temperature", "temperature(0)", "nucleus(1.5)", "greedy(2)", "", "nucleus(-1)"]
)
def test_bad_sampler_specs_say_what_is_accepted(spec):
    with pytest.raises(SamplerError, match="accepted"):
        parse_sampler(spec)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=5000), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(sampler="beam"), "sampler"),
        (dict(seed="x"), "seed"),
    ],
)
def test_bad_options_raise_value_error(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.generate(IMAGE, "caption en", **kwargs)


def test_prompt_over_budget_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="at most"):
        tiny_model.generate(IMAGE, "red " * 400)


def test_more_images_than_one_call_runs_is_a_clear_error(tiny_model):
    rows = MAX_BATCH + 1
    with pytest.raises(ValueError, match=f"at most {MAX_BATCH} images per call, got {rows}"):
        tiny_model.generate_batch([IMAGE] * rows, ["caption en"] * rows)


def test_empty_prompt_generates(tiny_model):
    assert isinstance(tiny_model.generate(IMAGE, "", max_new_tokens=4), str)


def test_never_emits_ids_past_the_tokenizer(tiny_model_dir, tokenizer_path, tmp_path):
    """HF pads the embedding table past the tokenizer; those rows must never be sampled."""
    import shutil

    import jax.numpy as jnp

    import paligemma
    from paligemma.checkpoint import load_params, save_npz

    params, _ = load_params(str(tiny_model_dir / "model.npz"))
    table = params["llm"]["embedder"]["input_embedding"]
    padded = jnp.concatenate([table, jnp.full((64, table.shape[1]), 5.0, table.dtype)])  # rows that would win
    params["llm"]["embedder"]["input_embedding"] = padded
    save_npz(str(tmp_path / "model.npz"), params)
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    model = paligemma.load(str(tmp_path))
    for sampler in ["greedy", "temperature(2.0)"]:
        ids = list(model.run([IMAGE], ["caption en"], max_new_tokens=16, sampler=sampler))[-1].token_ids[0]
        assert ids and max(ids) < model.tokenizer.vocab_size


def test_warmup_compiles_the_variant_its_runs_will_use(tiny_model_dir):
    import paligemma

    model = paligemma.load(str(tiny_model_dir))
    model.warmup(max_new_tokens=10, return_scores=True)
    warmed = model.compile_count
    *_, result = model.run([IMAGE], ["detect red circle"], 10, return_scores=True)
    assert result.scores is not None and model.compile_count == warmed  # a scored run of that bucket: nothing new
    model.generate(IMAGE, "detect red circle", max_new_tokens=10)
    assert model.compile_count > warmed  # the unscored variant is compiled on its own


def test_warmup_stops_at_the_first_token(tiny_model_dir, monkeypatch):
    """Both executables of the bucket exist before the first token: decoding on would only cost time."""
    import paligemma
    from paligemma.generate import Generator

    consumed, run = [], Generator.run

    def counted(self, *args, **kwargs):
        for result in run(self, *args, **kwargs):
            consumed.append(result)
            yield result

    monkeypatch.setattr(Generator, "run", counted)
    model = paligemma.load(str(tiny_model_dir))
    model.warmup(max_new_tokens=64)
    assert len(consumed) == 1 and model.compile_count == 2
    assert len(list(model.run([IMAGE], ["caption en"], 64, chunk=8))) > 1 and model.compile_count == 2
