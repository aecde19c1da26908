"""Dense pretraining of the demo model's image encoder: `python -m scenes.vision_pretrain --out DIR`.

Trained from scratch on prompts alone, a PaliGemma this small learns counts and colours within a CPU hour
but never where objects are: four loc tokens per detect prompt are too little signal for the encoder to
learn positions. Here every image patch has targets of its own (which object, if any, covers its centre,
and that object's box), so the encoder learns in minutes features from which labels and boxes are a linear
read-out. Box edges are read out as scores against `from_scratch.loc_codes`, the codes the decoder's `<locNNNN>`
embeddings start from: a box in an image token is then a linear map away from the tokens that write it.
The read-out is then dropped: the output is a whole PaliGemma checkpoint (a freshly initialised decoder)
for `python -m paligemma.train --init DIR`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from tqdm import tqdm

from paligemma.config import CONFIGS
from paligemma.siglip import encode_images
from paligemma.tokenizer import NUM_LOC, Tokenizer
from paligemma.train import model_input, patches_inside, save_checkpoint, soft_loc_targets, stored_image
from postprocess.parse import pixel_to_bin
from scenes.from_scratch import fresh_params, loc_codes
from scenes.generate import COLOURS, KINDS, Scene, scene_for

LABELS = [f"{colour} {kind}" for colour in COLOURS for kind in KINDS]  # class 0 is the background
BOX_SIGMA = 4.0  # bins (1024 across the image, so about ±1 px): the soft target of a box edge, here and in
# the decoder's --loc-sigma (scenes.build_demo), so that both read boxes in the same way


def patch_targets(scene: Scene, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """-> classes int32[grid*grid] (0: background, else 1 + index in LABELS) and boxes int32[grid*grid, 4]
    (the location bins of y1, x1, y2, x2; zero on background) for patches in row-major order. A patch belongs
    to an object as the decoder's grounding targets say (train.patches_inside)."""
    size = scene.image.shape[0]
    classes = np.zeros(grid * grid, np.int32)
    boxes = np.zeros((grid * grid, 4), np.int32)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        bins = [pixel_to_bin(edge, size) for edge in (y1, x1, y2, x2)]
        inside = patches_inside(tuple(bins), grid).astype(bool)
        classes[inside] = 1 + LABELS.index(obj.label)
        boxes[inside] = bins
    return classes, boxes


def make_scenes(seed: int, count: int, grid: int, image_size: int) -> dict[str, np.ndarray]:
    """`count` scenes of the series `seed` at the encoder's resolution, with their patch targets."""
    scenes = [scene_for(seed, i) for i in range(count)]
    targets = [patch_targets(s, grid) for s in scenes]  # bins: the same at any resolution
    return {
        "images": np.stack([stored_image(Image.fromarray(s.image), image_size) for s in scenes]),
        "classes": np.stack([c for c, _ in targets]),
        "boxes": np.stack([b for _, b in targets]),
    }


def readout_init(width: int, seed: int) -> dict[str, jax.Array]:
    """Class scores, and per box edge a map from the image token into the space of from_scratch.loc_codes."""
    rng = np.random.default_rng(seed)
    return {
        "kernel": jnp.asarray(rng.normal(0, width**-0.5, (width, 1 + len(LABELS))), jnp.float32),
        "bias": jnp.zeros(1 + len(LABELS), jnp.float32),
        "edges": jnp.asarray(rng.normal(0, width**-0.5, (4, width, width)), jnp.float32),
    }


def dense_loss(trainable, vision_cfg, batch):
    """Cross-entropy of the patch classes plus, on object patches, that of the box edges' location bins."""
    images = model_input(batch["images"])
    features = encode_images(trainable["img"], vision_cfg, images)  # [B, P, D]
    readout = trainable["readout"]
    logits = features @ readout["kernel"] + readout["bias"]  # [B, P, classes]
    codes = jnp.asarray(loc_codes(features.shape[-1]))  # [1024, D]
    # features [B, P, D] · edges [4 edges, D, D] · codes [1024 bins, D] -> [B, P, 4 edges, 1024 bins]
    edge_logits = jnp.einsum("bpd,cde,ke->bpck", features, readout["edges"], codes)
    edge_loss = -jnp.sum(soft_loc_targets(batch["boxes"], BOX_SIGMA) * jax.nn.log_softmax(edge_logits), -1)
    class_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["classes"]).mean()
    on_object = (batch["classes"] > 0).astype(jnp.float32)
    object_patches = jnp.maximum(on_object.sum(), 1.0)
    box_loss = jnp.sum(edge_loss.mean(-1) * on_object) / object_patches
    edge_error = jnp.abs(edge_logits.argmax(-1) - batch["boxes"]).mean(-1)  # bins
    correct = (logits.argmax(-1) == batch["classes"]).astype(jnp.float32)
    figures = {
        "loss": class_loss + box_loss,
        "class_accuracy_on_objects": jnp.sum(correct * on_object) / object_patches,
        "box_error_px": jnp.sum(edge_error * on_object) / object_patches / NUM_LOC * images.shape[1],
    }
    return class_loss + box_loss, figures


def pretrain(vision_cfg, img_params, data, valid, steps: int, batch_size: int, lr: float, seed: int):
    """Trains img_params (and a read-out) on `data`; returns the trained img params and validation figures."""
    trainable = {"img": img_params, "readout": readout_init(img_params["head"]["kernel"].shape[-1], seed)}
    horizon = max(steps, 2)  # the schedule needs room to warm up and decay, even for 0 or 1 steps
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(horizon // 10, 1), horizon, lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=1e-4))
    opt_state = optimizer.init(trainable)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(dense_loss, has_aux=True)(trainable, vision_cfg, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    bar = tqdm(range(1, steps + 1), desc="encoder", file=sys.stderr)
    for number in bar:
        rows = rng.choice(len(data["images"]), batch_size, replace=False)
        trainable, opt_state, loss = step(trainable, opt_state, {k: v[rows] for k, v in data.items()})
        if number % 20 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    _, figures = jax.jit(dense_loss, static_argnums=1)(trainable, vision_cfg, valid)
    return trainable["img"], {k: round(float(v), 4) for k, v in figures.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scenes.vision_pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for model.npz + tokenizer.model")
    p.add_argument("--tokenizer", required=True, help="the SentencePiece model the decoder will use")
    p.add_argument("--config", default="demo", choices=sorted(CONFIGS))
    p.add_argument("--scenes", type=int, default=8000)
    p.add_argument("--scene-seed", type=int, default=3)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    tokenizer = Tokenizer(args.tokenizer)
    cfg = CONFIGS[args.config](tokenizer.vocab_size)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    start = time.perf_counter()
    data = make_scenes(args.scene_seed, args.scenes, grid, cfg.vision.image_size)
    valid = make_scenes(args.scene_seed + 1000, 256, grid, cfg.vision.image_size)
    params = fresh_params(cfg, tokenizer, args.seed)
    params["img"], figures = pretrain(
        cfg.vision, params["img"], data, valid, args.steps, args.batch_size, args.lr, args.seed
    )
    save_checkpoint(args.out, params, tokenizer.path)
    print(json.dumps({**figures, "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
