"""Soak the app: N gradio_client clients at once send a fixed number of mixed requests to the demo model.

    python -m bench.soak --clients 1 --requests 40
    python -m bench.soak --clients 4 --requests 40     # same work; concurrent runs share generate calls

Starts `python app.py` on a free loopback port (playground.app_process), sends `--warmup` requests
that are not counted (the model loads and compiles the batch shapes the clients will form), then the
measured ones: the gallery's caption, describe, OCR, answer, question, detect and segment examples in
turn, greedy, each client sending its next request when its last one is answered. Prints one JSON line:
requests/s, p50/p95 latency (send → last output), the error count, the mean batch size and how many
measured requests still had to compile.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time

from gradio_client import Client, handle_file

from playground import prompts
from playground.app_process import REPO, app_process
from playground.registry import DEMO_NAME
from playground.requests import DEFAULT_MAX_NEW_TOKENS

EXAMPLES_DIR = os.path.join(REPO, "assets", "examples")


def soak(url: str, clients: int, total: int, max_new_tokens: int) -> list[dict]:
    """`total` requests from `clients` threads, each with its own gradio_client session: one record each."""
    examples = prompts.examples_for("demo", prompts.load_examples(EXAMPLES_DIR))  # the demo model's gallery
    numbers, records, lock = itertools.count(), [], threading.Lock()

    def client_loop() -> None:
        client = Client(url, verbose=False)
        while (n := next(numbers)) < total:  # itertools.count's next() is atomic under the GIL
            example = examples[n % len(examples)]
            sent = time.monotonic()
            try:
                *_, timing = client.predict(
                    handle_file(example.image), example.prompt, DEMO_NAME, "greedy", max_new_tokens, api_name="/run"
                )
                record = {
                    "latency_s": time.monotonic() - sent,
                    "batch_size": timing["batch_size"],
                    "compiled": timing["compiled"],
                }
            except Exception as err:  # counted, and the soak goes on
                record = {"error": f"{type(err).__name__}: {err}"}
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def summary(records: list[dict], clients: int, wall_s: float) -> dict:
    answered = [r for r in records if "error" not in r]
    latencies = sorted(r["latency_s"] for r in answered)
    cuts = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {
        "clients": clients,
        "requests": len(records),
        "errors": len(records) - len(answered),
        "wall_s": round(wall_s, 2),
        "requests_per_s": round(len(answered) / wall_s, 3),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(cuts[18], 3) if latencies else None,
        "mean_batch_size": round(statistics.mean(r["batch_size"] for r in answered), 2) if answered else None,
        "compiled": sum(r["compiled"] for r in answered),
        "first_errors": sorted({r["error"] for r in records if "error" in r})[:3],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=40, help="measured requests, shared by the clients")
    parser.add_argument("--warmup", type=int, default=None, help="uncounted requests first (default: 3 × clients)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        parser.error("--clients and --requests must be at least 1")

    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        registry_file = os.path.join(folder, "models.json")
        with open(registry_file, "w") as f:
            json.dump({"models": []}, f)  # the demo model alone
        log_path = os.path.join(folder, "server.log")
        try:
            with app_process(registry_file, log_path) as (url, _):
                soak(url, args.clients, 3 * args.clients if args.warmup is None else args.warmup, args.max_new_tokens)
                start = time.monotonic()
                records = soak(url, args.clients, args.requests, args.max_new_tokens)
                wall_s = time.monotonic() - start
        except BaseException:
            with open(log_path) as f:
                print(f.read()[-4000:], file=sys.stderr)  # the server's last words
            raise
    print(json.dumps(summary(records, args.clients, wall_s)))


if __name__ == "__main__":
    main()
