"""PaliGemma 1 and 2 in JAX: `paligemma.load(source)` gives a Model that generates text for an image.

    model = paligemma.load("assets/demo")
    model.generate(image, "detect red circle")          # '<loc0123><loc0045><loc0456><loc0321> red circle'
    for text in model.stream(image, "caption en"): ...  # text so far, chunk by chunk
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, hub, sharding
from .config import CheckpointError, PaliGemmaConfig
from .generate import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, Generator, Timing
from .params import count as count_params
from .preprocess import ImageError, preprocess
from .samplers import SamplerError, parse_sampler
from .tokenizer import Tokenizer

__all__ = ["load", "Model", "Result", "CheckpointError", "ImageError", "SamplerError", "PaliGemmaConfig"]

_TOKENIZER_NAMES = ("tokenizer.model", "paligemma_tokenizer.model")
_MASK_DECODER_NAME = "vae-oid.npz"
_NOT_WEIGHTS = {_MASK_DECODER_NAME, "vqvae-encoder.npz"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Result:
    texts: list[str]
    token_ids: list[list[int]]
    timing: Timing


class Model:
    """Params on the device, the tokenizer, and compiled generation functions reused across requests."""

    def __init__(self, params, config: PaliGemmaConfig, tokenizer: Tokenizer, source: str = "",
                 mask_decoder_path: str | None = None):
        if tokenizer.vocab_size > config.text.vocab_size:
            raise CheckpointError(
                f"the tokenizer has {tokenizer.vocab_size} pieces but the model only {config.text.vocab_size} embeddings")
        self.params, self.config, self.tokenizer, self.source = params, config, tokenizer, source
        self.mask_decoder_path = mask_decoder_path
        self._generator = Generator(params, config, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id)

    def replace_params(self, params) -> None:
        """Swaps in weights of the same shapes (e.g. while training), keeping the compiled functions."""
        self.params = self._generator.params = params

    @property
    def dtype(self):
        return self.params["llm"]["embedder"]["input_embedding"].dtype

    @property
    def compile_count(self) -> int:
        return self._generator.compile_count

    def info(self) -> dict:
        return {"name": self.config.describe(), "resolution": self.config.image_size,
                "parameters": count_params(self.params), "dtype": jnp.dtype(self.dtype).name,
                "device": self.device, "source": self.source}

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
            raise ValueError(f"the prompt is {len(ids) - 2} tokens long; this model takes at most "
                             f"{MAX_PROMPT_TOKENS - 2} prompt tokens. Shorten it.")
        return ids

    def run(self, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 64, sampler="greedy",
            seed: int = 0, chunk: int | None = None) -> Iterator[Result]:
        """The engine under generate/stream: yields Results for a batch as tokens arrive."""
        if len(images) != len(prompts) or not prompts:
            raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        if not isinstance(max_new_tokens, int | np.integer) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens!r}")
        if not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        parsed = parse_sampler(sampler)
        ids = [self.encode_prompt(p) for p in prompts]
        pixels = np.stack([preprocess(im, self.config.image_size) for im in images])
        for tokens, timing in self._generator.run(pixels, ids, int(max_new_tokens), parsed, int(seed), chunk):
            rows = [_until_eos(row, self.tokenizer.eos_id) for row in tokens.tolist()]
            yield Result([self.tokenizer.decode(r) for r in rows], rows, timing)

    def generate_batch(self, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 64,
                       sampler="greedy", seed: int = 0) -> list[str]:
        return _last(self.run(images, prompts, max_new_tokens, sampler, seed)).texts

    def generate(self, image, prompt: str, max_new_tokens: int = 64, sampler="greedy", seed: int = 0) -> str:
        """The generated suffix, loc/seg tokens kept as text, without EOS or the prompt."""
        return self.generate_batch([image], [prompt], max_new_tokens, sampler, seed)[0]

    def stream(self, image, prompt: str, max_new_tokens: int = 64, sampler="greedy", seed: int = 0,
               chunk_tokens: int = 8) -> Iterator[str]:
        """Text so far, after the first token and then every `chunk_tokens` tokens."""
        for result in self.run([image], [prompt], max_new_tokens, sampler, seed, chunk=chunk_tokens):
            yield result.texts[0]

    def warmup(self, batch: int = 1, max_new_tokens: int = 64) -> None:
        """Compiles the common bucket ahead of the first visitor."""
        blank = np.zeros((self.config.image_size, self.config.image_size, 3), np.uint8)
        self.generate_batch([blank] * batch, ["caption en"] * batch, max_new_tokens=max_new_tokens)


def _until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos)] if eos in row else row


def _last(iterator):
    item = None
    for item in iterator:
        pass
    return item


def _find_weights(folder: str) -> str:
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    candidates = [p for p in glob.glob(os.path.join(folder, "*.npz")) if os.path.basename(p) not in _NOT_WEIGHTS]
    if len(candidates) != 1:
        found = ", ".join(map(os.path.basename, candidates)) or "none"
        raise CheckpointError(
            f"{folder} should hold a Hugging Face model (config.json + *.safetensors) or exactly one big_vision "
            f".npz checkpoint; .npz files found: {found}")
    return candidates[0]


def _find_beside(folder: str, names: Sequence[str]) -> str | None:
    return next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)


def _mesh_for(devices) -> jax.sharding.Mesh | None:
    """Where load(devices=...) puts the weights: None for the default device (host buffers adopted without a
    copy on CPU), else a "model" mesh (one device: the model lives there; several: split over them)."""
    if isinstance(devices, jax.sharding.Mesh):
        if devices.axis_names != (sharding.AXIS,):
            raise ValueError(f"the mesh must have the one axis {sharding.AXIS!r} (sharding.make_mesh makes one); "
                             f"got axes {devices.axis_names}")
        return devices
    if isinstance(devices, jax.Device):
        devices = [devices]
    if devices is None or list(devices) == [jax.devices()[0]]:
        return None
    if isinstance(devices, str) or not all(isinstance(d, jax.Device) for d in devices):
        raise ValueError(f"devices must be a list of jax devices (e.g. jax.devices()[:2]) or a mesh; got {devices!r}")
    return sharding.make_mesh(devices)


def load(source: str | os.PathLike, dtype=None, tokenizer: str | None = None, mask_decoder: str | None = None,
         devices: Sequence[jax.Device] | jax.sharding.Mesh | None = None) -> Model:
    """Loads a .npz file, a folder holding one, a Hugging Face-format folder, or a Hub repo id.

    The tokenizer (`tokenizer.model`) and the VQ-VAE (`vae-oid.npz`) are found beside the weights unless
    given. dtype: None (bfloat16 on accelerators, float32 on CPU), 'float32', 'bfloat16' or 'float16'.
    devices: None (the default device), a list of devices (one: the model lives there; several: it is split
    over them, see sharding.py), or a mesh from `sharding.make_mesh`. Generation runs where the weights are.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    mesh = _mesh_for(devices)
    path = hub.resolve(source)
    weights = _find_weights(path) if os.path.isdir(path) else path
    folder = weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights))
    tokenizer_path = tokenizer or _find_beside(folder, _TOKENIZER_NAMES)
    if tokenizer_path is None:
        raise CheckpointError(f"no tokenizer found beside {weights}: expected one of {', '.join(_TOKENIZER_NAMES)} "
                              f"in {folder}, or pass tokenizer=PATH")
    tok = Tokenizer(tokenizer_path)
    params, cfg = checkpoint.load_params(weights, dtype, mesh=mesh)
    return Model(params, cfg, tok, source=os.fspath(source),
                 mask_decoder_path=mask_decoder or _find_beside(folder, (_MASK_DECODER_NAME,)))
