"""playground.deploy: exactly the files the Space needs, large files only through the large-file path, nothing
from tests/bench/data, the GPU requirements on GPU hardware, and the HfApi calls of a real deploy."""

import io
import os

import pytest

from playground import deploy

EXPECTED_TOP = {"app.py", "README.md", "models.json", "requirements.txt"}


def test_dry_run_lists_exactly_the_selected_files():
    out = io.StringIO()
    lines = deploy.deploy("user/space", "cpu-basic", dry_run=True, out=out)
    listed = [line.split("\t")[0] for line in lines]
    assert listed == deploy.selected_files()
    assert set(listed) >= EXPECTED_TOP
    assert {f.split("/")[0] for f in listed if "/" in f} == {"paligemma", "postprocess", "playground", "assets"}
    assert "paligemma/__init__.py" in listed and "assets/demo/model.npz" in listed
    assert "\n".join(lines) in out.getvalue()
    assert "ZeroGPU" in out.getvalue()


def test_nothing_from_tests_bench_data_or_caches_goes_up():
    for rel in deploy.selected_files():
        assert not rel.startswith(("tests/", "bench/", "scenes/", "data/", "runs/", "test-artifacts/", ".git"))
        assert "__pycache__" not in rel and not rel.endswith(".pyc")
        assert rel != "assets/demo/vqvae-encoder.npz" and rel != "playground/deploy.py"


def test_no_file_over_10_mb_goes_outside_the_large_file_path():
    lines = deploy.deploy("user/space", "cpu-basic", dry_run=True, out=io.StringIO())
    for rel, size, route in (line.split("\t") for line in lines):
        assert (int(size) > deploy.LARGE_FILE_BYTES) == (route == "large-file path (LFS/Xet)"), rel
    assert any(route.startswith("large-file") for _, _, route in (line.split("\t") for line in lines))


def test_gpu_hardware_ships_the_gpu_requirements_and_front_matter(tmp_path):
    deploy.stage(str(tmp_path), "l4x1")
    requirements = (tmp_path / "requirements.txt").read_text()
    assert "jax[cuda12]==0.10.2\n" in requirements and "jaxlib==" not in requirements
    readme = (tmp_path / "README.md").read_text()
    assert "suggested_hardware: l4x1" in readme and "  - google/paligemma2-3b-mix-224" in readme
    assert readme.count("---\n") >= 2 and "sdk: gradio" in readme


def test_gpu_requirements_differ_from_the_cpu_ones_only_in_jax():
    def packages(name):
        with open(os.path.join(deploy.ROOT, name)) as f:
            return {line.split("#")[0].strip() for line in f if line.split("#")[0].strip()}

    cpu, gpu = packages("requirements.txt"), packages("requirements-gpu.txt")
    assert cpu - gpu == {"jax==0.10.2", "jaxlib==0.10.2"}
    assert gpu - cpu <= {"jax[cuda12]==0.10.2", "kagglehub==1.0.3"}


def test_zero_gpu_and_unknown_hardware_are_refused():
    with pytest.raises(ValueError, match="ZeroGPU runs PyTorch only"):
        deploy.deploy("user/space", "zero-a10g", dry_run=True, out=io.StringIO())
    with pytest.raises(ValueError, match="unknown Space hardware"):
        deploy.is_gpu("h100x9")


class FakeApi:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def record(*args, **kwargs):
            if name == "upload_folder":
                kwargs["files"] = sorted(
                    os.path.relpath(os.path.join(r, n), kwargs["folder_path"])
                    for r, _, ns in os.walk(kwargs["folder_path"])
                    for n in ns
                )
            self.calls.append((name, args, kwargs))

        return record


def test_deploy_creates_the_space_sets_the_secret_and_uploads_the_folder(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    api = FakeApi()
    deploy.deploy("user/space", "t4-small", private=True, api=api, out=io.StringIO())
    (create, c_args, c_kw), (secret, s_args, _), (upload, _, u_kw) = api.calls
    assert (create, c_args, c_kw) == (
        "create_repo",
        ("user/space",),
        dict(repo_type="space", space_sdk="gradio", space_hardware="t4-small", private=True, exist_ok=True),
    )
    assert (secret, s_args[:3]) == ("add_space_secret", ("user/space", "HF_TOKEN", "hf_secret_value"))
    assert upload == "upload_folder" and u_kw["repo_type"] == "space"
    assert u_kw["allow_patterns"] == deploy.ALLOW and u_kw["ignore_patterns"] == deploy.IGNORE
    assert u_kw["files"] == deploy.selected_files()


def test_recommendations_name_the_smallest_gpu():
    from paligemma.memory_fit import Estimate

    sizes = {"google/a": Estimate(int(6e9), int(1e8), "bfloat16"), "google/b": Estimate(int(55e9), 0, "bfloat16")}
    lines = deploy.recommendations(
        [{"source": "google/a"}, {"source": "google/b"}, {"source": "demo"}], estimate=sizes.__getitem__
    )
    assert lines == [
        "google/a: 6.1 GB in bfloat16 -> smallest GPU: t4-small",
        "google/b: 55.0 GB in bfloat16 -> smallest GPU: a100-large",
    ]
