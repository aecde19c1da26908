"""Cached, compiled generation: one prefill and one decode loop per shape bucket.

Layout of the KV cache for a bucket (P image tokens, Tp padded prompt tokens, Nmax new tokens):

    cache index:  0 … P-1 | P … P+Tp-1                      | P+Tp … P+Tp+Nmax-1
                  image   | prompt (row b uses the first    | generated tokens, written at the
                          | len_b, the rest is masked out)  | same index for every row

Every row writes its t-th new token at the same cache index, so one in-place update serves the batch;
its RoPE position is P + len_b + t, so padding never shifts a row's positions. The decode loop is a
`lax.while_loop` that runs until every row has emitted EOS or a traced step limit is reached: the same
compiled loop serves a whole request or a streaming chunk, with one host round trip per call.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, compile_cache, gemma, sharding
from .config import PaliGemmaConfig
from .model import embed_sequence, prefix_lm_mask
from .samplers import Sampler, sample

PROMPT_BUCKETS = (16, 32, 64, 128, 256)
NEW_TOKEN_BUCKETS = (16, 64, 256, 1024)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
MAX_PROMPT_TOKENS = PROMPT_BUCKETS[-1]
MAX_NEW_TOKENS = NEW_TOKEN_BUCKETS[-1]


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= n)


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
        return {"prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
                "new_tokens": self.new_tokens, "tokens_per_s": round(self.tokens_per_s, 2),
                "compiled": self.compiled}


def _mask_vocab(logits, valid_vocab: int):
    """Ids the tokenizer cannot decode (HF pads the table past it) are never emitted."""
    if valid_vocab >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, -jnp.inf)


def _prefill(params, images, tokens, prompt_len, kind_id, value, key, *, cfg: PaliGemmaConfig,
             max_new: int, valid_vocab: int, eos_id: int, per_layer_cache: bool, cache_sharding=None):
    """Encodes images + prompts, fills the cache and samples the first token. Returns the decode state.

    Runs the stacked layers (prefill is compute-bound: a scan over layers compiles faster and its
    per-layer weight slices cost little next to the matmuls over all prompt tokens). per_layer_cache: hand
    decode the cache as a per-layer list (when it runs per-layer views). cache_sharding: where the KV cache
    lives when the model is split over devices (sharding.py)."""
    x = embed_sequence(params, cfg, images, tokens)  # [B, P + Tp, D]
    b, length, _ = x.shape
    prefix_end = cfg.num_image_tokens + prompt_len  # [B]
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    mask = prefix_lm_mask(prefix_end, prefix_end, length)
    hidden, new_kv, _ = gemma.run_layers(params["llm"], cfg.text, x, positions, mask)
    last = jnp.take_along_axis(hidden, (prefix_end - 1)[:, None, None], axis=1)  # [B, 1, D]
    logits = _mask_vocab(gemma.logits_from_hidden(params["llm"], cfg.text, last)[:, 0], valid_vocab)
    first = sample(logits, kind_id, value, jax.random.fold_in(key, 0))
    cache = gemma.map_cache(lambda c, axis: jnp.pad(c, [(0, max_new) if a == axis else (0, 0) for a in range(c.ndim)]),
                            new_kv)  # room for the generated tokens after P + Tp
    if cache_sharding is not None:
        cache = jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, cache_sharding), cache)
    if per_layer_cache:
        cache = gemma.unstack_cache(cache)
    return {
        "cache": cache,
        "tokens": jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first),
        "step": jnp.int32(1), "done": (first == eos_id) | (prompt_len == 0), "prefix_end": prefix_end,
        "kind_id": kind_id, "value": value, "key": key,
    }


def _decode(params, state, limit, *, cfg: PaliGemmaConfig, valid_vocab: int, eos_id: int, pad_id: int):
    """Generates tokens until every row is done or `step` reaches `limit` (traced)."""
    cache_len = gemma.cache_length(state["cache"])
    generated_start = cache_len - state["tokens"].shape[1]  # P + Tp

    def cond(s):
        return (s["step"] < limit) & ~jnp.all(s["done"])

    def body(s):
        step = s["step"]
        index = generated_start + step - 1  # cache slot of the token being fed
        token = jax.lax.dynamic_slice_in_dim(s["tokens"], step - 1, 1, axis=1)  # [B, 1]
        x = gemma.embed_tokens(params["llm"], cfg.text, token)
        positions = (s["prefix_end"] + step - 1)[:, None]
        slots = jnp.arange(cache_len)[None, None, :]
        mask_cache = (slots < s["prefix_end"][:, None, None]) | ((slots >= generated_start) & (slots < index))
        mask_new = jnp.ones((token.shape[0], 1, 1), bool)
        hidden, new_kv, _ = gemma.run_layers(params["llm"], cfg.text, x, positions, mask_new, s["cache"], mask_cache)
        logits = _mask_vocab(gemma.logits_from_hidden(params["llm"], cfg.text, hidden)[:, 0], valid_vocab)
        nxt = sample(logits, s["kind_id"], s["value"], jax.random.fold_in(s["key"], step))
        nxt = jnp.where(s["done"], pad_id, nxt)
        return {
            **s,
            "cache": gemma.write_cache(s["cache"], new_kv, index),
            "tokens": jax.lax.dynamic_update_slice_in_dim(s["tokens"], nxt[:, None], step, axis=1),
            "step": step + 1, "done": s["done"] | (nxt == eos_id),
        }

    return jax.lax.while_loop(cond, body, state)


def decode_params(params):
    """The params the decode loop runs on: on CPU the decoder layers as a list of per-layer arrays that share
    the stacked arrays' memory (see gemma.py for why), elsewhere — or where sharing is impossible — as they are."""
    layers = params["llm"]["layers"]
    views = jax.tree.map(_layer_views, layers)
    if any(v is None for v in jax.tree.leaves(views, is_leaf=lambda v: v is None)):
        return params
    depth = len(jax.tree.leaves(views, is_leaf=lambda v: isinstance(v, list))[0])
    per_layer = [jax.tree.map(lambda v, i=i: v[i], views, is_leaf=lambda v: isinstance(v, list)) for i in range(depth)]
    return {**params, "llm": {**params["llm"], "layers": per_layer}}


