"""Continuous batching for the app: requests join a running decode between chunks and leave when they finish.

Same interface as batching.Batcher (`submit(...)` -> a stream of batching.Update). Each model gets a
paligemma.slots.SlotEngine; one worker thread, the only user of the accelerator, loops over the models with
work: it prefills waiting requests into free slots, runs one decode chunk, streams every request's text, and
frees the slots of finished and cancelled requests. So a request waits at most one chunk (plus the prefills of
the requests before it) to start, never for the longest answer of someone else's batch, and any mix of prompt
lengths, samplers, seeds and token limits shares a decode. Greedy answers are the tokens a request gets alone;
a sampled request draws the tokens it would draw alone with its seed.

Beam search keeps several sequences per request and cannot take a slot: such a request runs alone through
`Model.run` on the worker, between chunks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import paligemma
from paligemma import SlotEngine, Timing, preprocess
from playground.batching import DONE, ExitGate, Stream, Update

log = logging.getLogger(__name__)

# Idle work (warmup(later=True)) starts only after the worker has had nothing to do for this long, so that it
# does not slip between requests that follow one another (a warm-up's runs, a visitor's next question).
IDLE_AFTER_S = 1.0

# Slot pools by token limit. Each slot's KV cache has room for its pool's limit, and a decode step's cost grows
# with the cache (XLA on CPU copies the loop-carried cache each step; measured on the demo model, 8 slots: 21 ms
# per step with room for 64 tokens, 52 ms with room for 1024), so the page's usual answers (64 tokens) do not pay
# for the rare long one.
POOLS = (64, paligemma.MAX_NEW_TOKENS)


@dataclasses.dataclass(eq=False)
class _Job:
    model: paligemma.Model
    pixels: object  # float32 [R, R, 3]
    image: object  # as given, for a beam search's Model.run
    prompt: str
    prompt_ids: list[int]
    max_new_tokens: int
    pool: int  # the token limit of the slots it takes
    sampler: paligemma.Sampler
    seed: int
    return_scores: bool
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    updates: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)
    abandoned: bool = False  # its reader stopped listening (batching.Stream sets it)
    slot: int | None = None
    timing: Timing = dataclasses.field(default_factory=Timing)
    wait_s: float = 0.0
    admitted: float = 0.0
    reported: int = 0  # tokens in its last update


class Scheduler:
    def __init__(
        self,
        seed: int = 0,
        slots: int | None = None,
        chunk: int | None = None,
        pools: tuple[int, ...] = POOLS,
        shared_chunk: int | None = None,
    ):
        """seed: for requests submitted without one. slots, chunk: decode slots per pool and tokens per decode
        chunk and per streamed update (None: paligemma.slots' defaults for the device). pools: token limits of the
        slot pools; a request takes a slot of the smallest pool that holds its limit, and the largest is the most a
        request may ask for. shared_chunk: tokens per decode chunk while a model serves more than one request
        (None: a quarter of the chunk): a newcomer then waits fewer steps for a slot (see `_steps`)."""
        if not pools or any(not isinstance(n, int) or not 1 <= n <= paligemma.MAX_NEW_TOKENS for n in pools):
            raise ValueError(f"pools must be token limits from 1 to {paligemma.MAX_NEW_TOKENS}, got {pools!r}")
        if shared_chunk is not None and (not isinstance(shared_chunk, int) or shared_chunk < 1):
            raise ValueError(f"shared_chunk must be a whole number of at least 1, got {shared_chunk!r}")
        self.seed, self.slots, self.chunk, self.pools = seed, slots, chunk, tuple(sorted(set(pools)))
        self.shared_chunk = shared_chunk
        self.max_new_tokens = self.pools[-1]
        self._engines: weakref.WeakKeyDictionary[paligemma.Model, dict[int, SlotEngine]] = weakref.WeakKeyDictionary()
        self._pending: list[_Job] = []
        self._running: dict[SlotEngine, dict[int, _Job]] = {}
        self._changed = threading.Condition()
        self._worker: threading.Thread | None = None
        self._soon: list[Callable[[], None]] = []  # work for the worker before its next chunk (_on_worker)
        self._idle: list[Callable[[], None]] = []  # and once it has had nothing to do for IDLE_AFTER_S
        self._exit = ExitGate(self._changed)

    def submit(
        self,
        model: paligemma.Model,
        image,
        prompt: str,
        max_new_tokens: int,
        sampler: str | paligemma.Sampler = "greedy",
        seed: int | None = None,
        tick_s: float | None = None,
        return_scores: bool = False,
    ) -> Iterator[Update | None]:
        """Queues one request; iterate the result for its updates (after its first token, then after every
        chunk), close it to cancel (its slot is freed before the next chunk). A request the model would refuse
        (prompt too long, image unreadable, bad sampler, limit or seed) raises here; a failure of its own prefill
        reaches only it, a failure of a shared decode chunk every request in it. tick_s: the stream also yields
        None after each tick_s seconds without news. return_scores: updates carry paligemma.TokenScores."""
        prompt_ids = model.encode_prompt(prompt)
        sampler = paligemma.parse_sampler(sampler)
        seed = self.seed if seed is None else seed
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens must be a whole number from 1 to {self.max_new_tokens}, got {max_new_tokens!r}"
            )
        if not isinstance(seed, int) or not 0 <= seed <= paligemma.MAX_SEED:
            raise ValueError(f"seed must be a whole number from 0 to {paligemma.MAX_SEED}, got {seed!r}")
        pixels = preprocess(image, model.config.image_size)
        pool = next(n for n in self.pools if n >= max_new_tokens)
        self.engine(model, pool)  # made here: a bad slots or chunk setting is the caller's error, not the worker's
        job = _Job(model, pixels, image, prompt, prompt_ids, max_new_tokens, pool, sampler, seed, return_scores)
        with self._changed:
            self._pending.append(job)
            self._start_worker()
            self._changed.notify()
        return Stream(job, tick_s)

    def engine(self, model: paligemma.Model, pool: int | None = None) -> SlotEngine:
        """The model's slot engine for a pool (default the largest; made on first use, it goes with the model)."""
        pool = self.pools[-1] if pool is None else pool
        with self._changed:
            engines = self._engines.setdefault(model, {})
            if pool not in engines:
                engines[pool] = SlotEngine(model, self.slots, self.chunk, pool)
            return engines[pool]

    def warmup(
        self, model: paligemma.Model, scores: bool = False, max_new_tokens: int | None = None, later: bool = False
    ) -> None:
        """Compiles the model's slot engines (every row count, the shortest prompt bucket; with or without token
        scores, as its requests will ask) on the worker, between its chunks, so that a request already being
        served meanwhile is safe; returns when done. max_new_tokens: only the pool requests of that limit take
        (the others compile when first used); None: every pool. later: the one-row decode loop now and the other
        row counts, which only overlapping requests use, once the worker has had nothing to do for IDLE_AFTER_S
        (the demo's take 4.5 s on 2 cores): the model serves its first visitor sooner."""
        pools = self.pools if max_new_tokens is None else [n for n in self.pools if n >= max_new_tokens][:1]
        for pool in pools:
            engine = self.engine(model, pool)
            now = functools.partial(engine.precompile, scores=scores, rows=engine.row_counts[:1] if later else None)
            self._on_worker(now).result()
            for rows in engine.row_counts[1:] if later else ():
                self._on_worker(functools.partial(engine.precompile, (), scores, (rows,)), when_idle=True)

    def _on_worker(self, task: Callable[[], None], when_idle: bool = False) -> Future:
        """Runs `task` on the worker: before its next chunk, or (when_idle) once no request has waited or run for
        IDLE_AFTER_S; requests that arrive meanwhile wait for it. An idle task's failure is logged (the request
        that needs the same compile fails with it later, where it is said)."""
        future = Future()

        def run():
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(task())
                except Exception as err:
                    future.set_exception(err)
                    if when_idle:
                        log.exception("compiling ahead while idle")

        with self._changed:
            (self._idle if when_idle else self._soon).append(run)
            self._start_worker()
            self._changed.notify()
        return future

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="continuous-batching", daemon=True)
            self._worker.start()
            self._exit.watch()

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            self._round()  # nothing stays referenced while the worker waits: unloaded models can go

    def _round(self) -> None:
        """One chunk for every pool with work: admissions into its free slots, then a decode chunk."""
        for model, pool in self._pools_with_work():
            engine = self.engine(model, pool)
            self._admit(model, pool, engine)
            self._advance(engine)

    def _pools_with_work(self) -> list[tuple[paligemma.Model, int]]:
        """(model, pool) with waiting or running requests, once there are any (the oldest request's first); none
        after a task of `_on_worker` ran instead."""
        with self._changed:
            quiet_since = time.monotonic()
            while self._exit.closing or not self._soon:
                if self._exit.closing:
                    self._exit.park()
                if self._drop_abandoned() or any(self._running.values()):
                    jobs = self._pending + [job for jobs in self._running.values() for job in jobs.values()]
                    return list(dict.fromkeys((job.model, job.pool) for job in jobs))
                wait = None
                if self._idle:
                    wait = quiet_since + IDLE_AFTER_S - time.monotonic()
                    if wait <= 0:
                        break
                self._changed.wait(wait)
            task = (self._soon or self._idle).pop(0)
        task()  # outside the lock, so requests can queue meanwhile
        return []

    def _drop_abandoned(self) -> list[_Job]:
        self._pending = [job for job in self._pending if not job.abandoned]
        return self._pending

    def _admit(self, model: paligemma.Model, pool: int, engine: SlotEngine) -> None:
        """Waiting requests of `model` and `pool` into free slots, oldest first; a beam search runs alone here."""
        with self._changed:
            waiting = [job for job in self._drop_abandoned() if job.model is model and job.pool == pool]
        for job in waiting:
            if not job.sampler.beams and not engine.free:
                break
            with self._changed:
                self._pending.remove(job)
            job.wait_s = time.monotonic() - job.submitted
            if job.sampler.beams:
                self._run_alone(job)
                continue
            compiles = engine.compile_count
            start = time.perf_counter()
            try:
                job.slot = engine.admit(
                    job.pixels, job.prompt_ids, job.max_new_tokens, job.sampler, job.seed, job.return_scores
                )
            except Exception as err:  # its own failure; the others' slots survive unless the state went with it
                job.updates.put(err)
                if engine.state_lost():
                    self._fail_all(engine, err)
                continue
            job.admitted = time.perf_counter()
            job.timing.prefill_s = job.admitted - start
            job.timing.compiled = engine.compile_count > compiles
            self._running.setdefault(engine, {})[job.slot] = job
            self._report(engine, job)

    def _advance(self, engine: SlotEngine) -> None:
        """One decode chunk of the engine's live slots, then everyone's text; finished and cancelled leave."""
        jobs = self._running.get(engine, {})
        for job in [job for job in jobs.values() if job.abandoned]:
            self._leave(engine, job)
        if not engine.live:
            return
        compiles = engine.compile_count
        try:
            engine.advance(self._steps(engine))
        except Exception as err:  # the shared state is gone: every request in it hears of it
            self._fail_all(engine, err)
            return
        for job in list(jobs.values()):
            job.timing.compiled |= engine.compile_count > compiles
            job.timing.decode_s = time.perf_counter() - job.admitted
            self._report(engine, job, every=engine.chunk)

    def _steps(self, engine: SlotEngine) -> int:
        """The next chunk's length: the engine's whole chunk for a request alone, fewer steps while it serves
        others too, when a slot that frees mid-chunk would idle and a newcomer wait for the chunk's end. Whole
        chunks for one request: each chunk costs a host round trip and a report (one client decoding in chunks of
        2 instead of 8 measured 0.89x the throughput on the mid model); shared chunks of 2 instead of 8 gave 8
        clients 1.17x the throughput and 0.78x the p95 time to first token (bench.continuous, 2 CPU cores)."""
        with self._changed:
            alone = len(self._running.get(engine, {})) <= 1 and not self._pending
        return engine.chunk if alone else min(engine.chunk, self.shared_chunk or max(1, engine.chunk // 4))

    def _report(self, engine: SlotEngine, job: _Job, every: int = 1) -> None:
        """Puts the job's text so far on its stream once it has `every` tokens more than its last update (or is
        finished: then it also leaves its slot), so that short chunks do not multiply the page's updates."""
        view = engine.read(job.slot)
        if not view.done and len(view.token_ids) - job.reported < every:
            return
        job.reported = len(view.token_ids)
        ids = job.model.tokenizer.until_eos(view.token_ids)
        job.timing.new_tokens = len(view.token_ids)
        timing = {**job.timing.as_dict(), "batch_size": len(engine.busy), "batch_wait_s": round(job.wait_s, 4)}
        scores = None if view.scores is None else paligemma.TokenScores.of(ids, view.scores)
        job.updates.put(Update(job.model.tokenizer.decode(ids), timing, len(ids), scores))
        if view.done:
            job.updates.put(DONE)
            self._leave(engine, job)

    def _leave(self, engine: SlotEngine, job: _Job) -> None:
        engine.release(job.slot)
        del self._running[engine][job.slot]
        if not self._running[engine]:
            del self._running[engine]  # an idle engine stays only as long as its model

    def _fail_all(self, engine: SlotEngine, err: Exception) -> None:
        for job in self._running.pop(engine, {}).values():
            job.updates.put(err)
        engine.reset()

    def _run_alone(self, job: _Job) -> None:
        """A beam search through Model.run: its one update at the end."""
        try:
            for result in job.model.run(
                [job.image], [job.prompt], job.max_new_tokens, job.sampler, job.seed, return_scores=job.return_scores
            ):
                timing = {**result.timing.as_dict(), "batch_size": 1, "batch_wait_s": round(job.wait_s, 4)}
                scores = result.scores[0] if result.scores else None
                job.updates.put(Update(result.texts[0], timing, len(result.token_ids[0]), scores))
            job.updates.put(DONE)
        except Exception as err:
            job.updates.put(err)
