"""Continuous batching (playground.continuous.Scheduler) against request batching (playground.batching.Batcher),
in one process, on the same model and the same mixed workload, in the same run.

    python -m bench.continuous [--configs demo mid] [--clients 1 4 8] [--requests 24] [--shared-chunks 8]

Each client (a thread) sends its next request when its last one has finished: the gallery's prompts (different
lengths) and images, token limits of 12 to 64, greedy / temperature(0.7) / nucleus(0.9), each request its own
seed. Per model and scheduler, one uncounted pass at the largest client count compiles the shapes first (and
Scheduler.warmup its decode loops; shapes still compiled while measuring are counted). Per (model, scheduler,
clients): requests/s, generated tokens/s, p50/p95 time to first token (submit -> first update) and latency
(submit -> last update), errors. Prints JSON lines, then one table with the CPU line and the ratios
continuous ÷ batching. `--shared-chunks 8` adds the continuous scheduler as it was before it shortened its decode
chunks while several requests share them (CPU: chunks of 8 throughout), for a before/after in the same run.

Models: `demo` (assets/demo, trained: short answers) and `mid` (bench.generate's ~167 M-parameter config with
random weights and the full 257 k vocabulary: the model, not the scheduler, dominates a request).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time

from PIL import Image

import paligemma
from bench import workload
from bench.generate import DEMO, TOKENIZER, model_config
from paligemma import cpu_kind
from playground.batching import Batcher
from playground.continuous import Scheduler


def load_model(name: str) -> paligemma.Model:
    if name == "demo":
        return paligemma.load(DEMO)
    tokenizer = paligemma.Tokenizer(TOKENIZER)
    cfg = model_config(name, tokenizer.vocab_size)
    return paligemma.Model(paligemma.init_params(cfg, seed=0, std=0.02), cfg, tokenizer, source=name)


def drive(scheduler, model, requests: list[workload.Request], clients: int) -> tuple[list[dict], float]:
    """The requests through `scheduler` from `clients` closed-loop threads: one record each, and the wall time."""
    images = {r.image: Image.open(r.image).convert("RGB") for r in requests}

    def send(request: workload.Request) -> dict:
        sent, record = time.perf_counter(), {}
        updates = scheduler.submit(
            model, images[request.image], request.prompt, request.max_new_tokens, request.decoding, request.seed
        )
        with contextlib.closing(updates):
            for update in updates:
                record.setdefault("ttft_s", time.perf_counter() - sent)
                record |= {"tokens": update.tokens, "compiled": update.timing.get("compiled", False)}
        return record | {"latency_s": time.perf_counter() - sent}

    return workload.closed_loop(send, requests, clients)


def measure(config: str, clients: list[int], count: int, shared_chunks: list[int] = ()) -> dict:
    """shared_chunks: the continuous scheduler also with these chunk lengths while requests share the decode
    (Scheduler's shared_chunk; the chunk itself, e.g. 8 on CPU, decodes as before shared chunks existed)."""
    model = load_model(config)
    requests = workload.mixed(count)
    schedulers = {"batching": Batcher}
    schedulers |= {f"continuous, shared chunk {n}": functools.partial(Scheduler, shared_chunk=n) for n in shared_chunks}
    schedulers["continuous"] = Scheduler
    rows = {}
    for name, kind in schedulers.items():
        scheduler = kind()
        if isinstance(scheduler, Scheduler):
            scheduler.warmup(model)  # every row count of its decode loop
        drive(scheduler, model, requests, max(clients))  # warm-up: compiles the shapes
        for n in clients:
            row = workload.summary(*drive(scheduler, model, requests, n))
            rows[(name, n)] = row
            print(json.dumps({"model": config, "scheduler": name, "clients": n, **row}), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["demo", "mid"], choices=["tiny", "demo", "mid"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=24, help="measured requests per (scheduler, clients)")
    parser.add_argument(
        "--shared-chunks",
        nargs="*",
        type=int,
        default=[],
        help="also measure continuous batching with these decode chunk lengths while requests share the decode",
    )
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or args.requests < 1 or min(args.shared_chunks, default=1) < 1:
        parser.error("--clients, --requests and --shared-chunks must be at least 1")
    clients = sorted(set(args.clients))
    paligemma.enable_compile_cache()
    settings = {"requests": args.requests, "limits": workload.LIMITS, "samplers": workload.SAMPLERS}
    print(json.dumps({"machine": cpu_kind.cpu(), **settings}))
    tables = [
        workload.table(
            f"{config}: continuous batching vs request batching",
            measure(config, clients, args.requests, args.shared_chunks),
        )
        for config in args.configs
    ]
    print("\n" + cpu_kind.line() + "\n".join(tables))


if __name__ == "__main__":
    main()
