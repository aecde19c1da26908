"""PaliGemma 1 and 2 in JAX: `paligemma.load(source)` gives a Model that generates text for an image.

model = paligemma.load("assets/demo")
model.generate(image, "detect red circle")          # '<loc0123><loc0045><loc0456><loc0321> red circle'
for text in model.stream(image, "caption en"): ...  # text so far, chunk by chunk
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from . import checkpoint, companions, cpu_forms, hub, memory_fit, out_major, quantize, sharding
from .checkpoint import load_params, save_npz
from .companions import MASK_DECODER_NAME, NOT_WEIGHTS, TOKENIZER_NAMES, CompanionMissing
from .compile_cache import enable as enable_compile_cache
from .config import CheckpointError, PaliGemmaConfig, TextConfig, VisionConfig, demo_config, tiny_config
from .devices import default_dtype
from .generate import (
    MAX_BATCH,
    MAX_NEW_TOKENS,
    MAX_PROMPT_TOKENS,
    PROMPT_BUCKETS,
    SCORE_KEYS,
    Generator,
    Timing,
    TokenScores,
)
from .hf_export import export as export_hf
from .hub import cli_progress, is_repo_id
from .hub import is_kaggle as is_kaggle_source
from .hub import resolve as resolve_source
from .memory_fit import DoesNotFit, Estimate, Requirements, describe_fit, estimate_for_repo, format_bytes, requirements
from .memory_fit import free_bytes as free_memory
from .params import count as count_params
from .params import init_params
from .preprocess import ACCEPTED, FORMATS, ImageError, open_image, preprocess, to_rgb
from .samplers import Sampler, SamplerError, parse_sampler
from .slots import SlotEngine
from .tokenizer import NUM_LOC, NUM_SEG, SEG_TOKENS_PER_MASK, Tokenizer, train_tokenizer

__all__ = [
    # loading and running a model
    "load", "Model", "Result", "Timing", "TokenScores", "DTYPES", "DTYPE_NAMES", "MAX_BATCH", "MAX_NEW_TOKENS",
    "MAX_PROMPT_TOKENS", "PROMPT_BUCKETS", "Sampler", "parse_sampler", "MAX_SEED", "is_out_of_memory",
    "enable_compile_cache",
    # continuous batching: decode slots that requests join and leave between chunks
    "SlotEngine", "large_on_cpu",
    # bad input, each a ValueError
    "CheckpointError", "ImageError", "SamplerError",
    # images
    "open_image", "to_rgb", "preprocess", "ACCEPTED", "FORMATS",
    # files of a checkpoint folder, and where a model comes from
    "MASK_DECODER_NAME", "TOKENIZER_NAMES", "NOT_WEIGHTS", "is_repo_id", "is_kaggle_source", "resolve_source",
    "CompanionMissing", "cli_progress",
    # fit before fetch: sizes of a source, and this machine's free memory
    "DoesNotFit", "Estimate", "Requirements", "requirements", "estimate_for_repo", "describe_fit", "format_bytes",
    "free_memory",
    # the loc/seg vocabulary
    "NUM_LOC", "NUM_SEG", "SEG_TOKENS_PER_MASK", "Tokenizer", "train_tokenizer",
    # building, saving and benchmarking models
    "PaliGemmaConfig", "TextConfig", "VisionConfig", "demo_config", "tiny_config", "init_params", "count_params",
    "load_params", "save_npz", "export_hf", "Generator",
    # scoring a model on an uploaded data set (loaded on first use, see __getattr__)
    "evaluate_zip", "write_eval_report", "MAX_ZIP_BYTES", "MAX_ZIP_IMAGES",
]  # fmt: skip
# paligemma.evaluate imports postprocess, which imports paligemma: these names load on first use, not here.
_LAZY = {
    "evaluate_zip": ("evaluate", "evaluate_zip"),
    "MAX_ZIP_BYTES": ("evaluate", "MAX_ZIP_BYTES"),
    "MAX_ZIP_IMAGES": ("evaluate", "MAX_ZIP_IMAGES"),
    "write_eval_report": ("eval_report", "write"),
}


def __getattr__(name: str):
    """The evaluator's names, imported on first use: it needs `postprocess`, which imports this package."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(f".{module}", __name__), attribute)


MAX_SEED = 2**63 - 1  # the largest seed jax.random.key takes
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}  # load(dtype=NAME)
INT8 = quantize.INT8  # load(dtype="int8"): decoder matrices int8, per-channel scales (quantize.py), the rest float
DTYPE_NAMES = (*DTYPES, INT8)  # every dtype name load() accepts


