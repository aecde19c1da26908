"""bench.soak: how a request's time is split, which result files it fetches, its tables, waiting for the app to
be prepared, and one real soak through `python app.py` (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import soak, workload
from playground.app_process import ServerError, wait_for_log


def test_a_request_is_split_into_the_servers_parts_the_web_layer_and_its_files():
    timing = {
        "queue_s": 0.01,
        "load_wait_s": 0.002,
        "batch_wait_s": 0.03,
        "prefill_s": 0.2,
        "decode_s": 0.5,
        "postprocess_s": 0.05,
        "new_tokens": 12,
        "compiled": False,
    }
    record = soak.record_of(timing, ttft_s=0.3, answered_s=1.0, files_s=0.1)
    assert record["model_s"] == pytest.approx(0.7)
    assert record["web_s"] == pytest.approx(1.0 - 0.01 - 0.002 - 0.03 - 0.7 - 0.05)
    assert sum(record[part] for part in soak.PARTS) == pytest.approx(record["latency_s"]) == pytest.approx(1.1)
    assert (record["tokens"], record["compiled"], record["ttft_s"]) == (12, False, 0.3)
    # A run the queue never stamped (queue_s None) and one without a scheduler wait still add up.
    bare = soak.record_of({"queue_s": None, "prefill_s": 0.1, "decode_s": 0.1}, 0.2, 0.5, 0.0)
    assert bare["queue_s"] == 0.0 and bare["web_s"] == pytest.approx(0.3)


def test_every_file_of_a_result_is_fetched_once():
    result = [
        [["circle", "circle"]],
        {
            "image": {"path": "/tmp/a.webp", "url": "http://x/file=a.webp"},
            "annotations": [{"image": {"url": "http://x/file=m1.png"}, "label": "circle"}],
        },
        "<loc0001><loc0002><loc0003><loc0004> circle",
        {"path": "/tmp/d.json", "url": "http://x/file=d.json"},
        None,
        {"prefill_s": 0.1},
    ]
    assert soak.file_urls(result) == ["http://x/file=a.webp", "http://x/file=m1.png", "http://x/file=d.json"]
    assert soak.file_urls(["text only", None, {"prefill_s": 0.1}]) == []


def _row(requests_per_s: float, ttft_p95_s: float) -> dict:
    return {
        "requests": 8,
        "errors": 0,
        "requests_per_s": requests_per_s,
        "tokens_per_s": 10 * requests_per_s,
        "ttft_p50_s": ttft_p95_s / 2,
        "ttft_p95_s": ttft_p95_s,
        "latency_p50_s": 1.0,
        "latency_p95_s": 2.0,
        "compiled": 0,
        "parts": {part: 0.1 for part in soak.PARTS},
    }


def test_tables_give_each_ratio_and_the_targets():
    rows = {
        ("batch", 1): _row(1.0, 1.0),
        ("batch", 8): _row(2.0, 4.0),
        ("continuous", 1): _row(1.0, 1.0),
        ("continuous", 8): _row(3.0, 1.5),
    }
    shown = workload.table("mid through the app", rows)
    assert "ratio = continuous ÷ batch" in shown
    assert "| 8 | ratio | 1.50× | 1.50× | 0.38× | 0.38× | 1.00× | 1.00× | | |" in shown
    assert "continuous: 8 clients ÷ 1: throughput 3.00×, p95 TTFT 1.50×" in shown
    targets = soak.targets_line(rows)
    assert "batch: 8 clients ÷ 1: throughput 2.00× (target ≥ 4.0×), p95 TTFT 4.00× (target ≤ 2.0×)" in targets
    assert "not measured" in soak.targets_line({("batch", 1): _row(1.0, 1.0), ("batch", 4): _row(2.0, 1.0)})
    parts = soak.breakdown_table("demo", rows)
    assert "| 1 | batch | 0.100 (14%) |" in parts and parts.rstrip().endswith("| 0.700 |")


def test_waiting_for_the_prepared_line_ends_when_it_is_logged_or_the_server_is_gone(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("INFO model 'demo' ready in 2.5 s\nINFO prepared for common requests: 'demo' in 9.1 s\n")
    assert wait_for_log(str(log), "prepared for common requests:", 5) < 1
    log.write_text("INFO model 'demo' ready in 2.5 s\n")
    with pytest.raises(ServerError, match="did not say 'prepared"):
        wait_for_log(str(log), "prepared", 0.6)
    gone = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    gone.wait()
    with pytest.raises(ServerError, match="exited with code 3"):  # at once, not after the timeout
        wait_for_log(str(log), "prepared", 600, gone)


@pytest.mark.slow
def test_a_soak_through_the_app_answers_every_request(capsys):
    soak.main(["--models", "demo", "--schedulers", "batch", "--clients", "1", "2", "--requests", "3", "--warmup", "2"])
    lines = capsys.readouterr().out.splitlines()
    runs = [json.loads(line) for line in lines if line.startswith('{"model"')]
    assert [(run["scheduler"], run["clients"]) for run in runs] == [("batch", 1), ("batch", 2)]
    for run in runs:
        assert run["requests"] == 3 and run["errors"] == 0, run["first_errors"]
        assert 0 < run["ttft_p50_s"] <= run["latency_p95_s"] and run["requests_per_s"] > 0
        assert run["parts"]["model_s"] > 0 and run["parts"]["files_s"] > 0 and run["parts"]["web_s"] > 0
    shown = "\n".join(lines)
    assert "CPU: " in shown and "vector features" in shown and "where a request's time goes" in shown
