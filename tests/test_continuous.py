"""Continuous batching: requests join and leave a running decode (paligemma.slots) and the app's scheduler over it
(playground.continuous). Every request gets the tokens `Model.run` gives it alone: greedy, sampled with its seed,
and its token scores; slots are reused and freed on cancel; a prompt of another length in the same bucket
compiles nothing; the model split over 4 simulated devices gives the same tokens.

All engines here share one shape (3 slots, chunks of 4, 16 tokens at most) over the tiny random model, so each
executable compiles once per session (the scheduler's engines hit the persistent compile cache).
"""

import contextlib
import functools
import json
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import paligemma
from paligemma import memory_fit
from paligemma.generate import MAX_PROMPT_TOKENS, PROMPT_BUCKETS, bucket
from paligemma.preprocess import preprocess
from paligemma.slots import SLOT_MEMORY_SHARE, SlotEngine, default_slots
from playground.continuous import Scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(slots=3, chunk=4, max_new_tokens=16)
SCHEDULER = dict(slots=3, chunk=4, pools=(16,))
SHORT, LONG = "caption en", "answer en how many shapes are there? is there a green square?"
_rng = np.random.default_rng(0)
IMAGES = [(_rng.random((30, 40, 3)) * 255).astype(np.uint8) for _ in range(4)]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return SlotEngine(tiny_model, **SHAPE)


def _alone(model, image, prompt, n, sampler="greedy", seed=0):
    """What Model.run gives the request by itself (the reference; always its scored variant, which draws the same
    tokens, so that the references compile one variant per prompt bucket)."""
    return list(model.run([IMAGES[image]], [prompt], n, sampler, seed, return_scores=True))[-1]


def _admit(engine, model, image, prompt, n, sampler="greedy", seed=0, scores=False):
    pixels = preprocess(IMAGES[image], model.config.image_size)
    return engine.admit(pixels, model.encode_prompt(prompt), n, paligemma.parse_sampler(sampler), seed, scores)


def _finish(engine, model, slots):
    """Advances until the given slots are done; their token ids (cut at EOS), each slot then released."""
    while any(slot in engine.live for slot in slots):
        engine.advance()
    tokens = [model.tokenizer.until_eos(engine.read(slot).token_ids) for slot in slots]
    for slot in slots:
        engine.release(slot)
    return tokens


def test_a_request_joining_a_running_decode_gets_its_solo_tokens_and_a_finished_slot_is_reused(engine, tiny_model):
    assert bucket(len(tiny_model.encode_prompt(LONG)), PROMPT_BUCKETS) > bucket(
        len(tiny_model.encode_prompt(SHORT)), PROMPT_BUCKETS
    )
    first = _admit(engine, tiny_model, 0, SHORT, 16)
    engine.advance()
    assert len(engine.read(first).token_ids) == 5  # the first token from prefill, then one chunk
    joining = _admit(engine, tiny_model, 1, LONG, 6)  # another prompt bucket, a shorter limit
    while joining in engine.live:
        engine.advance()
    assert first in engine.live, "the first request is still running when the one that joined leaves"
    [joined] = _finish(engine, tiny_model, [joining])
    assert joined == _alone(tiny_model, 1, LONG, 6).token_ids[0]
    again = _admit(engine, tiny_model, 2, SHORT, 9)
    assert again == joining, "the freed slot takes the next request"
    done = _finish(engine, tiny_model, [first, again])
    expected = [_alone(tiny_model, 0, SHORT, 16).token_ids[0], _alone(tiny_model, 2, SHORT, 9).token_ids[0]]
    assert done == expected
    assert len(expected[0]) == 16, "random weights should not stop at EOS early"
    assert engine.free == [0, 1, 2]


def test_cancelling_mid_decode_frees_the_slot_and_the_others_go_on(engine, tiny_model):
    cancelled = _admit(engine, tiny_model, 0, SHORT, 16)
    kept = _admit(engine, tiny_model, 3, SHORT, 12)
    engine.advance()
    engine.release(cancelled)
    assert cancelled in engine.free and engine.live == [kept]
    assert _finish(engine, tiny_model, [kept]) == [_alone(tiny_model, 3, SHORT, 12).token_ids[0]]


