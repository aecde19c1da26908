"""Request batching: concurrent requests share one generate call, each gets its own text, failures reach all.

The batcher alone (over the tiny random model, or a stand-in model that records its calls), then four
gradio_client clients at once through the app over the taught model of app_fixtures.
"""

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from app_fixtures import (
    DEMO_DIR,
    EXAMPLES_DIR,
    TAUGHT,
    app_in_thread,
    detect_example,
    taught_answers,
    write_registry,
)
from gradio_client import Client, handle_file
from PIL import Image

import paligemma
from paligemma import TokenScores
from paligemma.generate import Timing
from playground import prompts
from playground.batching import Batcher

MAX_NEW = 10
LONG_S = 30.0  # a gathering window the tests never wait out: batches fill up first


def _requests():
    """Four different images and prompts (prompts of different lengths)."""
    chosen = ["caption en", "detect red circle", "answer en how many shapes are there?", "segment blue square"]
    images = [Image.open(ex.image).convert("RGB") for ex in prompts.load_examples(EXAMPLES_DIR)[: len(chosen)]]
    return list(zip(images, chosen))


def _final_text(updates):
    return list(updates)[-1].text


@pytest.mark.slow
def test_concurrent_requests_share_one_run_and_get_what_they_would_alone(tiny_model, monkeypatch):
    requests = _requests()
    alone = [tiny_model.generate(image, prompt, max_new_tokens=MAX_NEW) for image, prompt in requests]
    calls, real_run = [], tiny_model.run

    def counted_run(images, *args, **kwargs):
        calls.append(len(images))
        return real_run(images, *args, **kwargs)

    monkeypatch.setattr(tiny_model, "run", counted_run)
    batcher = Batcher(chunk=3, max_batch=len(requests), gather_s=LONG_S)

    def submit_and_read(request):
        updates = list(batcher.submit(tiny_model, *request, MAX_NEW))
        return [u.text for u in updates], updates[-1].timing

    with ThreadPoolExecutor(len(requests)) as pool:
        outcomes = list(pool.map(submit_and_read, requests))

    assert calls == [len(requests)]
    assert [texts[-1] for texts, _ in outcomes] == alone
    assert all(len(texts) > 1 for texts, _ in outcomes)  # each streamed its own text as it grew
    assert all(timing["batch_size"] == len(requests) and timing["batch_wait_s"] >= 0 for _, timing in outcomes)


@pytest.mark.slow
def test_a_request_the_model_refuses_fails_alone(tiny_model):
    image, prompt = _requests()[1]
    batcher = Batcher(max_batch=2, gather_s=LONG_S)
    with pytest.raises(ValueError, match="prompt is .* tokens long"):
        batcher.submit(tiny_model, image, "detect " + "red circle ; " * 200, MAX_NEW)
    good = batcher.submit(tiny_model, image, prompt, MAX_NEW)
    companion = batcher.submit(tiny_model, image, prompt, MAX_NEW)  # fills the batch the refused one never joined
    assert _final_text(good) == _final_text(companion) == tiny_model.generate(image, prompt, max_new_tokens=MAX_NEW)


class RecordingModel:
    """A stand-in for paligemma.Model: answers each prompt with itself + '!', records every run's
    (prompts, max_new_tokens, sampler, return_scores), and can hold its first run open or fail; asked for scores,
    each row's log-probability is minus its row number."""

    def __init__(self, fail_after_first: bool = False):
        self.runs = []
        self.first_started, self.release = threading.Event(), threading.Event()
        self.release.set()
        self.fail_after_first = fail_after_first

    def encode_prompt(self, prompt):
        return [1, 2]

    def run(self, images, prompts, max_new_tokens, sampler, seed, chunk=None, return_scores=False):
        self.runs.append((list(prompts), max_new_tokens, str(sampler), return_scores))
        self.first_started.set()
        self.release.wait()
        scores = [TokenScores([1], np.array([-row]), np.ones((1, 1)), np.zeros((1, 1))) for row in range(len(prompts))]
        texts = [p + "!" for p in prompts]
        yield paligemma.Result(texts, [[1]] * len(prompts), Timing(new_tokens=1), scores if return_scores else None)
        if self.fail_after_first:
            raise ValueError("the cache is full")


