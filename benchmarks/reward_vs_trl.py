"""Reward model training: fromfeedback `run_rm_train` vs TRL `RewardTrainer`, comparisons per second and peak memory.

    .venv/bin/python benchmarks/reward_vs_trl.py [--model smollm2-135m] [--batch-size 16] [--micro-batch-size 4] [--steps 4] [--warmup 1]

Equal on both sides: the model (one scalar-head folder built from --model by fromfeedback, with its pad token
`<|endoftext|>`, loaded by both), the comparisons (the first batch_size·(warmup+steps) human comparisons of
rm_train, tokenized once by fromfeedback: query ≤ query_max_tokens, summary ≤ response_max_tokens incl. EOS; TRL
gets the same token ids as chosen_ids / rejected_ids), one epoch over them, comparisons per optimizer step and
per forward pass, the loss −log σ(r_chosen − r_rejected), AdamW lr 1e-5 cosine, grad clipping 1.0, bf16 autocast
(TRL: `bf16=True`) or fp32, threads, no gradient checkpointing (TRL's default is on), no checkpoints, no evaluation.
What differs is the method: fromfeedback runs each post once and both summaries on its keys and values;
TRL runs (post + summary) twice. MFU therefore counts the tokens each actually feeds the model.
Each side runs in its own fresh process (peak RSS = getrusage). The first `warmup` steps are not timed.
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


def preference_groups(args, tokenizer):
    from fromfeedback.config import default_data_dir
    from fromfeedback.data import load_tldr_comparisons
    from fromfeedback.reward import comparison_group

    n = args.batch_size * (args.steps + args.warmup)
    comparisons = load_tldr_comparisons(args.data_dir or default_data_dir(), "rm_train")[:n]
    return [comparison_group(c, tokenizer, args.query_max_tokens, args.response_max_tokens, soft_labels=False) for c in comparisons]


def worker_fromfeedback(args) -> dict:
    from fromfeedback.reward import RMConfig, run_rm_train

    with tempfile.TemporaryDirectory() as out:
        config = RMConfig(
            sft=args.rm_folder, data_dir=args.data_dir, out=out, train_limit=args.batch_size * (args.steps + args.warmup),
            max_steps=args.steps + args.warmup, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=1e-5,
            lr_schedule="cosine", query_max_tokens=args.query_max_tokens, response_max_tokens=args.response_max_tokens,
            precision=args.precision, bias_limit=1, eval_split="", checkpoint_every=0, seed=0,
        )
        run_rm_train(config)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"step_seconds": [row["seconds_per_step"] for row in rows if "seconds_per_step" in row]}


def worker_trl(args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from fromfeedback.models import disable_dropout, load_tokenizer

    tokenizer = load_tokenizer(args.rm_folder)
    groups = preference_groups(args, tokenizer)
    rows = [{"chosen_ids": g.query + g.responses[g.pairs[0][0]], "rejected_ids": g.query + g.responses[g.pairs[0][1]]} for g in groups]
    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *_, **__):
            step_ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    model = AutoModelForSequenceClassification.from_pretrained(args.rm_folder, num_labels=1)
    disable_dropout(model)
    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(
            output_dir=out, per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
            max_steps=args.steps + args.warmup, learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, bf16=args.precision == "bf16", gradient_checkpointing=False, max_length=None, center_rewards_coefficient=None,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[StepTimes()])
        trainer.train()
    return {"step_seconds": [b - a for a, b in zip(step_ends, step_ends[1:])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="Comparisons per optimizer step.")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="Comparisons per forward pass.")
    parser.add_argument("--steps", type=int, default=4, help="Timed optimizer steps.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed optimizer steps first.")
    parser.add_argument("--query-max-tokens", type=int, default=512)
    parser.add_argument("--response-max-tokens", type=int, default=48)
    parser.add_argument("--rm-folder", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_size % args.micro_batch_size:
        parser.error("--batch-size must be a multiple of --micro-batch-size")
    if args.worker:
        set_threads(args.threads)
        report({"fromfeedback": worker_fromfeedback, "trl": worker_trl}[args.worker](args))
        return

    peak = peak_for_mfu(args)
    set_threads(args.threads)
    from fromfeedback.flops import matmul_parameters, model_flops_utilization
    from fromfeedback.models import load_scalar_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    groups = preference_groups(args, tokenizer)
    shared_tokens = sum(len(g.query) + sum(len(r) for r in g.responses) for g in groups) / len(groups)
    joined_tokens = sum(2 * len(g.query) + sum(len(r) for r in g.responses) for g in groups) / len(groups)
    with tempfile.TemporaryDirectory() as folder:
        scalar_model = load_scalar_model(args.model)
        params = matmul_parameters(scalar_model.model)
        scalar_model.save(folder, tokenizer)
        del scalar_model
        argv = [*sys.argv[1:], "--rm-folder", folder]
        results = {name: run_worker(__file__, name, argv, args.threads) for name in ("fromfeedback", "trl")}

    rows, speed = [], {}
    for name, label, tokens in (("fromfeedback", "fromfeedback run_rm_train", shared_tokens), ("trl", "TRL 1.16 RewardTrainer", joined_tokens)):
        result = results[name]
        if "error" in result:
            rows.append([label, result["error"][:60], "", "", "", ""])
            continue
        seconds = steady_mean(result["step_seconds"], args.warmup)
        speed[name] = args.batch_size / seconds
        mfu = model_flops_utilization(params, round(tokens * args.batch_size), seconds, backward=True, peak_gflops=peak)
        rows.append([label, seconds, speed[name], tokens, mfu * 100, result["peak_rss_mib"]])
    rows.append(["ratio fromfeedback / TRL", "", ratio(speed.get("fromfeedback"), speed.get("trl")), "", "", ""])
    print(machine_line(args.threads))
    print(f"model {args.model} + scalar head ({params / 1e6:.1f}M matmul parameters), {len(groups)} rm_train comparisons, "
          f"batch {args.batch_size} comparisons in micro-batches of {args.micro_batch_size}, {args.precision}, "
          f"{args.warmup} warm-up + {args.steps} timed steps; MFU = 6·params·tokens fed/s against {peak:.0f} GFLOP/s\n")
    print_table("Reward model training step", ["implementation", "seconds/step", "comparisons/s", "tokens fed per comparison", "MFU %", "peak RSS MiB"], rows)


if __name__ == "__main__":
    main()