def test_mixed_samplers_seeds_and_limits_share_a_decode_each_as_alone(engine, tiny_model):
    requests = [(0, SHORT, 16, "greedy", 0, False), (1, LONG, 12, "temperature(0.8)", 1, True)]
    requests += [(2, SHORT, 7, "nucleus(0.9)", 2, False)]
    slots = [_admit(engine, tiny_model, *request) for request in requests]
    got = _finish(engine, tiny_model, slots)
    for tokens, request in zip(got, requests):
        assert tokens == _alone(tiny_model, *request[:5]).token_ids[0], request[3]
    assert [len(t) for t in got] == [16, 12, 7]
    # scores, and a seed's draws independent of what shares the decode: the sampled one again, with others
    scored = _admit(engine, tiny_model, *requests[1])
    other = _admit(engine, tiny_model, 3, LONG, 16, "temperature(0.8)", 9)
    while scored in engine.live:
        engine.advance()
    view = engine.read(scored)
    reference = _alone(tiny_model, *requests[1][:5])
    assert tiny_model.tokenizer.until_eos(view.token_ids) == got[1]
    n = len(got[1])
    for name in paligemma.generate.SCORE_KEYS:
        np.testing.assert_allclose(view.scores[name][:n], getattr(reference.scores[0], name), atol=1e-5)
    for slot in (scored, other):
        engine.release(slot)


def test_a_new_prompt_length_within_a_bucket_compiles_nothing(engine, tiny_model):
    assert bucket(len(tiny_model.encode_prompt("detect red circle")), PROMPT_BUCKETS) == bucket(
        len(tiny_model.encode_prompt(SHORT)), PROMPT_BUCKETS
    )
    assert len(tiny_model.encode_prompt("detect red circle")) != len(tiny_model.encode_prompt(SHORT))
    engine.precompile()  # compiled by now (earlier tests), or here
    compiles, events = engine.compile_count, []
    _finish(engine, tiny_model, [_admit(engine, tiny_model, 0, SHORT, 6)])
    assert engine.compile_count == compiles, "precompile left nothing for a request of its bucket"

    def listen(name, _duration, **_):
        events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        _finish(engine, tiny_model, [_admit(engine, tiny_model, 1, "detect red circle", 6, seed=5)])
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert engine.compile_count == compiles
    assert not [name for name in events if "compile" in name], events


def test_a_shorter_chunk_runs_the_same_executable_and_gives_the_same_tokens(engine, tiny_model):
    engine.precompile()
    slot = _admit(engine, tiny_model, 0, SHORT, 16)
    compiles = engine.compile_count
    for steps, tokens in ((1, 2), (2, 4), (4, 8)):  # the prefill's token, then each chunk's
        engine.advance(steps)
        assert len(engine.read(slot).token_ids) == tokens
    assert engine.compile_count == compiles
    for bad in (0, SHAPE["chunk"] + 1, 2.0):
        with pytest.raises(ValueError, match="steps"):
            engine.advance(bad)
    assert _finish(engine, tiny_model, [slot]) == [_alone(tiny_model, 0, SHORT, 16).token_ids[0]]


def test_default_slots_are_as_many_rows_of_cache_as_a_share_of_the_free_memory_holds(tiny_model, monkeypatch):
    dtype = np.dtype(tiny_model.params["llm"]["embedder"]["input_embedding"].dtype).name
    cache_len = tiny_model.config.num_image_tokens + MAX_PROMPT_TOKENS + 16
    slot_bytes = memory_fit.kv_cache_bytes(tiny_model.config, dtype, 1, cache_len)
    cases = ((2.5 * slot_bytes / SLOT_MEMORY_SHARE, 2), (1, 1), (1e15, default_slots("cpu")), (0, default_slots("cpu")))
    for free, slots in cases:  # free 0: unknown
        monkeypatch.setattr(memory_fit, "free_bytes", lambda devices=None, free=free: (int(free), "test"))
        assert SlotEngine(tiny_model, chunk=4, max_new_tokens=16).slots == slots, free
    assert SlotEngine(tiny_model, slots=3, chunk=4, max_new_tokens=16).slots == 3, "an explicit count is kept"


# ---------------------------------------------------------------------- the scheduler


def _text(updates) -> str:
    with contextlib.closing(updates):
        return [u for u in updates if u is not None][-1].text


