"""What the benchmark scripts share: worker subprocesses (one per measured system, so each has its own peak
memory), thread and precision settings, the measured matmul peak, and table printing.

A script re-runs itself as `python SCRIPT --worker NAME ...`; the worker prints one `BENCH_RESULT {json}` line
with its figures and its peak resident memory (getrusage), which the parent collects.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "


def add_common_arguments(parser: argparse.ArgumentParser, model: str = "smollm2-135m") -> None:
    parser.add_argument("--model", default=model, help="Policy/starting model: smollm2-135m, tiny-random or a folder.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Torch threads of every worker.")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast (both sides) or fp32.")
    parser.add_argument("--peak-gflops", type=float, default=0.0, help="bf16 matmul peak for MFU (0: measure it now, ~5 s).")
    parser.add_argument("--data-dir", default="", help="Data folder (default: ../shared/data).")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default="", help=argparse.SUPPRESS)


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(result: dict) -> None:
    """Called by a worker at its end: prints its figures (plus peak RSS) for the parent."""
    result = {**result, "peak_rss_mib": peak_rss_mib()}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(script: str, name: str, argv: list[str], threads: int, timeout: float | None = None) -> dict:
    """Runs `script --worker name argv...` in a fresh interpreter; returns its result (or {'error': ...})."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "FROMFEEDBACK_NO_PROGRESS": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, script, "--worker", name, *argv]
    print(f"  [{time.strftime('%H:%M:%S')}] running {name} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            result["process_seconds"] = time.perf_counter() - started
            print(f"  {name} done: {json.dumps(result)[:400]}", file=sys.stderr, flush=True)  # kept if a later worker times out
            return result
    tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-25:])
    print(f"  {name} failed (exit {completed.returncode}):\n{tail}", file=sys.stderr)
    return {"error": f"exit {completed.returncode}: {tail.splitlines()[-1] if tail else ''}"}


def matmul_gflops(dtype_name: str, size: int, min_seconds: float = 1.0) -> float:
    """Best-of-repeats GFLOP/s of a square [size x size] @ [size x size] matmul (2·size³ FLOPs)."""
    return shape_gflops(dtype_name, size, size, size, min_seconds)


def shape_gflops(dtype_name: str, m: int, k: int, n: int, min_seconds: float = 1.0) -> float:
    """Best-of-repeats GFLOP/s of a [m x k] @ [k x n] matmul (2·m·k·n FLOPs)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    for _ in range(2):  # warm-up: oneDNN picks and caches its kernel on the first calls
        torch.mm(a, b)
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        started = time.perf_counter()
        torch.mm(a, b)
        seconds = time.perf_counter() - started
        best, spent = min(best, seconds), spent + seconds
    return 2 * m * k * n / best / 1e9


def measured_peak(dtype_name: str = "bf16", sizes: tuple[int, ...] = (1024, 2048), min_seconds: float = 1.0) -> float:
    return max(matmul_gflops(dtype_name, size, min_seconds) for size in sizes)


def peak_for_mfu(args) -> float:
    if args.peak_gflops > 0:
        return args.peak_gflops
    set_threads(args.threads)
    peak = measured_peak("bf16" if args.precision == "bf16" else "fp32")
    print(f"  measured {args.precision} matmul peak: {peak:.0f} GFLOP/s ({args.threads} threads)", file=sys.stderr)
    return peak


def steady_mean(values: list[float], warmup: int) -> float:
    """Mean after dropping the first `warmup` values (all of them kept when nothing would remain)."""
    kept = values[warmup:] or values
    return statistics.fmean(kept)


def machine_line(threads: int) -> str:
    load = os.getloadavg()
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{now}; {cpu}, {os.cpu_count()} logical CPUs, {threads} torch thread(s); load average {load[0]:.1f} "
            f"(>{os.cpu_count()} means other processes shared the CPU); Python {platform.python_version()}")


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def print_table(title: str, headers: list[str], rows: list[list]) -> str:
    """A Markdown table (pasteable into benchmarks/README.md); returns it as well as printing it."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [f"### {title}", "", "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    text = "\n".join(lines)
    print(text + "\n")
    return text


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator
