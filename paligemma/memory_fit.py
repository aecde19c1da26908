"""Fit before fetch: how many bytes a model needs (weights + KV cache) and whether this machine has them.

Estimated from the config alone, so a registry can show "6.1 GB · fits" before a 6–55 GB download starts.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os

import numpy as np

from .config import PaliGemmaConfig
from .params import expected_shapes
from .quantize import CONTRACTED_AXES, INT8, scale_shape

GB = 1e9
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_TOKENS = 1024 + 64 + 128  # an image at 896 px, a long prompt and the answer: a generous single request
# Published decoders (224 px, bfloat16) to suggest when a model does not fit: name -> weights bytes.
_SMALLER = {
    "PaliGemma 2 28B": 27_650_192_112 * 2,
    "PaliGemma 2 10B": 9_662_409_456 * 2,
    "PaliGemma 2 3B": 3_032_094_960 * 2,
}


class DoesNotFit(ValueError):
    """The model would not fit in the free memory of the devices it is meant for."""


@dataclasses.dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    dtype: str

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def _dtype_bytes(dtype) -> int:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def _float_name(float_dtype) -> str:
    """The float dtype beside int8 layer matrices: as given, else what load() would pick on this machine."""
    if float_dtype is None:
        from .devices import default_dtype

        float_dtype = default_dtype()
    return float_dtype if isinstance(float_dtype, str) else np.dtype(float_dtype).name


def weight_bytes(cfg: PaliGemmaConfig, dtype="bfloat16", float_dtype=None) -> int:
    """dtype "int8": the decoder's layer matrices take a byte per weight plus a `float_dtype` scale per output
    channel (quantize.py); the rest is `float_dtype`. Quantised while read, one layer at a time, so loading
    never holds them in float."""
    if dtype != INT8:
        return sum(math.prod(shape) for shape in expected_shapes(cfg).values()) * _dtype_bytes(dtype)
    float_bytes, total = _dtype_bytes(_float_name(float_dtype)), 0
    for key, shape in expected_shapes(cfg).items():
        contracted = CONTRACTED_AXES.get(key)
        if contracted is None:
            total += math.prod(shape) * float_bytes
        else:
            total += math.prod(shape) + math.prod(scale_shape(shape, contracted)) * float_bytes
    return total


def kv_cache_bytes(cfg: PaliGemmaConfig, dtype="bfloat16", batch: int = 1, tokens: int | None = None) -> int:
    """Keys and values of every layer for `tokens` positions (image + prompt + answer) of `batch` rows."""
    t = cfg.text
    tokens = tokens if tokens is not None else cfg.num_image_tokens + 192
    return 2 * t.depth * t.num_kv_heads * t.head_dim * tokens * batch * _dtype_bytes(dtype)


def estimate(
    cfg: PaliGemmaConfig, dtype="bfloat16", batch: int = 1, tokens: int | None = None, float_dtype=None
) -> Estimate:
    """dtype: a float dtype, or "int8" with the rest (and the KV cache) in float_dtype (default: by device)."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    cache_dtype = _float_name(float_dtype) if name == INT8 else name
    return Estimate(weight_bytes(cfg, name, float_dtype), kv_cache_bytes(cfg, cache_dtype, batch, tokens), name)


def free_bytes(devices=None) -> tuple[int, str]:
    """(free bytes, a description) of the target devices: host RAM for CPU, device memory for accelerators."""
    import jax
    import psutil

    devices = list(devices) if devices is not None else [jax.devices()[0]]
    if devices[0].platform == "cpu":
        return psutil.virtual_memory().available, "host RAM"
    free = 0
    for device in devices:
        stats = device.memory_stats() or {}
        free += int(stats.get("bytes_limit", 0)) - int(stats.get("bytes_in_use", 0))
    kind = devices[0].device_kind
    return free, f"{len(devices)} × {kind}" if len(devices) > 1 else kind


def step_down(dtype) -> tuple[tuple[str, str], ...]:
    """The smaller forms a load with no dtype asked for takes, in order, where its device's default float dtype
    does not fit, as (dtype, float dtype): bfloat16 below float32, then int8 decoder matrices beside the
    smallest float dtype (on CPU bfloat16: beside float32, int8 would take more than bfloat16 alone)."""
    name = np.dtype(dtype).name
    if name == "float32":
        return (("bfloat16", "bfloat16"), (INT8, "bfloat16"))
    return ((INT8, name),)


def check_fits(
    cfg: PaliGemmaConfig,
    dtype="bfloat16",
    batch: int = 1,
    tokens: int | None = None,
    devices=None,
    free: int | None = None,
    where: str | None = None,
    float_dtype=None,
    smaller: tuple[tuple[str, str], ...] = (),
) -> Estimate:
    """The estimate, or DoesNotFit naming the need, what is free and what would fit. `free`/`where` override
    the measurement (for a planned machine, or a test); float_dtype: beside int8 (see estimate). smaller: forms
    to fall back to, in order, where `dtype` does not fit (`step_down`): the estimate is then the first that
    fits, and DoesNotFit comes only where none does."""
    if free is None:
        free, measured = free_bytes(devices)
        where = where or measured
    where = where or "this machine"
    need = estimate(cfg, dtype, batch, tokens, float_dtype)
    fitting = first_fitting([need, *(estimate(cfg, d, batch, tokens, beside) for d, beside in smaller)], free)
    if fitting is not None:
        return fitting
    raise DoesNotFit(
        f"{cfg.describe()} needs about {format_bytes(need.total)} in {need.dtype} ({format_bytes(need.weights)} "
        f"weights + {format_bytes(need.kv_cache)} KV cache for {batch}×{tokens or cfg.num_image_tokens + 192} "
        f"tokens) but {where} has {format_bytes(free)} free. Would fit: "
        f"{_alternatives(cfg, need, batch, tokens, free)}"
    )


