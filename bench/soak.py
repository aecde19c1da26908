"""Soak the app: N clients at once send mixed requests through `python app.py`'s HTTP API, as visitors do.

    python -m bench.soak                                         # demo and mid, 1/4/8/16 clients, both schedulers
    python -m bench.soak --models demo --clients 1 4 --requests 16 --schedulers batch

Per model and scheduler, starts `python app.py --scheduler S` on a free loopback port (playground.app_process)
with a registry of that model alone, as its default: `demo` (assets/demo) or `mid` (bench.generate's ~167 M-param
config with random weights and the full 257 k vocabulary, written once under --dir and registered as a local
checkpoint: the model, not the web layer, dominates its requests). Once the app's log says it is prepared (its
common shapes compiled, its gallery answered: what the page calls "ready"), sends one uncounted pass at the
largest client count (it compiles the shapes the clients form), then, per client count, the measured requests:
bench.workload's mix (the gallery's prompts, token limits 12-64, greedy / temperature / nucleus, each its own
seed), each client sending its next request when its last is answered and reading the stream as the page does.

Per (model, scheduler, clients): requests/s, tokens/s, p50/p95 time to first token (send -> first streamed
model output) and latency (send -> final output and its files fetched), errors, compilations; and where a
request's time goes, as means over its requests from the server's own timing: Gradio's queue, waiting for the
model to load, the scheduler's wait (for a batch or a slot), the model (prefill + decode), postprocess, the web
layer (upload, HTTP, streaming, Gradio saving the outputs: what the server's figures leave of the time to the
final output), and fetching the result's files (annotated image, overlays, downloads). `batch` (request
batching, the CPU default) is the before, `continuous` (continuous batching) the after. Prints JSON lines,
then tables with the CPU line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import httpx

from bench import workload
from bench.generate import DEMO, TOKENIZER, prepare
from paligemma import cpu_kind
from playground.app_process import app_process
from playground.registry import DEMO_NAME
from playground.requests import PREPARED

MODELS = ("demo", "mid")
SCHEDULERS = ("batch", "continuous")
# Where a request's time goes: the server's timing fields, what they leave of the time to the final output, and
# fetching the result's files.
PARTS = ("queue_s", "load_wait_s", "batch_wait_s", "model_s", "postprocess_s", "web_s", "files_s")
# The targets on the mid model: 8 clients over one client.
TARGETS = {"throughput": 4.0, "ttft_p95": 2.0}
PREPARE_TIMEOUT_S = 900  # the app compiling its common shapes and answering the gallery before it says "ready"


def registry_file(model: str, folder: str, bench_dir: str) -> str:
    """A registry with `model` alone, as the default; the mid weights are written under bench_dir once."""
    if model == "demo":
        data = {"models": []}
    else:
        ours = os.path.join(prepare(model, bench_dir, rewrite=False), "ours")
        entry = {
            "name": model,
            "source": os.path.join(ours, "model.npz"),
            "tokenizer": os.path.join(ours, os.path.basename(TOKENIZER)),
            "mask_decoder": os.path.join(DEMO, "vae-oid.npz"),
            "notes": "random weights (bench.soak)",
        }
        data = {"default": model, "models": [entry]}
    path = os.path.join(folder, f"{model}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def record_of(timing: dict, ttft_s: float, answered_s: float, files_s: float) -> dict:
    """One answered request's record: its figures and its time split by PARTS (web: what the server's parts
    leave of the time to the final output; files: fetching the result's files after it)."""
    parts = {key: timing.get(key) or 0.0 for key in ("queue_s", "load_wait_s", "batch_wait_s", "postprocess_s")}
    parts["model_s"] = timing.get("prefill_s", 0.0) + timing.get("decode_s", 0.0)
    parts["web_s"] = answered_s - sum(parts.values())
    return {
        "ttft_s": ttft_s,
        "latency_s": answered_s + files_s,
        "tokens": timing.get("new_tokens", 0),
        "compiled": bool(timing.get("compiled")),
        **parts,
        "files_s": files_s,
    }


def file_urls(value) -> list[str]:
    """The URLs of the files in an output value (FileData dicts)."""
    if isinstance(value, dict):
        own = [value["url"]] if isinstance(value.get("url"), str) else []
        return own + [url for item in value.values() for url in file_urls(item)]
    if isinstance(value, list | tuple):
        return [url for item in value for url in file_urls(item)]
    return []


def sender(url: str, model: str):
    """send(request) -> record over the app's documented HTTP API (upload, POST /call/run, then its event stream),
    as a browser does and with one keep-alive connection per client thread: no client-side polling counts in the
    web layer (gradio_client reads its messages every 50 ms). Then fetches the result's files (annotated image,
    overlays, downloads), timed apart."""
    sessions = threading.local()

    def send(request: workload.Request) -> dict:
        if not hasattr(sessions, "http"):
            sessions.http = httpx.Client(base_url=url, timeout=300)
        http = sessions.http
        sent = time.perf_counter()
        with open(request.image, "rb") as f:
            uploaded = http.post("gradio_api/upload", files={"files": (os.path.basename(request.image), f)})
        image = {"path": uploaded.raise_for_status().json()[0], "meta": {"_type": "gradio.FileData"}}
        data = [image, request.prompt, model, request.decoding, request.max_new_tokens, request.seed]
        event_id = http.post("gradio_api/call/run", json={"data": data}).raise_for_status().json()["event_id"]
        ttft_s, result = None, None
        with http.stream("GET", f"gradio_api/call/run/{event_id}") as stream:
            event = None
            for line in stream.iter_lines():  # "event: generating|complete|error" then "data: <JSON>"
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                    continue
                if not line.startswith("data:"):
                    continue
                payload = json.loads(line.removeprefix("data:"))
                if event == "error":
                    raise RuntimeError(payload or "the run failed")
                if event not in ("generating", "complete"):  # heartbeats while a run waits: no data
                    continue
                if ttft_s is None and "prefill_s" in (payload[-1] or {}):  # the first output with model timing
                    ttft_s = time.perf_counter() - sent
                if event == "complete":
                    result = payload
        if result is None:
            raise RuntimeError("the event stream ended without a result")
        answered_s = time.perf_counter() - sent
        for file_url in file_urls(result):
            http.get(file_url).raise_for_status()
        files_s = time.perf_counter() - sent - answered_s
        return record_of(result[-1], answered_s if ttft_s is None else ttft_s, answered_s, files_s)

    return send