def test_scheduler_streams_each_request_its_solo_text_with_more_requests_than_slots(tiny_model):
    scheduler = Scheduler(**SCHEDULER)
    requests = [(0, SHORT, 16, "greedy"), (1, LONG, 5, "greedy"), (2, "ocr", 9, "nucleus(0.9)")]
    requests += [(3, "detect red circle", 12, "temperature(0.8)")]  # a fourth waits for a free slot
    streams = [scheduler.submit(tiny_model, IMAGES[i], p, n, s, seed=3) for i, p, n, s in requests]
    texts = [None] * len(streams)

    def read(i):
        texts[i] = _text(streams[i])

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(60)
    assert texts == [_alone(tiny_model, i, p, n, s, seed=3).texts[0] for i, p, n, s in requests]
    assert scheduler.engine(tiny_model).free == [0, 1, 2]


def test_auto_on_cpu_runs_small_models_continuously_and_large_ones_through_the_batcher(tiny_model, monkeypatch):
    from playground.batching import Batcher
    from playground.requests import BySize, make_scheduler

    auto = make_scheduler("auto")
    assert isinstance(auto, BySize) and isinstance(auto.continuous, Scheduler) and isinstance(auto.batch, Batcher)
    assert auto.of(tiny_model) is auto.continuous
    warmed = []
    monkeypatch.setattr(auto.continuous, "warmup", lambda model, *settings: warmed.append(("slots", settings)))
    monkeypatch.setattr(tiny_model, "warmup", lambda **settings: warmed.append(("Model.run", settings)))
    auto.warmup(tiny_model, True, 64, later=True)
    monkeypatch.setattr(paligemma, "large_on_cpu", lambda config: True)  # as a 3B
    assert auto.of(tiny_model) is auto.batch
    auto.warmup(tiny_model, True, 64, later=True)
    # each through what its requests run: slot engines, or the batcher's Model.run loop
    assert warmed == [("slots", (True, 64, True)), ("Model.run", {"max_new_tokens": 64, "return_scores": True})]
    greedy = paligemma.parse_sampler("greedy")
    assert _text(auto.submit(tiny_model, IMAGES[0], SHORT, 8, greedy, 0)) == _alone(tiny_model, 0, SHORT, 8).texts[0]


def test_warming_up_for_a_token_limit_compiles_only_the_pool_that_limit_takes(tiny_model, monkeypatch):
    compiled = []
    monkeypatch.setattr(SlotEngine, "precompile", lambda engine, scores, rows: compiled.append(engine.max_new_tokens))
    scheduler = Scheduler(slots=3, chunk=4, pools=(16, 64, 1024))
    scheduler.warmup(tiny_model, max_new_tokens=20)
    assert compiled == [64]
    scheduler.warmup(tiny_model)
    assert compiled == [64, 16, 64, 1024]


def test_warming_up_later_compiles_one_row_count_now_and_the_others_while_the_worker_is_idle(tiny_model):
    """A model is ready once one request can run; the row counts only overlapping requests use compile in the
    worker's idle time, and a request arriving meanwhile is served as usual. Every compile runs on the worker,
    between its chunks, never beside a request it is serving."""
    scheduler = Scheduler(**SCHEDULER)
    engine = scheduler.engine(tiny_model)
    calls, compile_rows = [], engine.precompile

    def precompile(prompt_buckets=PROMPT_BUCKETS[:1], scores=False, rows=None):
        calls.append((threading.current_thread().name, rows))
        compile_rows(prompt_buckets, scores, rows)

    engine.precompile = precompile
    scheduler.warmup(tiny_model, later=True)
    assert calls[0] == ("continuous-batching", (1,))  # done when warmup returns
    text = _text(scheduler.submit(tiny_model, IMAGES[0], SHORT, 8, "greedy", 0))
    assert text == _alone(tiny_model, 0, SHORT, 8).texts[0]
    for _ in range(600):
        if engine.compile_count == 1 + len(engine.row_counts):  # the admission and every decode loop
            break
        time.sleep(0.1)
    assert calls[1:] == [("continuous-batching", (rows,)) for rows in engine.row_counts[1:]]
    assert engine.compile_count == 1 + len(engine.row_counts)


