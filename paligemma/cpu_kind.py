"""The CPU this process runs on: printed with every benchmark table (figures from one CPU kind say little of
another), and the key under which cpu_forms.py remembers the forms it measured. Standard library only.
"""

from __future__ import annotations

import os
import platform
import subprocess

# The vector features that decide which CPU matmul forms are fast (AVX2 boxes against AVX-512/AMX Xeons).
VECTOR_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu() -> dict:
    """{"cpu": model name, "family_or_model": lscpu's family line, "vector_flags": [...], "cores": n}."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        family = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith(("CPU family", "Model:"))),
            "",
        )
    except (OSError, subprocess.SubprocessError):
        family = ""
    return {
        "cpu": model,
        "family_or_model": family,
        "vector_flags": [flag for flag in VECTOR_FLAGS if flag in flags],
        "cores": os.cpu_count(),
    }


def line(kind: dict | None = None) -> str:
    """One line for a benchmark table: the CPU, its family, its cores and its vector features (`kind`: a cpu()
    result, default this machine's)."""
    kind = kind or cpu()
    features = ", ".join(kind["vector_flags"]) or "none of " + ", ".join(VECTOR_FLAGS)
    family = f" (family {kind['family_or_model']})" if kind.get("family_or_model") else ""
    return f"CPU: {kind['cpu']}{family}, {kind['cores']} cores — vector features: {features}"
