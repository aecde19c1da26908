"""Continuous batching: a fixed set of decode slots that requests join and leave between decode chunks.

A `SlotEngine` holds one KV cache for S slots. A request is prefilled alone (generate.py's prefill, batch 1, its
own prompt bucket and image) and its cache row copied into a free slot; `advance` then moves every live slot on
by up to C tokens (or as few as the caller asks, in the same executable) in one compiled loop, each slot at its
own step, with its own sampler, seed, token limit and EOS. A finished or released slot takes the next request,
so nobody waits for the longest answer of a batch.

Layout of a slot's row of the cache (P image tokens, the largest prompt bucket, N = the engine's token limit):

    cache index:  0 … P-1 | P … P+MAX_PROMPT_TOKENS-1               | P+MAX_PROMPT_TOKENS … +N-1
                  image   | prompt (its bucket from P on, the rest   | generated tokens, the t-th at
                          | masked out)                              | P+MAX_PROMPT_TOKENS+t
RoPE positions are those `Model.run` gives the request alone (P + prompt length + t), and masked positions add
exact zeros to attention, so a greedy request gets the tokens it gets alone. Token t of a sampled request is
drawn with fold_in(key(seed), t) as alone, whatever the other slots hold.

Compiles: one admission (prefill + copy into a slot) per prompt bucket, and one decode loop per row count (1, 2,
4, … up to S: a chunk runs only the first rows, up to the highest live slot), each again when token scores are
asked for (the scored variants record every token's log-probability and alternatives; a chunk runs scored only
while a slot that wants scores is live). A prompt of another length within its bucket compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from . import memory_fit, sharding
from .cpu_memory import check_alive
from .generate import (
    MAX_NEW_TOKENS,
    MAX_PROMPT_TOKENS,
    PROMPT_BUCKETS,
    SCORE_KEYS,
    TOP_K,
    _prefill,
    _record_scores,
    bucket,
    decode_step,
)
from .samplers import KINDS, Sampler, sample

log = logging.getLogger(__name__)

# Per platform: slots in one decode and tokens per chunk. On CPU a decode step reads every weight once whatever
# the rows (up to gemma._IN_PLACE_MAX_ROWS rows the matmuls read weights in place), so 8 slots cost little more
# than one; accelerators have the compute for more rows and pay a host round trip per chunk.
DEFAULT_SLOTS = {"cpu": 8}
DEFAULT_CHUNK = {"cpu": 8}
ACCELERATOR_SLOTS = 16
ACCELERATOR_CHUNK = 16
# The share of the free memory (measured when an engine is made, after the weights are placed) that one engine's
# KV cache may take when its slot count is left to the default: every slot holds a whole row of cache, so a model
# that fills most of its device (a 10B on a 24 GB GPU: ~0.5 GB a slot with room for 1024 tokens) gets fewer slots
# instead of running out of memory when the engine first fills. The app has two engines per model (token pools).
SLOT_MEMORY_SHARE = 0.25
GREEDY = KINDS.index("greedy")  # what finished and free rows run (the cheapest: one argmax, no draw)


def default_slots(platform: str) -> int:
    return DEFAULT_SLOTS.get(platform, ACCELERATOR_SLOTS)


def slots_that_fit(slots: int, slot_bytes: int, free_bytes: int) -> int:
    """At most `slots`, as many as SLOT_MEMORY_SHARE of `free_bytes` holds at `slot_bytes` each, and at least one.
    free_bytes 0: unknown (a backend without memory statistics), `slots`."""
    if free_bytes <= 0:
        return slots
    return max(1, min(slots, int(free_bytes * SLOT_MEMORY_SHARE) // slot_bytes))


def default_chunk(platform: str) -> int:
    return DEFAULT_CHUNK.get(platform, ACCELERATOR_CHUNK)


@dataclasses.dataclass
class SlotView:
    """One slot's request so far: its token ids (EOS included when emitted), whether it is finished, and with
    scores its SCORE_KEYS arrays over those tokens (TokenScores.of cuts them where the tokens are cut)."""

    token_ids: list[int]
    done: bool
    scores: dict[str, np.ndarray] | None = None


class SlotEngine:
    """S decode slots over one model's weights (the model's own compiled functions stay untouched).

    Holds the model's Generator, not the Model: a scheduler may key engines weakly by model. The slot state (KV
    cache) exists only while some slot is in use, so an idle engine holds no cache memory. slots None: the
    device's default, or fewer where SLOT_MEMORY_SHARE of the free memory holds fewer rows of cache.
    """

    def __init__(self, model, slots: int | None = None, chunk: int | None = None, max_new_tokens: int = MAX_NEW_TOKENS):
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(
                f"max_new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens!r}"
            )
        generator = model._generator
        devices = sorted(jax.tree.leaves(generator.params)[0].devices(), key=lambda d: d.id)
        platform = devices[0].platform
        cache_len = generator.cfg.num_image_tokens + MAX_PROMPT_TOKENS + max_new_tokens
        if slots is None:
            dtype = np.dtype(generator.params["llm"]["embedder"]["input_embedding"].dtype).name
            slot_bytes = memory_fit.kv_cache_bytes(generator.cfg, dtype, 1, cache_len)
            default = default_slots(platform)
            slots = slots_that_fit(default, slot_bytes, memory_fit.free_bytes(devices)[0])
            if slots < default:
                log.info("%d decode slots (of %d) fit in a share of the free memory", slots, default)
        self.slots = slots
        self.chunk = default_chunk(platform) if chunk is None else chunk
        for name, value, top in (("slots", self.slots, 1024), ("chunk", self.chunk, MAX_NEW_TOKENS)):
            if not isinstance(value, int) or not 1 <= value <= top:
                raise ValueError(f"{name} must be a whole number from 1 to {top}, got {value!r}")
        self.max_new_tokens = max_new_tokens
        self._generator = generator
        cfg = generator.cfg
        self._static = dict(generator._static)  # cfg, valid_vocab, eos_id
        mesh = sharding.mesh_of(generator.params)
        self._replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._cache_sharding = None if mesh is None else sharding.cache_sharding(cfg, mesh)
        self._cache_len = cache_len
        self._admits: dict[tuple[int, bool], jax.stages.Compiled] = {}
        self._advances: dict[tuple[bool, int], jax.stages.Compiled] = {}  # by (scores, rows)
        # the decode loop's compiled row counts: a chunk runs the smallest that holds the highest live slot
        self.row_counts = tuple(sorted({min(2**i, self.slots) for i in range(self.slots.bit_length() + 1)}))
        self._state = None
        self._host: dict[str, np.ndarray] = {}
        self._in_use = [False] * self.slots
        self._scored = [False] * self.slots

    @property
    def compile_count(self) -> int:
        """Executables compiled so far: admissions per (prompt bucket, scores), decode loops per (scores, rows)."""
        return len(self._admits) + len(self._advances)

    @property
    def free(self) -> list[int]:
        return [i for i, used in enumerate(self._in_use) if not used]

    @property
    def busy(self) -> list[int]:
        """Slots holding a request, finished or not (a finished one stays until released)."""
        return [i for i, used in enumerate(self._in_use) if used]

    @property
    def live(self) -> list[int]:
        """Slots still generating."""
        return [i for i in self.busy if not self._host["done"][i]]

    def admit(
        self,
        pixels: np.ndarray,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampler: Sampler,
        seed: int,
        scores: bool = False,
    ) -> int:
        """Prefills one request alone and puts it in a free slot, its first token already drawn; returns the slot.

        pixels: float32 [R, R, 3] (preprocess.preprocess); prompt_ids: Model.encode_prompt's ids.
        """
        if sampler.beams:
            raise ValueError(f"{sampler} keeps {sampler.beams} sequences per prompt and cannot run in a decode slot")
        if not 1 <= max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens must be from 1 to {self.max_new_tokens} here, got {max_new_tokens}")
        if not 1 <= len(prompt_ids) <= MAX_PROMPT_TOKENS:
            raise ValueError(f"a prompt takes 1 to {MAX_PROMPT_TOKENS} tokens, got {len(prompt_ids)}")
        if not self.free:
            raise RuntimeError(f"all {self.slots} slots are in use; admit after one is released")
        check_alive(self._generator.params)
        slot = self.free[0]
        if self._state is None:
            self._state = self._empty_state()
        prompt_bucket, inputs = _admit_inputs(pixels, prompt_ids, max_new_tokens, sampler, seed, slot)
        admit = self._admit_fn(prompt_bucket, scores, inputs)
        self._state = admit(self._generator.run_params, self._state, *inputs)
        self._in_use[slot], self._scored[slot] = True, scores
        self._read_back()
        return slot

    def precompile(
        self,
        prompt_buckets: tuple[int, ...] = PROMPT_BUCKETS[:1],
        scores: bool = False,
        rows: tuple[int, ...] | None = None,
    ) -> None:
        """Compiles ahead of requests the admissions of these prompt buckets and the decode loop of these row
        counts (None: every one of `row_counts`, which a busier engine would otherwise compile while serving).
        Call it from the thread that serves the engine, or before it serves."""
        idle = self._state is None
        if idle:
            self._state = self._empty_state()
        r = self._generator.cfg.image_size
        for prompt_bucket in prompt_buckets:
            blank = _admit_inputs(np.zeros((r, r, 3), np.float32), [0] * prompt_bucket, 1, Sampler(), 0, 0)
            self._admit_fn(prompt_bucket, scores, blank[1])
        for count in self.row_counts if rows is None else rows:
            self._advance_fn(scores, count)
        if idle:
            self._state = None

    def advance(self, steps: int | None = None) -> None:
        """Moves every live slot on by up to `steps` tokens (default and most: `chunk`; fewer where it finishes),
        in one compiled call whatever `steps` is: a shorter chunk lets a waiting request join sooner, for a host
        round trip more per token."""
        steps = self.chunk if steps is None else steps
        if not isinstance(steps, int) or not 1 <= steps <= self.chunk:
            raise ValueError(f"steps must be a whole number from 1 to {self.chunk}, got {steps!r}")
        if not self.live:
            return
        check_alive(self._generator.params)
        record = any(self._scored[i] for i in self.live)
        advance = self._advance_fn(record, bucket(max(self.live) + 1, self.row_counts))
        self._state = advance(self._generator.run_params, self._state, np.int32(steps))
        self._read_back()

    def read(self, slot: int) -> SlotView:
        step = int(self._host["step"][slot])
        scores = None
        if self._scored[slot]:
            scores = {name: self._host[name][slot, :step] for name in SCORE_KEYS}
        return SlotView(self._host["tokens"][slot, :step].tolist(), bool(self._host["done"][slot]), scores)

    def release(self, slot: int) -> None:
        """Frees a slot (finished or not: a cancelled request stops generating at once)."""
        self._in_use[slot] = self._scored[slot] = False
        if not any(self._in_use):
            self._state, self._host = None, {}  # idle: no cache memory held
            return
        if not self._host["done"][slot]:
            self._state = {**self._state, "done": self._state["done"].at[slot].set(True)}
            self._host["done"][slot] = True

    def state_lost(self) -> bool:
        """Whether a failed call took the slot state with it (its buffers were donated): then only reset helps."""
        return self._state is not None and any(leaf.is_deleted() for leaf in jax.tree.leaves(self._state))

    def reset(self) -> None:
        """Drops every slot and the state (after a failed call, whose donated state may be gone)."""
        self._in_use = [False] * self.slots
        self._scored = [False] * self.slots
        self._state, self._host = None, {}

    # ------------------------------------------------------------------ state and compiled functions

    def _read_back(self) -> None:
        names = ["tokens", "step", "done"] + (list(SCORE_KEYS) if any(self._scored) else [])
        self._host = {name: np.array(self._state[name]) for name in names}

    def _empty_state(self) -> dict:
        """Every slot finished (free rows generate nothing) at step 1 (their writes stay inside their rows)."""
        cfg, s, n = self._generator.cfg.text, self.slots, self.max_new_tokens
        row_shape = (s, cfg.num_kv_heads, self._cache_len, cfg.head_dim)
        dtype = self._generator.params["llm"]["embedder"]["input_embedding"].dtype
        if self._generator.run_params is not self._generator.params:  # per-layer views (one CPU device)
            cache = [(jnp.zeros(row_shape, dtype), jnp.zeros(row_shape, dtype)) for _ in range(cfg.depth)]
        else:
            stacked = (cfg.depth, *row_shape)
            cache = jax.device_put((jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype)), self._cache_sharding)
        rest = {
            "tokens": np.zeros((s, n), np.int32),
            "step": np.ones((s,), np.int32),
            "done": np.ones((s,), bool),
            "limit": np.ones((s,), np.int32),
            "prefix_end": np.zeros((s,), np.int32),
            "kind_id": np.zeros((s,), np.int32),
            "value": np.zeros((s,), np.float32),
            "key": np.zeros((s, 2), np.uint32),
            "logprobs": np.zeros((s, n), np.float32),
            "top_ids": np.zeros((s, n, TOP_K), np.int32),
            "top_logprobs": np.zeros((s, n, TOP_K), np.float32),
        }
        return {"cache": cache, **jax.device_put(rest, self._replicated)}

    def _jit_options(self) -> dict:
        return dict(cache_sharding=self._cache_sharding, **self._static)

    def _admit_fn(self, prompt_bucket: int, scores: bool, inputs) -> jax.stages.Compiled:
        key = (prompt_bucket, scores)
        if key not in self._admits:
            specs = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=self._replicated) for x in inputs]
            fn = functools.partial(_admit, scores=scores, **self._jit_options())
            self._admits[key] = (
                jax.jit(fn, donate_argnums=1).lower(self._generator.run_params, self._state, *specs).compile()
            )
        return self._admits[key]

    def _advance_fn(self, record: bool, rows: int) -> jax.stages.Compiled:
        if (record, rows) not in self._advances:
            fn = functools.partial(_advance, rows=rows, record=record, **self._jit_options())
            steps = jax.ShapeDtypeStruct((), np.int32, sharding=self._replicated)
            self._advances[record, rows] = (
                jax.jit(fn, donate_argnums=1).lower(self._generator.run_params, self._state, steps).compile()
            )
        return self._advances[record, rows]


# ---------------------------------------------------------------------- the compiled functions


def _admit_inputs(pixels, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler, seed: int, slot: int):
    """(prompt bucket, the host arrays _admit takes after the params and the state)."""
    prompt_bucket = bucket(len(prompt_ids), PROMPT_BUCKETS)
    tokens = np.zeros((1, prompt_bucket), np.int32)
    tokens[0, : len(prompt_ids)] = prompt_ids
    return prompt_bucket, (
        np.asarray(pixels, np.float32)[None],
        tokens,
        np.asarray([len(prompt_ids)], np.int32),
        np.int32(sampler.kind_id),
        np.float32(sampler.value),
        np.asarray(jax.random.key_data(jax.random.key(seed))),
        np.int32(slot),
        np.int32(max_new_tokens),
    )


def _constrain(cache, cache_sharding):
    if cache_sharding is None or isinstance(cache, list):
        return cache
    return jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, cache_sharding), cache)


def _admit(
    params,
    state,
    images,
    tokens,
    prompt_len,
    kind_id,
    value,
    key_data,
    slot,
    limit,
    *,
    scores,
    cache_sharding,
    **static,
):
    """Prefill of one request (batch 1) and its copy into row `slot` of the slot state."""
    first = _prefill(
        params,
        images,
        tokens,
        prompt_len,
        kind_id,
        value,
        jax.random.wrap_key_data(key_data),
        max_new=1,
        scores=scores,
        **static,
    )

    def into_row(rows, prefilled):  # the request's [1, K, P + Tp + 1, H] (per layer) into row `slot` of rows
        start = (slot, 0, 0, 0) if rows.ndim == 4 else (0, slot, 0, 0, 0)  # per layer, or stacked [L, ...]
        return jax.lax.dynamic_update_slice(rows, prefilled, start)

    cache = jax.tree.map(into_row, state["cache"], first["cache"])  # both in the form of the params' layers
    n = state["tokens"].shape[1]
    row = {
        "tokens": jnp.zeros((n,), jnp.int32).at[0].set(first["tokens"][0, 0]),
        "step": jnp.int32(1),
        "done": first["done"][0] | (limit <= 1),
        "limit": limit,
        "prefix_end": first["prefix_end"][0],
        "kind_id": kind_id,
        "value": value,
        "key": key_data,
    }
    if scores:
        row |= {name: jnp.zeros_like(state[name][0]).at[0].set(first[name][0, 0]) for name in SCORE_KEYS}
    return state | {"cache": _constrain(cache, cache_sharding)} | {k: state[k].at[slot].set(v) for k, v in row.items()}


def _sample_rows(logits, kind_ids, values, keys):
    """samplers.sample for each row with its own kind, value and key: int32[S]. Row by row (lax.map), so that
    each runs only its own sampler (a nucleus passes over the whole vocabulary 33 times), as it would in a batch
    of one."""

    def one(row):
        row_logits, kind_id, value, key = row
        return sample(row_logits[None], kind_id, value, key)[0]

    return jax.lax.map(one, (logits, kind_ids, values, keys))


def _record_rows(state, logits, token, live, kinds):
    """generate's score recording for each live row at its own step, row by row as for _sample_rows."""

    def one(row):
        scores, row_logits, row_token, step, kind_id, value = row
        single = {name: scores[name][None] for name in SCORE_KEYS} | {"kind_id": kind_id, "value": value}
        written = _record_scores(single, row_logits[None], row_token[None], step)
        return {name: written[name][0] for name in SCORE_KEYS}

    old = {name: state[name] for name in SCORE_KEYS}
    new = jax.lax.map(one, (old, logits, token, state["step"], kinds, state["value"]))
    return {name: jnp.where(live.reshape(-1, *[1] * (new[name].ndim - 1)), new[name], old[name]) for name in new}