def test_scheduler_shortens_chunks_only_while_requests_share_them_and_streams_every_chunk_of_tokens(
    tiny_model, monkeypatch
):
    for bad in (0, 1.5, "2"):
        with pytest.raises(ValueError, match="shared_chunk must be a whole number"):
            Scheduler(**SCHEDULER, shared_chunk=bad)
    scheduler = Scheduler(**SCHEDULER, shared_chunk=1)
    engine = scheduler.engine(tiny_model)
    steps, advance = [], engine.advance
    monkeypatch.setattr(engine, "advance", lambda n=None: (steps.append(n), advance(n)))

    def updates(stream) -> list:
        with contextlib.closing(stream):
            return [u for u in stream if u is not None]

    alone = updates(scheduler.submit(tiny_model, IMAGES[0], SHORT, 16))
    assert set(steps) == {SCHEDULER["chunk"]}, "a request alone decodes whole chunks"
    assert [u.timing["new_tokens"] for u in alone] == [1, 5, 9, 13, 16]
    steps.clear()
    requests = [(0, SHORT, 16), (1, LONG, 12)]
    streams = [scheduler.submit(tiny_model, IMAGES[i], p, n) for i, p, n in requests]
    got = [None] * len(streams)
    readers = [threading.Thread(target=lambda i=i: got.__setitem__(i, updates(streams[i]))) for i in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(60)
    assert 1 in steps, "chunks of shared_chunk steps while both decode"
    for stream, (i, p, n) in zip(got, requests):
        assert stream[-1].text == _alone(tiny_model, i, p, n).texts[0]
        counts = [u.timing["new_tokens"] for u in stream]
        assert all(b - a >= SCHEDULER["chunk"] for a, b in zip(counts, counts[1:-1])), counts  # not every step


def test_scheduler_frees_a_cancelled_request_slot_and_raises_a_request_own_error_to_it_only(tiny_model, monkeypatch):
    scheduler = Scheduler(**SCHEDULER)
    engine = scheduler.engine(tiny_model)
    with pytest.raises(ValueError, match="max_new_tokens"):
        scheduler.submit(tiny_model, IMAGES[0], SHORT, 17)
    with pytest.raises(paligemma.SamplerError):
        scheduler.submit(tiny_model, IMAGES[0], SHORT, 8, "hot")
    admit = engine.admit

    def refuse_ocr(pixels, prompt_ids, *args):
        if prompt_ids == tiny_model.encode_prompt("ocr"):
            raise RuntimeError("out of memory for this one")
        return admit(pixels, prompt_ids, *args)

    monkeypatch.setattr(engine, "admit", refuse_ocr)
    cancelled = scheduler.submit(tiny_model, IMAGES[0], SHORT, 16)
    failing = scheduler.submit(tiny_model, IMAGES[1], "ocr", 8)
    fine = scheduler.submit(tiny_model, IMAGES[2], SHORT, 10)
    assert next(cancelled).tokens >= 1
    cancelled.close()
    with pytest.raises(RuntimeError, match="this one"):
        _text(failing)
    assert _text(fine) == _alone(tiny_model, 2, SHORT, 10).texts[0]
    deadline = time.monotonic() + 10
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.free == [0, 1, 2]


# ---------------------------------------------------------------------- several devices

_SPLIT = """
import json, sys
import numpy as np
import paligemma
from paligemma import sharding
from paligemma.preprocess import preprocess
from paligemma.slots import SlotEngine

rng = np.random.default_rng(0)
images = [(rng.random((30, 40, 3)) * 255).astype(np.uint8) for _ in range(2)]
prompts = ["caption en", "answer en how many shapes are there?"]
one = paligemma.load(sys.argv[1])
alone = [list(one.run([im], [p], max_new_tokens=12))[-1].token_ids[0] for im, p in zip(images, prompts)]
split = paligemma.load(sys.argv[1], devices=sharding.make_mesh())
engine = SlotEngine(split, slots=3, chunk=4, max_new_tokens=16)

def admit(i):
    pixels = preprocess(images[i], split.config.image_size)
    return engine.admit(pixels, split.encode_prompt(prompts[i]), 12, paligemma.parse_sampler("greedy"), 0)

slots = [admit(0)]
engine.advance()
slots.append(admit(1))  # joins the running decode
while engine.live:
    engine.advance()
got = [split.tokenizer.until_eos(engine.read(s).token_ids) for s in slots]
print(json.dumps({"device": split.device, "alone": alone, "slots": got}))
"""


@pytest.mark.slow
def test_split_over_4_devices_slots_give_the_one_device_tokens(tiny_model_dir):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", _SPLIT, str(tiny_model_dir)], env=env, check=True, capture_output=True, text=True
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["device"] == "cpu ×4"
    assert report["slots"] == report["alone"] and all(len(t) == 12 for t in report["alone"])


@pytest.mark.slow  # the app's request path over a taught model (a training run in its fixture)
def test_the_page_runs_through_continuous_batching_and_each_visitor_gets_their_own_answer(taught_model_dir, tmp_path):
    """The app's path (playground.requests) with `--scheduler continuous`: concurrent runs with different prompts,
    limits and decodings each end with what the same-settings batcher gives them, scored for the debug panel."""
    from concurrent.futures import ThreadPoolExecutor

    from app_fixtures import TAUGHT, detect_example
    from PIL import Image

    from playground import registry
    from playground.manager import ModelManager
    from playground.requests import Playground, make_scheduler

    (tmp_path / "models.json").write_text(json.dumps({"models": [{"name": TAUGHT, "source": str(taught_model_dir)}]}))
    manager = ModelManager(registry.build(str(tmp_path / "no-demo"), str(tmp_path / "models.json")))
    picture = Image.open(detect_example().image).convert("RGB")
    asks = [("detect red circle", "greedy", 32), ("caption en", "greedy", 9), ("segment red circle", "greedy", 64),
            ("caption en", "temperature(0.5)", 12)]  # fmt: skip

    def final(playground, ask):
        prompt, decoding, limit = ask
        *_, last = playground.outcomes(lambda: picture, prompt, TAUGHT, decoding, limit, 3)
        return last.text, last.debug is not None

    batched = [final(Playground(manager, "batch"), ask) for ask in asks]
    continuous = Playground(manager, "continuous")
    assert isinstance(continuous.scheduler, Scheduler)
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(lambda ask: final(continuous, ask), asks))
    assert together == batched and all(scored for _, scored in together)
    assert "red circle" in together[0][0]
    with pytest.raises(ValueError, match="accepted: auto, batch, continuous"):
        make_scheduler("fastest")


