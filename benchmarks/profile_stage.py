"""Where a stage's time goes: torch.profiler over a few steps of one fromfeedback stage, top ops by self CPU time.

    .venv/bin/python benchmarks/profile_stage.py --stage sft|rm|ppo|generate [--model smollm2-135m] [--micro-batch-size 4] [--steps 2]

sft: `sft.response_nll` forward + backward + AdamW step; rm: `reward.group_scores` + preference loss + backward;
ppo: `ppo.policy_and_values` (policy logits + value head) + a policy-gradient-shaped loss + backward; generate:
`sampling.generate` at T=0.7. The first step is a warm-up; the table covers the rest, with the share of time in
matmuls, attention and copies/casts printed underneath (only matmuls run near the measured peak).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_arguments, set_threads  # noqa: E402

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn")
ATTENTION_OPS = ("aten::_scaled_dot_product",)
CAST_OPS = ("aten::copy_", "aten::_to_copy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--stage", choices=["sft", "rm", "ppo", "generate"], default="sft")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="Profiled steps after one warm-up step.")
    parser.add_argument("--query-max-tokens", type=int, default=512)
    parser.add_argument("--response-max-tokens", type=int, default=48)
    parser.add_argument("--rows", type=int, default=25, help="Ops shown.")
    args = parser.parse_args()
    set_threads(args.threads)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from fromfeedback.config import default_data_dir
    from fromfeedback.data import QueryResponseBatch, load_tldr, load_tldr_comparisons
    from fromfeedback.models import load_policy, load_scalar_model, load_tokenizer
    from fromfeedback.ops import logprobs_from_logits, masked_mean
    from fromfeedback.sft import response_nll, tokenize_pairs

    data_dir = args.data_dir or default_data_dir()
    tokenizer = load_tokenizer(args.model)
    n = args.micro_batch_size
    pairs = tokenize_pairs([p for p in load_tldr(data_dir, "sft_train") if p.reference][:n], tokenizer, args.query_max_tokens, args.response_max_tokens)
    batch = QueryResponseBatch.from_ids([q for q, _ in pairs], [r for _, r in pairs], tokenizer.pad_token_id)

    if args.stage in ("sft", "ppo", "generate"):
        model = load_policy(args.model)
    if args.stage == "sft":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            nll, count = response_nll(model, batch, args.precision)
            (nll / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    elif args.stage == "ppo":
        from fromfeedback.ppo import ValueHead, policy_and_values
        from fromfeedback.runtime import autocast

        model.train()
        critic = ValueHead(model.config.hidden_size)
        old_logprobs = torch.zeros(batch.response_ids.shape)

        def step():
            with autocast(args.precision, torch.device("cpu")):
                logits, values = policy_and_values(model, critic, batch, 0.7)
            logprobs = logprobs_from_logits(logits, batch.response_ids)
            loss = -masked_mean((logprobs - old_logprobs).exp(), batch.response_mask) + masked_mean(values**2, batch.response_mask)
            loss.backward()
            model.zero_grad(set_to_none=True)
    elif args.stage == "rm":
        from fromfeedback.reward import comparison_group, group_scores, pair_tensors, preference_loss

        model = load_scalar_model(args.model).train()
        comparisons = load_tldr_comparisons(data_dir, "rm_train")[:n]
        groups = [comparison_group(c, tokenizer, args.query_max_tokens, args.response_max_tokens, False) for c in comparisons]
        better, worse, target, weight = pair_tensors(groups)

        def step():
            scores = group_scores(model, groups, tokenizer.pad_token_id, args.precision)
            preference_loss(scores, better, worse, target, weight).backward()
            model.zero_grad(set_to_none=True)
    else:
        from fromfeedback.sampling import generate

        model.eval()
        queries = [q for q, _ in pairs]

        def step():
            generate(model, tokenizer, queries, args.response_max_tokens, 0.7, 1.0, len(queries), torch.Generator().manual_seed(0), args.precision)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(args.steps):
            step()
    averages = profiler.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    total = sum(e.self_cpu_time_total for e in averages)
    def share(prefixes: tuple[str, ...]) -> str:
        return f"{sum(e.self_cpu_time_total for e in averages if e.key.startswith(prefixes)) / max(total, 1):.0%}"

    print(f"{args.stage}: {n} examples, {total / 1e6 / args.steps:.2f} s of self CPU time per step: {share(MATMUL_OPS)} in matmuls, "
          f"{share(ATTENTION_OPS)} in attention kernels, {share(CAST_OPS)} in copies/casts (bf16 autocast re-casting fp32 weights), "
          f"the rest elementwise ops, the optimizer and framework overhead")


if __name__ == "__main__":
    main()