def test_the_cap_holds_and_only_requests_with_the_same_settings_share_a_batch():
    model = RecordingModel()
    model.release.clear()
    batcher = Batcher(max_batch=2, gather_s=0)
    streams = [batcher.submit(model, None, "a", 16)]
    model.first_started.wait()  # "a" runs alone and holds the model while the rest arrive
    later = [
        ("b", 16, "greedy"),
        ("c", 32, "greedy"),
        ("d", 16, "greedy"),
        ("e", 16, "greedy"),
        ("f", 16, "greedy"),
        ("g", 16, "temperature(0.5)"),
        ("h", 16, "temperature(0.5)"),
    ]
    streams += [batcher.submit(model, None, p, n, sampler) for p, n, sampler in later]
    model.release.set()

    assert [_final_text(s) for s in streams] == [p + "!" for p in "abcdefgh"]
    assert [(run_prompts, n) for run_prompts, n, *_ in model.runs] == [
        (["a"], 16),
        (["b", "d"], 16),
        (["c"], 32),
        (["e", "f"], 16),
        (["g"], 16),
        (["h"], 16),
    ]
    assert model.runs[-1][2] == "temperature(0.5)"  # sampled requests run alone, so they stay reproducible


def test_requests_with_scores_share_batches_only_with_each_other_and_get_their_rows_scores():
    model = RecordingModel()
    model.release.clear()
    batcher = Batcher(max_batch=4, gather_s=0)
    first = batcher.submit(model, None, "a", 16)
    model.first_started.wait()  # the rest arrive while "a" holds the model
    streams = [batcher.submit(model, None, p, 16, return_scores=p in "ce") for p in "bcde"]
    model.release.set()

    updates = [list(s)[-1] for s in [first, *streams]]
    assert [u.text for u in updates] == ["a!", "b!", "c!", "d!", "e!"]
    assert [(run_prompts, scored) for run_prompts, _, _, scored in model.runs] == [
        (["a"], False),
        (["b", "d"], False),
        (["c", "e"], True),
    ]
    assert [u.scores for u in updates[:2]] == [None, None] and updates[3].scores is None
    assert [float(u.scores.logprobs[0]) for u in (updates[2], updates[4])] == [0.0, -1.0]  # each its own row's


def test_a_failing_run_reports_the_error_to_every_member_and_the_next_batch_runs():
    model = RecordingModel(fail_after_first=True)
    batcher = Batcher(max_batch=3, gather_s=LONG_S)
    streams = [batcher.submit(model, None, prompt, 16) for prompt in "xyz"]
    for prompt, stream in zip("xyz", streams):
        assert next(stream).text == prompt + "!"
        with pytest.raises(ValueError, match="the cache is full"):
            next(stream)
    assert len(model.runs) == 1

    healthy = RecordingModel()
    assert [_final_text(s) for s in [batcher.submit(healthy, None, p, 16) for p in "uvw"]] == ["u!", "v!", "w!"]


def test_a_batch_nobody_listens_to_stops():
    listener_gone, produced = threading.Event(), []

    class EndlessModel(RecordingModel):
        def run(self, images, prompts, *args, **kwargs):
            for n in range(1000):
                produced.append(n)
                yield paligemma.Result(["more"], [[1]], Timing(new_tokens=n + 1))
                listener_gone.wait()

    batcher = Batcher(max_batch=1)
    stream = batcher.submit(EndlessModel(), None, "a", 16)
    next(stream)
    stream.close()
    listener_gone.set()
    assert _final_text(batcher.submit(RecordingModel(), None, "b", 16)) == "b!"  # runs once the endless one stopped
    assert len(produced) <= 2  # the result in hand when the listener left, and at most the one being made


