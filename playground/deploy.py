"""Deploys the playground to a Hugging Face Space: `python -m playground.deploy --space USER/NAME [--hardware l4x1]`.

Uploads only what the Space runs (the app, its packages, assets, the registry, requirements, README) with
huggingface_hub's `upload_folder`, which sends files over 10 MB through the Hub's large-file path (LFS/Xet), so
this repository's git history never travels. JAX does not run on ZeroGPU (PyTorch only): pick CPU or a
dedicated GPU; `--dry-run` prints the files and the smallest GPU that fits each registered model.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import sys
import tempfile

import paligemma

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LARGE_FILE_BYTES = 10 * 1024 * 1024  # the Hub refuses plain-git files above this
ALLOW = [
    "app.py",
    "README.md",
    "models.json",
    "requirements.txt",
    "paligemma/*.py",
    "postprocess/*.py",
    "playground/*.py",
    "assets/*",
]
IGNORE = ["**/__pycache__/*", "*.pyc", "playground/deploy.py", "assets/demo/vqvae-encoder.npz"]
# Space hardware with a GPU (flavour -> GPU memory in bytes), smallest first; JAX needs one of these, not ZeroGPU.
GPU_HARDWARE = {
    "t4-small": 16e9,
    "t4-medium": 16e9,
    "l4x1": 24e9,
    "a10g-small": 24e9,
    "a10g-large": 24e9,
    "l40sx1": 48e9,
    "a100-large": 80e9,
}
CPU_HARDWARE = {"cpu-basic", "cpu-upgrade"}
ZERO_GPU = "zero-a10g"


def selected_files(root: str = ROOT) -> list[str]:
    """Repository files the Space needs, relative, '/'-separated, sorted (ALLOW minus IGNORE)."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if any(fnmatch.fnmatch(rel, p) for p in ALLOW) and not any(fnmatch.fnmatch(rel, p) for p in IGNORE):
                files.append(rel)
    return sorted(files)


def is_gpu(hardware: str) -> bool:
    if hardware == ZERO_GPU:
        raise ValueError(
            "ZeroGPU runs PyTorch only; JAX needs dedicated GPU hardware "
            f"({', '.join(GPU_HARDWARE)}) or CPU ({', '.join(sorted(CPU_HARDWARE))})"
        )
    if hardware not in GPU_HARDWARE and hardware not in CPU_HARDWARE:
        raise ValueError(
            f"unknown Space hardware {hardware!r}; choose one of {', '.join([*sorted(CPU_HARDWARE), *GPU_HARDWARE])}"
        )
    return hardware in GPU_HARDWARE


def registry_models(root: str = ROOT) -> list[dict]:
    with open(os.path.join(root, "models.json")) as f:
        return json.load(f)["models"]


def smallest_gpu(need_bytes: int) -> str | None:
    """The smallest Space GPU flavour whose memory holds `need_bytes`, or None."""
    return next((name for name, size in GPU_HARDWARE.items() if size >= need_bytes), None)


def recommendations(models: list[dict], estimate=None) -> list[str]:
    """One line per registered Hub model: its bf16 estimate and the smallest GPU that holds it. `estimate`
    (repo id -> memory_fit.Estimate) defaults to reading each repo's config.json."""
    estimate = estimate or paligemma.estimate_for_repo
    lines = []
    for model in models:
        source = model["source"]
        if not paligemma.is_repo_id(source):
            continue
        try:
            need = estimate(source)
        except ValueError as err:
            lines.append(f"{source}: size unknown ({err})")
            continue
        gpu = smallest_gpu(need.total) or "none"
        lines.append(f"{source}: {need.total / 1e9:.1f} GB in bfloat16 -> smallest GPU: {gpu}")
    return lines


def front_matter(readme: str, hardware: str, models: list[str]) -> str:
    """The README with `suggested_hardware` and `models` set in its YAML front matter."""
    match = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    if not match:
        raise ValueError("README.md has no YAML front matter (--- ... ---) for the Space")
    lines = [
        line
        for line in match.group(1).splitlines()
        if not re.match(r"^(suggested_hardware|models)\s*:", line) and not line.startswith("  - ")
    ]
    lines.append(f"suggested_hardware: {hardware}")
    if models:
        lines.append("models:")
        lines.extend(f"  - {m}" for m in models)
    return "---\n" + "\n".join(lines) + "\n---\n" + readme[match.end() :]


def stage(folder: str, hardware: str, root: str = ROOT) -> list[str]:
    """Copies the selected files into `folder`; requirements.txt becomes the GPU one on GPU hardware and the
    README gets its front matter. Returns the staged files."""
    files = selected_files(root)
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(folder, rel)) or folder, exist_ok=True)
        shutil.copyfile(os.path.join(root, rel), os.path.join(folder, rel))
    if is_gpu(hardware):
        shutil.copyfile(os.path.join(root, "requirements-gpu.txt"), os.path.join(folder, "requirements.txt"))
    models = [m["source"] for m in registry_models(root) if paligemma.is_repo_id(m["source"])]
    with open(os.path.join(root, "README.md")) as f:
        readme = front_matter(f.read(), hardware, models)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(readme)
    return files


def plan_lines(folder: str, files: list[str]) -> list[str]:
    lines = []
    for rel in files:
        size = os.path.getsize(os.path.join(folder, rel))
        route = "large-file path (LFS/Xet)" if size > LARGE_FILE_BYTES else "regular"
        lines.append(f"{rel}\t{size}\t{route}")
    return lines


def deploy(
    space: str,
    hardware: str = "cpu-basic",
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    api=None,
    root: str = ROOT,
    out=sys.stdout,
) -> list[str]:
    """Creates/updates the Space and uploads the staged files (or only prints them with dry_run)."""
    gpu = is_gpu(hardware)
    with tempfile.TemporaryDirectory() as folder:
        files = stage(folder, hardware, root)
        lines = plan_lines(folder, files)
        print(
            f"{'Would upload' if dry_run else 'Uploading'} {len(files)} files to spaces/{space} "
            f"({hardware}, {'GPU: requirements-gpu.txt' if gpu else 'CPU'} as requirements.txt):",
            file=out,
        )
        print("\n".join(lines), file=out)
        print("JAX does not run on ZeroGPU (PyTorch only); use a dedicated GPU or CPU hardware.", file=out)
        if dry_run:
            return lines
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        api.create_repo(
            space, repo_type="space", space_sdk="gradio", space_hardware=hardware, private=private, exist_ok=True
        )
        secret = token or os.environ.get("HF_TOKEN")
        if secret:
            api.add_space_secret(space, "HF_TOKEN", secret, description="reads gated models (PaliGemma licence)")
        api.upload_folder(
            folder_path=folder,
            repo_id=space,
            repo_type="space",
            allow_patterns=ALLOW,
            ignore_patterns=IGNORE,
            commit_message="Deploy PaliGemma playground",
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m playground.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True, help="USER/NAME of the Space to create or update")
    parser.add_argument("--hardware", default="cpu-basic", help="Space hardware, e.g. cpu-basic, t4-small, l4x1")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print the files that would go up, upload nothing")
    parser.add_argument(
        "--recommend",
        action="store_true",
        help="also print the smallest GPU for each registered Hub model (reads their config.json)",
    )
    args = parser.parse_args(argv)
    try:
        deploy(args.space, args.hardware, args.private, args.dry_run)
        if args.recommend:
            print("\n".join(recommendations(registry_models())))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
