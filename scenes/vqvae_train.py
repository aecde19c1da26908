"""Trains the mask VQ-VAE on our shapes: a small conv encoder + the published decoder.

The decoder (and its 128-entry codebook) is PaliGemma's, from `postprocess.vqvae`, so the
trained weights ship as a `vae-oid.npz` any PaliGemma tool can read. The encoder exists
only to turn training masks into the 16 `<segNNN>` codes the language model learns, so it
stays with the training code (ENCODER_DIR, scenes/assets) instead of shipping with the app.

    python -m scenes.vqvae_train --out assets/demo --steps 300 --seed 0
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from PIL import Image

from postprocess.vqvae import MASK_SIZE, decode_codes, init_decoder_params, load_vqvae_params, params_to_published
from scenes.generate import random_placements, shape_mask

DECODER_FILE = "vae-oid.npz"
ENCODER_FILE = "vqvae-encoder.npz"
ENCODER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")  # the demo model's encoder
EMBEDDING_DIM = 512  # the published codebook's width
ENCODER_WIDTHS = (32, 64, 128, 128)  # four stride-2 convs: 64 → 32 → 16 → 8 → 4
GRID = 4  # 4×4 latents = the 16 seg tokens
COMMITMENT_WEIGHT = 0.25
_NHWC = ("NHWC", "HWIO", "NHWC")

Params = dict


def mask_crop64(mask: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """A full-image bool mask cut to its pixel box and resized to 64×64, as float32 in [-1, 1].

    The inverse of `postprocess.vqvae.mask_to_image`, with the same bilinear resampling.
    """
    x1, y1, x2, y2 = box
    crop = Image.fromarray(mask[y1:y2, x1:x2].astype(np.float32))
    resized = np.asarray(crop.resize((MASK_SIZE, MASK_SIZE), Image.Resampling.BILINEAR))
    return np.clip(resized, 0.0, 1.0) * 2.0 - 1.0


def object_masks(num_scenes: int, seed: int) -> np.ndarray:
    """The 64×64 crops of every object laid out in `num_scenes` random scenes: [N, 64, 64].

    Only the layouts are drawn (no painting): the masks are all the VQ-VAE sees.
    """
    rng = np.random.default_rng(seed)
    crops = [
        mask_crop64(shape_mask(kind, box), box) for _ in range(num_scenes) for kind, _, box in random_placements(rng)
    ]
    return np.stack(crops)


def init_encoder_params(rng: np.random.Generator, embedding_dim: int = EMBEDDING_DIM) -> Params:
    """He-normal conv kernels (HWIO) and zero biases: {"down": [conv] * 4, "to_latent": conv}.

    Drawn with numpy: jax.random would compile a sampler per shape, seconds each on CPU.
    """

    def conv(size, cin, cout):
        kernel = rng.standard_normal((size, size, cin, cout), dtype=np.float32) * np.sqrt(2.0 / (size * size * cin))
        return {"kernel": jnp.asarray(kernel), "bias": jnp.zeros((cout,))}

    widths = (1, *ENCODER_WIDTHS)
    return {
        "down": [conv(4, cin, cout) for cin, cout in itertools.pairwise(widths)],
        "to_latent": conv(1, widths[-1], embedding_dim),
    }


def encode(encoder_params: Params, masks64: jax.Array) -> jax.Array:
    """Masks float[B, 64, 64] in [-1, 1] → continuous latents float[B, 16, D] (4×4 row-major)."""
    x = masks64[..., None]  # [B, 64, 64, 1]
    for conv in encoder_params["down"]:  # [B, H, W, in] → [B, H/2, W/2, out]
        x = lax.conv_general_dilated(x, conv["kernel"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
        x = jax.nn.relu(x + conv["bias"])
    head = encoder_params["to_latent"]
    x = lax.conv_general_dilated(x, head["kernel"], (1, 1), "VALID", dimension_numbers=_NHWC) + head["bias"]
    return x.reshape(x.shape[0], GRID * GRID, -1)


def quantise(latents: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook row for each latent: [B, 16, D], [K, D] → int[B, 16]."""
    distances = (
        jnp.sum(latents**2, axis=-1, keepdims=True)
        - 2 * jnp.einsum("bnd,kd->bnk", latents, codebook)
        + jnp.sum(codebook**2, axis=-1)
    )  # [B, 16, K]
    return jnp.argmin(distances, axis=-1)


@jax.jit
def encode_masks(vqvae_params: Params, masks64: jax.Array) -> jax.Array:
    """Masks float[B, 64, 64] in [-1, 1] (see `mask_crop64`) → seg codes int[B, 16]."""
    return quantise(encode(vqvae_params["encoder"], masks64), vqvae_params["decoder"]["codebook"])


def decode_latents(decoder_params: Params, latents: jax.Array) -> jax.Array:
    """Latents float[B, 16, D] → decoder output float[B, 64, 64], differentiable in the latents.

    `decode_codes` reads its input through the codebook, so each sample gets a codebook of
    its own 16 latents and the codes 0..15 that pick them in order.
    """
    in_order = jnp.arange(GRID * GRID)[None]  # [1, 16]

    def one(sample_latents):  # [16, D] → [64, 64]
        return decode_codes({**decoder_params, "codebook": sample_latents}, in_order)[0]

    return jax.vmap(one)(latents)