def first_fitting(estimates, free: int) -> Estimate | None:
    """The first of `estimates` whose total fits in `free` bytes, or None."""
    return next((est for est in estimates if est.total <= free), None)


def _alternatives(cfg, need: Estimate, batch, tokens, free: int) -> str:
    options = []
    half = estimate(cfg, "bfloat16", batch, tokens)
    if need.dtype == "float32" and half.total <= free:
        options.append(f"dtype bfloat16 ({format_bytes(half.total)})")
    if need.dtype != INT8:
        int8 = estimate(cfg, INT8, batch, tokens, need.dtype)
        if int8.total <= free:
            options.append(f"dtype int8 ({format_bytes(int8.total)}, {need.dtype} beside it)")
    if free > 0 and half.total > free:
        options.append(f"splitting it over {math.ceil(half.total / free)} such devices (devices=[...], bfloat16)")
    smaller = [
        f"{name} ({size / GB:.1f} GB in bfloat16)"
        for name, size in _SMALLER.items()
        if size + half.kv_cache <= free and size < half.weights
    ]
    options.append(f"a smaller checkpoint: {smaller[0]}" if smaller else "no published checkpoint on this memory")
    return "; ".join(options)


def config_for_repo(repo_id: str, token: str | None = None, progress=None) -> PaliGemmaConfig:
    """The architecture of a Hub repo from its config.json alone (a few KB), before any weights are fetched."""
    from . import hub, published

    with open(hub.download_file(repo_id, "config.json", token=token, progress=progress)) as f:
        return published.architecture(json.load(f))


def estimate_for_repo(repo_id: str, dtype="bfloat16", token: str | None = None, progress=None) -> Estimate:
    return estimate(config_for_repo(repo_id, token, progress), dtype)


def read_checkpoint_config(weights: str) -> PaliGemmaConfig:
    """A local checkpoint's architecture from its shapes (array headers only; no tensor data is read). `weights`:
    a .npz file or a Hugging Face folder (hub.weights_in finds it in a folder)."""
    from .checkpoint import read_checkpoint

    return read_checkpoint(weights)[1]


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What a source asks of this machine, as far as it is known without downloading the weights."""

    download: int | None  # bytes of the files to fetch (on disk already for local sources); None: unknown
    need: Estimate | None  # None: unknown (e.g. a gated repo without a token, a Kaggle model not yet fetched)
    gated: bool | None
    unknown_because: str = ""  # why `need` is unknown, one line
    smaller: tuple[Estimate, ...] = ()  # where no dtype was asked for: the step-down dtypes' needs, in order

    def fitting(self, free: int) -> Estimate | None:
        """The need of the dtype a load would take with `free` bytes free: the first that fits, else `need`."""
        if self.need is None:
            return None
        return first_fitting([self.need, *self.smaller], free) or self.need


def requirements(source: str, dtype=None) -> Requirements:
    """Sizes of a local path, a Hub repo (metadata and config.json only) or a `kaggle:` handle (unknown until
    fetched). dtype None: the one load() would pick on this machine, with the needs of the dtypes it would step
    down to (`step_down`). Never raises for a source it cannot reach: the reason goes into `unknown_because`."""
    from . import hub
    from .config import CheckpointError
    from .devices import default_dtype

    forms = ((dtype, None),) if dtype else ((np.dtype(default_dtype()).name, None), *step_down(default_dtype()))
    if hub.is_kaggle(source):
        return Requirements(None, None, None, "Kaggle models are measured once downloaded")
    if not hub.is_repo_id(source):
        try:
            weights = hub.weights_in(source)
            found = _bytes_on_disk(weights), read_checkpoint_config(weights), False
        except (CheckpointError, OSError) as err:
            return Requirements(None, None, False, str(err))
    else:
        try:
            files, gated = hub.repo_summary(source)
        except CheckpointError as err:
            return Requirements(None, None, None, str(err))
        try:
            found = sum(files.values()), config_for_repo(source), gated
        except CheckpointError as err:
            return Requirements(sum(files.values()), None, gated, str(err))
    download, cfg, gated = found
    need, *smaller = (estimate(cfg, d, float_dtype=beside) for d, beside in forms)
    return Requirements(download, need, gated, smaller=tuple(smaller))


def _bytes_on_disk(weights: str) -> int:
    if os.path.isfile(weights):
        return os.path.getsize(weights)
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(weights, "*.safetensors")))


def format_bytes(n: int) -> str:
    """A size for a person: '6.1 GB', '28.4 MB', '512 KB'."""
    return f"{n / GB:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} KB"


def describe_fit(est: Estimate, free: int) -> str:
    """A short registry line, e.g. '6.1 GB (bfloat16) · fits' or '55.3 GB (bfloat16) · needs 39.3 GB more'."""
    status = "fits" if est.total <= free else f"needs {format_bytes(est.total - free)} more"
    return f"{format_bytes(est.total)} ({est.dtype}) · {status}"
