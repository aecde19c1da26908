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
        return lambda: jax.random.categorical(key, adjust(logits, value), axis=-1).astype(jnp.int32)

    return jax.lax.switch(kind_id, (greedy, drawn(_temperature), drawn(_nucleus)))


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
    """Logits outside the smallest set of top tokens whose probability reaches P (always at least the top one)
    set to -inf."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < value, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)