def loss_fn(vqvae_params: Params, masks64: jax.Array) -> tuple[jax.Array, dict]:
    """Reconstruction MSE + codebook + commitment losses, with the straight-through estimator."""
    codebook = vqvae_params["decoder"]["codebook"]
    latents = encode(vqvae_params["encoder"], masks64)
    chosen = codebook[quantise(latents, codebook)]  # [B, 16, D]
    straight_through = latents + lax.stop_gradient(chosen - latents)
    decoded = decode_latents(vqvae_params["decoder"], straight_through)
    reconstruction = jnp.mean((decoded - masks64) ** 2)
    codebook_loss = jnp.mean((lax.stop_gradient(latents) - chosen) ** 2)
    commitment = jnp.mean((latents - lax.stop_gradient(chosen)) ** 2)
    loss = reconstruction + codebook_loss + COMMITMENT_WEIGHT * commitment
    return loss, {"reconstruction": reconstruction, "codebook": codebook_loss}


def mask_iou(decoded: np.ndarray, targets: np.ndarray) -> float:
    """Mean per-mask IoU of decoded > 0 against targets > 0, both [B, 64, 64]."""
    predicted, actual = np.asarray(decoded) > 0, np.asarray(targets) > 0
    intersection = (predicted & actual).sum(axis=(1, 2))
    union = (predicted | actual).sum(axis=(1, 2))
    return float(np.mean(np.where(union > 0, intersection / np.maximum(union, 1), 1.0)))


def reconstruction_iou(vqvae_params: Params, masks64: np.ndarray) -> float:
    """How well masks survive encode → 16 codes → decode, as `mask_iou`."""
    decoded = decode_codes(vqvae_params["decoder"], encode_masks(vqvae_params, masks64))
    return mask_iou(decoded, masks64)


def train(
    masks64: np.ndarray,
    steps: int,
    seed: int,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    log_every: int = 0,
) -> tuple[Params, list[float]]:
    """Trains encoder, codebook and decoder on batches drawn from `masks64`; returns params and losses."""
    if steps < 1 or batch_size < 1 or len(masks64) == 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and some masks; got {steps}, {batch_size}, {len(masks64)}")
    rng = np.random.default_rng(seed)
    params = {"encoder": init_encoder_params(rng), "decoder": init_decoder_params(jax.random.key(seed))}
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, parts

    losses = []
    for index in range(steps):
        batch = masks64[rng.integers(0, len(masks64), batch_size)]
        params, opt_state, loss, parts = step(params, opt_state, batch)
        losses.append(float(loss))
        if log_every and (index + 1) % log_every == 0:
            print(f"step {index + 1}: loss {float(loss):.4f} reconstruction {float(parts['reconstruction']):.4f}")
    return params, losses


def save_vqvae(vqvae_params: Params, decoder_dir: str | os.PathLike, encoder_dir: str | os.PathLike) -> None:
    """Writes the decoder as the published `vae-oid.npz` in decoder_dir and the encoder in encoder_dir."""
    for folder in (decoder_dir, encoder_dir):
        os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(decoder_dir, DECODER_FILE), **params_to_published(vqvae_params["decoder"]))
    encoder = vqvae_params["encoder"]
    flat = {f"down.{i}.{name}": np.asarray(conv[name]) for i, conv in enumerate(encoder["down"]) for name in conv}
    flat.update({f"to_latent.{name}": np.asarray(value) for name, value in encoder["to_latent"].items()})
    np.savez(os.path.join(encoder_dir, ENCODER_FILE), **flat)


def load_vqvae(decoder_dir: str | os.PathLike, encoder_dir: str | os.PathLike = ENCODER_DIR) -> Params:
    """The {"encoder", "decoder"} params that `save_vqvae` wrote to these folders (by default the encoder the
    demo model's segment codes came from)."""
    encoder_path = os.path.join(encoder_dir, ENCODER_FILE)
    try:
        with np.load(encoder_path) as npz:
            down = [
                {"kernel": jnp.asarray(npz[f"down.{i}.kernel"]), "bias": jnp.asarray(npz[f"down.{i}.bias"])}
                for i in range(len(ENCODER_WIDTHS))
            ]
            head = {"kernel": jnp.asarray(npz["to_latent.kernel"]), "bias": jnp.asarray(npz["to_latent.bias"])}
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(
            f"cannot read the VQ-VAE encoder {encoder_path!r} written by scenes.vqvae_train: {error}"
        ) from error
    decoder = load_vqvae_params(os.path.join(decoder_dir, DECODER_FILE))
    return {"encoder": {"down": down, "to_latent": head}, "decoder": decoder}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help=f"folder for {DECODER_FILE}, the decoder the app uses")
    parser.add_argument("--encoder-out", default=ENCODER_DIR, help=f"folder for {ENCODER_FILE} (training only)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="small: the decoder's gradient is slow on CPU")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-scenes", type=int, default=1000)
    parser.add_argument("--test-scenes", type=int, default=300)
    args = parser.parse_args(argv)

    train_masks = object_masks(args.train_scenes, seed=2 * args.seed)
    test_masks = object_masks(args.test_scenes, seed=2 * args.seed + 1)  # held-out scenes
    start = time.perf_counter()
    params, losses = train(train_masks, args.steps, args.seed, args.batch_size, args.learning_rate, log_every=50)
    seconds = time.perf_counter() - start
    print(f"trained {args.steps} steps in {seconds:.1f} s; final loss {losses[-1]:.4f}")
    print(f"train mask IoU {reconstruction_iou(params, train_masks[:1000]):.4f}")
    print(f"held-out mask IoU {reconstruction_iou(params, test_masks):.4f} on {len(test_masks)} masks")
    save_vqvae(params, args.out, args.encoder_out)
    print(f"wrote {os.path.join(args.out, DECODER_FILE)} and {os.path.join(args.encoder_out, ENCODER_FILE)}")


if __name__ == "__main__":
    main()