def breakdown(records: list[dict]) -> dict:
    """Mean seconds of each part of a request over the answered ones."""
    ok = [r for r in records if "error" not in r]
    return {part: round(statistics.mean(r[part] for r in ok), 4) if ok else None for part in PARTS}


def breakdown_table(title: str, rows: dict[tuple[str, int], dict]) -> str:
    lines = [
        f"\n{title}: where a request's time goes (mean s per request; share of the mean latency)",
        "| clients | scheduler | " + " | ".join(part.removesuffix("_s") for part in PARTS) + " | latency |",
        "|---|---|" + "---|" * (len(PARTS) + 1),
    ]
    for (name, n), row in sorted(rows.items(), key=lambda item: (item[0][1], item[0][0])):
        parts = row["parts"]
        total = sum(parts[p] for p in PARTS if parts[p] is not None)
        cells = [f"{parts[p]:.3f} ({parts[p] / total:.0%})" if total and parts[p] is not None else "n/a" for p in PARTS]
        lines.append(f"| {n} | {name} | " + " | ".join(cells) + f" | {total:.3f} |")
    return "\n".join(lines)


def measure(model: str, scheduler: str, clients: list[int], count: int, warmup: int, folder: str, bench_dir: str):
    """Per client count, the summary and breakdown of `count` requests through a fresh app process."""
    name = DEMO_NAME if model == "demo" else model
    log_path = os.path.join(folder, f"server-{model}-{scheduler}.log")
    rows = {}
    try:
        registry = registry_file(model, folder, bench_dir)
        # Measured once the log says the model is prepared: compiled and the gallery answered, the page's "ready".
        prepared = (PREPARED, PREPARE_TIMEOUT_S)
        with app_process(registry, log_path, args=("--scheduler", scheduler), log_line=prepared) as (url, _):
            send = sender(url, name)
            workload.closed_loop(send, workload.mixed(warmup), max(clients))  # compiles what the clients form
            for n in clients:
                records, wall_s = workload.closed_loop(send, workload.mixed(count), n)
                row = {**workload.summary(records, wall_s), "parts": breakdown(records)}
                rows[(scheduler, n)] = row
                print(json.dumps({"model": model, "scheduler": scheduler, "clients": n, **row}), flush=True)
    except BaseException:
        if os.path.isfile(log_path):  # the server started: its last words
            with open(log_path) as f:
                print(f.read()[-4000:], file=sys.stderr)
        raise
    return rows


def targets_line(rows: dict[tuple[str, int], dict]) -> str:
    """The issue's mid-model targets against each scheduler's figures (most clients over one)."""
    clients = sorted({n for _, n in rows})
    if 8 not in clients or 1 not in clients:
        return "targets (8 clients over 1): not measured (needs --clients 1 and 8)"
    lines = []
    for name in dict.fromkeys(s for s, _ in rows):
        one, eight = rows[(name, 1)], rows[(name, 8)]
        throughput = eight["requests_per_s"] / one["requests_per_s"]
        ttft = eight["ttft_p95_s"] / one["ttft_p95_s"]
        lines.append(
            f"{name}: 8 clients ÷ 1: throughput {throughput:.2f}× (target ≥ {TARGETS['throughput']}×), "
            f"p95 TTFT {ttft:.2f}× (target ≤ {TARGETS['ttft_p95']}×)"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), choices=SCHEDULERS)
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=24, help="measured requests per (model, scheduler, clients)")
    parser.add_argument("--warmup", type=int, default=None, help="uncounted requests first (default: 2 × most clients)")
    parser.add_argument("--dir", default="/tmp/paligemma-bench", help="where the mid weights are written once")
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or args.requests < 1:
        parser.error("--clients and --requests must be at least 1")
    clients = sorted(set(args.clients))
    warmup = 2 * clients[-1] if args.warmup is None else args.warmup
    settings = {"requests": args.requests, "warmup": warmup, "limits": workload.LIMITS, "samplers": workload.SAMPLERS}
    print(json.dumps({"machine": cpu_kind.cpu(), **settings}), flush=True)
    tables = []
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        for model in args.models:
            rows = {}
            for scheduler in args.schedulers:
                rows |= measure(model, scheduler, clients, args.requests, warmup, folder, args.dir)
            title = f"{model} through the app"
            tables += [workload.table(title, rows), breakdown_table(title, rows)]
            if model == "mid":
                tables.append(targets_line(rows))
    print("\n" + cpu_kind.line() + "\n".join(tables))


if __name__ == "__main__":
    main()