def large_on_cpu(config: PaliGemmaConfig) -> bool:
    """Whether a model counts as large on CPU: a decoder layer of cpu_forms.MEASURE_MIN_LAYER_BYTES or more in
    float32 (a 3B and up, not the demo). Such a model's forms are measured at load, and the app serves it through
    same-settings batches rather than decode slots (playground/requests.py)."""
    return cpu_forms.applies(config, jax.devices("cpu")[0])


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` means the host or the accelerator ran out of memory (XLA says RESOURCE_EXHAUSTED)."""
    return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err)


@dataclasses.dataclass
class Result:
    texts: list[str]
    token_ids: list[list[int]]
    timing: Timing
    scores: list[TokenScores] | None = None  # per row, when run(..., return_scores=True)


class Model:
    """Params on the device, the tokenizer, and compiled generation functions reused across requests."""

    mask_decoder_note: str | None = None  # why mask_decoder_path is None (load sets it), for the page and the CLI
    dtype_note: str | None = None  # why the weights are in a smaller dtype than the device's default (load sets it)

    def __init__(
        self,
        params,
        config: PaliGemmaConfig,
        tokenizer: Tokenizer,
        source: str = "",
        mask_decoder_path: str | None = None,
        cpu_form: cpu_forms.Choice | None = None,
    ):
        if tokenizer.vocab_size > config.text.vocab_size:
            raise CheckpointError(
                f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                f"{config.text.vocab_size} embeddings"
            )
        self.params, self.config, self.tokenizer, self.source = params, config, tokenizer, source
        self.mask_decoder_path = mask_decoder_path
        self.cpu_form = cpu_form  # the measured choice of dtype and decode form on CPU (cpu_forms.py), if one was made
        self._generator = Generator(
            params, config, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id, layer_views=self.layer_views
        )

    @property
    def layer_views(self) -> bool:
        """Whether decoding runs on per-layer views of the weights where it can (on one CPU device): unless the
        stacked form measured faster on this CPU. For Generators built on this model's params."""
        return self.cpu_form is None or self.cpu_form.form.layer_views

    def replace_params(self, params) -> None:
        """Swaps in weights of the same shapes and dtypes (e.g. while training), keeping the compiled functions.
        The MLP matrices go into the layout this model holds them in (out_major.py). ValueError names a weight
        that differs."""
        params = out_major.in_layout_of(params, self.params)
        held = traverse_util.flatten_dict(self.params, sep="/")
        given = traverse_util.flatten_dict(params, sep="/")
        for key in sorted(held.keys() | given.keys()):
            new, old = _described(given.get(key)), _described(held.get(key))
            if new != old:
                raise ValueError(f"replace_params: {key} is {new}, this model's is {old}")
        self.params = self._generator.params = params

    @property
    def dtype(self):
        return self.params["llm"]["embedder"]["input_embedding"].dtype

    @property
    def compile_count(self) -> int:
        return self._generator.compile_count

    def info(self) -> dict:
        return {
            "name": self.config.describe(),
            "resolution": self.config.image_size,
            "parameters": count_params(self.params),
            "dtype": self.dtype_name,
            "device": self.device,
            "source": self.source,
        }

    @property
    def dtype_name(self) -> str:
        """'int8' for quantised decoder matrices, else the weights' float dtype, e.g. 'float32'."""
        return (
            INT8 if quantize.is_quantized(self.params["llm"]["layers"]["mlp"]["linear"]) else jnp.dtype(self.dtype).name
        )

    @property
    def device(self) -> str:
        """The platform the weights live on, with the device count when split, e.g. 'cpu' or 'gpu ×4'."""
        devices = self.params["llm"]["embedder"]["input_embedding"].devices()
        platform = next(iter(devices)).platform
        return platform if len(devices) == 1 else f"{platform} ×{len(devices)}"

    def encode_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"the prompt must be text, got {type(prompt).__name__}")
        ids = self.tokenizer.encode_prompt(prompt)
        if len(ids) > MAX_PROMPT_TOKENS:
            raise ValueError(
                f"the prompt is {len(ids) - 2} tokens long; this model takes at most "
                f"{MAX_PROMPT_TOKENS - 2} prompt tokens. Shorten it."
            )
        return ids

    def run(
        self,
        images: Sequence,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        sampler="greedy",
        seed: int = 0,
        chunk: int | None = None,
        return_scores: bool = False,
    ) -> Iterator[Result]:
        """The engine under generate/stream: yields Results for a batch as tokens arrive (for beam(N), once at
        the end). return_scores: each Result also carries every token's log-probability and top alternatives
        (runs a separately compiled variant; without it, generation is exactly as before)."""
        if len(images) != len(prompts) or not prompts:
            raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        if len(prompts) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} images per call, got {len(prompts)}: split them into batches")
        if not isinstance(max_new_tokens, int | np.integer) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens!r}")
        if not isinstance(seed, int | np.integer) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
        parsed = parse_sampler(sampler)
        ids = [self.encode_prompt(p) for p in prompts]
        pixels = np.stack([preprocess(im, self.config.image_size) for im in images])
        for tokens, timing, *scored in self._generator.run(
            pixels, ids, int(max_new_tokens), parsed, int(seed), chunk, scores=return_scores
        ):
            rows = [self.tokenizer.until_eos(row) for row in tokens.tolist()]
            scores = None
            if scored:
                arrays = scored[0]
                scores = [TokenScores.of(row, {k: arrays[k][i] for k in SCORE_KEYS}) for i, row in enumerate(rows)]
            yield Result([self.tokenizer.decode(r) for r in rows], rows, timing, scores)

    def generate_batch(
        self, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 64, sampler="greedy", seed: int = 0
    ) -> list[str]:
        *_, last = self.run(images, prompts, max_new_tokens, sampler, seed)
        return last.texts

    def generate(self, image, prompt: str, max_new_tokens: int = 64, sampler="greedy", seed: int = 0) -> str:
        """The generated suffix, loc/seg tokens kept as text, without EOS or the prompt."""
        return self.generate_batch([image], [prompt], max_new_tokens, sampler, seed)[0]

    def stream(
        self, image, prompt: str, max_new_tokens: int = 64, sampler="greedy", seed: int = 0, chunk_tokens: int = 8
    ) -> Iterator[str]:
        """Text so far, after the first token and then every `chunk_tokens` tokens."""
        for result in self.run([image], [prompt], max_new_tokens, sampler, seed, chunk=chunk_tokens):
            yield result.texts[0]

    def warmup(self, batch: int = 1, max_new_tokens: int = 64, return_scores: bool = False) -> None:
        """Compiles the common bucket ahead of the first visitor, in the variant its runs will use (with or
        without token scores: each is compiled separately). Both of a bucket's executables are compiled before
        its first token, so the run stops there (a 3B on a CPU would spend 20 s decoding a blank image)."""
        blank = np.zeros((self.config.image_size, self.config.image_size, 3), np.uint8)
        run = self.run([blank] * batch, ["caption en"] * batch, max_new_tokens, return_scores=return_scores)
        with contextlib.closing(run):
            next(run)


def _described(weight) -> str:
    return "absent" if weight is None else f"{np.dtype(weight.dtype).name}{list(weight.shape)}"


def _mesh_for(devices) -> jax.sharding.Mesh | None:
    """Where load(devices=...) puts the weights: None for the default device (host buffers adopted without a
    copy on CPU), else a "model" mesh (one device: the model lives there; several: split over them)."""
    if isinstance(devices, jax.sharding.Mesh):
        if devices.axis_names != (sharding.AXIS,):
            raise ValueError(
                f"the mesh must have the one axis {sharding.AXIS!r} (sharding.make_mesh makes one); "
                f"got axes {devices.axis_names}"
            )
        return devices
    if isinstance(devices, jax.Device):
        devices = [devices]
    if devices is None or list(devices) == [jax.devices()[0]]:
        return None
    if isinstance(devices, str) or not all(isinstance(d, jax.Device) for d in devices):
        raise ValueError(f"devices must be a list of jax devices (e.g. jax.devices()[:2]) or a mesh; got {devices!r}")
    return sharding.make_mesh(devices)


def load(
    source: str | os.PathLike,
    dtype=None,
    tokenizer: str | os.PathLike | None = None,
    mask_decoder: str | os.PathLike | None = None,
    devices: Sequence[jax.Device] | jax.sharding.Mesh | None = None,
    progress: hub.Progress | None = None,
    status: Callable[[str], None] | None = None,
) -> Model:
    """Loads a .npz file, a folder holding one, a Hugging Face-format folder, a Hub repo id or a
    `kaggle:OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]` handle.

    Fit before fetch: before a Hub download (from its config.json alone) and again before reading the weights
    (from their shapes), the need in weights + KV cache is compared with the free memory of the target devices;
    DoesNotFit says the need, what is free and what would fit. The tokenizer and the mask decoder (`vae-oid.npz`)
    come from the argument, beside the weights, the cache, or where they are published (companions.py); a model
    without a mask decoder still detects, and `model.mask_decoder_note` says why masks are missing.
    dtype: None (by the device: bfloat16 where the hardware has it, float16 on older GPUs, see devices.py;
    float32 on CPU, or for a large model bfloat16 or int8 where measured clearly faster on this CPU, see
    cpu_forms.py; where that does not fit in free memory, bfloat16 below float32, then int8, whichever fits
    first, and `model.dtype_note` says why),
    'float32', 'bfloat16', 'float16', or 'int8' (weight-only int8 decoder matrices, quantised layer by layer as
    they are read; the rest in the device's float dtype; for accelerators: on CPU XLA decodes int8 more slowly
    than float32). On one CPU device, a large float32 model's decode form (per-layer views or stacked layers,
    the MLP matrices out-major or not) is the one measured fastest here; `model.cpu_form` holds the figures.
    devices: None (the default device), a list of devices (one: the model lives there; several: it is split
    over them, see sharding.py), or a mesh from `sharding.make_mesh`. Generation runs where the weights are.
    progress: called with (file name, bytes done, bytes total) while files download.
    status: called with what the load does next, in words, before each step after the downloads that can take a
    while (measuring this CPU's forms: seconds, first load on this CPU kind only; reading the weights).
    """
    if isinstance(dtype, str) and dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPE_NAMES)}")
    quantize_int8 = dtype == INT8
    mesh = _mesh_for(devices)
    targets = list(mesh.devices.flat) if mesh is not None else None
    target = targets[0] if targets else jax.devices()[0]
    asked = None if dtype is None or quantize_int8 else jnp.dtype(DTYPES.get(dtype, dtype)).name
    dtype = jnp.dtype(asked) if asked else default_dtype(target)
    need = {"dtype": INT8 if quantize_int8 else jnp.dtype(dtype).name, "float_dtype": jnp.dtype(dtype).name}
    dtype_open = asked is None and not quantize_int8
    if dtype_open:  # where the device's default does not fit, a smaller dtype that does
        need["smaller"] = memory_fit.step_down(dtype)
    source = os.fspath(source)
    if hub.is_repo_id(source):
        memory_fit.check_fits(memory_fit.config_for_repo(source, progress=progress), **need, devices=targets)
    weights = hub.weights_in(hub.resolve(source, progress=progress), source)
    folder = weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights))
    tok = Tokenizer(companions.find_tokenizer(folder, tokenizer, progress=progress))
    try:
        mask_decoder_path, note = companions.find_mask_decoder(folder, mask_decoder, progress=progress), None
    except CompanionMissing as err:
        mask_decoder_path, note = None, str(err)
    tensors, cfg = checkpoint.read_checkpoint(weights)
    free, where = memory_fit.free_bytes(targets)  # once: the note quotes what the choice was made on
    fitting = memory_fit.check_fits(cfg, **need, free=free, where=where)
    dtype_note = None
    if fitting.dtype != need["dtype"]:  # the default does not fit: a smaller form does
        preferred = memory_fit.estimate(cfg, need["dtype"])
        dtype_note = (
            f"{fitting.dtype} because {preferred.dtype} would need {memory_fit.format_bytes(preferred.total)} "
            f"and {where} has {memory_fit.format_bytes(free)} free"
        )
        if status is not None:
            status(f"loading in {dtype_note}")
        quantize_int8, dtype = fitting.dtype == INT8, jnp.dtype(dict(need["smaller"])[fitting.dtype])
    cpu_form = None
    if not quantize_int8 and len(targets or [target]) == 1 and cpu_forms.applies(cfg, target):
        measuring = None if status is None else functools.partial(status, cpu_forms.MEASURING)
        # no dtype asked for and the default fits: any form (each takes less memory than float32)
        open_choice = dtype_open and dtype_note is None
        cpu_form = cpu_forms.choose(cfg, None if open_choice else jnp.dtype(dtype).name, measuring=measuring)
    if cpu_form is not None:
        quantize_int8 = cpu_form.form.dtype == INT8  # the float dtype stays beside the int8 matrices
        dtype = dtype if quantize_int8 else jnp.dtype(cpu_form.form.dtype)
    if status is not None:
        status("reading the weights")
    transposed = cpu_form is not None and cpu_form.form.out_major
    params = checkpoint.materialize(tensors, cfg, dtype, weights, mesh, int8=quantize_int8, out_major=transposed)
    model = Model(params, cfg, tok, source=source, mask_decoder_path=mask_decoder_path, cpu_form=cpu_form)
    model.mask_decoder_note, model.dtype_note = note, dtype_note
    return model
