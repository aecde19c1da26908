"""Prefix-LM training and fine-tuning on a JSONL dataset: `python -m paligemma.train --data DIR --out DIR`.

Dataset: a folder with `train.jsonl` (and optionally `valid.jsonl`) of {"image", "prefix", "suffix"} lines,
images relative to the folder. The loss covers the suffix and its EOS only; the prefix is context.
Checkpoints are written in the big_vision .npz layout with the tokenizer beside them, so the output folder
loads with `paligemma.load(out)` and serves in the app as it is.

Without --init, training starts from random weights of a --config architecture; `train` and `main` take the
function that makes them, so a caller can build its own starting point (scenes.from_scratch does).

Axis letters in shapes: B batch, T text positions, V vocabulary, P image patches, L layers, N heads,
S key positions.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from tqdm import tqdm

from . import Model, checkpoint, companions, load
from .config import CONFIGS, PaliGemmaConfig
from .model import forward
from .params import count, init_params
from .preprocess import preprocess
from .tokenizer import NUM_LOC, Tokenizer
from .whole_files import written_whole

TEXT_BUCKETS = (32, 48, 64, 96, 128)
TRAIN_STATE = companions.TRAIN_STATE_NAME  # in --out while a --resume run is unfinished


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
                raise ValueError(
                    f"{path}:{number}: expected a JSON object with image, prefix and suffix ({err})"
                ) from None
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
    """Tokenised examples with their images decoded once into memory, served as padded batches.

    Asked for, a batch also carries `grounding` float32 [B, T, P]: at the position before each loc or seg token
    of an object, the image patches whose centres lie inside that object's box (1) or not (0); rows of other
    positions are zero. It is the target of the optional grounding loss (see suffix_loss).
    """

    def __init__(self, folder: str, examples: list[Example], tokenizer: Tokenizer, cfg: PaliGemmaConfig):
        cache: dict[str, np.ndarray] = {}
        self.images, self.prefixes, self.suffixes, self.boxes = [], [], [], []
        self.grid = cfg.vision.image_size // cfg.vision.patch_size
        for ex in examples:
            if ex.image not in cache:
                with Image.open(os.path.join(folder, ex.image)) as im:
                    cache[ex.image] = stored_image(im, cfg.image_size)
            self.images.append(cache[ex.image])
            self.prefixes.append(tokenizer.encode_prompt(ex.prefix))
            self.suffixes.append([*tokenizer.encode(ex.suffix), tokenizer.eos_id])
            self.boxes.append(object_tokens(self.suffixes[-1], tokenizer))
        longest = max(len(p) + len(s) for p, s in zip(self.prefixes, self.suffixes))
        if longest > TEXT_BUCKETS[-1]:
            raise ValueError(f"an example is {longest} tokens long; at most {TEXT_BUCKETS[-1]} are supported")

    def __len__(self) -> int:
        return len(self.prefixes)

    def batch(self, indices, with_grounding: bool = False) -> dict[str, np.ndarray]:
        lengths = [len(self.prefixes[i]) + len(self.suffixes[i]) for i in indices]
        width = next(b for b in TEXT_BUCKETS if b >= max(lengths))
        tokens = np.zeros((len(indices), width), np.int32)
        for row, i in enumerate(indices):
            ids = self.prefixes[i] + self.suffixes[i]
            tokens[row, : len(ids)] = ids
        batch = {
            "images": model_input(np.stack([self.images[i] for i in indices])),
            "tokens": tokens,
            "prefix_len": np.asarray([len(self.prefixes[i]) for i in indices], np.int32),
            "seq_len": np.asarray(lengths, np.int32),
        }
        if with_grounding:
            batch["grounding"] = self.grounding(indices, width)
        return batch

    def grounding(self, indices, width: int) -> np.ndarray:
        """float32 [B, width, P]: see the class docstring."""
        targets = np.zeros((len(indices), width, self.grid * self.grid), np.float32)
        for row, i in enumerate(indices):
            for index, box in self.boxes[i]:
                targets[row, len(self.prefixes[i]) + index - 1] = patches_inside(box, self.grid)
        return targets


def object_tokens(suffix: list[int], tokenizer: Tokenizer) -> list[tuple[int, tuple[int, ...]]]:
    """(index in suffix, box in bins y1 x1 y2 x2) for each loc and seg token of an object; a box is four loc
    tokens in a row and owns the seg tokens after it."""
    if tokenizer.loc_ids is None:
        return []
    bin_of = {token: bin_ for bin_, token in enumerate(tokenizer.loc_ids)}
    segs = set(tokenizer.seg_ids or ())
    found, box, i = [], None, 0
    while i < len(suffix):
        if i + 4 <= len(suffix) and all(t in bin_of for t in suffix[i : i + 4]):
            box = tuple(bin_of[t] for t in suffix[i : i + 4])
            found += [(i + k, box) for k in range(4)]
            i += 4
            continue
        if box is not None and suffix[i] in segs:
            found.append((i, box))
        i += 1
    return found


def patches_inside(box: tuple[int, ...], grid: int) -> np.ndarray:
    """float32 [grid*grid], row-major: 1 where the patch centre lies in the box (bins), else 0; the patch
    under the box centre when no centre does (a box thinner than a patch)."""
    y1, x1, y2, x2 = box
    centres = (np.arange(grid) + 0.5) * NUM_LOC / grid
    inside = ((centres >= y1) & (centres < y2))[:, None] & ((centres >= x1) & (centres < x2))[None, :]
    if not inside.any():
        row, col = (min(int((a + b) / 2 * grid / NUM_LOC), grid - 1) for a, b in ((y1, y2), (x1, x2)))
        inside[row, col] = True
    return inside.reshape(-1).astype(np.float32)


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


def soft_loc_targets(bins, sigma: float):
    """int [...] bins -> float [..., 1024]: a Gaussian of `sigma` bins around each bin, summing to 1."""
    return jax.nn.softmax(-0.5 * jnp.square((jnp.arange(NUM_LOC) - bins[..., None]) / sigma))


def suffix_loss(params, cfg: PaliGemmaConfig, batch, loc: LocTargets | None = None, grounding: float = 0.0):
    """Mean cross-entropy of the suffix tokens (and EOS), each predicted from the position before it.

    With grounding > 0, plus that weight times grounding_loss: a small model learns where an object is from
    four loc tokens per example far too slowly; telling it where to look is a dense signal.
    """
    out = forward(
        params,
        cfg,
        batch["images"],
        batch["tokens"],
        batch["prefix_len"],
        batch["seq_len"],
        with_attention=bool(grounding),
    )
    logits, attention = out if grounding else (out, None)
    targets = batch["tokens"][:, 1:]
    position = jnp.arange(1, batch["tokens"].shape[1])[None]
    weights = (position >= batch["prefix_len"][:, None]) & (position < batch["seq_len"][:, None])
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))  # [B, T-1, V]
    losses = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if loc is not None:
        target_bin = targets - loc.first_id  # [B, T-1]
        soft = soft_loc_targets(target_bin, loc.sigma)
        loc_log_probs = jax.lax.slice_in_dim(log_probs, loc.first_id, loc.first_id + NUM_LOC, axis=-1)
        is_loc = (target_bin >= 0) & (target_bin < NUM_LOC)
        losses = jnp.where(is_loc, -jnp.sum(soft * loc_log_probs, axis=-1), losses)
    loss = jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1)
    if grounding:
        loss = loss + grounding * grounding_loss(attention, batch["grounding"], cfg.num_image_tokens)
    return loss


def grounding_loss(attention, targets, num_image_tokens: int):
    """-log of the attention that head 0 of each layer after the first pays to the target patches, averaged
    over the positions that have targets. The first layer is left free to gather the prompt's words.

    attention [L, B, N, T, S] (forward's); targets [B, T, P] (Batches' grounding).
    """
    looks = attention[1:, :, 0, :, :num_image_tokens]  # [L-1, B, T, P]
    on_target = jnp.sum(looks * targets[None], axis=-1)  # [L-1, B, T]
    supervised = (targets.sum(-1) > 0).astype(jnp.float32)  # [B, T]
    total = jnp.maximum(supervised.sum() * looks.shape[0], 1.0)
    return -jnp.sum(jnp.log(on_target + 1e-6) * supervised[None]) / total


def make_optimizer(params, lr: float, steps: int, image_encoder_lr_scale: float = 1.0):
    """AdamW on a warm-up + cosine schedule with the image encoder's learning rate scaled: fine-tuning a
    pretrained encoder gently keeps what it learned while the decoder's task still reshapes it. Scale 0 freezes
    it, and its gradients then stay out of the clipping norm too."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(500, steps // 10 + 1), steps, lr * 0.05)
    clip = optax.clip_by_global_norm(1.0)

    def adamw(scale: float):
        return optax.adamw(lambda step: scale * schedule(step), b2=0.98, weight_decay=1e-4)

    if image_encoder_lr_scale == 1.0:
        return optax.chain(clip, adamw(1.0))
    labels = jax.tree_util.tree_map_with_path(lambda path, _: "img" if path[0].key == "img" else "rest", params)
    if image_encoder_lr_scale == 0.0:
        return optax.multi_transform({"rest": optax.chain(clip, adamw(1.0)), "img": optax.set_to_zero()}, labels)
    return optax.chain(clip, optax.multi_transform({"rest": adamw(1.0), "img": adamw(image_encoder_lr_scale)}, labels))


def make_train_step(cfg: PaliGemmaConfig, optimizer, loc: LocTargets | None = None, grounding: float = 0.0):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(suffix_loss)(params, cfg, batch, loc, grounding)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def evaluate(model: Model, batches: Batches, examples: list[Example], cfg, limit: int = 64) -> dict:
    """Validation loss and exact-match rate of greedy answers on the first `limit` examples."""
    indices = list(range(min(limit, len(batches))))
    loss = float(jax.jit(suffix_loss, static_argnums=1)(model.params, cfg, batches.batch(indices)))  # plain CE
    correct = 0
    for start in range(0, len(indices), 16):
        chunk = indices[start : start + 16]
        images = [batches.images[i] for i in chunk]
        texts = model.generate_batch(images, [examples[i].prefix for i in chunk], max_new_tokens=64)
        correct += sum(t == examples[i].suffix for t, i in zip(texts, chunk))
    return {"valid_loss": loss, "exact_match": correct / len(indices)}


FreshParams = Callable[[PaliGemmaConfig, Tokenizer, int], dict]  # (config, tokenizer, seed) -> params


def random_params(cfg: PaliGemmaConfig, tokenizer: Tokenizer, seed: int) -> dict:
    """Plain random weights (no use for the tokenizer): the start of training from scratch unless the caller
    brings its own."""
    return init_params(cfg, seed)


