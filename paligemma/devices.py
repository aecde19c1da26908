"""Which float dtype a device computes in, and where float16 needs float32.

bfloat16 has float32's exponent range at half the bytes, but only some hardware multiplies it natively: TPUs,
and NVIDIA GPUs from compute capability 8.0 (Ampere: A100, A10, L4, H100, ...). Older GPUs (T4 is 7.5, V100
7.0) emulate it slowly, so there float16 is the half-size dtype. On CPU the default stays float32: XLA's
bfloat16 matrix-vector products there are slower than float32's.

float16 tops out at 65504, and Gemma-family activations go past that: the residual stream (embeddings are
scaled by √width and every block adds to it) and the SigLIP encoder's. So with float16 weights the models keep
the values that can grow in `wide_dtype` (float32): the residual streams, the outputs of the projections that
feed them, attention scores and soft caps, norms and logits. Matrix inputs stay float16, which keeps the
weight reads (the cost of decoding) at two bytes.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

# NVIDIA compute capability from which bfloat16 matrix units exist (Ampere).
BFLOAT16_MIN_CUDA_CAPABILITY = 8.0


def has_bfloat16(device: jax.Device) -> bool:
    """Whether the device multiplies bfloat16 in hardware (TPU, NVIDIA compute capability >= 8.0)."""
    if device.platform == "tpu":
        return True
    if device.platform == "gpu":
        capability = str(getattr(device, "compute_capability", ""))  # CUDA: e.g. "7.5"
        if not re.fullmatch(r"\d+\.\d+", capability):
            return True  # not CUDA: the AMD Instinct GPUs JAX supports (MI100 on) multiply bfloat16 natively
        return float(capability) >= BFLOAT16_MIN_CUDA_CAPABILITY
    return False


def default_dtype(device: jax.Device | None = None):
    """The dtype a model loads in on `device` (default: JAX's first device): float32 on CPU, bfloat16 on
    accelerators that have it, float16 on older GPUs (safe through the float32 guards above)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return jnp.float32
    return jnp.bfloat16 if has_bfloat16(device) else jnp.float16


def wide_dtype(dtype):
    """The dtype for values that may outgrow `dtype`'s range: float32 for float16, else `dtype` itself
    (bfloat16 and float32 already reach 3e38, so their computation stays exactly as it was)."""
    return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else dtype
