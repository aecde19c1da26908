"""Beam search with big_vision's semantics, as compiled steps over the decoder's next-token log-probabilities.

Each prompt keeps N live sequences (none ended) and the best finished one. At every step, for B prompts:
- each live sequence is also considered ended here (EOS appended, its log-probability added); the best of
  these replaces the finished one if it scores higher (ties keep the earlier);
- the live sequences continue with the N best non-EOS extensions among all of theirs (the N+1 best tokens of
  each beam are enough to hold them);
- a prompt is done once its best live sequence scores below its finished one: scores (sums of log-probabilities,
  no length normalisation, as big_vision) only fall, so no live sequence can overtake it.
At the step limit the answer is the best finished sequence, EOS included, so a beam answer always ends within
max_new_tokens; a sequence still running there is dropped, as big_vision does.

State (B prompts, N beams, L new-token slots, K = TOP_K), a dict:
    cache, prefix_end [B·N]: the decoder's, one row per beam (row b·N + j is beam j of prompt b)
    live: {"tokens": [B, N, L]} (+ "logprobs" [B, N, L], "top_ids"/"top_logprobs" [B, N, L, K] when scored)
    live_score [B, N]; the best finished sequence as the same arrays without N at the top level; best_score [B]
    step: tokens in each live sequence; done [B]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import gemma

TOP_K = 5  # alternatives recorded per token of a scored run


def expand_cache(cache, beams: int):
    """Each prompt's cache row repeated for its beams: [.., B, ..] -> [.., B·N, ..] (the batch axis sits two
    before the sequence axis in either cache form)."""
    return gemma.map_cache(lambda c, seq_axis: jnp.repeat(c, beams, axis=seq_axis - 2), cache)


def start(log_probs, cache, prefix_end, beams: int, max_new: int, eos_id: int, scores: bool, done):
    """The state after the first step, from the first token's log-probabilities [B, V] (every beam's cache row
    is the same, so none moves)."""
    b = log_probs.shape[0]
    live = {"tokens": jnp.zeros((b, beams, max_new), jnp.int32)}
    if scores:
        live |= {
            "logprobs": jnp.zeros((b, beams, max_new), jnp.float32),
            "top_ids": jnp.zeros((b, beams, max_new, TOP_K), jnp.int32),
            "top_logprobs": jnp.zeros((b, beams, max_new, TOP_K), jnp.float32),
        }
    state = {
        "cache": cache,
        "prefix_end": prefix_end,
        "live": live,
        "live_score": jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf) * jnp.ones((b, 1)),  # one beam to start
        **{name: array[:, 0] for name, array in live.items()},
        "best_score": jnp.full((b,), -jnp.inf),
        "step": jnp.int32(0),
        "done": done,
    }
    state, _ = _select(state, jnp.broadcast_to(log_probs[:, None], (b, beams, log_probs.shape[-1])), eos_id)
    return state


def search(state, limit, next_log_probs, eos_id: int):
    """Steps until every prompt is done or `step` reaches `limit` (traced).

    next_log_probs(cache, token int32[B·N, 1], step) -> (log-probabilities [B·N, V] of token `step`, cache).
    """
    b, beams = state["live_score"].shape

    def cond(s):
        return (s["step"] < limit) & ~jnp.all(s["done"])

    def body(s):
        token = jax.lax.dynamic_slice_in_dim(s["live"]["tokens"], s["step"] - 1, 1, axis=2).reshape(b * beams, 1)
        log_probs, cache = next_log_probs(s["cache"], token, s["step"])
        s, rows = _select({**s, "cache": cache}, log_probs.reshape(b, beams, -1), eos_id)
        return {**s, "cache": gemma.map_cache(lambda c, seq_axis: jnp.take(c, rows, axis=seq_axis - 2), s["cache"])}

    return jax.lax.while_loop(cond, body, state)


def _select(state, log_probs, eos_id: int):
    """One search step at slot `step` from the live sequences' next-token log_probs [B, N, V]: (the new state,
    the cache row each new beam continues from [B·N])."""
    b, beams, vocab = log_probs.shape
    step = state["step"]
    prompt = jnp.arange(b)[:, None]
    top = jax.lax.top_k(log_probs, TOP_K) if "logprobs" in state["live"] else None

    def entries(token, beam):
        """The record of token [B, M] drawn from the distribution of live sequence `beam` [B, M]."""
        new = {"tokens": token}
        if top is not None:
            new |= {
                "logprobs": log_probs[prompt, beam, token],
                "top_logprobs": top[0][prompt, beam],
                "top_ids": top[1][prompt, beam],
            }
        return new

    def extend(beam, token):
        """The live sequences `beam` [B, M] with token [B, M] written at `step`: arrays [B, M, L, ...]."""
        taken = jax.tree.map(lambda a: a[prompt, beam], state["live"])
        return jax.tree.map(
            lambda a, x: jax.lax.dynamic_update_slice_in_dim(a, x[:, :, None].astype(a.dtype), step, 2),
            taken,
            entries(token, beam),
        )

    # every live sequence ending here; the best of them against the finished one
    ending = state["live_score"] + log_probs[:, :, eos_id]  # [B, N]
    last = jnp.argmax(ending, axis=1)[:, None]  # [B, 1]
    ending_score = jnp.take_along_axis(ending, last, axis=1)[:, 0]
    finished = extend(last, jnp.full_like(last, eos_id))
    better = ending_score > state["best_score"]
    best = {
        name: jnp.where(better.reshape(b, *[1] * (array.ndim - 2)), array[:, 0], state[name])
        for name, array in finished.items()
    }

    # the N best continuations without EOS
    candidate_logprobs, candidate_ids = jax.lax.top_k(log_probs, min(beams + 1, vocab))  # [B, N, C]
    candidates = state["live_score"][:, :, None] + jnp.where(candidate_ids == eos_id, -jnp.inf, candidate_logprobs)
    live_score, pick = jax.lax.top_k(candidates.reshape(b, -1), beams)  # [B, N]
    parent = pick // candidate_ids.shape[-1]
    token = jnp.take_along_axis(candidate_ids.reshape(b, -1), pick, axis=1)
    best_score = jnp.where(better, ending_score, state["best_score"])
    state = {
        **state,
        **best,
        "best_score": best_score,
        "live": extend(parent, token),
        "live_score": live_score,
        "step": step + 1,
        "done": state["done"] | (live_score.max(axis=1) < best_score),
    }
    return state, (prompt * beams + parent).reshape(-1)
