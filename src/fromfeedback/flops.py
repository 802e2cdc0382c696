"""Model FLOP arithmetic for benchmarks: the FLOPs a transformer step needs, and how much of the machine it used.

The usual estimate (Kaplan et al. 2020): a forward pass costs 2 FLOPs per parameter per token (one multiply
and one add), the backward pass twice the forward. Attention scores and softmax are left out, as is
everything that is not a matmul, so the figure is the *useful* work; model FLOP utilization (MFU) is that
work per second divided by the measured peak matmul throughput.
"""

from __future__ import annotations

from torch import nn


def model_flops(params: int, tokens: int, backward: bool) -> float:
    """FLOPs of a forward pass (2·params·tokens), or of forward plus backward (3× that) when `backward`."""
    forward = 2.0 * params * tokens
    return forward * 3.0 if backward else forward


def model_flops_utilization(params: int, tokens: int, seconds: float, backward: bool, peak_gflops: float) -> float:
    """Fraction of `peak_gflops` (GFLOP/s) that `tokens` processed in `seconds` by a `params`-parameter model used."""
    if seconds <= 0 or peak_gflops <= 0:
        raise ValueError("seconds and peak_gflops must be positive")
    return model_flops(params, tokens, backward) / seconds / (peak_gflops * 1e9)


def matmul_parameters(model: nn.Module) -> int:
    """Parameters that take part in per-token matmuls: all of them except the input embedding table, which is a
    lookup. (With tied embeddings the table is also the LM head; it is still left out, so the head's FLOPs are
    not credited: fromfeedback runs the head on response tokens only, TRL on every token.)"""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skipped = {id(embedding.weight)} if embedding is not None else set()
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) in skipped or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total
