"""Online RL: one fromfeedback PPO iteration vs TRL 1.16 `RLOOTrainer` and `GRPOTrainer` on 64 episodes; and the
reward gained per minute over a fixed time budget.

    .venv/bin/python benchmarks/rl_vs_trl.py [--model smollm2-135m] [--rm FOLDER] [--iterations 2] [--budget-minutes 10]

Equal on all sides: the policy (same folder, fp32 weights, dropout off) and its frozen copy as the KL reference
(β = 0.05), the reward model (--rm; by default a scalar head freshly put on --model and saved once as a folder that
all load), the prompt pool (every sft_train post in fromfeedback's query format, ≤ query_max_tokens; TRL gets the
text, which re-tokenizes to the same ids), episodes per iteration (64), response length (≤ 48 new tokens, stop at
EOS), sampling (temperature 0.7, top_p 1, no top_k), update work (`--epochs` passes over the 64 episodes in
optimizer steps of 16 episodes, micro-batches of 8: PPO `ppo_epochs`, TRL `num_iterations`), AdamW lr 1e-5,
grad clipping 1.0, bf16 autocast (TRL `bf16=True`) or fp32, threads, no gradient checkpointing.
All three sample `--generations` (default 2) responses to each of 64/generations prompts. What differs is each
method: PPO learns a value head (and subtracts the other responses' mean score, its `score_baseline =
leave_one_out`, the demo preset's setting); RLOO and GRPO need no value model. PPO generates the 64 rollouts in
one batch (generation_batch_size 64), as TRL does, running each prompt once for its responses.
Each run is its own fresh process (peak RSS = getrusage). Seconds per 64 episodes are the mean over iterations
after the first (`--iterations 1`: the only one, which then includes warm-up costs).
Reward per minute: each trainer runs for `--budget-minutes` of training time (whole iterations); the raw
reward-model score of each iteration's 64 episodes is fitted by least squares against elapsed time.
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

SYSTEMS = {"ppo": "fromfeedback PPO", "rloo": "TRL 1.16 RLOOTrainer", "grpo": "TRL 1.16 GRPOTrainer"}


class BudgetReached(Exception):
    pass


def prompt_texts(args) -> list[str]:
    from fromfeedback.config import default_data_dir
    from fromfeedback.data import load_tldr, make_query
    from fromfeedback.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    posts = load_tldr(args.data_dir or default_data_dir(), "sft_train")
    return [make_query(p.subreddit, p.title, p.post, tokenizer, args.query_max_tokens) for p in posts]


def worker_ppo(args) -> dict:
    import torch

    from fromfeedback.ppo import PPOConfig, reward_model_fn, run_ppo

    budget_seconds = args.budget_minutes * 60 if args.mode == "budget" else 0.0
    with tempfile.TemporaryDirectory() as out:
        metrics_path = Path(out) / "metrics.jsonl"

        def iterations_done() -> list[dict]:
            if not metrics_path.exists():
                return []
            return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]

        config = PPOConfig(
            sft=args.model, rm=args.rm, out=out, data_dir=args.data_dir, prompt_splits="sft_train", query_max_tokens=args.query_max_tokens,
            response_max_tokens=args.response_max_tokens, iterations=10**6 if budget_seconds else args.iterations,
            rollout_batch_size=args.episodes, minibatch_size=args.minibatch_size, micro_batch_size=args.micro_batch_size,
            generation_batch_size=args.episodes, samples_per_prompt=args.generations, score_baseline="leave_one_out", ppo_epochs=args.epochs, lr=1e-5, max_grad_norm=1.0, temperature=0.7, kl_coef=0.05,
            precision=args.precision, checkpoint_every=0, log_samples=0, seed=0,
        )
        score = reward_model_fn(args.rm, config, torch.device("cpu"))

        def reward_fn(batch):
            # Called once per iteration, after sampling: stop once the finished iterations used up the budget.
            if budget_seconds and sum(row["seconds_iteration"] for row in iterations_done()) >= budget_seconds:
                raise BudgetReached
            return score(batch)

        try:
            run_ppo(config, reward_fn=reward_fn)
        except BudgetReached:
            pass
        rows = iterations_done()
    keys = ("seconds_iteration", "seconds_generate", "seconds_score", "seconds_forward", "seconds_update", "raw_score", "response_length")
    return {"iterations": [{key: row[key] for key in keys} for row in rows]}


def worker_trl(args, kind: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from fromfeedback.models import disable_dropout, load_policy, load_tokenizer

    config_class, trainer_class = {"rloo": (RLOOConfig, RLOOTrainer), "grpo": (GRPOConfig, GRPOTrainer)}[kind]
    budget_seconds = args.budget_minutes * 60 if args.mode == "budget" else 0.0
    steps_per_iteration = args.episodes // args.minibatch_size * args.epochs
    iterations = 10**6 if budget_seconds else args.iterations
    dataset = Dataset.from_dict({"prompt": prompt_texts(args)})
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1).eval().requires_grad_(False)
    disable_dropout(reward_model)
    reward_tokenizer = AutoTokenizer.from_pretrained(args.rm)
    started: list[float] = []
    iteration_ends: list[float] = []
    scores: list[float] = []
    lengths: list[float] = []

    class Record(TrainerCallback):
        def on_train_begin(self, *_, **__):
            started.append(time.perf_counter())

        def on_step_end(self, _args, state, control, **__):
            if state.global_step % steps_per_iteration == 0:
                iteration_ends.append(time.perf_counter())
                if budget_seconds and iteration_ends[-1] - started[0] >= budget_seconds:
                    control.should_training_stop = True

        def on_log(self, _args, state, control, logs=None, **__):
            for key, value in (logs or {}).items():
                if key.startswith("rewards/") and key.endswith("/mean"):
                    scores.append(float(value))
                if key == "completions/mean_length":
                    lengths.append(float(value))

    with tempfile.TemporaryDirectory() as out:
        config = config_class(
            output_dir=out, per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=args.minibatch_size // args.micro_batch_size,
            generation_batch_size=args.episodes, num_generations=args.generations, max_completion_length=args.response_max_tokens,
            temperature=0.7, top_p=1.0, top_k=0, num_iterations=args.epochs, beta=0.05, learning_rate=1e-5, lr_scheduler_type="constant",
            max_grad_norm=1.0, bf16=args.precision == "bf16", gradient_checkpointing=False, max_steps=steps_per_iteration * iterations,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_dropout=True, disable_tqdm=True, seed=0,
            log_completions=False,
        )
        tokenizer = load_tokenizer(args.model)
        trainer = trainer_class(model=load_policy(args.model), reward_funcs=reward_model, args=config, train_dataset=dataset,
                                processing_class=tokenizer, reward_processing_classes=reward_tokenizer, callbacks=[Record()])
        torch.manual_seed(0)
        trainer.train()
    bounds = started[:1] + iteration_ends
    return {"iterations": [{"seconds_iteration": b - a, "raw_score": s, "response_length": n}
                           for a, b, s, n in zip(bounds, bounds[1:], scores, lengths)]}


def reward_slope(iterations: list[dict]) -> tuple[float | None, float]:
    """Least-squares slope of the raw score against elapsed minutes (at each iteration's end), and the minutes used."""
    times, elapsed = [], 0.0
    for row in iterations:
        elapsed += row["seconds_iteration"] / 60
        times.append(elapsed)
    if len(iterations) < 2:
        return None, elapsed
    scores = [row["raw_score"] for row in iterations]
    mean_t, mean_s = sum(times) / len(times), sum(scores) / len(scores)
    variance = sum((t - mean_t) ** 2 for t in times)
    return sum((t - mean_t) * (s - mean_s) for t, s in zip(times, scores)) / variance, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--rm", default="", help="Reward model folder (default: a fresh scalar head on --model, saved to a temporary folder).")
    parser.add_argument("--episodes", type=int, default=64, help="Episodes (responses) per iteration.")
    parser.add_argument("--generations", type=int, default=2, help="Responses per prompt for RLOO and GRPO (at least 2).")
    parser.add_argument("--epochs", type=int, default=4, help="Passes over each iteration's episodes (PPO ppo_epochs = TRL num_iterations).")
    parser.add_argument("--minibatch-size", type=int, default=16, help="Episodes per optimizer step.")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="Episodes per forward pass.")
    parser.add_argument("--iterations", type=int, default=2, help="Timed iterations of 64 episodes (the first is warm-up when more than one).")
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="Training time per trainer for reward per minute (0: skip).")
    parser.add_argument("--query-max-tokens", type=int, default=512)
    parser.add_argument("--response-max-tokens", type=int, default=48)
    parser.add_argument("--systems", default="ppo,rloo,grpo", help="Which of ppo, rloo, grpo to run.")
    parser.add_argument("--mode", default="step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.episodes % args.minibatch_size or args.minibatch_size % args.micro_batch_size or args.episodes % args.generations:
        parser.error("--episodes must be a multiple of --minibatch-size and of --generations, --minibatch-size of --micro-batch-size")
    if args.worker:
        set_threads(args.threads)
        report(worker_ppo(args) if args.worker == "ppo" else worker_trl(args, args.worker))
        return

    peak = peak_for_mfu(args)
    set_threads(args.threads)
    from fromfeedback.flops import matmul_parameters
    from fromfeedback.models import load_scalar_model, load_tokenizer

    systems = [s for s in args.systems.split(",") if s]
    tokenizer = load_tokenizer(args.model)
    texts = prompt_texts(args)
    query_tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts) / len(texts)
    with tempfile.TemporaryDirectory() as folder:
        rm_note = args.rm
        if not args.rm:
            reward_model = load_scalar_model(args.model)
            reward_model.set_bias(0.0)
            reward_model.save(folder, tokenizer)
            params = matmul_parameters(reward_model.model)
            del reward_model
            rm_note = f"fresh scalar head on {args.model} (seed 0)"
        else:
            params = matmul_parameters(load_scalar_model(args.rm).model)
        rm_folder = args.rm or folder
        base = [a for a in sys.argv[1:]]
        base = [*base, "--rm", rm_folder] if not args.rm else base
        step = {s: run_worker(__file__, s, [*base, "--mode", "step"], args.threads) for s in systems}
        budget = {}
        if args.budget_minutes > 0:
            budget = {s: run_worker(__file__, s, [*base, "--mode", "budget"], args.threads) for s in systems}

    # Useful FLOPs of an iteration, per episode of T = query + response tokens: sampling (2PT), the reward model
    # (2PT), the policy's and the reference's log-probs (4PT), then `epochs` forward+backward passes (6PT each).
    print(machine_line(args.threads))
    print(f"policy {args.model}, reward model: {rm_note}, {args.episodes} episodes per iteration "
          f"({args.episodes // args.generations} prompts × {args.generations} on every side), "
          f"≤ {args.response_max_tokens} new tokens at T=0.7, {args.epochs} epochs of minibatches of {args.minibatch_size} "
          f"(micro-batches of {args.micro_batch_size}), {args.precision}; prompt pool: {len(texts)} sft_train queries of "
          f"{query_tokens:.0f} tokens on average; MFU = P·T·(8 + 6·epochs) per episode against {peak:.0f} GFLOP/s "
          f"(P = {params / 1e6:.1f}M matmul parameters)\n")
    rows, seconds = [], {}
    for name in systems:
        result = step[name]
        if "error" in result or not result.get("iterations"):
            rows.append([SYSTEMS[name], result.get("error", "no iteration finished")[:60], "", "", "", "", ""])
            continue
        iterations = result["iterations"]
        seconds[name] = steady_mean([row["seconds_iteration"] for row in iterations], 1)
        response = steady_mean([row["response_length"] for row in iterations], 1)
        flops = params * (query_tokens + response) * (8 + 6 * args.epochs) * args.episodes
        breakdown = ""
        if name == "ppo":
            parts = {key: steady_mean([row[f"seconds_{key}"] for row in iterations], 1) for key in ("generate", "score", "forward", "update")}
            breakdown = " / ".join(f"{parts[k]:.1f}" for k in ("generate", "score", "forward", "update"))
        rows.append([SYSTEMS[name], seconds[name], response, flops / seconds[name] / (peak * 1e9) * 100, result["peak_rss_mib"], len(iterations), breakdown])
    for name in ("rloo", "grpo"):
        if name in seconds and "ppo" in seconds:
            rows.append([f"ratio: {SYSTEMS[name]} seconds / PPO seconds", ratio(seconds[name], seconds["ppo"]), "", "", "", "", ""])
    print_table(f"Seconds per {args.episodes} episodes", ["trainer", "seconds", "mean response tokens", "MFU %", "peak RSS MiB", "iterations",
                                                         "PPO generate / score / forward / update s"], rows)
    if budget:
        rows, gained = [], {}
        for name in systems:
            result = budget[name]
            if "error" in result or not result.get("iterations"):
                rows.append([SYSTEMS[name], result.get("error", "no iteration finished")[:60], "", "", "", "", ""])
                continue
            iterations = result["iterations"]
            slope, minutes = reward_slope(iterations)
            gained[name] = slope
            steady = steady_mean([row["seconds_iteration"] for row in iterations], 1) if len(iterations) > 1 else None
            rows.append([SYSTEMS[name], minutes, len(iterations), steady, iterations[0]["raw_score"], iterations[-1]["raw_score"], slope])
        for name in ("rloo", "grpo"):
            if gained.get(name) is not None and gained.get("ppo") is not None:
                # A ratio of slopes means something only when both trainers gained reward.
                both_gained = gained[name] > 0 and gained["ppo"] > 0
                rows.append([f"ratio: PPO / {SYSTEMS[name]}", "", "", "", "", "", ratio(gained["ppo"], gained[name]) if both_gained else "— (a slope ≤ 0)"])
        print_table(f"Reward gained per minute ({args.budget_minutes:g}-minute budget of training time)",
                    ["trainer", "minutes trained", "iterations", "seconds per iteration after the first", "first score", "last score",
                     "score / minute (fit)"], rows)


if __name__ == "__main__":
    main()
