"""The mixed serving workload the crowd benchmarks share (bench.continuous in process, bench.soak through the app):
what each request asks, closed-loop clients that send them, and the summary of what they measured.

Requests cycle through the demo gallery's prompts and images (different prompt lengths), token limits of 12 to
64 and greedy / temperature(0.7) / nucleus(0.9) decoding, each with its own seed, so no two neighbours share
all their settings and request batching cannot simply group them.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
import threading
import time
from collections.abc import Callable

from playground import prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIR = os.path.join(ROOT, "assets", "examples")
LIMITS = (12, 24, 40, 64)
SAMPLERS = ("greedy", "temperature(0.7)", "nucleus(0.9)")


@dataclasses.dataclass(frozen=True)
class Request:
    image: str  # the example's file
    prompt: str
    max_new_tokens: int
    decoding: str
    seed: int


def mixed(count: int) -> list[Request]:
    """`count` requests, every mix of example, token limit and sampler cycling."""
    examples = prompts.examples_for("demo", prompts.load_examples(EXAMPLES_DIR))  # the demo model's gallery
    return [
        Request(examples[k % len(examples)].image, examples[k % len(examples)].prompt, LIMITS[k % len(LIMITS)],
                SAMPLERS[k % len(SAMPLERS)], k)
        for k in range(count)
    ]  # fmt: skip


def closed_loop(send: Callable[[Request], dict], requests: list[Request], clients: int) -> tuple[list[dict], float]:
    """The requests from `clients` threads, each sending its next one when its last is answered: send(request)
    gives a record ({"ttft_s", "latency_s", "tokens", "compiled", ...}); an exception is counted as an error
    and the run goes on. Returns the records and the wall time."""
    numbers, records, lock = itertools.count(), [], threading.Lock()

    def client() -> None:
        while (n := next(numbers)) < len(requests):  # itertools.count's next() is atomic under the GIL
            try:
                record = send(requests[n])
            except Exception as err:  # counted, and the run goes on
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


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summary(records: list[dict], wall_s: float) -> dict:
    """Throughput, time to first token and latency percentiles, compilations and errors of one measured run."""
    ok = [r for r in records if "error" not in r]
    ttft, latency = [r["ttft_s"] for r in ok], [r["latency_s"] for r in ok]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "requests_per_s": round(len(ok) / wall_s, 3),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall_s, 1),
        "ttft_p50_s": round(percentile(ttft, 50), 3) if ok else None,
        "ttft_p95_s": round(percentile(ttft, 95), 3) if ok else None,
        "latency_p50_s": round(percentile(latency, 50), 3) if ok else None,
        "latency_p95_s": round(percentile(latency, 95), 3) if ok else None,
        "compiled": sum(r["compiled"] for r in ok),
        "first_errors": sorted({r["error"] for r in records if "error" in r})[:3],
    }


COLUMNS = ("requests_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s")


def table(title: str, rows: dict[tuple[str, int], dict]) -> str:
    """One markdown table of summaries keyed by (scheduler, clients): each client count's rows, the ratio of the
    last scheduler over the first (same run), and each scheduler's most clients over its fewest."""
    schedulers = list(dict.fromkeys(name for name, _ in rows))
    clients = sorted({n for _, n in rows})
    first, last = schedulers[0], schedulers[-1]
    lines = [
        f"\n{title} (same run; ratio = {last} ÷ {first})",
        "| clients | scheduler | req/s | tok/s | TTFT p50 s | TTFT p95 s | latency p50 s | latency p95 s | errors "
        "| compiled |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in clients:
        for name in schedulers:
            row = rows[(name, n)]
            cells = " | ".join(str(row[k]) for k in COLUMNS)
            lines.append(f"| {n} | {name} | {cells} | {row['errors']} | {row['compiled']} |")
        if len(schedulers) > 1:
            ratios = (_ratio(rows[(last, n)][k], rows[(first, n)][k]) for k in COLUMNS)
            lines.append(f"| {n} | ratio | " + " | ".join(ratios) + " | | |")
    for name in schedulers:
        few, many = rows[(name, clients[0])], rows[(name, clients[-1])]
        lines.append(
            f"{name}: {clients[-1]} clients ÷ {clients[0]}: throughput "
            f"{_ratio(many['requests_per_s'], few['requests_per_s'])}, "
            f"p95 TTFT {_ratio(many['ttft_p95_s'], few['ttft_p95_s'])}"
        )
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "n/a"
