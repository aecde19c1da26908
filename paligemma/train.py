"""Prefix-LM training and fine-tuning on a JSONL dataset: `python -m paligemma.train --data DIR --out DIR`.

Dataset: a folder with `train.jsonl` (and optionally `valid.jsonl`) of {"image", "prefix", "suffix"} lines,
images relative to the folder. The loss covers the suffix and its EOS only; the prefix is context.
Checkpoints are written in the big_vision .npz layout with the tokenizer beside them, so the output folder
loads with `paligemma.load(out)` and serves in the app as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from tqdm import tqdm

from . import Model, checkpoint, load
from .config import PaliGemmaConfig, TextConfig, VisionConfig
from .model import forward
from .params import count, init_params
from .preprocess import preprocess
from .tokenizer import NUM_LOC, Tokenizer

TEXT_BUCKETS = (32, 48, 64, 96, 128)


def demo_config(vocab_size: int) -> PaliGemmaConfig:
    """The embedded demo model: a small SigLIP (224px, 28px patches -> 64 image tokens) + Gemma, ~6 M params,
    sized to train on a 2-core CPU in under an hour."""
    return PaliGemmaConfig(
        vision=VisionConfig(width=192, depth=4, mlp_dim=768, num_heads=4, patch_size=28, image_size=224),
        text=TextConfig(vocab_size=vocab_size, width=256, depth=4, mlp_dim=1024, num_heads=4, num_kv_heads=1,
                        head_dim=64, query_scale=64**-0.5),
    )


def tiny_config(vocab_size: int) -> PaliGemmaConfig:
    """A seconds-to-train config for smoke tests of the training loop."""
    return PaliGemmaConfig(
        vision=VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=28, image_size=56),
        text=TextConfig(vocab_size=vocab_size, width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1,
                        head_dim=32, query_scale=32**-0.5),
    )


CONFIGS = {"demo": demo_config, "tiny": tiny_config}


@dataclasses.dataclass
class Example:
    image: str
    prefix: str
    suffix: str


def read_jsonl(path: str) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                examples.append(Example(row["image"], row["prefix"], row["suffix"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: expected a JSON object with image, prefix and suffix ({err})") from None
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def stored_image(image, size: int) -> np.ndarray:
    """The model's input (preprocess: RGB, resized) kept as uint8 [size, size, 3]: a quarter of the memory of
    float32, so that a whole dataset's images fit in memory."""
    return ((preprocess(image, size) + 1.0) * 127.5).round().astype(np.uint8)


def model_input(stored):
    """uint8 [..., 3] from stored_image (numpy or jax) -> float32 in [-1, 1], as preprocess gives."""
    return stored.astype(np.float32) / 127.5 - 1.0


class Batches:
    """Tokenised examples with their images decoded once into memory, served as padded batches."""

    def __init__(self, folder: str, examples: list[Example], tokenizer: Tokenizer, image_size: int):
        cache: dict[str, np.ndarray] = {}
        self.images, self.prefixes, self.suffixes = [], [], []
        for ex in examples:
            if ex.image not in cache:
                with Image.open(os.path.join(folder, ex.image)) as im:
                    cache[ex.image] = stored_image(im, image_size)
            self.images.append(cache[ex.image])
            self.prefixes.append(tokenizer.encode_prompt(ex.prefix))
            self.suffixes.append([*tokenizer.encode(ex.suffix), tokenizer.eos_id])
        longest = max(len(p) + len(s) for p, s in zip(self.prefixes, self.suffixes))
        if longest > TEXT_BUCKETS[-1]:
            raise ValueError(f"an example is {longest} tokens long; at most {TEXT_BUCKETS[-1]} are supported")

    def __len__(self) -> int:
        return len(self.prefixes)

    def batch(self, indices) -> dict[str, np.ndarray]:
        lengths = [len(self.prefixes[i]) + len(self.suffixes[i]) for i in indices]
        width = next(b for b in TEXT_BUCKETS if b >= max(lengths))
        tokens = np.zeros((len(indices), width), np.int32)
        for row, i in enumerate(indices):
            ids = self.prefixes[i] + self.suffixes[i]
            tokens[row, : len(ids)] = ids
        images = model_input(np.stack([self.images[i] for i in indices]))
        return {"images": images, "tokens": tokens,
                "prefix_len": np.asarray([len(self.prefixes[i]) for i in indices], np.int32),
                "seq_len": np.asarray(lengths, np.int32)}