def _layer_views(stacked) -> list[jax.Array] | None:
    """[L, ...] -> L arrays [...] aliasing the stacked array's buffer, or None where that cannot be done.

    XLA adopts 64-byte-aligned host memory without a copy (DLPack); on CPU a device buffer *is* host memory,
    so each layer's row of it can be adopted as its own array (on the default device: DLPack puts it there).
    The views do not own the memory: the stacked array must outlive them (the Generator holds both) and must
    not be donated (see _check_alive).
    """
    if not isinstance(stacked, jax.Array) or stacked.ndim < 2 or jax.default_backend() != "cpu":
        return None
    if stacked.devices() != {jax.devices()[0]} or np.dtype(stacked.dtype).kind not in "fiu":  # no bfloat16 DLPack
        return None
    address, row_bytes = stacked.unsafe_buffer_pointer(), stacked.nbytes // stacked.shape[0]
    if address % checkpoint.ALIGNMENT or row_bytes % checkpoint.ALIGNMENT:
        return None
    memory = (ctypes.c_char * stacked.nbytes).from_address(address)
    host = np.frombuffer(memory, dtype=stacked.dtype).reshape(stacked.shape)
    return [jax.dlpack.from_dlpack(host[i], copy=False) for i in range(stacked.shape[0])]


def _check_alive(params) -> None:
    """Per-layer views would read freed memory where the stacked params were donated; refuse instead."""
    if any(leaf.is_deleted() for leaf in jax.tree.leaves(params["llm"]["layers"])):
        raise RuntimeError("the model's decoder weights were deleted (donated to another computation?); "
                           "give the model live params with replace_params() before generating")