def _parser(prog: str = "python -m paligemma.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with train.jsonl (+ valid.jsonl) and its images")
    p.add_argument("--out", required=True, help="output folder: model.npz + tokenizer.model")
    p.add_argument("--init", help="checkpoint to start from (else a fresh --config)")
    p.add_argument("--config", default="demo", choices=sorted(CONFIGS), help="architecture when training from scratch")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one beside --init)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    encoder = p.add_mutually_exclusive_group()
    encoder.add_argument("--freeze-image-encoder", action="store_true", help="train everything but the image encoder")
    encoder.add_argument(
        "--image-encoder-lr-scale",
        type=float,
        default=1.0,
        help="the image encoder's learning rate as a fraction of --lr (0 freezes it)",
    )
    p.add_argument(
        "--loc-sigma",
        type=float,
        default=0.0,
        help="spread <locNNNN> targets as a Gaussian of this many bins (0: exact targets)",
    )
    p.add_argument(
        "--grounding",
        type=float,
        default=0.0,
        help="weight of a loss that teaches one attention head per layer to look inside the box of the "
        "object whose loc/seg tokens come next (0: off)",
    )
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"keep the optimiser's state in --out ({TRAIN_STATE}) at every save and continue from it when the "
        "same run is started again; the resumed run ends with the weights an uninterrupted one would",
    )
    return p


# The settings that make two runs the same run: a saved state resumes only the run that wrote it.
_RUN_SETTINGS = (
    "data",
    "init",
    "config",
    "steps",
    "batch_size",
    "lr",
    "freeze_image_encoder",
    "image_encoder_lr_scale",
    "loc_sigma",
    "grounding",
    "seed",
)


def run_fingerprint(args) -> str:
    return json.dumps({name: getattr(args, name) for name in _RUN_SETTINGS}, sort_keys=True)


def save_train_state(out: str, fingerprint: str, step: int, params, opt_state) -> None:
    """Weights and optimiser state after `step`, written whole like the checkpoint."""
    leaves = jax.tree_util.tree_leaves((params, opt_state))
    with written_whole(os.path.join(out, TRAIN_STATE)) as f:
        np.savez(f, fingerprint=fingerprint, step=step, **{f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)})


