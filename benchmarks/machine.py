"""The machine's limit: measured bf16 and fp32 matmul throughput of this CPU (GFLOP/s, the best of a few sizes),
and what bf16 matmuls of the model's own shapes reach on it.

    .venv/bin/python benchmarks/machine.py [--threads 2] [--sizes 512,1024,2048,4096] [--seconds 2] [--model smollm2-135m] [--tokens 1024,32]

Each figure is the best repeat of a square matmul (2·n³ FLOPs); the best over sizes is the peak the other
scripts divide by for model FLOP utilization (fromfeedback.flops.model_flops_utilization).
The second table times, for every linear layer of one decoder block of --model, the three matmuls of a
training step at --tokens rows (forward x·W, the input gradient g·Wᵀ, the weight gradient xᵀ·g): their
FLOP-weighted throughput is the most a stage can reach on this machine even if it did nothing but matmuls
(1024 rows ≈ a micro-batch of 4 × 256 tokens; 32 rows ≈ one decoding step of 32 sequences).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_line, matmul_gflops, print_table, set_threads, shape_gflops  # noqa: E402


def block_linears(model: str) -> list[tuple[str, int, int]]:
    """(name, in features, out features) of the linear layers of one decoder block of `model` (Llama layout)."""
    from transformers import AutoConfig

    from fromfeedback.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model))
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = config.num_key_value_heads * head_dim
    return [("q_proj", hidden, heads * head_dim), ("k_proj", hidden, kv), ("v_proj", hidden, kv), ("o_proj", heads * head_dim, hidden),
            ("gate_proj", hidden, config.intermediate_size), ("up_proj", hidden, config.intermediate_size),
            ("down_proj", config.intermediate_size, hidden)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sizes", default="512,1024,2048,4096", help="Square matmul sizes to try.")
    parser.add_argument("--seconds", type=float, default=2.0, help="Time spent repeating each size (the best repeat counts).")
    parser.add_argument("--model", default="smollm2-135m", help="Model whose matmul shapes are timed (empty: skip).")
    parser.add_argument("--tokens", default="1024,32", help="Rows (tokens) of the model-shape matmuls.")
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
    if not args.model:
        return
    linears = block_linears(args.model)
    rows, summary = [], []
    for tokens in [int(t) for t in args.tokens.split(",") if t]:
        seconds_per_flop = {"forward": 0.0, "training": 0.0}
        flops = 0.0
        for name, fan_in, fan_out in linears:
            forward = shape_gflops("bf16", tokens, fan_in, fan_out, args.seconds / 4)
            input_grad = shape_gflops("bf16", tokens, fan_out, fan_in, args.seconds / 4)
            weight_grad = shape_gflops("bf16", fan_in, tokens, fan_out, args.seconds / 4)
            rows.append([tokens, f"{name} [{tokens}×{fan_in}]·[{fan_in}×{fan_out}]", forward, input_grad, weight_grad])
            share = fan_in * fan_out  # every matmul of a linear does 2·tokens·in·out FLOPs
            flops += share
            seconds_per_flop["forward"] += share / forward
            seconds_per_flop["training"] += share * (1 / forward + 1 / input_grad + 1 / weight_grad) / 3
        forward_rate, training_rate = flops / seconds_per_flop["forward"], flops / seconds_per_flop["training"]
        summary.append([tokens, forward_rate, forward_rate / best["bf16"] * 100, training_rate, training_rate / best["bf16"] * 100])
    print_table(f"bf16 matmuls of one {args.model} decoder block (GFLOP/s)", ["rows", "matmul", "forward x·W", "input grad g·Wᵀ", "weight grad xᵀ·g"], rows)
    print_table("The most a stage can reach if it only ran these matmuls (FLOP-weighted)",
                ["rows", "forward GFLOP/s", "% of the square peak", "forward + backward GFLOP/s", "% of the square peak"], summary)


if __name__ == "__main__":
    main()
