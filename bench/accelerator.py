"""Accelerator-ready in one command: half-precision parity, then PaliGemma-3B-224 speed on whatever device JAX sees.

    python -m bench.accelerator [--config {tiny,demo,mid,3b-224}] [--dir /tmp/paligemma-bench] [--json]
    python bench/accelerator.py ...       # the same (it runs itself again as the module)

1. Parity: a small random model in float32 and in bfloat16 (and float16 where the device has no bfloat16
   hardware, as devices.default_dtype picks it there): greedy tokens over the whole vocabulary and the largest
   logit difference against float32 on the float32 tokens (teacher-forced). It passes when every logit is finite
   and the largest difference stays under a share of the largest float32 logit (PARITY_TOLERANCE).
2. Speed: the config's random checkpoint (default 3b-224 on an accelerator, mid on CPU), written once under
   --dir by bench/generate.py as our .npz and a transformers folder with the same tensors, served in the device's
   default dtype at batch 1, 4 and 16: time to first token, decode ms per token, tokens/s, the share of the
   memory-bandwidth bound (decoder weight bytes read per decode step ÷ time per step ÷ bound; the bound from a
   table of device kinds, measured with numpy on CPU), peak device memory (host RSS on CPU) and compile time
   (first request − warm request). Then the same for transformers (torch CUDA, same dtype, same weights) where
   JAX runs on a GPU that torch sees; elsewhere that row says why it was skipped.

Each step runs in a fresh process (this one never starts JAX or CUDA), so each framework has the device to
itself. Prints the CPU model and its vector features, the device kind and one table; `--json` prints the same as
one JSON object instead. Progress goes to stderr. Planned to finish in under 8 minutes on one GPU (3b-224,
64 new tokens, weights written included).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__" and not __package__:
    # Run as a file, Python puts bench/ first on the path, where `bench` itself does not import and
    # bench/postprocess.py shadows the postprocess package: run again as the module, the root on the path
    # (-P: the current folder is not).
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-P", "-m", "bench.accelerator", *sys.argv[1:]]
    os.execve(sys.executable, command, {**os.environ, "PYTHONPATH": path})

from bench.generate import PROMPT, common_prefix, memory_bandwidth_gbs, model_config, prepare, write_inputs  # noqa: E402
from bench.memory import peak_rss_gib  # noqa: E402
from paligemma import cpu_kind  # noqa: E402

MODULE = [sys.executable, "-m", "bench.accelerator"]  # the measured subprocesses, run from ROOT
TORCH_DEVICE = "cuda"  # where transformers runs (the test of that branch runs it on the CPU with CUDA's calls stubbed)
CONFIGS = ("tiny", "demo", "mid", "3b-224")
BATCHES = (1, 4, 16)
# The parity model: demo shapes with the published vocabulary (greedy picks among as many tokens as the real
# models), or tiny shapes and vocabulary for the tiny config (CI's smoke test).
PARITY_MODELS = {"tiny": ("tiny", 2048)}
PARITY_MODEL = ("demo", 257152)
PARITY_TOLERANCE = {"bfloat16": 0.05, "float16": 0.01}  # largest |Δ logit| ÷ largest |float32 logit|


# ---------------------------------------------------------------- the machine


# Peak memory bandwidth (GB/s) by device kind, from the vendors' data sheets; the first pattern that matches
# jax's device_kind wins, so the specific ones come first.
BANDWIDTH_GBS = (
    (r"\bH200\b", 4800, "H200 HBM3e"),
    (r"\bH100 PCIe\b", 2000, "H100 PCIe HBM2e"),
    (r"\bH100 NVL\b", 3900, "H100 NVL HBM3"),
    (r"\bH100\b", 3350, "H100 SXM HBM3"),
    (r"\bA100\b.*80GB.*PCIe", 1935, "A100 80GB PCIe HBM2e"),
    (r"\bA100\b.*80GB", 2039, "A100 80GB SXM HBM2e"),
    (r"\bA100\b", 1555, "A100 40GB HBM2"),
    (r"\bL40S\b", 864, "L40S GDDR6"),
    (r"\bL4\b", 300, "L4 GDDR6"),
    (r"\bA10G?\b", 600, "A10/A10G GDDR6"),
    (r"\bT4\b", 320, "T4 GDDR6"),
    (r"\bV100\b", 900, "V100 HBM2"),
    (r"TPU v4\b", 1200, "TPU v4 HBM2"),
    (r"TPU v5 ?(lite|e)\b", 819, "TPU v5e HBM2e"),
    (r"TPU v5p?\b", 2765, "TPU v5p HBM2e"),
    (r"TPU v6 ?(lite|e)\b", 1640, "TPU v6e HBM"),
)


def bandwidth_bound(device: dict, gib: float) -> dict:
    """GB/s the decode's weight reads are held against: the device kind's data-sheet figure, numpy's
    measurement on CPU, none for an accelerator kind not in BANDWIDTH_GBS."""
    if device["platform"] == "cpu":
        measured = memory_bandwidth_gbs(gib)
        source = f"numpy on this CPU: copy {measured['copy_gbs']}, streaming read {measured['read_gbs']} GB/s"
        return {"gbs": measured["bound_gbs"], "source": source}
    for pattern, gbs, name in BANDWIDTH_GBS:
        if re.search(pattern, device["kind"]):
            return {"gbs": gbs, "source": f"data sheet: {name}"}
    return {"gbs": None, "source": f"unknown device kind {device['kind']!r}: add it to BANDWIDTH_GBS"}


# ---------------------------------------------------------------- step 1: parity (a subprocess)


def parity(config: str, new_tokens: int) -> dict:
    """The device, and float32 against the half dtypes on a small random model (PARITY_MODELS)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import paligemma
    from paligemma.devices import default_dtype, has_bfloat16
    from paligemma.model import forward

    device = jax.devices()[0]
    shapes, vocab = PARITY_MODELS.get(config, PARITY_MODEL)
    cfg = model_config(shapes, vocab)
    params32 = paligemma.init_params(cfg, seed=0, std=cfg.text.width**-0.5)  # activations and logits of order 1
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    prompts = [list(rng.integers(2, vocab, 9)), list(rng.integers(2, vocab, 5))]
    teacher_forced = jax.jit(forward, static_argnums=1)

    def greedy(params) -> np.ndarray:
        generator = paligemma.Generator(params, cfg, vocab, eos_id=-1, pad_id=0)  # never stops early
        *_, (tokens, _) = generator.run(images, prompts, new_tokens, paligemma.Sampler(), 0)
        return tokens

    def logits(params, tokens) -> np.ndarray:
        """float32 [rows, new_tokens, V]: each row's logits for its generated positions, given `tokens`."""
        seq = np.zeros((len(prompts), max(map(len, prompts)) + new_tokens), np.int32)
        for row, (prompt, generated) in enumerate(zip(prompts, tokens)):
            seq[row, : len(prompt) + new_tokens] = [*prompt, *generated]
        lengths = np.array([len(p) for p in prompts])
        out = np.asarray(teacher_forced(params, cfg, images, seq, lengths, lengths + new_tokens))
        return np.stack([out[row, n - 1 : n - 1 + new_tokens] for row, n in enumerate(lengths)])

    tokens32 = greedy(params32)
    logits32 = logits(params32, tokens32)
    checks = []
    for name in ["bfloat16"] + ([] if has_bfloat16(device) else ["float16"]):
        params = jax.tree.map(lambda x, dtype=name: x.astype(dtype), params32)
        checks.append(_compare(name, greedy(params), tokens32, logits(params, tokens32), logits32))
    return {
        "device": {
            "platform": device.platform,
            "kind": device.device_kind,
            "count": jax.device_count(),
            "default_dtype": jnp.dtype(default_dtype(device)).name,
            "jax": jax.__version__,
        },
        "parity_model": f"{cfg.describe()}, {paligemma.count_params(params32) / 1e6:.1f} M params, random",
        "parity": checks,
    }


