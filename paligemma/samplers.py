"""Decoding choices: `greedy`, `temperature(T)`, `nucleus(P)`.

All three run inside one compiled function: the kind is a traced integer picked with `lax.switch` and T/P
are traced floats, so switching samplers or values never recompiles.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

KINDS = ("greedy", "temperature", "nucleus")
_SPEC = re.compile(r"^\s*(greedy|temperature|nucleus)\s*(?:\(\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*\))?\s*$")


class SamplerError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Sampler:
    kind: str = "greedy"
    value: float = 0.0  # T for temperature, P for nucleus

    @property
    def kind_id(self) -> int:
        return KINDS.index(self.kind)

    def __str__(self) -> str:
        return self.kind if self.kind == "greedy" else f"{self.kind}({self.value:g})"


def parse_sampler(spec: str | Sampler) -> Sampler:
    """'greedy' | 'temperature(T)' with T > 0 | 'nucleus(P)' with 0 < P ≤ 1."""
    if isinstance(spec, Sampler):
        return spec
    match = _SPEC.match(str(spec))
    accepted = "accepted: greedy, temperature(T) with T > 0, nucleus(P) with 0 < P ≤ 1"
    if not match:
        raise SamplerError(f"unknown sampler {spec!r}; {accepted}")
    kind, value = match.group(1), match.group(2)
    if kind == "greedy":
        if value is not None:
            raise SamplerError(f"greedy takes no value ({spec!r}); {accepted}")
        return Sampler()
    if value is None:
        raise SamplerError(f"{kind} needs a value, e.g. {kind}(0.5); {accepted}")
    number = float(value)
    if number <= 0 or (kind == "nucleus" and number > 1):
        raise SamplerError(f"{spec!r} is out of range; {accepted}")
    return Sampler(kind, number)


def sample(logits, kind_id, value, key):
    """logits float32[B, V] -> int32[B]."""

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def temperature():
        return jax.random.categorical(key, logits / value, axis=-1).astype(jnp.int32)

    def nucleus():
        # Keep the smallest set of top tokens whose probability reaches P (always at least the top one).
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < value, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        kept = jnp.where(logits >= cutoff, logits, -jnp.inf)
        return jax.random.categorical(key, kept, axis=-1).astype(jnp.int32)

    return jax.lax.switch(kind_id, (greedy, temperature, nucleus))
