"""bench/accelerator.py: CI's smoke test on CPU (tiny config, a few tokens, run the way a person runs it), the
bandwidth bound it reads from the device kind, and the transformers comparison that never runs without CUDA."""

import argparse
import json
import subprocess
import sys

import pytest

from bench import accelerator
from bench.accelerator import BATCHES, ROOT, bandwidth_bound, measure_transformers, table
from bench.generate import prepare, write_inputs


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """One folder for the module: the tiny weights are written once."""
    return tmp_path_factory.mktemp("accelerator")


@pytest.mark.slow
def test_runs_on_cpu_with_the_tiny_config(bench_dir):
    command = [sys.executable, "bench/accelerator.py", "--config", "tiny", "--dir", str(bench_dir), "--json"]
    command += ["--new-tokens", "3", "--parity-tokens", "3", "--repeats", "1", "--bandwidth-gib", "0.25"]
    command += ["--batches", "1,2"]  # two sizes show the rows follow the option; the GPU run times 1, 4 and 16
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout)

    assert result["device"]["platform"] == "cpu" and result["device"]["default_dtype"] == "float32"
    assert [check["dtype"] for check in result["parity"]] == ["bfloat16", "float16"]  # no bfloat16 hardware on CPU
    assert result["parity_passed"] and all(check["passed"] for check in result["parity"])
    assert all(check["greedy_tokens"] == 6 for check in result["parity"])  # 2 rows × 3 tokens
    assert [(row["framework"], row["batch"]) for row in result["speed"]] == [("ours", 1), ("ours", 2)]
    for row in result["speed"]:
        assert row["new_tokens"] == 3 and row["tokens_per_s"] > 0 and row["ttft_s"] > 0
        assert row["memory_kind"] == "host RSS" and 0 < row["bandwidth_share"] < 1
    assert "CUDA" in result["skipped"]["transformers"]
    assert result["bandwidth_bound"]["gbs"] > 0 and "numpy" in result["bandwidth_bound"]["source"]

    shown = table(result)
    assert shown.startswith(f"CPU: {result['cpu']['cpu']}") and "vector features: " in shown.splitlines()[0]
    assert shown.count("| parity vs float32 |") == 2 and shown.count(": passed |") == 2
    assert "| tiny ours | float32 | 1 |" in shown and "| tiny ours | float32 | 2 |" in shown
    assert "| tiny transformers |" in shown and "skipped:" in shown