@dataclasses.dataclass(frozen=True)
class LocTargets:
    """Soft targets for `<locNNNN>` tokens: a Gaussian of `sigma` bins around the true bin.

    A box edge one bin off is nearly as good as the exact bin, but plain cross-entropy scores it like any
    other wrong token; spreading the target over neighbours teaches coordinates as quantities.
    """

    first_id: int  # id of <loc0000>; the 1024 loc ids must be consecutive
    sigma: float


def loc_targets_of(tokenizer: Tokenizer, sigma: float) -> LocTargets | None:
    if sigma <= 0:
        return None
    ids = tokenizer.loc_ids
    if ids is None or ids != list(range(ids[0], ids[0] + NUM_LOC)):
        raise ValueError("--loc-sigma needs a tokenizer whose <loc0000>..<loc1023> ids are consecutive")
    return LocTargets(ids[0], sigma)


def suffix_loss(params, cfg: PaliGemmaConfig, batch, loc: LocTargets | None = None):
    """Mean cross-entropy of the suffix tokens (and EOS), each predicted from the position before it."""
    logits = forward(params, cfg, batch["images"], batch["tokens"], batch["prefix_len"], batch["seq_len"])
    targets = batch["tokens"][:, 1:]
    position = jnp.arange(1, batch["tokens"].shape[1])[None]
    weights = (position >= batch["prefix_len"][:, None]) & (position < batch["seq_len"][:, None])
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))  # [B, T-1, V]
    losses = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if loc is not None:
        target_bin = targets - loc.first_id  # [B, T-1]
        soft = jax.nn.softmax(-0.5 * jnp.square((jnp.arange(NUM_LOC) - target_bin[..., None]) / loc.sigma))
        loc_log_probs = jax.lax.slice_in_dim(log_probs, loc.first_id, loc.first_id + NUM_LOC, axis=-1)
        is_loc = (target_bin >= 0) & (target_bin < NUM_LOC)
        losses = jnp.where(is_loc, -jnp.sum(soft * loc_log_probs, axis=-1), losses)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1)


