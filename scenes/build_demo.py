"""Builds the embedded demo model end to end: scenes -> tokenizer -> PaliGemma training -> assets/demo.

    python -m scenes.build_demo --out assets/demo --data data/shapes --num-scenes 5000 --steps 2400

Expects the mask VQ-VAE in --out already (`python -m scenes.vqvae_train --out assets/demo`), since the
segment targets are its codes. Every step is seeded, so the same command rebuilds the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from paligemma import train
from paligemma.tokenizer import train_tokenizer
from scenes.dataset import write_dataset
from scenes.vqvae_train import load_vqvae

DATA_SEED = 1  # evaluation uses other seeds: scenes the model never saw


def dataset_texts(folder: str) -> list[str]:
    texts = []
    for split in ("train.jsonl", "valid.jsonl"):
        with open(os.path.join(folder, split), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts += [row["prefix"], row["suffix"]]
    return texts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/demo")
    parser.add_argument("--data", default="data/shapes")
    parser.add_argument("--num-scenes", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    if not os.path.isfile(os.path.join(args.data, "train.jsonl")):
        summary = write_dataset(args.data, args.num_scenes, DATA_SEED, load_vqvae(args.out))
        print(json.dumps(summary), file=sys.stderr)
    tokenizer_prefix = os.path.join(args.out, "tokenizer")
    tok = train_tokenizer(dataset_texts(args.data), tokenizer_prefix, text_pieces=256)
    os.remove(tokenizer_prefix + ".vocab")
    print(f"tokenizer: {tok.vocab_size} pieces", file=sys.stderr)
    return train.main([
        "--data", args.data, "--out", args.out, "--config", "demo", "--tokenizer", tok.path,
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--eval-every", str(max(args.steps // 6, 1)), "--save-every", "400", "--seed", "0",
    ])


if __name__ == "__main__":
    sys.exit(main())