def _advance(params, state, steps, *, rows, record, cfg, valid_vocab, eos_id, cache_sharding):
    """Up to `steps` (traced: any chunk length, one executable) decode steps of the first `rows` slots, which hold
    every live one (admission takes the lowest free slot): on CPU a decode step of 8 rows costs 2-4× one row's
    (measured on the mid config: 69 vs 245 ms on an AVX2 EPYC, 33 vs 73 ms on an AVX-512 one), so a lightly loaded
    engine runs fewer rows. The rows are copied out and back once per chunk, not per step."""
    if rows == state["tokens"].shape[0]:
        return _advance_rows(params, state, steps, record, cfg, valid_vocab, eos_id, cache_sharding)
    first = {name: value[:rows] for name, value in state.items() if name != "cache"}
    first["cache"] = jax.tree.map(lambda c: jax.lax.slice_in_dim(c, 0, rows, axis=c.ndim - 4), state["cache"])
    done = _advance_rows(params, first, steps, record, cfg, valid_vocab, eos_id, cache_sharding)
    back = {name: state[name].at[:rows].set(value) for name, value in done.items() if name != "cache"}
    back["cache"] = jax.tree.map(
        lambda c, d: jax.lax.dynamic_update_slice_in_dim(c, d, 0, axis=c.ndim - 4), state["cache"], done["cache"]
    )
    return back