def test_a_reader_hears_every_tick_while_its_request_waits():
    model = RecordingModel()
    model.release.clear()  # the model is busy (compiling, say) until released
    stream = Batcher().submit(model, None, "a", 16, tick_s=0.01)

    assert next(stream) is None and next(stream) is None  # nothing yet: the page can say why it waits
    model.release.set()
    assert [u.text for u in stream if u is not None] == ["a!"]


def test_a_run_repeats_its_step_while_the_model_works_so_closing_it_ends_it_within_a_tick(monkeypatch):
    """Gradio can close a run only between two of its steps. A model busy for long (compiling, or a 3B prefill on
    a CPU) must not hold the next step back, or Stop would wait for it and a Run pressed meanwhile be dropped.
    Past COMPILE_NOTICE_S without a token the page says why it waits."""
    from playground import registry, requests
    from playground.manager import ModelManager
    from playground.requests import TICK_S, Playground

    monkeypatch.setattr(requests, "COMPILE_NOTICE_S", 3 * TICK_S)

    closed = threading.Event()

    class BusyScheduler:
        """The model never answers: its stream only ticks, as Batcher's does while the model compiles."""

        def submit(self, *args, tick_s, **kwargs):
            try:
                while True:
                    time.sleep(tick_s)
                    yield None
            finally:
                closed.set()

    playground = Playground(ModelManager(registry.build(DEMO_DIR)))
    playground.scheduler = BusyScheduler()
    steps = playground.outcomes(lambda: Image.new("RGB", (32, 32)), "caption en", "demo", "greedy", 8, 0)
    assert next(steps).text == ""
    gaps = []
    for _ in range(3):
        asked = time.monotonic()
        assert next(steps).text == ""
        gaps.append(time.monotonic() - asked)
    assert max(gaps) < 4 * TICK_S, gaps
    notice = next(step.notice for step in steps if step.notice)
    assert re.fullmatch(r"Preparing the model for this prompt length \(first time only\) · \d+ s", notice), notice
    steps.close()
    assert closed.is_set()


def test_warming_a_model_stops_each_run_at_its_first_token_without_logging_it_as_a_cancel(caplog, monkeypatch):
    """The startup log says what happened: warm-up runs end at their first token by design, a visitor's early
    close is a cancel."""
    from playground import registry, requests
    from playground.manager import ModelManager

    monkeypatch.setattr(requests, "WARM_PROMPT_TOKENS", (8,))
    playground = requests.Playground(ModelManager(registry.build(DEMO_DIR)), "batch")
    with caplog.at_level(logging.INFO, logger="playground.requests"):
        playground.warm("demo")
        assert "cancelled" not in caplog.text
        steps = playground.outcomes(lambda: Image.new("RGB", (32, 32)), "caption en", "demo", "greedy", 8, 0)
        next(step for step in steps if step.text)
        steps.close()
    assert "'caption en' on 'demo' cancelled after" in caplog.text


# ---------------------------------------------------------------- through the app


@pytest.fixture(scope="module")
def url(taught_model_dir, tmp_path_factory):
    # not preloaded: the app's own warm-up and example runs would join the clients' batches
    registry = write_registry(tmp_path_factory.mktemp("batching_registry"), taught_model_dir)
    with app_in_thread(registry, preload=False) as address:
        yield address


@pytest.mark.slow
def test_four_concurrent_clients_each_get_their_own_answer(url):
    chosen = ["caption en", "detect red circle", "segment red circle", "detect red circle"]
    clients = [Client(url, verbose=False) for _ in chosen]
    jobs = [
        client.submit(handle_file(detect_example().image), prompt, TAUGHT, "greedy", 64, api_name="/run")
        for client, prompt in zip(clients, chosen)
    ]
    outputs = [job.result() for job in jobs]
    for prompt, (_, _, raw, detections, _, timing) in zip(chosen, outputs):
        assert raw == taught_answers()[prompt]
        assert (detections is None) == (prompt == "caption en")
        assert 1 <= timing["batch_size"] <= len(chosen) and timing["tokens_per_s"] > 0
