"""SFT training: fromfeedback `run_sft` vs TRL `SFTTrainer` (completion-only loss), examples per second and peak memory.

    .venv/bin/python benchmarks/sft_vs_trl.py [--model smollm2-135m] [--batch-size 16] [--micro-batch-size 8] [--steps 4] [--warmup 1]

Equal on both sides: the model (same folder, fp32 weights, dropout off), the examples (the first
batch_size·(warmup+steps) posts of sft_train with a reference, tokenized once by fromfeedback's query format:
query ≤ query_max_tokens, reference ≤ response_max_tokens + EOS; TRL gets the very same token ids with a
completion mask), one epoch over them, batch and micro-batch sizes (gradient accumulation), AdamW lr 2e-5
cosine, grad clipping 1.0, bf16 autocast (TRL: `bf16=True`) or fp32, torch threads, no gradient checkpointing
(TRL's default turns it on; turned off here as fromfeedback does not use it), no checkpoints, no evaluation.
Each side runs in its own fresh process (peak RSS = getrusage of that process). Step times exclude the first
`warmup` optimizer steps. fromfeedback is timed from its own metrics.jsonl (seconds_per_step, the real `fromfeedback
sft` loop); TRL by a callback between consecutive optimizer steps (its data loading and collation included).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_arguments, machine_line, peak_for_mfu, print_table, ratio, report, run_worker, set_threads, steady_mean  # noqa: E402


def training_pairs(args):
    from fromfeedback.config import default_data_dir
    from fromfeedback.data import load_tldr
    from fromfeedback.models import load_tokenizer
    from fromfeedback.sft import tokenize_pairs

    tokenizer = load_tokenizer(args.model)
    n_examples = args.batch_size * (args.steps + args.warmup)
    posts = [p for p in load_tldr(args.data_dir or default_data_dir(), "sft_train") if p.reference][:n_examples]
    return tokenizer, tokenize_pairs(posts, tokenizer, args.query_max_tokens, args.response_max_tokens)


def worker_fromfeedback(args) -> dict:
    from fromfeedback.sft import SFTConfig, run_sft

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            model=args.model, data_dir=args.data_dir, out=out, train_limit=args.batch_size * (args.steps + args.warmup), valid_limit=1,
            max_steps=args.steps + args.warmup, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=2e-5,
            lr_schedule="cosine", query_max_tokens=args.query_max_tokens, response_max_tokens=args.response_max_tokens,
            precision=args.precision, checkpoint_every=0, seed=0,
        )
        run_sft(config)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    step_seconds = [row["seconds_per_step"] for row in rows if "seconds_per_step" in row]
    return {"step_seconds": step_seconds}


def worker_trl(args) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from fromfeedback.models import load_policy

    tokenizer, pairs = training_pairs(args)
    dataset = Dataset.from_list([{"input_ids": q + r, "completion_mask": [0] * len(q) + [1] * len(r)} for q, r in pairs])
    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *_, **__):
            step_ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
            max_steps=args.steps + args.warmup, learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, bf16=args.precision == "bf16", gradient_checkpointing=False, completion_only_loss=True,
            max_length=None, shuffle_dataset=False, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        trainer = SFTTrainer(model=load_policy(args.model), args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[StepTimes()])
        trainer.train()
    return {"step_seconds": [b - a for a, b in zip(step_ends, step_ends[1:])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="Examples per optimizer step.")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="Examples per forward pass.")
    parser.add_argument("--steps", type=int, default=4, help="Timed optimizer steps.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed optimizer steps first.")
    parser.add_argument("--query-max-tokens", type=int, default=512)
    parser.add_argument("--response-max-tokens", type=int, default=48)
    args = parser.parse_args()
    if args.batch_size % args.micro_batch_size:
        parser.error("--batch-size must be a multiple of --micro-batch-size")
    if args.worker:
        set_threads(args.threads)
        report({"fromfeedback": worker_fromfeedback, "trl": worker_trl}[args.worker](args))
        return

    peak = peak_for_mfu(args)
    set_threads(args.threads)
    from fromfeedback.flops import matmul_parameters
    from fromfeedback.flops import model_flops_utilization
    from fromfeedback.models import load_policy

    tokenizer, pairs = training_pairs(args)
    tokens_per_example = sum(len(q) + len(r) for q, r in pairs) / len(pairs)
    params = matmul_parameters(load_policy(args.model))
    argv = sys.argv[1:]
    results = {name: run_worker(__file__, name, argv, args.threads) for name in ("fromfeedback", "trl")}

    rows, speed = [], {}
    for name, label in (("fromfeedback", "fromfeedback run_sft"), ("trl", "TRL 1.16 SFTTrainer")):
        result = results[name]
        if "error" in result:
            rows.append([label, result["error"][:60], "", "", ""])
            continue
        seconds = steady_mean(result["step_seconds"], args.warmup)
        speed[name] = args.batch_size / seconds
        mfu = model_flops_utilization(params, round(tokens_per_example * args.batch_size), seconds, backward=True, peak_gflops=peak)
        rows.append([label, seconds, speed[name], mfu * 100, result["peak_rss_mib"]])
    rows.append(["ratio fromfeedback / TRL", "", ratio(speed.get("fromfeedback"), speed.get("trl")), "", ""])
    print(machine_line(args.threads))
    print(f"model {args.model} ({params / 1e6:.1f}M matmul parameters), {len(pairs)} sft_train examples "
          f"({tokens_per_example:.0f} tokens each on average), batch {args.batch_size} in micro-batches of {args.micro_batch_size}, "
          f"{args.precision}, {args.warmup} warm-up + {args.steps} timed steps; MFU = 6·params·tokens/s against {peak:.0f} GFLOP/s\n")
    print_table("SFT training step", ["implementation", "seconds/step", "examples/s", "MFU %", "peak RSS MiB"], rows)


if __name__ == "__main__":
    main()