def _advance_rows(params, state, steps, record, cfg, valid_vocab, eos_id, cache_sharding):
    """Up to `steps` decode steps of every live row (until all are done); finished and free rows compute along
    but change nothing that is read (their tokens are not written, their cache writes stay in their rows)."""
    n = state["tokens"].shape[1]
    rows = jnp.arange(state["tokens"].shape[0])

    def cond(carry):
        i, s = carry
        return (i < steps) & ~jnp.all(s["done"])

    def body(carry):
        i, s = carry
        live, step = ~s["done"], s["step"]
        fed = s["tokens"][rows, step - 1][:, None]
        logits, cache = decode_step(params, cfg, valid_vocab, s["cache"], fed, s["prefix_end"], step, n)
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(s["key"]), step)
        kinds = jnp.where(live, s["kind_id"], GREEDY)  # finished and free rows: the cheapest
        token = _sample_rows(logits, kinds, s["value"], keys)
        if record:
            s = s | _record_rows(s, logits, token, live, kinds)
        s = s | {
            "cache": _constrain(cache, cache_sharding),
            "tokens": s["tokens"].at[rows, jnp.where(live, step, n)].set(token, mode="drop"),
            "step": step + live,
            "done": s["done"] | (token == eos_id) | (step + 1 >= s["limit"]),
        }
        return i + 1, s

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]
