"""Requests for the same model and decoding settings, run together as one batch on the accelerator.

The decode loop costs about the same for a few rows as for one (it reads every weight once per token
either way), so requests that arrive while the model is busy, or within a few milliseconds of each other,
share one `Model.run` call. Each request still streams its own text and gets its own final result.

One worker thread runs one batch at a time for every model of the server, as the single-run queue did
before: models never compete for the accelerator. Only greedy requests are batched: a sampled row's
random draws depend on its batch, so a sampled request runs alone and stays reproducible. Requests that ask
for token scores run a separately compiled variant of the model, so they share batches only with each other.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Iterator

import paligemma

MAX_BATCH = 8  # one of the generator's batch buckets: larger batches would compile another shape
GATHER_S = 0.005  # how long a request that finds the model idle waits for others to join it
DONE = object()
EXIT_WAIT_S = 120.0  # at interpreter exit a worker may finish its chunk or compile for at most this long


class ExitGate:
    """Holds interpreter exit until a daemon worker is between units of work (a decode chunk, a compile) and
    parks it there: a daemon thread still inside XLA when the interpreter ends aborts the process (exit status
    134, e.g. a server stopped while it runs or compiles ahead). The worker reads `closing` between units and
    calls `park` (holding `changed`) once it is set."""

    def __init__(self, changed: threading.Condition):
        self.closing = False
        self._changed, self._parked = changed, threading.Event()

    def watch(self) -> None:
        """From now on the interpreter's exit waits for the worker (call when it starts)."""
        atexit.register(self._close)

    def _close(self) -> None:
        with self._changed:
            self.closing = True
            self._changed.notify_all()
        self._parked.wait(EXIT_WAIT_S)

    def park(self) -> None:
        """Never returns: the worker waits here, outside XLA, until the interpreter ends."""
        self._parked.set()
        while True:
            self._changed.wait()


@dataclasses.dataclass(frozen=True)
class Update:
    """One request's text so far, and the timing of the batch it runs in."""

    text: str
    timing: dict  # Timing.as_dict() of the whole batch, plus batch_size and batch_wait_s
    tokens: int = 0  # tokens of this request's answer so far, its EOS not counted
    scores: paligemma.TokenScores | None = None  # when submitted with return_scores


@dataclasses.dataclass(eq=False)
class _Job:
    model: paligemma.Model
    image: object
    prompt: str
    max_new_tokens: int
    sampler: paligemma.Sampler
    seed: int
    return_scores: bool
    group: object  # jobs with equal groups may share a batch
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    updates: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)
    abandoned: bool = False  # its reader stopped listening


class Batcher:
    def __init__(self, seed: int = 0, chunk: int | None = None, max_batch: int = MAX_BATCH, gather_s: float = GATHER_S):
        """seed and chunk: passed to every `Model.run` (chunk: stream every this many tokens)."""
        self.seed, self.chunk, self.max_batch, self.gather_s = seed, chunk, max_batch, gather_s
        self._pending: list[_Job] = []
        self._changed = threading.Condition()
        self._worker: threading.Thread | None = None
        self._exit = ExitGate(self._changed)

    def warmup(
        self, model: paligemma.Model, scores: bool = False, max_new_tokens: int | None = None, later: bool = False
    ) -> None:
        """Compiles what a lone request runs (Model.warmup: one row, the shortest prompt bucket, with or without
        token scores as the requests will ask; max_new_tokens None: 64); batches of more rows compile when they
        first gather, so `later` has nothing to defer. The same call as Scheduler.warmup."""
        model.warmup(max_new_tokens=max_new_tokens or 64, return_scores=scores)

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
        """Queues one request; iterate the result for its updates, close it to cancel the request (a waiting
        request is dropped, a running batch stops once none of its members listens). A request the model
        would refuse (a prompt too long) raises here, before it can join a batch and fail the others; a
        failure of the batch's run is raised to each of its members. seed: for sampled decodings (a sampled
        request runs alone), by default the batcher's. tick_s: when given, the stream also yields None after each
        tick_s seconds without news, so that its reader can say it is still waiting. return_scores: each update
        also carries the request's paligemma.TokenScores."""
        model.encode_prompt(prompt)
        sampler = paligemma.parse_sampler(sampler)
        group = (model, sampler, max_new_tokens, return_scores) if sampler.kind == "greedy" else object()
        seed = self.seed if seed is None else seed
        job = _Job(model, image, prompt, max_new_tokens, sampler, seed, return_scores, group)
        with self._changed:
            self._pending.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="batcher", daemon=True)
                self._worker.start()
                self._exit.watch()
            self._changed.notify()
        return Stream(job, tick_s)

    def _work(self) -> None:
        while True:
            self._run(self._next_batch())  # no batch stays referenced between runs: unloaded models can go

    def _next_batch(self) -> list[_Job]:
        """The oldest request and up to max_batch - 1 more of its group, once the batch is full or the
        oldest has waited gather_s (at once when it arrived while the model was busy)."""
        with self._changed:
            while self._exit.closing or not self._drop_abandoned():
                if self._exit.closing:
                    self._exit.park()
                self._changed.wait()
            oldest = self._pending[0]
            while (
                len(self._members(oldest.group)) < self.max_batch
                and (left := oldest.submitted + self.gather_s - time.monotonic()) > 0
            ):
                self._changed.wait(left)
            batch = self._members(oldest.group)
            self._pending = [job for job in self._pending if job not in batch]
        return batch

    def _drop_abandoned(self) -> list[_Job]:
        """The pending requests someone still listens to (a cancelled one never reaches the model)."""
        self._pending = [job for job in self._pending if not job.abandoned]
        return self._pending

    def _members(self, group) -> list[_Job]:
        return [job for job in self._pending if job.group == group][: self.max_batch]

    def _run(self, batch: list[_Job]) -> None:
        started = time.monotonic()
        first = batch[0]
        outcome = DONE
        try:
            run = first.model.run(
                [job.image for job in batch],
                [job.prompt for job in batch],
                first.max_new_tokens,
                first.sampler,
                first.seed,
                chunk=self.chunk,
                return_scores=first.return_scores,
            )
            with contextlib.closing(run) as results:
                for result in results:
                    timing = {**result.timing.as_dict(), "batch_size": len(batch)}
                    scores = result.scores or [None] * len(batch)
                    for job, text, ids, scored in zip(batch, result.texts, result.token_ids, scores):
                        wait = round(started - job.submitted, 4)
                        job.updates.put(Update(text, {**timing, "batch_wait_s": wait}, len(ids), scored))
                    if all(job.abandoned for job in batch) or self._exit.closing:
                        break  # nobody is listening, or the interpreter ends: free the accelerator
        except Exception as err:  # every member hears of it (and logs it); the worker goes on with the next batch
            outcome = err
        finally:
            for job in batch:
                job.updates.put(outcome)


class Stream:
    """One request's updates; closing it, even before the first update, tells the worker nobody listens."""

    def __init__(self, job: _Job, tick_s: float | None = None):
        self._job, self._tick_s = job, tick_s

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Update | None:
        try:
            item = self._job.updates.get(timeout=self._tick_s)
        except queue.Empty:
            return None
        if item is DONE or isinstance(item, Exception):
            self.close()
            if item is DONE:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        self._job.abandoned = True
