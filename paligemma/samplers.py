"""Decoding choices: `greedy`, `temperature(T)`, `nucleus(P)`, and `beam(N)` (beam search, see beam.py).

The three samplers run inside one compiled function: the kind is a traced integer picked with `lax.switch` and
T/P are traced floats, so switching samplers or values never recompiles. Beam search keeps N sequences per
prompt, so N sets array shapes: each N compiles its own decode loop.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

KINDS = ("greedy", "temperature", "nucleus")  # the samplers, in `sample`'s switch order
BEAM = "beam"
MAX_BEAMS = 64
_SPEC = re.compile(r"^\s*(greedy|temperature|nucleus|beam)\s*(?:\(\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*\))?\s*$")


class SamplerError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Sampler:
    kind: str = "greedy"
    value: float = 0.0  # T for temperature, P for nucleus, N for beam

    @property
    def kind_id(self) -> int:
        return KINDS.index(self.kind)

    @property
    def beams(self) -> int:
        """N for beam search, 0 for the samplers."""
        return int(self.value) if self.kind == BEAM else 0

    def __str__(self) -> str:
        return self.kind if self.kind == "greedy" else f"{self.kind}({self.value:g})"


def parse_sampler(spec: str | Sampler) -> Sampler:
    """'greedy' | 'temperature(T)' with T > 0 | 'nucleus(P)' with 0 < P ≤ 1 | 'beam(N)' with N whole, 1 ≤ N ≤ 64."""
    if isinstance(spec, Sampler):
        return spec
    match = _SPEC.match(str(spec))
    accepted = (
        f"accepted: greedy, temperature(T) with T > 0, nucleus(P) with 0 < P ≤ 1, "
        f"beam(N) with N a whole number from 1 to {MAX_BEAMS}"
    )
    if not match:
        raise SamplerError(f"unknown sampler {spec!r}; {accepted}")
    kind, value = match.group(1), match.group(2)
    if kind == "greedy":
        if value is not None:
            raise SamplerError(f"greedy takes no value ({spec!r}); {accepted}")
        return Sampler()
    if value is None:
        raise SamplerError(f"sampler {kind} needs a value, e.g. {kind}({4 if kind == BEAM else 0.5}); {accepted}")
    number = float(value)
    if kind == BEAM and (number != int(number) or not 1 <= number <= MAX_BEAMS):
        raise SamplerError(f"{spec!r} is out of range; {accepted}")
    if number <= 0 or (kind == "nucleus" and number > 1):
        raise SamplerError(f"{spec!r} is out of range; {accepted}")
    return Sampler(kind, number)


def sample(logits, kind_id, value, key):
    """logits float32[B, V] -> int32[B]."""

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def drawn(adjust):
        return lambda: _draw(key, adjust(logits, value))

    return jax.lax.switch(kind_id, (greedy, drawn(_temperature), drawn(_nucleus)))


def _draw(key, logits):
    """int32[B]: one token per row from softmax(logits), by inverting the cumulative distribution at one uniform
    number per row. As exact as jax.random.categorical, which draws a Gumbel number for every token of the
    vocabulary: 6.4 ms per row of 257 k on a 2-core CPU, against 1.3 ms here. A token of probability 0 (-inf,
    e.g. outside the nucleus) is never drawn: its cumulative value equals its predecessor's."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)  # [B, V]
    u = jax.random.uniform(key, (logits.shape[0], 1)) * cdf[:, -1:]  # [B, 1], in [0, total)
    return jnp.minimum(jnp.sum(cdf <= u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)


def sampling_log_probs(logits, kind_id, value):
    """float32[B, V]: the log-probabilities of the distribution `sample` draws from (greedy: the model's own;
    temperature(T): of logits / T; nucleus(P): renormalised over the nucleus, -inf outside it)."""
    branches = [
        lambda adjust=adjust: jax.nn.log_softmax(adjust(logits, value), axis=-1)
        for adjust in (_unchanged, _temperature, _nucleus)
    ]
    return jax.lax.switch(kind_id, branches)


def _unchanged(logits, value):
    return logits


def _temperature(logits, value):
    return logits / value


def _nucleus(logits, value):
    """Logits outside the nucleus set to -inf: the smallest set of top tokens whose probability reaches P (ties at
    its edge kept, always at least the top one); P = 1 keeps every token.

    Found without sorting the vocabulary (a sort of 257 k logits took 60-70 ms per row on a 2-core CPU, more than
    a whole decode step of the mid config). A token is in the nucleus exactly when the probability of the tokens
    above it is below P, and that probability falls as the logit rises; so a bisection over the logits'
    order-preserving int32 keys finds the lowest kept one: 32 halvings, each one masked sum over the vocabulary
    (1.6 ms per row of 257 k)."""
    keys = _order_keys(logits)  # int32[B, V], ordered as the logits
    probs = jax.nn.softmax(logits, axis=-1)

    def halve(_, bounds):
        low, high = bounds  # the lowest kept key lies in [low, high]
        mid = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2) without int32 overflow
        above = jnp.sum(jnp.where(keys > mid, probs, 0.0), axis=-1, keepdims=True)
        kept = above < value  # a token keyed `mid` would be kept: the lowest kept key is at most mid
        return jnp.where(kept, low, mid + 1), jnp.where(kept, mid, high)

    bounds = (jnp.min(keys, axis=-1, keepdims=True), jnp.max(keys, axis=-1, keepdims=True))  # the top one is kept
    _, lowest = jax.lax.fori_loop(0, 32, halve, bounds)
    return jnp.where((keys >= lowest) | (value >= 1), logits, -jnp.inf)


def _order_keys(x):
    """float32 -> int32 keys in the same order (negative floats' magnitude bits flipped)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)
