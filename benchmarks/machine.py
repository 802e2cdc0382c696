"""The machine's limit: measured bf16 and fp32 matmul throughput of this CPU (GFLOP/s, the best of a few sizes).

    .venv/bin/python benchmarks/machine.py [--threads 2] [--sizes 512,1024,2048,4096] [--seconds 2]

Each figure is the best repeat of a square matmul (2·n³ FLOPs); the best over sizes is the peak the other
scripts divide by for model FLOP utilization (fromfeedback.flops.model_flops_utilization).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_line, matmul_gflops, print_table, set_threads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sizes", default="512,1024,2048,4096", help="Square matmul sizes to try.")
    parser.add_argument("--seconds", type=float, default=2.0, help="Time spent repeating each size (the best repeat counts).")
    args = parser.parse_args()
    set_threads(args.threads)
    import torch

    sizes = [int(s) for s in args.sizes.split(",") if s]
    rows, best = [], {}
    for size in sizes:
        row: list = [size]
        for dtype in ("bf16", "fp32"):
            gflops = matmul_gflops(dtype, size, args.seconds)
            best[dtype] = max(best.get(dtype, 0.0), gflops)
            row.append(gflops)
        row.append(row[1] / row[2])
        rows.append(row)
    rows.append(["best", best["bf16"], best["fp32"], best["bf16"] / best["fp32"]])
    print(machine_line(args.threads))
    print(f"torch {torch.__version__}, oneDNN bf16 {'supported' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'NOT supported'}\n")
    print_table("Matmul throughput (GFLOP/s)", ["size n (n×n @ n×n)", "bf16", "fp32", "bf16 / fp32"], rows)
    print(f"peak for MFU: bf16 {best['bf16']:.0f} GFLOP/s, fp32 {best['fp32']:.0f} GFLOP/s "
          f"(pass --peak-gflops {best['bf16']:.0f} to the other scripts to reuse it)")


if __name__ == "__main__":
    main()
