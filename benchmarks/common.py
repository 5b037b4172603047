"""Shared helpers for the benchmark scripts: device description, peak memory, JSON + markdown output. It
imports no torch at module level, so drivers that keep torch out of their own process can use it."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def device_info() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
        cpu = model
    except (OSError, StopIteration):
        pass
    return (
        f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mb() -> float | None:
    """This process's own peak RSS (VmHWM of /proc/self/status: the high-water mark of its address space,
    which starts afresh at exec, unlike ru_maxrss, which keeps the parent's at the fork), or None where
    /proc is missing."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        return "unknown"


def write_results(name: str, payload: dict, table: str) -> Path:
    """benchmarks/results/<name>.json and <name>.md (the table, with command and device)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "device": device_info(), "git": git_rev()}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    md = (
        f"{table}\n\nCommand: `{payload.get('command', '')}`  \n"
        f"Device: {payload['device']}  \ngit: {payload['git']}\n"
    )
    (RESULTS / f"{name}.md").write_text(md)
    print(md)
    return RESULTS / f"{name}.json"


def md_table(head: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def timed(fn, repeats: int, warm_up: bool = False) -> float:
    """Median seconds of `repeats` calls of fn (after one untimed call with `warm_up`)."""
    if warm_up:
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)