@pytest.mark.parametrize(
    "kind, gbs",
    [
        ("NVIDIA H200", 4800),
        ("NVIDIA H100 80GB HBM3", 3350),
        ("NVIDIA H100 PCIe", 2000),
        ("NVIDIA A100-SXM4-80GB", 2039),
        ("NVIDIA A100 80GB PCIe", 1935),
        ("NVIDIA A100-SXM4-40GB", 1555),
        ("NVIDIA L40S", 864),
        ("NVIDIA L4", 300),
        ("NVIDIA A10G", 600),
        ("Tesla T4", 320),
        ("TPU v4", 1200),
        ("TPU v5 lite", 819),
        ("TPU v5p", 2765),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_bandwidth_bound_follows_the_device_kind(kind, gbs):
    bound = bandwidth_bound({"platform": "gpu", "kind": kind}, gib=1.0)
    assert bound["gbs"] == gbs
    assert ("data sheet" if gbs else "unknown device kind") in bound["source"]


def test_transformers_is_skipped_without_cuda(tmp_path):
    """On CPU (CI's torch build) the torch CUDA branch stops before it reads any weights."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA GPU here")
    result = measure_transformers(str(tmp_path / "absent"), "float32", new_tokens=3, repeats=1)
    assert set(result) == {"skipped"} and "CUDA" in result["skipped"]


def test_bad_options_get_a_message_not_a_traceback():
    command = [sys.executable, "-m", "bench.accelerator", "--new-tokens", "1"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--new-tokens must be from 2 to 1024" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_transformers_branch_runs_with_cuda_stubbed_onto_the_cpu(bench_dir, monkeypatch):
    """The CUDA branch itself (no GPU here): torch's CUDA calls stubbed and the model placed on the CPU."""
    import torch

    for name, stub in [
        ("is_available", lambda: True),
        ("synchronize", lambda *a: None),
        ("reset_peak_memory_stats", lambda *a: None),
        ("max_memory_allocated", lambda *a: 2**30),
    ]:
        monkeypatch.setattr(torch.cuda, name, stub)
    monkeypatch.setattr(accelerator, "TORCH_DEVICE", "cpu")
    folder = prepare("tiny", str(bench_dir), rewrite=False)
    write_inputs(folder, image_size=56)
    result = measure_transformers(folder, "bfloat16", new_tokens=3, repeats=1)
    assert result["dtype"] == "bfloat16" and [row["batch"] for row in result["rows"]] == list(BATCHES)
    for row in result["rows"]:
        assert len(row["tokens"]) == 3 and row["ttft_s"] > 0 and row["peak_memory_gib"] == 1.0


def _fake_child(calls: list):
    """What the three steps report on an H200, for the run's own arithmetic."""

    def speed(dtype, tokens):
        rows = [dict(batch=b, ttft_s=0.05, decode_ms_per_token=2.0, tokens_per_s=500.0 * b, compile_s=30.0,
                     peak_memory_gib=6.0, memory_kind="device", tokens=tokens) for b in BATCHES]  # fmt: skip
        return {"load_s": 10.0, "dtype": dtype, "rows": rows}

    check = dict(dtype="bfloat16", greedy_tokens_equal=32, greedy_tokens=32, teacher_forced_argmax_equal=32,
                 max_logit_diff=0.1, max_abs_logit=7.0, tolerance=0.05, passed=True)  # fmt: skip
    device = dict(platform="gpu", kind="NVIDIA H200", count=1, default_dtype="bfloat16", jax="0")
    results = {
        "parity": {"device": device, "parity_model": "demo", "parity": [check]},
        "ours": {**speed("bfloat16", [5, 6, 7, 8]), "decode_weight_bytes": 4_800_000_000},
        "transformers": speed("bfloat16", [5, 6, 9, 9]),
    }

    def child(name, **kwargs):
        calls.append((name, kwargs))
        return results[name]

    return child


def test_gpu_run_defaults_to_3b_bfloat16_and_compares_transformers(monkeypatch):
    calls = []
    monkeypatch.setattr(accelerator, "_child", _fake_child(calls))
    monkeypatch.setattr(accelerator, "prepare", lambda config, root, rewrite: f"{root}/{config}")
    args = argparse.Namespace(config=None, dir="/w", rewrite=False, new_tokens=None, repeats=None, parity_tokens=16,
                              bandwidth_gib=1.0, batches=BATCHES)  # fmt: skip
    result = accelerator.run(args)

    assert [name for name, _ in calls] == ["parity", "ours", "transformers"]
    assert calls[1][1] == dict(folder="/w/3b-224", dtype="bfloat16", new_tokens=64, repeats=3, batches=BATCHES)
    assert calls[2][1]["dtype"] == "bfloat16" and result["skipped"] == {}
    assert result["bandwidth_bound"]["gbs"] == 4800 and result["parity_passed"]
    ours, theirs = result["speed"][0], result["speed"][len(BATCHES)]
    assert ours["bandwidth_share"] == pytest.approx(4.8e9 / 2e-3 / 4.8e12)  # 0.5: 4.8 GB per 2 ms step
    assert theirs["framework"] == "transformers" and theirs["greedy_tokens_equal_ours"] == 2
    shown = table(result)
    assert "| 3b-224 transformers | bfloat16 | 16 |" in shown and "greedy 2/4 equal to ours" in shown
    assert "4800.0 GB/s (data sheet: H200 HBM3e)" in shown


@pytest.mark.parametrize(
    ("returncode", "stdout", "kept"),
    [(0, '{"a": 1}\n', True), (-6, 'log line\n{"a": 1}\n', True), (1, "", False), (-6, "partial {", False)],
)
def test_a_step_keeps_a_printed_result_and_fails_without_one(monkeypatch, capsys, returncode, stdout, kept):
    """A result printed before the process died at exit is kept (with a warning); no result is a failure."""

    def run(command, **kwargs):
        return subprocess.CompletedProcess(command, returncode, stdout=stdout)

    monkeypatch.setattr(accelerator.subprocess, "run", run)
    if kept:
        assert accelerator._child("ours") == {"a": 1}
        assert ("after its result; kept" in capsys.readouterr().err) == (returncode != 0)
    else:
        with pytest.raises(SystemExit, match="the ours step failed"):
            accelerator._child("ours")
