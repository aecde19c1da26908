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
from .tokenizer import Tokenizer

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


class Batches:
    """Tokenised examples with their images decoded once into memory, served as padded batches."""

    def __init__(self, folder: str, examples: list[Example], tokenizer: Tokenizer, image_size: int):
        cache: dict[str, np.ndarray] = {}
        self.images, self.prefixes, self.suffixes = [], [], []
        for ex in examples:
            if ex.image not in cache:
                with Image.open(os.path.join(folder, ex.image)) as im:
                    cache[ex.image] = ((preprocess(im, image_size) + 1.0) * 127.5).round().astype(np.uint8)
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
        images = np.stack([self.images[i] for i in indices]).astype(np.float32) / 127.5 - 1.0
        return {"images": images, "tokens": tokens,
                "prefix_len": np.asarray([len(self.prefixes[i]) for i in indices], np.int32),
                "seq_len": np.asarray(lengths, np.int32)}


def suffix_loss(params, cfg: PaliGemmaConfig, batch):
    """Mean cross-entropy of the suffix tokens (and EOS), each predicted from the position before it."""
    logits = forward(params, cfg, batch["images"], batch["tokens"], batch["prefix_len"], batch["seq_len"])
    targets = batch["tokens"][:, 1:]
    position = jnp.arange(1, batch["tokens"].shape[1])[None]
    weights = (position >= batch["prefix_len"][:, None]) & (position < batch["seq_len"][:, None])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1)


def make_optimizer(params, lr: float, steps: int, freeze_image_encoder: bool):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(500, steps // 10 + 1), steps, lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=1e-4))
    if not freeze_image_encoder:
        return optimizer
    labels = {part: jax.tree.map(lambda _: "frozen" if part == "img" else "train", params[part]) for part in params}
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def make_train_step(cfg: PaliGemmaConfig, optimizer):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(suffix_loss)(params, cfg, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


def evaluate(model: Model, batches: Batches, examples: list[Example], cfg, limit: int = 64) -> dict:
    """Validation loss and exact-match rate of greedy answers on the first `limit` examples."""
    indices = list(range(min(limit, len(batches))))
    loss = float(jax.jit(suffix_loss, static_argnums=1)(model.params, cfg, batches.batch(indices)))
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
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    return p


def _save(out: str, params, tokenizer_path: str) -> None:
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
        params = init_params(cfg, args.seed)
    train_examples = read_jsonl(os.path.join(args.data, "train.jsonl"))
    train_data = Batches(args.data, train_examples, tokenizer, cfg.image_size)
    valid_path = os.path.join(args.data, "valid.jsonl")
    valid_examples = read_jsonl(valid_path) if os.path.isfile(valid_path) else []
    valid_data = Batches(args.data, valid_examples, tokenizer, cfg.image_size) if valid_examples else None

    optimizer = make_optimizer(params, args.lr, args.steps, args.freeze_image_encoder)
    opt_state = optimizer.init(params)
    step_fn = make_train_step(cfg, optimizer)
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
            _save(args.out, params, tokenizer.path)
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