def test_the_app_warms_a_loaded_model_through_the_scheduler_that_serves_it():
    """A continuously batched model is ready once its slot engine is compiled, without compiling Model.run's
    loop, which its requests never run (on a GPU Space a 3B's would take tens of seconds)."""
    from app_fixtures import DEMO_DIR

    from playground import registry
    from playground.manager import ModelManager
    from playground.requests import DEFAULT_MAX_NEW_TOKENS, make_scheduler, warm_for_requests

    runs = make_scheduler("auto")
    manager = ModelManager(registry.build(DEMO_DIR), warm=functools.partial(warm_for_requests, runs))
    model = manager.get("demo").model
    pool = next(n for n in runs.continuous.pools if n >= DEFAULT_MAX_NEW_TOKENS)
    assert runs.continuous.engine(model, pool).compile_count > 0
    assert model.compile_count == 0


_EXIT_WHILE_WORKING = """
import sys, time
import numpy as np
import paligemma
from playground.batching import Batcher
from playground.continuous import Scheduler
model = paligemma.load(sys.argv[1])
if sys.argv[2] == "compiling ahead":
    scheduler = Scheduler(slots=3, chunk=4, pools=(16,))
    scheduler.warmup(model, later=True)
    time.sleep(1.5)  # the worker has been idle for IDLE_AFTER_S: it compiles the other row counts now
    assert scheduler.engine(model).compile_count < len(scheduler.engine(model).row_counts), "compiled already"
else:
    stream = Batcher(chunk=8).submit(model, np.zeros((28, 28, 3), np.uint8), "caption en", 1024)
    assert next(stream).tokens < 1024  # the batch decodes on while the interpreter ends
"""


@pytest.mark.parametrize("work", ["compiling ahead", "decoding a batch"])
def test_a_process_that_ends_while_a_worker_is_in_xla_exits_cleanly(tiny_model_dir, work):
    """A daemon thread killed inside XLA aborts the process (exit status 134): the slot scheduler's and the
    batcher's workers finish their compile or chunk and park first."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "PALIGEMMA_COMPILE_CACHE": "off"}
    out = subprocess.run(
        [sys.executable, "-c", _EXIT_WHILE_WORKING, str(tiny_model_dir), work], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