def sincos_codes(positions: np.ndarray, width: int, longest: float) -> np.ndarray:
    """[N] positions -> [N, width] sines and cosines at geometric frequencies, unit RMS.

    Dot products of two codes fall off smoothly with the distance between their positions.
    """
    frequencies = np.pi / longest * np.geomspace(1.0, longest / 4.0, width // 2)
    angles = positions[:, None] * frequencies[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def structured_init(params, cfg: PaliGemmaConfig, tokenizer: Tokenizer, std: float = 0.02):
    """Starts a from-scratch model with geometry built in: 2D sin-cos patch position embeddings and
    loc token embeddings that vary smoothly with their bin, so nearby boxes start out alike."""
    grid = cfg.vision.image_size // cfg.vision.patch_size
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    half = cfg.vision.width // 2
    position = np.concatenate([sincos_codes(rows, half, grid), sincos_codes(cols, half, grid)], axis=1)
    # patch embeddings of a random init have an RMS near 0.5 on these images; positions must not drown in them
    params["img"]["pos_embedding"] = jnp.asarray(position[None] * 0.5)
    if tokenizer.loc_ids is not None:
        codes = sincos_codes(np.arange(NUM_LOC, dtype=np.float32), cfg.text.width, NUM_LOC)
        embedding = params["llm"]["embedder"]["input_embedding"]
        params["llm"]["embedder"]["input_embedding"] = embedding.at[np.asarray(tokenizer.loc_ids)].set(codes * std)
    return params


def fresh_params(cfg: PaliGemmaConfig, tokenizer: Tokenizer, seed: int):
    """The starting point of training from scratch: random weights with structured_init's geometry."""
    return structured_init(init_params(cfg, seed), cfg, tokenizer)


def make_optimizer(params, lr: float, steps: int, freeze_image_encoder: bool):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(500, steps // 10 + 1), steps, lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=1e-4))
    if not freeze_image_encoder:
        return optimizer
    labels = {part: jax.tree.map(lambda _: "frozen" if part == "img" else "train", params[part]) for part in params}
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def make_train_step(cfg: PaliGemmaConfig, optimizer, loc: LocTargets | None = None):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(suffix_loss)(params, cfg, batch, loc)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


def evaluate(model: Model, batches: Batches, examples: list[Example], cfg, limit: int = 64) -> dict:
    """Validation loss and exact-match rate of greedy answers on the first `limit` examples."""
    indices = list(range(min(limit, len(batches))))
    loss = float(jax.jit(suffix_loss, static_argnums=1)(model.params, cfg, batches.batch(indices)))  # plain CE
    correct = 0
    for start in range(0, len(indices), 16):
        chunk = indices[start: start + 16]
        images = [batches.images[i] for i in chunk]
        texts = model.generate_batch(images, [examples[i].prefix for i in chunk], max_new_tokens=64)
        correct += sum(t == examples[i].suffix for t, i in zip(texts, chunk))
    return {"valid_loss": loss, "exact_match": correct / len(indices)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m paligemma.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with train.jsonl (+ valid.jsonl) and its images")
    p.add_argument("--out", required=True, help="output folder: model.npz + tokenizer.model")
    p.add_argument("--init", help="checkpoint to start from (else a fresh --config)")
    p.add_argument("--config", default="demo", choices=sorted(CONFIGS), help="architecture when training from scratch")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one beside --init)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--freeze-image-encoder", action="store_true")
    p.add_argument("--loc-sigma", type=float, default=0.0,
                   help="spread <locNNNN> targets as a Gaussian of this many bins (0: exact targets)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    return p


def save_checkpoint(out: str, params, tokenizer_path: str) -> None:
    """model.npz in the big_vision layout with the tokenizer beside it: a folder `paligemma.load` reads."""
    os.makedirs(out, exist_ok=True)
    checkpoint.save_npz(os.path.join(out, "model.npz"), params)
    if os.path.abspath(tokenizer_path) != os.path.abspath(os.path.join(out, "tokenizer.model")):
        shutil.copy(tokenizer_path, os.path.join(out, "tokenizer.model"))


def train(args) -> dict:
    if args.init:
        start_model = load(args.init, dtype="float32", tokenizer=args.tokenizer)
        params, cfg, tokenizer = start_model.params, start_model.config, start_model.tokenizer
    else:
        if not args.tokenizer:
            raise ValueError("training from scratch needs --tokenizer")
        tokenizer = Tokenizer(args.tokenizer)
        cfg = CONFIGS[args.config](tokenizer.vocab_size)
        params = fresh_params(cfg, tokenizer, args.seed)
    loc = loc_targets_of(tokenizer, args.loc_sigma)
    train_examples = read_jsonl(os.path.join(args.data, "train.jsonl"))
    train_data = Batches(args.data, train_examples, tokenizer, cfg.image_size)
    valid_path = os.path.join(args.data, "valid.jsonl")
    valid_examples = read_jsonl(valid_path) if os.path.isfile(valid_path) else []
    valid_data = Batches(args.data, valid_examples, tokenizer, cfg.image_size) if valid_examples else None

    optimizer = make_optimizer(params, args.lr, args.steps, args.freeze_image_encoder)
    opt_state = optimizer.init(params)
    step_fn = make_train_step(cfg, optimizer, loc)
    model = Model(params, cfg, tokenizer)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(train_data))
    position, history = 0, []
    print(f"{cfg.describe()}: {count(params) / 1e6:.2f} M parameters, {len(train_data)} training examples",
          file=sys.stderr)
    bar = tqdm(range(1, args.steps + 1), desc="train", file=sys.stderr)
    start = time.perf_counter()
    for step in bar:
        if position + args.batch_size > len(order):
            order, position = rng.permutation(len(train_data)), 0
        batch = train_data.batch(order[position: position + args.batch_size])
        position += args.batch_size
        params, opt_state, loss = step_fn(params, opt_state, batch)
        if step % 10 == 0 or step == args.steps:
            loss = float(loss)
            history.append((step, loss))
            bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{step * args.batch_size / (time.perf_counter() - start):.1f}")
        if valid_data and (step % args.eval_every == 0 or step == args.steps):
            model.replace_params(params)
            figures = evaluate(model, valid_data, valid_examples, cfg)
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()), file=sys.stderr)
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(args.out, params, tokenizer.path)
    return {"steps": args.steps, "losses": history, "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = train(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"final_loss": summary["losses"][-1][1], "seconds": round(summary["seconds"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
