"""PaliGemma's mask decoder: 16 VQ-VAE codes → a 64×64 mask, then into its box.

The published checkpoint `vae-oid.npz` is a flat PyTorch state dict:
  _vq_vae._embedding          [128, D]            codebook (D = 512 in the release)
  decoder.0.{weight,bias}     Conv2d 1×1, D → 128, then ReLU
  decoder.{2,3}.net.{0,2,4}   two residual blocks: Conv2d 3×3, ReLU, 3×3, ReLU, 1×1, + input
  decoder.{4,6,8,10}          ConvTranspose2d 4×4, stride 2, padding 1, to 128, 64, 32, 16
                              channels, each followed by ReLU (4×4 → 64×64)
  decoder.12.{weight,bias}    Conv2d 1×1, 16 → 1
(`encoder.*` keys hold the encoder, unused here.) Conv2d weights are [out, in, kh, kw],
ConvTranspose2d weights [in, out, kh, kw].

Our parameter pytree stores every kernel HWIO for `lax.conv_general_dilated` on NHWC,
the transposed convolutions already flipped and swapped into the equivalent
input-dilated convolution, so the jitted path does no re-layout:
  {"codebook": [K, D],
   "conv_in": conv, "res_blocks": [[conv, conv, conv], [conv, conv, conv]],
   "upsample": [conv] * 4, "conv_out": conv},   conv = {"kernel": [kh, kw, in, out], "bias": [out]}
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from PIL import Image

from paligemma import NUM_SEG, SEG_TOKENS_PER_MASK
from postprocess.parse import Object, Piece

MASK_SIZE = 64
CODEBOOK_KEY = "_vq_vae._embedding"
_WIDTH = 128
_CONV_IN = "decoder.0"
_RES_BLOCKS = (("decoder.2.net.0", "decoder.2.net.2", "decoder.2.net.4"),
               ("decoder.3.net.0", "decoder.3.net.2", "decoder.3.net.4"))  # fmt: skip
_UPSAMPLE = ("decoder.4", "decoder.6", "decoder.8", "decoder.10")
_UPSAMPLE_WIDTHS = (128, 64, 32, 16)
_CONV_OUT = "decoder.12"
_NHWC = ("NHWC", "HWIO", "NHWC")

Params = dict


def published_shapes(codebook_size: int = NUM_SEG, embedding_dim: int = 512) -> dict[str, tuple[int, ...]]:
    """Key → shape of every array the decoder reads from a `vae-oid.npz`-layout checkpoint."""
    shapes = {CODEBOOK_KEY: (codebook_size, embedding_dim)}

    def conv(name, cout, cin, k):  # Conv2d: weight [out, in, kh, kw]
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    conv(_CONV_IN, _WIDTH, embedding_dim, 1)
    for block in _RES_BLOCKS:
        for name, k in zip(block, (3, 3, 1)):
            conv(name, _WIDTH, _WIDTH, k)
    cin = _WIDTH
    for name, cout in zip(_UPSAMPLE, _UPSAMPLE_WIDTHS):  # ConvTranspose2d: weight [in, out, kh, kw]
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cin, cout, 4, 4), (cout,)
        cin = cout
    conv(_CONV_OUT, 1, cin, 1)
    return shapes


def load_vqvae_params(source: str | os.PathLike | Mapping[str, np.ndarray]) -> Params:
    """The decoder pytree from a `vae-oid.npz` path or an already loaded {key: array}."""
    if isinstance(source, (str, os.PathLike)):
        try:
            loaded = np.load(source)
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise ValueError(f"cannot read VQ-VAE checkpoint {os.fspath(source)!r}: {error}") from error
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(  # noqa: TRY004 - a wrong file, not a wrong argument type
                f"VQ-VAE checkpoint {os.fspath(source)!r} is a single array, not an .npz of named arrays"
            )
        with loaded:
            arrays = {key: loaded[key] for key in loaded.files}
    else:
        arrays = dict(source)
    if CODEBOOK_KEY not in arrays or np.ndim(arrays[CODEBOOK_KEY]) != 2:
        raise ValueError(f"not a vae-oid.npz-layout checkpoint: it needs a [codes, dim] array under {CODEBOOK_KEY!r}")
    expected = published_shapes(*np.shape(arrays[CODEBOOK_KEY]))
    wrong = {key: np.shape(arrays[key]) if key in arrays else "missing" for key in expected}
    wrong = {key: found for key, found in wrong.items() if found != expected[key]}
    if wrong:
        details = ", ".join(f"{key}: {found} (expected {expected[key]})" for key, found in wrong.items())
        raise ValueError(f"not a vae-oid.npz-layout checkpoint: {details}")
    arrays = {key: np.asarray(arrays[key], np.float32) for key in expected}

    def conv(name):
        return {
            "kernel": jnp.asarray(arrays[f"{name}.weight"].transpose(2, 3, 1, 0)),
            "bias": jnp.asarray(arrays[f"{name}.bias"]),
        }

    def upsample(name):  # [in, out, kh, kw] → flipped [kh, kw, in, out]
        kernel = arrays[f"{name}.weight"][:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
        return {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(arrays[f"{name}.bias"])}

    return {
        "codebook": jnp.asarray(arrays[CODEBOOK_KEY]),
        "conv_in": conv(_CONV_IN),
        "res_blocks": [[conv(name) for name in block] for block in _RES_BLOCKS],
        "upsample": [upsample(name) for name in _UPSAMPLE],
        "conv_out": conv(_CONV_OUT),
    }


def params_to_published(params: Params) -> dict[str, np.ndarray]:
    """The inverse of `load_vqvae_params`: {key: float32 array} to save with `np.savez`.

    Holds the decoder and codebook only; `MaskDecoder.load` needs nothing more.
    """
    out = {CODEBOOK_KEY: np.asarray(params["codebook"], np.float32)}

    def put(name, conv, kernel_to_torch):
        out[f"{name}.weight"] = np.ascontiguousarray(kernel_to_torch(np.asarray(conv["kernel"], np.float32)))
        out[f"{name}.bias"] = np.asarray(conv["bias"], np.float32)

    def conv_to_torch(kernel):  # [kh, kw, in, out] → [out, in, kh, kw]
        return kernel.transpose(3, 2, 0, 1)

    def upsample_to_torch(kernel):  # flipped [kh, kw, in, out] → [in, out, kh, kw]
        return kernel.transpose(2, 3, 0, 1)[:, :, ::-1, ::-1]

    put(_CONV_IN, params["conv_in"], conv_to_torch)
    for names, convs in zip(_RES_BLOCKS, params["res_blocks"]):
        for name, conv in zip(names, convs):
            put(name, conv, conv_to_torch)
    for name, conv in zip(_UPSAMPLE, params["upsample"]):
        put(name, conv, upsample_to_torch)
    put(_CONV_OUT, params["conv_out"], conv_to_torch)
    return out


def init_decoder_params(rng: jax.Array, codebook_size: int = NUM_SEG, embedding_dim: int = 512) -> Params:
    """A random decoder in the same pytree, for training: He-normal kernels, zero biases, N(0, 1) codebook."""
    shapes = published_shapes(codebook_size, embedding_dim)
    sizes = [math.prod(shape) for shape in shapes.values()]
    # one draw sliced into arrays: each distinct shape drawn on its own costs a compilation (seconds)
    noise = np.asarray(jax.random.normal(rng, (sum(sizes),)), np.float32)
    chunks = np.split(noise, np.cumsum(sizes)[:-1])
    return load_vqvae_params(
        {name: chunk.reshape(shape) * _init_scale(name, shape) for (name, shape), chunk in zip(shapes.items(), chunks)}
    )


def _init_scale(name: str, shape: tuple[int, ...]) -> float:
    if name == CODEBOOK_KEY:
        return 1.0
    if name.endswith(".bias"):
        return 0.0
    transposed = name.removesuffix(".weight") in _UPSAMPLE
    # inputs seen per output value; a stride-2 transposed conv uses a quarter of its taps
    fan_in = (shape[0] if transposed else shape[1]) * shape[2] * shape[3] / (4 if transposed else 1)
    return math.sqrt(2.0 / fan_in)


def _conv(x: jax.Array, conv: dict) -> jax.Array:
    # x [B, H, W, in], kernel [kh, kw, in, out] → [B, H', W', out]; "SAME" keeps H, W for odd kernels
    return lax.conv_general_dilated(x, conv["kernel"], (1, 1), "SAME", dimension_numbers=_NHWC) + conv["bias"]


def _upsample(x: jax.Array, conv: dict) -> jax.Array:
    # ConvTranspose2d(k=4, stride=2, padding=1) as a convolution over the input dilated by 2
    # and padded by k - 1 - padding = 2: [B, H, W, in] → [B, 2H, 2W, out]
    return (
        lax.conv_general_dilated(
            x, conv["kernel"], (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2), dimension_numbers=_NHWC
        )
        + conv["bias"]
    )


@jax.jit
def decode_codes(params: Params, codes: jax.Array) -> jax.Array:
    """Codes int[B, 16] in 0..K-1 → the decoder's raw output float[B, 64, 64].

    Pure and differentiable in `params`. Trained masks lie in about [-1, 1] with 0
    as the boundary; nothing clips here so that gradients flow (MaskDecoder clips).
    """
    batch = codes.shape[0]
    x = jnp.take(params["codebook"], codes, axis=0).reshape(batch, 4, 4, -1)  # row-major 4×4 grid of [D]
    x = jax.nn.relu(_conv(x, params["conv_in"]))
    for first, second, last in params["res_blocks"]:
        h = jax.nn.relu(_conv(x, first))
        h = jax.nn.relu(_conv(h, second))
        x = x + _conv(h, last)
    for conv in params["upsample"]:
        x = jax.nn.relu(_upsample(x, conv))
    return _conv(x, params["conv_out"])[..., 0]


def mask_to_image(
    mask64: np.ndarray, box: Sequence[int], width: int, height: int, threshold: float = 0.0
) -> np.ndarray:
    """A 64×64 decoded mask resized (bilinear) into pixel box (x1, y1, x2, y2) → bool[height, width].

    A pixel is in the mask when the resized value is above `threshold` (0 is the
    decoder's boundary between -1 outside and 1 inside).
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"box {tuple(box)} must satisfy 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height}")
    mask64 = np.asarray(mask64, np.float32)
    if mask64.shape != (MASK_SIZE, MASK_SIZE):
        raise ValueError(f"a decoded mask is [{MASK_SIZE}, {MASK_SIZE}], got {list(mask64.shape)}")
    resized = np.asarray(Image.fromarray(mask64).resize((x2 - x1, y2 - y1), Image.Resampling.BILINEAR))
    full = np.zeros((height, width), bool)
    full[y1:y2, x1:x2] = resized > threshold
    return full


