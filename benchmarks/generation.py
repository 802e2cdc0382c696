"""Generation: tokens per second of fromfeedback.sampling.generate vs plain transformers `model.generate`.

    .venv/bin/python benchmarks/generation.py [--model smollm2-135m] [--batch-size 16] [--max-new-tokens 48] [--repeats 2]

Same model object, same batch of TL;DR queries (left-padded), same max_new_tokens, same precision (bf16 autocast
around both calls), same threads; greedy and temperature 0.7 (top_p 1, top_k 0 on the transformers side, which
otherwise defaults to top_k 50). Generated tokens are counted up to and including each row's first EOS, the same
way on both sides. Repeats alternate between the two and the best repeat counts (less noise from other processes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_arguments, machine_line, peak_for_mfu, print_table, ratio, set_threads  # noqa: E402


def generated_tokens(rows: list[list[int]], eos_id: int) -> int:
    """Tokens of each row up to and including its first EOS."""
    total = 0
    for row in rows:
        total += row.index(eos_id) + 1 if eos_id in row else len(row)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--split", default="sft_valid", help="Posts whose queries are generated from.")
    parser.add_argument("--batch-size", type=int, default=16, help="Queries in the batch (one generate call each side).")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--query-max-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="Timed repeats per side and temperature (the best counts).")
    args = parser.parse_args()
    peak = peak_for_mfu(args)
    set_threads(args.threads)

    import torch

    from fromfeedback.config import default_data_dir
    from fromfeedback.data import load_tldr, make_query, pad_left
    from fromfeedback.flops import matmul_parameters, model_flops_utilization
    from fromfeedback.models import load_policy, load_tokenizer, resolve_model
    from fromfeedback.runtime import autocast
    from fromfeedback.sampling import generate

    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    model = load_policy(model_dir).eval()
    params = matmul_parameters(model)
    posts = load_tldr(args.data_dir or default_data_dir(), args.split)[: args.batch_size]
    queries = [tokenizer.encode(make_query(p.subreddit, p.title, p.post, tokenizer, args.query_max_tokens), add_special_tokens=False) for p in posts]
    query_tokens = sum(len(q) for q in queries)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = torch.device("cpu")

    def run_fromfeedback(temperature: float) -> tuple[float, int]:
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        result = generate(model, tokenizer, queries, args.max_new_tokens, temperature, 1.0, len(queries), generator, args.precision)
        seconds = time.perf_counter() - started
        return seconds, generated_tokens(result.batch.response_ids.tolist(), eos_id)

    def run_transformers(temperature: float) -> tuple[float, int]:
        torch.manual_seed(0)
        query_ids, query_mask = pad_left(queries, pad_id)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 else {"do_sample": False}
        started = time.perf_counter()
        with torch.no_grad(), autocast(args.precision, device):
            output = model.generate(input_ids=query_ids, attention_mask=query_mask, max_new_tokens=args.max_new_tokens,
                                    pad_token_id=pad_id, eos_token_id=eos_id, **sampling)
        seconds = time.perf_counter() - started
        return seconds, generated_tokens(output[:, query_ids.shape[1] :].tolist(), eos_id)

    run_fromfeedback(0.0)  # warm-up (kernel selection, lazy init) for both paths
    run_transformers(0.0)
    rows = []
    for temperature in (0.0, 0.7):
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.repeats):
            for name, run in (("fromfeedback", run_fromfeedback), ("transformers", run_transformers)):
                seconds, tokens = run(temperature)
                if name not in best or tokens / seconds > best[name][1] / best[name][0]:
                    best[name] = (seconds, tokens)
        speeds = {}
        for name in ("fromfeedback", "transformers"):
            seconds, tokens = best[name]
            speeds[name] = tokens / seconds
            mfu = model_flops_utilization(params, query_tokens + tokens, seconds, backward=False, peak_gflops=peak)
            rows.append([f"{'greedy' if temperature == 0 else f'T={temperature}'}", name, tokens, seconds, tokens / seconds, mfu * 100])
        rows.append(["", "ratio fromfeedback / transformers", "", "", ratio(speeds["fromfeedback"], speeds["transformers"]), ""])

    print(machine_line(args.threads))
    print(f"model {args.model} ({params / 1e6:.1f}M matmul parameters), {len(queries)} queries ({query_tokens} query tokens) "
          f"from {args.split}, max_new_tokens {args.max_new_tokens}, {args.precision}, one batch, best of {args.repeats}; "
          f"MFU counts prefill + generated tokens against {peak:.0f} GFLOP/s\n")
    print_table("Generation", ["decoding", "implementation", "generated tokens", "seconds", "tokens/s", "MFU %"], rows)


if __name__ == "__main__":
    main()
