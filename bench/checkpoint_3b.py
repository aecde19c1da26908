"""Full-size PaliGemma-3B-224 with random weights: load time, peak memory, compile, prefill and decode.

    python -m bench.checkpoint_3b [--dir /tmp/paligemma-3b-224] [--decode-tokens 16] [--cases npz-f32:float32,...]

Writes the checkpoint once in each published format the cases read (a transformers `save_pretrained` folder, a
big_vision .npz in float32 and in bfloat16) and then measures each (format, dtype) in a fresh process, so peak
RSS is that load's own. `int8` is weight-only int8 decoder matrices quantised layer by layer while read
(load(dtype="int8")), to set against float32 from the same file in the same run; `auto` is load's default
(dtype None: the form measured fastest on this CPU, bfloat16 included, cpu_forms.py). Prints one JSON line per case
and a table with each case's decode speed over the first case's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.memory import peak_rss_gib
from paligemma.cpu_kind import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = [sys.executable, "-m", "bench.checkpoint_3b"]  # the measured subprocesses, run from ROOT
CASES = [
    ("npz-f32", "float32"),
    ("npz-f32", "auto"),
    ("npz-f32", "int8"),
    ("npz-bf16", "bfloat16"),
    ("hf", "float32"),
    ("hf", "bfloat16"),
    ("hf", "int8"),
]
NPZ_DTYPES = {"npz-f32": "float32", "npz-bf16": "bfloat16"}


def write_checkpoints(folder: str, formats: set[str]) -> None:
    """The HF folder from transformers (random init at the published shapes), then those of our .npz files that
    `formats` names, from it."""
    hf_dir = os.path.join(folder, "hf")
    if not os.path.isdir(hf_dir):
        import torch
        from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

        import paligemma

        torch.manual_seed(0)
        config = PaliGemmaConfig(
            vision_config=dict(
                model_type="siglip_vision_model",
                hidden_size=1152,
                intermediate_size=4304,
                num_hidden_layers=27,
                num_attention_heads=16,
                patch_size=14,
                image_size=224,
                vision_use_head=False,
                hidden_act="gelu_pytorch_tanh",
                layer_norm_eps=1e-6,
            ),
            text_config=dict(
                model_type="gemma",
                hidden_size=2048,
                intermediate_size=16384,
                num_hidden_layers=18,
                num_attention_heads=8,
                num_key_value_heads=1,
                head_dim=256,
                vocab_size=257216,
                hidden_activation="gelu_pytorch_tanh",
            ),
            image_token_index=257152,
            vocab_size=257216,
            projection_dim=2048,
            hidden_size=2048,
        )
        model = PaliGemmaForConditionalGeneration(config)
        model.save_pretrained(hf_dir, max_shard_size="4GB")
        del model
        texts = ["caption en", "detect cat", "a cat on a mat"] * 50
        paligemma.train_tokenizer(texts, os.path.join(hf_dir, "tokenizer"), text_pieces=64)
    for name, dtype in NPZ_DTYPES.items():
        target = os.path.join(folder, name)
        if name in formats and not os.path.isdir(target):
            subprocess.run([*MODULE, "--write-npz", hf_dir, target, dtype], check=True, cwd=ROOT)


def _write_npz(hf_dir: str, target: str, dtype: str) -> None:
    import shutil

    import paligemma

    params, _ = paligemma.load_params(hf_dir, dtype)
    os.makedirs(target)
    paligemma.save_npz(os.path.join(target, "model.npz"), params)
    shutil.copy(os.path.join(hf_dir, "tokenizer.model"), target)


def measure(source: str, dtype: str, decode_tokens: int) -> dict:
    import jax
    import numpy as np

    import paligemma

    paligemma.enable_compile_cache()  # as the app and the CLI do
    start = time.perf_counter()
    model = paligemma.load(source, dtype=None if dtype == "auto" else dtype)
    load_s = time.perf_counter() - start
    load_rss = peak_rss_gib()
    image = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    start = time.perf_counter()
    first = list(model.run([image], ["caption en"], max_new_tokens=decode_tokens))[-1]
    first_request_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = list(model.run([image], ["caption en"], max_new_tokens=decode_tokens))[-1]
    warm_request_s = time.perf_counter() - start
    weights = sum(x.nbytes for x in jax.tree.leaves(model.params))
    return {
        "load_s": round(load_s, 1),
        "peak_rss_after_load_gib": round(load_rss, 2),
        "weights_gib": round(weights / 2**30, 2),
        "first_request_s": round(first_request_s, 1),
        # compiled: False when the persistent compilation cache served the executables (then the difference
        # below is noise, and may come out below zero)
        "first_compiled": first.timing.compiled,
        "first_minus_warm_s": round(first_request_s - warm_request_s, 1),
        "prefill_s": round(warm.timing.prefill_s, 2),
        "decode_ms_per_token": round(1000 * warm.timing.decode_s / max(warm.timing.new_tokens - 1, 1), 1),
        "new_tokens": warm.timing.new_tokens,
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "form": str(model.cpu_form.form) if model.cpu_form else None,  # measured at load (cpu_forms.py)
        "form_measure_s": round(model.cpu_form.measure_s, 1) if model.cpu_form else None,
        "form_remembered": model.cpu_form.remembered if model.cpu_form else None,  # then not measured at this load
    }


def _cases(text: str) -> list[tuple[str, str]]:
    cases = [tuple(item.split(":", 1)) for item in text.split(",")]
    unknown = [case for case in cases if case not in CASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown cases {unknown}; known: {CASES}")
    return cases


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--write-npz":
        _write_npz(*sys.argv[2:5])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/paligemma-3b-224")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument(
        "--cases",
        type=_cases,
        default=CASES,
        help="FORMAT:DTYPE,... to measure, the first the reference (default: all, from "
        + ",".join(f"{name}:{dtype}" for name, dtype in CASES)
        + ")",
    )
    args = parser.parse_args()
    write_checkpoints(args.dir, {name for name, _ in args.cases})
    print(json.dumps(cpu()), flush=True)
    rows = []
    for name, dtype in args.cases:
        out = subprocess.run(
            [*MODULE, "--measure", os.path.join(args.dir, name), dtype, str(args.decode_tokens)],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        row = {"format": name, "dtype": dtype, **json.loads(out.stdout.strip().splitlines()[-1])}
        row["decode_speed_over_first"] = (
            round(rows[0]["decode_ms_per_token"] / row["decode_ms_per_token"], 2) if rows else 1.0
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
