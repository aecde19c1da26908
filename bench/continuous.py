"""Continuous batching (playground.continuous.Scheduler) against request batching (playground.batching.Batcher),
in one process, on the same model and the same mixed workload, in the same run.

    python -m bench.continuous [--configs demo mid] [--clients 1 4 8] [--requests 24]

Each client (a thread) sends its next request when its last one has finished: the gallery's prompts (different
lengths) and images, token limits of 12 to 64, greedy / temperature(0.7) / nucleus(0.9), each request its own
seed. Per model and scheduler, one uncounted pass at the largest client count compiles the shapes first (and
Scheduler.warmup its decode loops; shapes still compiled while measuring are counted). Per (model, scheduler,
clients): requests/s, generated tokens/s, p50/p95 time to first token (submit -> first update) and latency
(submit -> last update), errors. Prints JSON lines, then one table with the CPU line and the ratios
continuous ÷ batching.

Models: `demo` (assets/demo, trained: short answers) and `mid` (bench.generate's ~167 M-parameter config with
random weights and the full 257 k vocabulary: the model, not the scheduler, dominates a request).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import threading
import time

from PIL import Image

import paligemma
from bench.generate import DEMO, TOKENIZER, model_config
from paligemma.cpu_kind import cpu as machine
from playground import prompts
from playground.batching import Batcher
from playground.continuous import Scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIR = os.path.join(ROOT, "assets", "examples")
LIMITS = (12, 24, 40, 64)
SAMPLERS = ("greedy", "temperature(0.7)", "nucleus(0.9)")
SCHEDULERS = {"batching": Batcher, "continuous": Scheduler}


def load_model(name: str) -> paligemma.Model:
    if name == "demo":
        return paligemma.load(DEMO)
    tokenizer = paligemma.Tokenizer(TOKENIZER)
    cfg = model_config(name, tokenizer.vocab_size)
    return paligemma.Model(paligemma.init_params(cfg, seed=0, std=0.02), cfg, tokenizer, source=name)


def workload(count: int) -> list[tuple]:
    """`count` requests: (image, prompt, max_new_tokens, sampler, seed), every mix of the three cycles."""
    examples = prompts.examples_for("demo", prompts.load_examples(EXAMPLES_DIR))  # the demo model's gallery
    images = {ex.image: Image.open(ex.image).convert("RGB") for ex in examples}
    return [
        (images[examples[k % len(examples)].image], examples[k % len(examples)].prompt, LIMITS[k % len(LIMITS)],
         SAMPLERS[k % len(SAMPLERS)], k)
        for k in range(count)
    ]  # fmt: skip


def drive(scheduler, model, requests: list[tuple], clients: int) -> tuple[list[dict], float]:
    """Sends the requests from `clients` closed-loop threads; one record per request, and the wall time."""
    numbers, records, lock = itertools.count(), [], threading.Lock()

    def client() -> None:
        while (n := next(numbers)) < len(requests):
            image, prompt, limit, sampler, seed = requests[n]
            sent = time.perf_counter()
            record = {}
            try:
                with contextlib.closing(scheduler.submit(model, image, prompt, limit, sampler, seed)) as updates:
                    for update in updates:
                        record.setdefault("ttft_s", time.perf_counter() - sent)
                        record |= {"tokens": update.tokens, "compiled": update.timing.get("compiled", False)}
                record["latency_s"] = time.perf_counter() - sent
            except Exception as err:  # counted; the run goes on
                record = {"error": f"{type(err).__name__}: {err}"}
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records, time.perf_counter() - start


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summary(records: list[dict], wall_s: float) -> dict:
    ok = [r for r in records if "error" not in r]
    ttft, latency = [r["ttft_s"] for r in ok], [r["latency_s"] for r in ok]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "requests_per_s": round(len(ok) / wall_s, 3),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall_s, 1),
        "ttft_p50_s": round(_percentile(ttft, 50), 3) if ok else None,
        "ttft_p95_s": round(_percentile(ttft, 95), 3) if ok else None,
        "latency_p50_s": round(_percentile(latency, 50), 3) if ok else None,
        "latency_p95_s": round(_percentile(latency, 95), 3) if ok else None,
        "compiled": sum(r["compiled"] for r in ok),
        "first_errors": sorted({r["error"] for r in records if "error" in r})[:3],
    }


def measure(config: str, clients: list[int], count: int) -> dict:
    model = load_model(config)
    requests = workload(count)
    rows = {}
    for name, kind in SCHEDULERS.items():
        scheduler = kind()
        if isinstance(scheduler, Scheduler):
            scheduler.warmup(model)  # every row count of its decode loop
        drive(scheduler, model, requests, max(clients))  # warm-up: compiles the shapes
        for n in clients:
            row = summary(*drive(scheduler, model, requests, n))
            rows[(name, n)] = row
            print(json.dumps({"model": config, "scheduler": name, "clients": n, **row}), flush=True)
    return rows


def table(config: str, rows: dict, clients: list[int]) -> str:
    lines = [
        f"\n{config}: continuous batching vs request batching (same run; ratio = continuous ÷ batching)",
        "| clients | scheduler | req/s | tok/s | TTFT p50 s | TTFT p95 s | latency p50 s | latency p95 s | compiled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = ("requests_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s")
    for n in clients:
        for name in SCHEDULERS:
            row = rows[(name, n)]
            lines.append(f"| {n} | {name} | " + " | ".join(str(row[k]) for k in keys) + f" | {row['compiled']} |")
        ratio = [rows[("continuous", n)][k] / rows[("batching", n)][k] if rows[("batching", n)][k] else 0 for k in keys]
        lines.append(f"| {n} | ratio | " + " | ".join(f"{r:.2f}×" for r in ratio) + " | |")
    for name in SCHEDULERS:
        one, most = rows[(name, clients[0])], rows[(name, clients[-1])]
        throughput = most["requests_per_s"] / one["requests_per_s"]
        lines.append(
            f"{name}: {clients[-1]} clients ÷ {clients[0]}: throughput {throughput:.2f}×, "
            f"p95 TTFT {most['ttft_p95_s'] / one['ttft_p95_s']:.2f}×"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["demo", "mid"], choices=["tiny", "demo", "mid"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=24, help="measured requests per (scheduler, clients)")
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or args.requests < 1:
        parser.error("--clients and --requests must be at least 1")
    clients = sorted(set(args.clients))
    paligemma.enable_compile_cache()
    print(json.dumps({"machine": machine(), "requests": args.requests, "limits": LIMITS, "samplers": SAMPLERS}))
    tables = [table(config, measure(config, clients, args.requests), clients) for config in args.configs]
    print(f"\nCPU: {machine()['cpu']}" + "\n".join(tables))


if __name__ == "__main__":
    main()
