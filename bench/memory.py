"""Peak memory of the benchmark's own process."""

from __future__ import annotations


def peak_rss_gib() -> float:
    """This process's peak RSS in GiB, from VmHWM: unlike getrusage's ru_maxrss it does not carry the parent's
    peak across exec, so each measured subprocess reports its own."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20
