"""How fast this CPU reads each decoder matrix in a decode step, as the model stores it and out-major.

    python -m bench.layouts [--config 3b-224] [--rows 1 4 16]

A decode step reads every weight once, so its speed is the rate at which XLA's CPU dot streams each matrix. The
model stores its layer matrices in-major (big_vision's [In, Out]: q/kv [N, D, H], gating [2, D, F], linear
[F, D]) and decodes them with gemma.py's own products. The embedding table, stored out-major ([V, D]: the
contracted axis last, as torch's Linear keeps its weights), reads near the memory bound. This prints, per matrix
and rows per step, GB/s in both layouts and the layer's sum, with the CPU line, so a layout change is decided
from each CPU kind's figures, not one machine's. Each matrix is timed over copies totalling at least
COPIES_BYTES, so that no figure comes from the CPU's caches.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp

from bench.generate import model_config
from paligemma import gemma
from paligemma.cpu_kind import cpu
from paligemma.out_major import OutMajor, rows_times, swapped_last_two

COPIES_BYTES = 2**30
REPEATS = 3


def _stored(kind: str):
    """The decode product gemma.py uses on the stored layout: x [M, In] -> output rows."""
    if kind == "grouped":  # w [R, D, O]
        return lambda x, w: gemma._grouped_project(x[:, None], w)
    return gemma._matmul  # w [In, Out]


def _out_major(x, w):
    """The same product on the transposed matrix (w [..., Out, In]) as out_major.py computes it for the model,
    whatever the matrix's kind: -> [..., M, Out]."""
    return rows_times(x, OutMajor(w))


def layer_matrices(cfg) -> dict[str, tuple[str, tuple[int, ...]]]:
    """One decoder layer's matrices: name -> (product kind, stored shape)."""
    t = cfg.text
    return {
        "q [N, D, H]": ("grouped", (t.num_heads, t.width, t.head_dim)),
        "kv [2K, D, H]": ("grouped", (2 * t.num_kv_heads, t.width, t.head_dim)),
        "attn_vec [N·H, D]": ("plain", (t.num_heads * t.head_dim, t.width)),
        "gating [2, D, F]": ("grouped", (2, t.width, t.mlp_dim)),
        "linear [F, D]": ("plain", (t.mlp_dim, t.width)),
    }


def seconds_per_read(product, shape: tuple[int, ...], in_features: int, rows: int) -> float:
    """The fastest of REPEATS passes over the copies, per copy (interference only ever adds time)."""
    copies = max(2, min(32, math.ceil(COPIES_BYTES / (4 * math.prod(shape)))))
    weights = [jnp.full(shape, 0.01 + 1e-3 * k, jnp.float32) for k in range(copies)]
    x = jnp.ones((rows, in_features), jnp.float32)
    fn = jax.jit(product)
    for w in weights:
        jax.block_until_ready(fn(x, w))
    best = math.inf
    for _ in range(REPEATS):
        start = time.perf_counter()
        for w in weights:
            jax.block_until_ready(fn(x, w))
        best = min(best, (time.perf_counter() - start) / copies)
    return best


def measure(cfg, rows: int) -> list[dict]:
    results = []
    for name, (kind, shape) in layer_matrices(cfg).items():
        stored = seconds_per_read(_stored(kind), shape, shape[-2], rows)
        out = seconds_per_read(_out_major, swapped_last_two(shape), shape[-2], rows)
        results.append({"matrix": name, "rows": rows, "bytes": 4 * math.prod(shape), "stored_s": stored, "out_s": out})
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="3b-224", choices=["tiny", "demo", "mid", "3b-224"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16], help="rows per decode step (batch)")
    args = parser.parse_args(argv)
    cfg = model_config(args.config, 257152)
    print(json.dumps({"config": args.config, **cpu()}))
    print("| rows | matrix | MB | stored GB/s | out-major GB/s | stored ÷ out-major time |\n|---|---|---|---|---|---|")
    for rows in args.rows:
        results = measure(cfg, rows)
        for r in results + [_layer_sum(results)]:
            gbs = [r["bytes"] / r[k] / 1e9 for k in ("stored_s", "out_s")]
            print(
                f"| {rows} | {r['matrix']} | {r['bytes'] / 1e6:.0f} | {gbs[0]:.1f} | {gbs[1]:.1f} | "
                f"{r['stored_s'] / r['out_s']:.2f}x |"
            )


def _layer_sum(results: list[dict]) -> dict:
    return {
        "matrix": "**one layer**",
        "bytes": sum(r["bytes"] for r in results),
        **{k: sum(r[k] for r in results) for k in ("stored_s", "out_s")},
    }


if __name__ == "__main__":
    main()