class Generator:
    """Compiles prefill/decode once per (batch, prompt, new-token) bucket and reuses them.

    Params split over a mesh (checkpoint.load_params(..., mesh=...)) make it run there too: inputs are
    replicated, the KV cache split by kv heads, and XLA partitions the rest.
    """

    def __init__(self, params, cfg: PaliGemmaConfig, valid_vocab: int, eos_id: int, pad_id: int):
        compile_cache.enable()  # executables survive restarts (see compile_cache.py)
        self.cfg = cfg
        self.params = params
        mesh = sharding.mesh_of(params)
        self._inputs_sharding = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._static = dict(cfg=cfg, valid_vocab=valid_vocab, eos_id=eos_id)
        self._cache_sharding = None if mesh is None else sharding.cache_sharding(cfg, mesh)
        self._pad_id = pad_id
        self._compiled: dict[tuple[int, int, int], tuple] = {}

    @property
    def params(self):
        return self._params

    @params.setter
    def params(self, params) -> None:
        """Swaps weights (same shapes); the compiled functions stay."""
        self._params = params
        self._decode_params = decode_params(params)

    @property
    def compile_count(self) -> int:
        """Number of compiled executables (a prefill and a decode per bucket)."""
        return 2 * len(self._compiled)

    def _executables(self, batch: int, prompt_len: int, max_new: int, sampler_args):
        key = (batch, prompt_len, max_new)
        if key not in self._compiled:
            r = self.cfg.image_size
            inputs = [((batch, r, r, 3), jnp.float32), ((batch, prompt_len), jnp.int32), ((batch,), jnp.int32)]
            inputs += [(x.shape, x.dtype) for x in sampler_args]
            inputs = [jax.ShapeDtypeStruct(shape, dtype, sharding=self._inputs_sharding) for shape, dtype in inputs]
            per_layer = self._decode_params is not self._params
            prefill = jax.jit(functools.partial(_prefill, max_new=max_new, per_layer_cache=per_layer,
                                                cache_sharding=self._cache_sharding, **self._static)
                              ).lower(self._params, *inputs).compile()
            # decode takes the state where prefill left it (split over the mesh, if any)
            state = jax.tree.map(lambda info, where: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=where),
                                 prefill.out_info, prefill.output_shardings)
            decode = jax.jit(functools.partial(_decode, pad_id=self._pad_id, **self._static), donate_argnums=1).lower(
                self._decode_params, state, jnp.int32(0)).compile()
            self._compiled[key] = (prefill, decode)
        return self._compiled[key]

    def run(self, images: np.ndarray, prompts: list[list[int]], max_new_tokens: int, sampler: Sampler,
            seed: int, chunk: int | None = None):
        """Yields (token ids per row so far, Timing) after the first token and after every chunk.

        images: float32 [n, R, R, 3]; prompts: token ids per row (already within MAX_PROMPT_TOKENS).
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
        sampler_args = (jnp.int32(sampler.kind_id), jnp.float32(sampler.value), jax.random.key(seed))

        _check_alive(self._params)
        timing = Timing(compiled=(batch, prompt_len, max_new) not in self._compiled)
        start = time.perf_counter()
        prefill, decode = self._executables(batch, prompt_len, max_new, sampler_args)
        state = prefill(self._params, images, tokens, lengths, *sampler_args)
        step, done = 1, np.asarray(state["done"])[:n]
        timing.prefill_s = time.perf_counter() - start
        timing.new_tokens = 1
        yield np.asarray(state["tokens"][:n, :1]), timing

        start = time.perf_counter()
        while step < max_new_tokens and not done.all():
            limit = max_new_tokens if chunk is None else min(step + chunk, max_new_tokens)
            state = decode(self._decode_params, state, jnp.int32(limit))
            ids = np.asarray(state["tokens"][:n])
            step, done = int(state["step"]), np.asarray(state["done"])[:n]
            timing.decode_s = time.perf_counter() - start
            timing.new_tokens = step
            yield ids[:, :step], timing