def _compare(dtype: str, tokens, tokens32, logits, logits32) -> dict:
    """One dtype against float32: its free-running greedy tokens (the rows' common prefixes with float32's) and
    its logits given float32's tokens."""
    import numpy as np

    finite = bool(np.isfinite(logits).all())
    diff = float(np.abs(logits - logits32).max()) if finite else float("inf")
    scale = float(np.abs(logits32).max())
    return {
        "dtype": dtype,
        "greedy_tokens_equal": sum(common_prefix(a.tolist(), b.tolist()) for a, b in zip(tokens, tokens32)),
        "greedy_tokens": int(tokens32.size),
        "teacher_forced_argmax_equal": int((logits.argmax(-1) == logits32.argmax(-1)).sum()),
        "max_logit_diff": diff,
        "max_abs_logit": scale,
        "tolerance": PARITY_TOLERANCE[dtype],
        "passed": finite and diff <= PARITY_TOLERANCE[dtype] * scale,
    }


# ---------------------------------------------------------------- step 2: speed (a subprocess per framework)


def _tile(pixels, batch: int):
    """`batch` images from the shared inputs (bench/generate.py writes four), repeated in turn."""
    return pixels[[i % len(pixels) for i in range(batch)]]


def measure_ours(folder: str, dtype: str, new_tokens: int, repeats: int, batches: tuple[int, ...] = BATCHES) -> dict:
    """Load once, then each batch size in ascending order (so peak memory so far is the larger batch's)."""
    import jax
    import numpy as np

    import paligemma

    start = time.perf_counter()
    model = paligemma.load(os.path.join(folder, "ours"), dtype=dtype)
    load_s = time.perf_counter() - start
    inputs = np.load(write_inputs(folder, model.config.image_size))  # transformers reads the same file next
    generator = paligemma.Generator(
        model.params, model.config, model.config.text.vocab_size, eos_id=-1, pad_id=0, layer_views=model.layer_views
    )  # eos -1: every request decodes exactly new_tokens
    device = jax.devices()[0]
    rows = []
    for batch in batches:
        pixels, prompts = _tile(inputs["pixels"], batch), [list(inputs[PROMPT])] * batch

        def request(pixels=pixels, prompts=prompts):
            start = time.perf_counter()
            *_, (tokens, timing) = generator.run(pixels, prompts, new_tokens, paligemma.Sampler(), 0)
            return time.perf_counter() - start, tokens, timing

        first_s, _, _ = request()
        warm = [request() for _ in range(repeats)]
        decode_ms = statistics.median(1000 * t.decode_s / (t.new_tokens - 1) for _, _, t in warm)
        rows.append(
            {
                "batch": batch,
                "ttft_s": statistics.median(t.prefill_s for _, _, t in warm),
                "decode_ms_per_token": decode_ms,
                "tokens_per_s": batch * 1000 / decode_ms,
                "compile_s": first_s - statistics.median(s for s, _, _ in warm),
                **_peak_memory(device),
                "tokens": warm[0][1][0].tolist(),
            }
        )
    return {
        "load_s": load_s,
        "dtype": model.dtype_name,
        "decode_weight_bytes": sum(x.nbytes for x in jax.tree.leaves(model.params["llm"])),
        "rows": rows,
    }


