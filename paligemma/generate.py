"""Cached, compiled generation: one prefill and one decode loop per shape bucket.

Layout of the KV cache for a bucket (P image tokens, Tp padded prompt tokens, Nmax new tokens):

    cache index:  0 … P-1 | P … P+Tp-1                      | P+Tp … P+Tp+Nmax-1
                  image   | prompt (row b uses the first    | generated tokens, written at the
                          | len_b, the rest is masked out)  | same index for every row

Every row writes its t-th new token at the same cache index, so one in-place update serves the batch;
its RoPE position is P + len_b + t, so padding never shifts a row's positions. The decode loop is a
`lax.while_loop` that runs until every row has emitted EOS or a traced step limit is reached: the same
compiled loop serves a whole request or a streaming chunk, with one host round trip per call.

Asked for scores, the same loop also writes each token's log-probability under the distribution it was drawn
from and its TOP_K best alternatives into the state at the token's step (a separately compiled variant, so
requests without scores run exactly the code they ran before). `beam(N)` runs beam search instead (beam.py)
over the same prefill and decode step.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import beam, gemma, sharding
from .config import PaliGemmaConfig
from .cpu_memory import check_alive, run_params
from .model import embed_sequence, prefix_lm_mask
from .samplers import Sampler, sample, sampling_log_probs

PROMPT_BUCKETS = (16, 32, 64, 128, 256)
NEW_TOKEN_BUCKETS = (16, 64, 256, 1024)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
MAX_BATCH = BATCH_BUCKETS[-1]  # rows in one call
MAX_PROMPT_TOKENS = PROMPT_BUCKETS[-1]
MAX_NEW_TOKENS = NEW_TOKEN_BUCKETS[-1]
TOP_K = beam.TOP_K  # alternatives recorded per generated token
SCORE_KEYS = ("logprobs", "top_ids", "top_logprobs")  # per-token state arrays of a scored run


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= n)


@dataclasses.dataclass
class TokenScores:
    """How sure the model was of each generated token of one row (cut where its tokens are cut, before EOS).

    logprobs float32[n]: log-probability of each token under the distribution it was drawn from (greedy and
    beam: the model's; temperature(T): of logits / T; nucleus(P): renormalised over the nucleus).
    top_ids int32[n, TOP_K], top_logprobs float32[n, TOP_K]: the best alternatives at each step under that
    distribution, best first (-inf where a nucleus held fewer than TOP_K tokens).
    """

    token_ids: list[int]
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    @classmethod
    def of(cls, ids: list[int], arrays) -> TokenScores:
        """The scores of `ids` (one row's tokens, cut at EOS) from that row's SCORE_KEYS arrays, each [T, ...]."""
        return cls(ids, *(arrays[name][: len(ids)] for name in SCORE_KEYS))


@dataclasses.dataclass
class Timing:
    prefill_s: float = 0.0  # image encoder + prompt, up to the first token being known on the host
    decode_s: float = 0.0
    new_tokens: int = 0
    compiled: bool = False  # whether this request had to compile

    @property
    def tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0

    def as_dict(self) -> dict:
        return {
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "new_tokens": self.new_tokens,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "compiled": self.compiled,
        }


def _mask_vocab(logits, valid_vocab: int):
    """Ids the tokenizer cannot decode (HF pads the table past it) are never emitted."""
    if valid_vocab >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, -jnp.inf)


def _prefill_logits(params, images, tokens, prompt_len, *, cfg: PaliGemmaConfig, max_new: int, valid_vocab: int):
    """Encodes images + prompts: (logits of the first new token [B, V], the cache with room for max_new tokens,
    in the form of the params' layers, prefix_end [B]).

    Runs the layers in the form decode reads them: stacked (one scan), or on one CPU device as per-layer views,
    where the scan would copy each layer's weights before its matmuls (3B-224 on 2 cores: the prefill of one
    image and a short prompt took 5.1-5.4 s stacked, 4.4 s on the views, compiled in about the same time)."""
    x = embed_sequence(params, cfg, images, tokens)  # [B, P + Tp, D]
    b, length, _ = x.shape
    prefix_end = cfg.num_image_tokens + prompt_len  # [B]
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    mask = prefix_lm_mask(prefix_end, prefix_end, length)
    hidden, new_kv, _ = gemma.run_layers(params["llm"], cfg.text, x, positions, mask)
    last = jnp.take_along_axis(hidden, (prefix_end - 1)[:, None, None], axis=1)  # [B, 1, D]
    logits = _mask_vocab(gemma.logits_from_hidden(params["llm"], cfg.text, last)[:, 0], valid_vocab)
    cache = gemma.map_cache(
        lambda c, axis: jnp.pad(c, [(0, max_new) if a == axis else (0, 0) for a in range(c.ndim)]), new_kv
    )  # room for the generated tokens after P + Tp
    return logits, cache, prefix_end


def _place_cache(cache, cache_sharding):
    """cache_sharding: where the KV cache lives when the model is split over devices (sharding.py)."""
    if cache_sharding is None:
        return cache
    return jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, cache_sharding), cache)


def _prefill(
    params,
    images,
    tokens,
    prompt_len,
    kind_id,
    value,
    key,
    *,
    cfg: PaliGemmaConfig,
    max_new: int,
    valid_vocab: int,
    eos_id: int,
    cache_sharding=None,
    scores: bool = False,
):
    """Encodes images + prompts, fills the cache and samples the first token. Returns the decode state
    (with the SCORE_KEYS arrays when `scores`)."""
    logits, cache, prefix_end = _prefill_logits(
        params, images, tokens, prompt_len, cfg=cfg, max_new=max_new, valid_vocab=valid_vocab
    )
    b = logits.shape[0]
    first = sample(logits, kind_id, value, jax.random.fold_in(key, 0))
    state = {
        "cache": _place_cache(cache, cache_sharding),
        "tokens": jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first),
        "step": jnp.int32(1),
        "done": (first == eos_id) | (prompt_len == 0),
        "prefix_end": prefix_end,
        "kind_id": kind_id,
        "value": value,
        "key": key,
    }
    if scores:
        state |= {
            "logprobs": jnp.zeros((b, max_new), jnp.float32),
            "top_ids": jnp.zeros((b, max_new, TOP_K), jnp.int32),
            "top_logprobs": jnp.zeros((b, max_new, TOP_K), jnp.float32),
        }
        state = _record_scores(state, logits, first, 0)
    return state


def _record_scores(state, logits, token, step):
    """Writes token's log-probability and the TOP_K best alternatives under the sampling distribution at `step`."""
    log_probs = sampling_log_probs(logits, state["kind_id"], state["value"])  # [B, V]
    top_logprobs, top_ids = jax.lax.top_k(log_probs, TOP_K)  # [B, K]
    chosen = jnp.take_along_axis(log_probs, token[:, None], axis=1)  # [B, 1]
    written = {"logprobs": chosen, "top_ids": top_ids[:, None], "top_logprobs": top_logprobs[:, None]}
    return state | {
        name: jax.lax.dynamic_update_slice_in_dim(state[name], new.astype(state[name].dtype), step, axis=1)
        for name, new in written.items()
    }


def decode_step(params, cfg: PaliGemmaConfig, valid_vocab: int, cache, token, prefix_end, step, max_new: int):
    """Feeds token int32[B, 1], the (step-1)-th new token of each row, through the decoder: (logits of the
    step-th token [B, V], the cache with the fed token's keys and values written).

    step: one int32 for the whole batch (Generator) or int32[B], each row at its own step (slots.py); the
    token's cache index then has the same shape."""
    cache_len = gemma.cache_length(cache)
    generated_start = cache_len - max_new  # P + Tp
    index = generated_start + step - 1  # cache slot of the token being fed
    x = gemma.embed_tokens(params["llm"], cfg.text, token)
    positions = (prefix_end + step - 1)[:, None]
    slots = jnp.arange(cache_len)[None, None, :]
    fed = index if jnp.ndim(index) == 0 else index[:, None, None]
    mask = (slots < prefix_end[:, None, None]) | ((slots >= generated_start) & (slots <= fed))  # [B, 1, S]
    hidden, cache, _ = gemma.run_layers(params["llm"], cfg.text, x, positions, mask, cache, index)
    logits = _mask_vocab(gemma.logits_from_hidden(params["llm"], cfg.text, hidden)[:, 0], valid_vocab)
    return logits, cache


def _decode(params, state, limit, *, cfg: PaliGemmaConfig, valid_vocab: int, eos_id: int, pad_id: int):
    """Generates tokens until every row is done or `step` reaches `limit` (traced); records scores when the
    state has room for them."""
    max_new = state["tokens"].shape[1]

    def cond(s):
        return (s["step"] < limit) & ~jnp.all(s["done"])

    def body(s):
        step = s["step"]
        token = jax.lax.dynamic_slice_in_dim(s["tokens"], step - 1, 1, axis=1)  # [B, 1]
        logits, cache = decode_step(params, cfg, valid_vocab, s["cache"], token, s["prefix_end"], step, max_new)
        nxt = sample(logits, s["kind_id"], s["value"], jax.random.fold_in(s["key"], step))
        nxt = jnp.where(s["done"], pad_id, nxt)
        s = {
            **s,
            "cache": cache,
            "tokens": jax.lax.dynamic_update_slice_in_dim(s["tokens"], nxt[:, None], step, axis=1),
            "step": step + 1,
            "done": s["done"] | (nxt == eos_id),
        }
        return _record_scores(s, logits, nxt, step) if "logprobs" in s else s

    return jax.lax.while_loop(cond, body, state)


def _beam_prefill(
    params,
    images,
    tokens,
    prompt_len,
    kind_id,
    value,
    key,
    *,
    beams: int,
    cfg: PaliGemmaConfig,
    max_new: int,
    valid_vocab: int,
    eos_id: int,
    cache_sharding=None,
    scores: bool = False,
):
    """Prefill for beam search: the cache copied for each of `beams` beams and the search's first step.
    Takes (and ignores) the sampler arguments so that both kinds of run are called alike."""
    del kind_id, value, key
    logits, cache, prefix_end = _prefill_logits(
        params, images, tokens, prompt_len, cfg=cfg, max_new=max_new, valid_vocab=valid_vocab
    )
    cache = _place_cache(beam.expand_cache(cache, beams), cache_sharding)
    return beam.start(
        jax.nn.log_softmax(logits, axis=-1),
        cache,
        jnp.repeat(prefix_end, beams),
        beams,
        max_new,
        eos_id,
        scores,
        done=prompt_len == 0,
    )


def _beam_decode(params, state, limit, *, cfg: PaliGemmaConfig, valid_vocab: int, eos_id: int, pad_id: int):
    """Beam search steps until every prompt's best finished sequence beats all its live ones or `limit`."""
    del pad_id
    max_new = state["tokens"].shape[1]

    def next_log_probs(cache, token, step):
        logits, cache = decode_step(params, cfg, valid_vocab, cache, token, state["prefix_end"], step, max_new)
        return jax.nn.log_softmax(logits, axis=-1), cache

    return beam.search(state, limit, next_log_probs, eos_id)


class Generator:
    """Compiles prefill/decode once per (batch, prompt, new-token) bucket and reuses them (and once more per
    bucket for scored runs and for each beam count).

    Params split over a mesh (checkpoint.load_params(..., mesh=...)) make it run there too: inputs are
    replicated, the KV cache split by kv heads, and XLA partitions the rest. layer_views False generates on the
    stacked layers even where per-layer views could be made (cpu_forms.py measures which is faster on a CPU).
    """

    def __init__(
        self, params, cfg: PaliGemmaConfig, valid_vocab: int, eos_id: int, pad_id: int, layer_views: bool = True
    ):
        self.cfg = cfg
        self._layer_views = layer_views
        self.params = params
        mesh = sharding.mesh_of(params)
        self._inputs_sharding = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._static = dict(cfg=cfg, valid_vocab=valid_vocab, eos_id=eos_id)
        self._cache_sharding = None if mesh is None else sharding.cache_sharding(cfg, mesh)
        self._pad_id = pad_id
        self._compiled: dict[tuple[int, int, int, int, bool], tuple] = {}  # + beams, scores

    @property
    def params(self):
        return self._params

    @params.setter
    def params(self, params) -> None:
        """Swaps weights (same shapes); the compiled functions stay."""
        self._params = params
        self._run_params = run_params(params, self._layer_views)

    @property
    def run_params(self):
        """The params prefill and the decode loop read (on one CPU device: per-layer views of the stacked weights)."""
        return self._run_params

    @property
    def compile_count(self) -> int:
        """Number of compiled executables (a prefill and a decode per bucket)."""
        return 2 * len(self._compiled)

    def _executables(self, key: tuple[int, int, int, int, bool], sampler_args):
        batch, prompt_len, max_new, beams, scores = key
        if key not in self._compiled:
            r = self.cfg.image_size
            inputs = [((batch, r, r, 3), jnp.float32), ((batch, prompt_len), jnp.int32), ((batch,), jnp.int32)]
            inputs += [(x.shape, x.dtype) for x in sampler_args]
            inputs = [jax.ShapeDtypeStruct(shape, dtype, sharding=self._inputs_sharding) for shape, dtype in inputs]
            prefill_fn = functools.partial(_beam_prefill, beams=beams) if beams else _prefill
            prefill = (
                jax.jit(
                    functools.partial(
                        prefill_fn,
                        max_new=max_new,
                        scores=scores,
                        cache_sharding=self._cache_sharding,
                        **self._static,
                    )
                )
                .lower(self._run_params, *inputs)
                .compile()
            )
            # decode takes the state where prefill left it (split over the mesh, if any)
            state = jax.tree.map(
                lambda info, where: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=where),
                prefill.out_info,
                prefill.output_shardings,
            )
            decode_fn = _beam_decode if beams else _decode
            decode = (
                jax.jit(functools.partial(decode_fn, pad_id=self._pad_id, **self._static), donate_argnums=1)
                .lower(self._run_params, state, jnp.int32(0))
                .compile()
            )
            self._compiled[key] = (prefill, decode)
        return self._compiled[key]

    def run(
        self,
        images: np.ndarray,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampler: Sampler,
        seed: int,
        chunk: int | None = None,
        scores: bool = False,
    ):
        """Yields (token ids per row so far, Timing) after the first token and after every chunk; with `scores`,
        (ids, Timing, {SCORE_KEYS name: array [rows, tokens so far, ...]}).

        images: float32 [n, R, R, 3]; prompts: token ids per row (already within MAX_PROMPT_TOKENS).
        Beam search knows its answer only at the end: it yields once, the best finished sequences.
        """
        n = len(prompts)
        batch = bucket(n, BATCH_BUCKETS)
        prompt_len = bucket(max(len(p) for p in prompts), PROMPT_BUCKETS)
        max_new = bucket(max_new_tokens, NEW_TOKEN_BUCKETS)
        tokens = np.zeros((batch, prompt_len), np.int32)
        lengths = np.zeros((batch,), np.int32)
        for i, ids in enumerate(prompts):  # rows past n keep length 0: done from the start, then dropped
            tokens[i, : len(ids)] = ids
            lengths[i] = len(ids)
        if batch > n:
            images = np.concatenate([images, np.zeros((batch - n, *images.shape[1:]), images.dtype)])
        sampler_args = (
            jnp.int32(0 if sampler.beams else sampler.kind_id),
            jnp.float32(sampler.value),
            jax.random.key(seed),
        )
        key = (batch, prompt_len, max_new, sampler.beams, scores)

        def read(state, step):
            ids = np.asarray(state["tokens"][:n, :step])
            if not scores:
                return ids, timing
            return ids, timing, {name: np.asarray(state[name][:n, :step]) for name in SCORE_KEYS}

        check_alive(self._params)
        timing = Timing(compiled=key not in self._compiled)
        start = time.perf_counter()
        prefill, decode = self._executables(key, sampler_args)
        state = prefill(self._run_params, images, tokens, lengths, *sampler_args)
        step, done = 1, np.asarray(state["done"])[:n]
        timing.prefill_s = time.perf_counter() - start
        timing.new_tokens = 1
        if not sampler.beams:
            yield read(state, 1)

        start = time.perf_counter()
        while step < max_new_tokens and not done.all():
            limit = max_new_tokens if chunk is None or sampler.beams else min(step + chunk, max_new_tokens)
            state = decode(self._run_params, state, jnp.int32(limit))
            step, done = int(state["step"]), np.asarray(state["done"])[:n]
            timing.decode_s = time.perf_counter() - start
            timing.new_tokens = step
            if not sampler.beams:
                yield read(state, step)
        if sampler.beams:
            yield read(state, step)