class MaskDecoder:
    """The published mask decoder, jitted and batched, with checked inputs."""

    def __init__(self, params: Params):
        self.params = params

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskDecoder:
        """Reads a checkpoint in the published `vae-oid.npz` layout."""
        return cls(load_vqvae_params(path))

    def __call__(self, codes: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Codes int[B, 16] → masks float32[B, 64, 64] in [-1, 1]."""
        codes = np.asarray(codes)
        codebook_size = self.params["codebook"].shape[0]
        if codes.ndim != 2 or codes.shape[1] != SEG_TOKENS_PER_MASK or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(
                f"codes must be integers shaped [batch, {SEG_TOKENS_PER_MASK}], got {codes.dtype} {list(codes.shape)}"
            )
        if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
            raise ValueError(f"codes must lie in 0..{codebook_size - 1}, got {codes.min()}..{codes.max()}")
        batch = len(codes)
        if batch == 0:
            return np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
        # pad to a power of two so that a few compiled shapes serve every batch size
        padded = np.zeros((1 << (batch - 1).bit_length(), SEG_TOKENS_PER_MASK), np.int32)
        padded[:batch] = codes
        masks = np.asarray(decode_codes(self.params, padded))[:batch]
        return np.clip(masks, -1.0, 1.0)

    def attach_masks(self, pieces: Sequence[Piece], width: int, height: int, threshold: float = 0.0) -> list[Piece]:
        """`pieces` with each object that has seg codes given its full-image bool mask (one batched decode)."""
        with_codes = [piece.seg_codes for piece in pieces if _has_codes(piece)]
        masks = iter(self(np.array(with_codes, np.int32).reshape(-1, SEG_TOKENS_PER_MASK)))
        return [
            dataclasses.replace(piece, mask=mask_to_image(next(masks), piece.box, width, height, threshold))
            if _has_codes(piece)
            else piece
            for piece in pieces
        ]


def _has_codes(piece: Piece) -> bool:
    return isinstance(piece, Object) and piece.seg_codes is not None