def _peak_memory(device) -> dict:
    """The device allocator's peak where JAX reports one (GPU, TPU), else this process's peak RSS (CPU)."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_memory_gib": stats["peak_bytes_in_use"] / 2**30, "memory_kind": "device"}
    return {"peak_memory_gib": peak_rss_gib(), "memory_kind": "host RSS"}


def measure_transformers(
    folder: str, dtype: str, new_tokens: int, repeats: int, batches: tuple[int, ...] = BATCHES
) -> dict:
    """transformers on the same weights with torch on CUDA, or why not (never on CPU: bench/generate.py is the
    CPU comparison)."""
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA GPU (torch's CPU build, or a non-NVIDIA accelerator)"}
    try:
        from transformers import PaliGemmaForConditionalGeneration
    except ImportError as err:
        return {"skipped": f"transformers is not installed ({err})"}
    import numpy as np

    cuda, torch_dtype = torch.device(TORCH_DEVICE), getattr(torch, dtype)
    start = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(os.path.join(folder, "hf"), dtype=torch_dtype)
    model = model.to(cuda).eval()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    inputs = np.load(os.path.join(folder, "inputs.npz"))
    image_tokens = [model.config.image_token_id] * model.config.text_config.num_image_tokens
    rows = []
    for batch in batches:
        ids = torch.tensor([image_tokens + inputs[PROMPT].tolist()] * batch, device=cuda)
        pixels = _tile(inputs["pixels"], batch).transpose(0, 3, 1, 2)
        feed = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            token_type_ids=torch.zeros_like(ids),
            pixel_values=torch.from_numpy(np.ascontiguousarray(pixels)).to(cuda, torch_dtype),
        )

        def generate(n: int, feed=feed, prompt_len=ids.shape[1]):
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**feed, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            return time.perf_counter() - start, out[:, prompt_len:].cpu()

        torch.cuda.reset_peak_memory_stats()
        first_s, _ = generate(new_tokens)
        ttft = [generate(1)[0] for _ in range(repeats)]
        full = [generate(new_tokens) for _ in range(repeats)]
        decode_ms = 1000 * (statistics.median(s for s, _ in full) - statistics.median(ttft)) / (new_tokens - 1)
        rows.append(
            {
                "batch": batch,
                "ttft_s": statistics.median(ttft),
                "decode_ms_per_token": decode_ms,
                "tokens_per_s": batch * 1000 / decode_ms,
                "compile_s": first_s - statistics.median(s for s, _ in full),  # eager: CUDA and cuBLAS warm-up
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                "memory_kind": "device",
                "tokens": full[0][1][0].tolist(),
            }
        )
    return {"load_s": load_s, "dtype": dtype, "torch": torch.__version__, "rows": rows}


CHILDREN = {"parity": parity, "ours": measure_ours, "transformers": measure_transformers}


# ---------------------------------------------------------------- the run


def _child(name: str, **kwargs) -> dict:
    """Runs CHILDREN[name](**kwargs) in a fresh process from the repository root; its last stdout line is JSON.

    A step that printed its result and then died while the interpreter shut down (seen once on CPU: "terminate
    called without an active exception", exit -6, after a complete run) keeps its result, with a warning."""
    print(f"accelerator: {name} …", file=sys.stderr, flush=True)
    out = subprocess.run([*MODULE, "--child", name, json.dumps(kwargs)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines = out.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise SystemExit(f"accelerator: the {name} step failed (exit {out.returncode}); its error is above")
    if out.returncode != 0:
        print(f"accelerator: the {name} step exited with {out.returncode} after its result; kept", file=sys.stderr)
    return result


def speed_rows(framework: str, result: dict, weight_bytes: int, bound_gbs: float | None) -> list[dict]:
    """One row per batch with the share of the bandwidth bound: weights read once per decode step."""
    rows = []
    for row in result["rows"]:
        seconds = row["decode_ms_per_token"] / 1000
        share = weight_bytes / seconds / (bound_gbs * 1e9) if bound_gbs and seconds > 0 else None
        rows.append({"framework": framework, "dtype": result["dtype"], **row, "bandwidth_share": share})
    return rows


def run(args) -> dict:
    started = time.perf_counter()
    probe = _child("parity", config=args.config or "", new_tokens=args.parity_tokens)
    device = probe["device"]
    accelerator = device["platform"] != "cpu"
    config = args.config or ("3b-224" if accelerator else "mid")
    new_tokens = args.new_tokens or (64 if accelerator else 16)
    repeats = args.repeats or (3 if accelerator else 2)
    bound = bandwidth_bound(device, args.bandwidth_gib)
    try:
        folder = prepare(config, args.dir, args.rewrite)
    except subprocess.CalledProcessError as err:
        message = f"accelerator: writing the {config} weights under {args.dir} failed (exit {err.returncode})"
        raise SystemExit(message) from None
    timed = {"new_tokens": new_tokens, "repeats": repeats, "batches": args.batches}
    ours = _child("ours", folder=folder, dtype=device["default_dtype"], **timed)
    rows = speed_rows("ours", ours, ours["decode_weight_bytes"], bound["gbs"])
    if device["platform"] == "gpu":
        theirs = _child("transformers", folder=folder, dtype=ours["dtype"], **timed)
    else:
        theirs = {"skipped": f"JAX runs on {device['platform']}: transformers is measured with torch CUDA on a GPU "
                  "only (bench/generate.py compares the two on CPU)"}  # fmt: skip
    if "skipped" not in theirs:
        rows += speed_rows("transformers", theirs, ours["decode_weight_bytes"], bound["gbs"])
        for mine, other in zip(rows, rows[len(args.batches) :]):
            other["greedy_tokens_equal_ours"] = common_prefix(mine["tokens"], other["tokens"])
    for row in rows:
        row["new_tokens"] = len(row.pop("tokens"))
    return {
        "cpu": cpu_kind.cpu(),
        **probe,
        "bandwidth_bound": bound,
        "config": config,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "load_s": {"ours": ours["load_s"], **({"transformers": theirs["load_s"]} if "load_s" in theirs else {})},
        "decode_weight_bytes": ours["decode_weight_bytes"],
        "speed": rows,
        "skipped": {"transformers": theirs["skipped"]} if "skipped" in theirs else {},
        "parity_passed": all(check["passed"] for check in probe["parity"]),
        "elapsed_s": time.perf_counter() - started,
    }


# ---------------------------------------------------------------- the table


def _num(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(result: dict) -> str:
    """The machine, the device and one markdown table: parity rows, then speed rows."""
    cpu, device, bound = result["cpu"], result["device"], result["bandwidth_bound"]
    lines = [
        cpu_kind.line(cpu),
        f"device: {device['kind']} ({device['platform']}, {device['count']} device(s), jax {device['jax']}), "
        f"default dtype {device['default_dtype']}",
        f"memory-bandwidth bound: {_num(bound['gbs'], 1) or 'none'} GB/s ({bound['source']})",
        f"parity model: {result['parity_model']}; speed: {result['config']} random weights, "
        f"{result['new_tokens']} new tokens, median of {result['repeats']} warm requests; load "
        + ", ".join(f"{k} {v:.1f} s" for k, v in result["load_s"].items()),
        "",
        "| case | dtype | batch | TTFT s | decode ms/token | tokens/s | share of bound | peak GiB | compile s "
        "| check |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for check in result["parity"]:
        verdict = "passed" if check["passed"] else "FAILED"
        lines.append(
            f"| parity vs float32 | {check['dtype']} | 2 | | | | | | | greedy {check['greedy_tokens_equal']}/"
            f"{check['greedy_tokens']} equal, teacher-forced argmax {check['teacher_forced_argmax_equal']}/"
            f"{check['greedy_tokens']}, max abs Δlogit {check['max_logit_diff']:.3g} of {check['max_abs_logit']:.3g}"
            f" (≤ {check['tolerance']:.0%}): {verdict} |"
        )
    for row in result["speed"]:
        memory = _num(row["peak_memory_gib"]) + ("" if row["memory_kind"] == "device" else " RSS")
        check = (
            f"greedy {row['greedy_tokens_equal_ours']}/{row['new_tokens']} equal to ours"
            if "greedy_tokens_equal_ours" in row
            else ""
        )
        lines.append(
            f"| {result['config']} {row['framework']} | {row['dtype']} | {row['batch']} | {_num(row['ttft_s'], 3)} | "
            f"{_num(row['decode_ms_per_token'], 1)} | {_num(row['tokens_per_s'], 1)} | {_num(row['bandwidth_share'])} |"
            f" {memory} | {_num(row['compile_s'], 1)} | {check} |"
        )
    for framework, reason in result["skipped"].items():
        lines.append(f"| {result['config']} {framework} | | | | | | | | | skipped: {reason} |")
    lines.append(f"\n{result['elapsed_s']:.0f} s in all")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(CHILDREN[sys.argv[2]](**json.loads(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=CONFIGS, help="default: 3b-224 on an accelerator, mid on CPU")
    parser.add_argument("--dir", default=os.path.join("/tmp", "paligemma-bench"), help="weights are written here once")
    parser.add_argument("--rewrite", action="store_true", help="write the weights again")
    parser.add_argument("--new-tokens", type=int, help="per request (default 64 on an accelerator, 16 on CPU)")
    parser.add_argument("--repeats", type=int, help="warm requests per batch (default 3 on an accelerator, 2 on CPU)")
    parser.add_argument("--parity-tokens", type=int, default=16, help="greedy tokens per parity row")
    parser.add_argument(
        "--batches",
        type=lambda text: tuple(int(b) for b in text.split(",")),
        default=BATCHES,
        help=f"batch sizes to time, comma-separated (default {','.join(map(str, BATCHES))})",
    )
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="numpy's bandwidth measurement on CPU")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    for name in ("new_tokens", "parity_tokens"):
        if getattr(args, name) is not None and not 2 <= getattr(args, name) <= 1024:
            parser.error(f"--{name.replace('_', '-')} must be from 2 to 1024 (decode is timed past the first token)")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not args.batches or min(args.batches) < 1:
        parser.error("--batches must be positive whole numbers, e.g. 1,4,16")
    result = run(args)
    print(json.dumps(result) if args.json else table(result))
    if not result["parity_passed"]:
        raise SystemExit("accelerator: half-precision parity FAILED (see the parity rows)")


if __name__ == "__main__":
    main()