def load_train_state(out: str, fingerprint: str, params, opt_state):
    """(step, params, opt_state) saved in `out` by the run `fingerprint` names, or None (nothing saved, or saved by
    another run, which is then said and left to be overwritten)."""
    path = os.path.join(out, TRAIN_STATE)
    if not os.path.isfile(path):
        return None
    with np.load(path) as saved:
        if str(saved["fingerprint"]) != fingerprint:
            print(f"{path} was saved by another run; starting this one from its first step", file=sys.stderr)
            return None
        treedef = jax.tree_util.tree_structure((params, opt_state))
        leaves = [jnp.asarray(saved[f"leaf{i}"]) for i in range(treedef.num_leaves)]
        step = int(saved["step"])
    params, opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
    return step, params, opt_state


def batch_indices(num_examples: int, batch_size: int, rng: np.random.Generator):
    """Example indices of each step's batch, forever: shuffled epochs, each one's tail that cannot fill a batch
    left out. A function of the seed alone, so a resumed run skips to the batches it has not trained on."""
    order, position = rng.permutation(num_examples), 0
    while True:
        if position + batch_size > len(order):
            order, position = rng.permutation(num_examples), 0
        yield order[position : position + batch_size]
        position += batch_size


def save_checkpoint(out: str, params, tokenizer_path: str) -> None:
    """model.npz in the big_vision layout with the tokenizer beside it: a folder `paligemma.load` reads. Written
    whole, so a run killed while saving leaves the last whole checkpoint (and a folder that still loads)."""
    os.makedirs(out, exist_ok=True)
    with written_whole(os.path.join(out, "model.npz")) as f:
        checkpoint.save_npz(f, params)
    if os.path.abspath(tokenizer_path) != os.path.abspath(os.path.join(out, "tokenizer.model")):
        shutil.copy(tokenizer_path, os.path.join(out, "tokenizer.model"))


def train(args, fresh_params: FreshParams = random_params) -> dict:
    """Runs the training `args` (from _parser) describes; fresh_params makes the weights when there is no --init."""
    encoder_scale = 0.0 if args.freeze_image_encoder else args.image_encoder_lr_scale
    if encoder_scale < 0:
        raise ValueError(f"--image-encoder-lr-scale must be 0 or more, not {encoder_scale}")
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
    train_data = Batches(args.data, train_examples, tokenizer, cfg)
    valid_path = os.path.join(args.data, "valid.jsonl")
    valid_examples = read_jsonl(valid_path) if os.path.isfile(valid_path) else []
    valid_data = Batches(args.data, valid_examples, tokenizer, cfg) if valid_examples else None

    optimizer = make_optimizer(params, args.lr, args.steps, encoder_scale)
    opt_state = optimizer.init(params)
    step_fn = make_train_step(cfg, optimizer, loc, args.grounding)
    fingerprint, done = run_fingerprint(args), 0
    resumed = load_train_state(args.out, fingerprint, params, opt_state) if args.resume else None
    if resumed:
        done, params, opt_state = resumed
        print(f"resuming after step {done} of {args.steps}", file=sys.stderr)
    model = Model(params, cfg, tokenizer)
    batches = itertools.islice(
        batch_indices(len(train_data), args.batch_size, np.random.default_rng(args.seed)), done, None
    )
    history = []
    print(
        f"{cfg.describe()}: {count(params) / 1e6:.2f} M parameters, {len(train_data)} training examples",
        file=sys.stderr,
    )
    bar = tqdm(range(done + 1, args.steps + 1), desc="train", file=sys.stderr, initial=done, total=args.steps)
    start = time.perf_counter()
    for step, indices in zip(bar, batches):
        batch = train_data.batch(indices, with_grounding=args.grounding > 0)
        params, opt_state, loss = step_fn(params, opt_state, batch)
        if step % 10 == 0 or step == args.steps:
            loss = float(loss)
            history.append((step, loss))
            examples_per_s = (step - done) * args.batch_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{examples_per_s:.1f}")
        if valid_data and (step % args.eval_every == 0 or step == args.steps):
            model.replace_params(params)
            figures = evaluate(model, valid_data, valid_examples, cfg)
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()), file=sys.stderr)
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(args.out, params, tokenizer.path)
            if args.resume and step < args.steps:
                save_train_state(args.out, fingerprint, step, params, opt_state)
    if args.resume and os.path.isfile(os.path.join(args.out, TRAIN_STATE)):
        os.remove(os.path.join(args.out, TRAIN_STATE))  # finished: nothing left to resume
    return {"steps": args.steps, "losses": history, "seconds": time.perf_counter() - start}


def main(argv=None, fresh_params: FreshParams = random_params, prog: str = "python -m paligemma.train") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        summary = train(args, fresh_params)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"final_loss": summary["losses"][-1][1], "seconds": round(summary["seconds"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
