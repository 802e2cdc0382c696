"""`fromfeedback eval ...` and `fromfeedback report`: thin shells over the evaluate modules."""

from __future__ import annotations

import json
from typing import Optional

import typer

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate policies: win rates, over-optimization, transfer to news.")


@eval_app.command("policy")
def eval_policy(
    samples: list[str] = typer.Option(..., "--samples", help="Samples file, posts:NAME (e.g. posts:openai_ppo_1.3b) or reference; repeat for more."),
    judge: str = typer.Option(..., "--judge", help="rm:DIR (reward model), human:FILE (exported comparisons) or simulated:DIR."),
    baseline: str = typer.Option("reference", "--baseline", help="reference, or the name of a loaded policy."),
    split: str = typer.Option("test", "--split", help="Posts to evaluate on (all: every post)."),
    limit: int = typer.Option(0, "--limit", help="Only the first N posts of the split (0: all)."),
    sft: str = typer.Option("", "--sft", help="SFT policy folder, for KL to SFT (with --policy-model)."),
    policy_model: list[str] = typer.Option([], "--policy-model", help="NAME=DIR: the folder of policy NAME, for its KL to SFT."),
    flip_prob: float = typer.Option(0.16, "--flip-prob", help="simulated: judges flip the judge RM's choice with this probability."),
    unfinished_loses: bool = typer.Option(True, "--unfinished-loses/--judge-unfinished",
                                          help="A summary without EOS loses to a finished one (default), or is left to the judge."),
    data_dir: str = typer.Option("", "--data-dir", help="Folder with tldr/posts.jsonl."),
    batch_size: int = typer.Option(16, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    out: str = typer.Option("", "--out", help="Also write the JSON result here (e.g. RUN_DIR/eval/policy.json)."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON instead of a table."),
) -> None:
    """Win rate (95% CI), length-controlled win rate, ROUGE, length, EOS rate, repetition and KL of each policy."""
    from fromfeedback.evaluate.judges import make_judge
    from fromfeedback.evaluate.policy import PolicyEvalConfig, evaluate_policies, format_table
    from fromfeedback.files import write_json

    config = PolicyEvalConfig(samples=samples, judge=judge, baseline=baseline, data_dir=data_dir, split=split, limit=limit, sft=sft, policy_models=policy_model,
                              unfinished_loses=unfinished_loses, flip_prob=flip_prob, batch_size=batch_size, seed=seed, out=out)
    result = evaluate_policies(config, make_judge(judge, flip_prob, batch_size, seed))
    if out:
        write_json(out, result)
    print(json.dumps(result, indent=2) if json_output else format_table(result))


@eval_app.command("overoptimization")
def eval_overoptimization(
    point: list[str] = typer.Option(..., "--point", help="SERIES/NAME=SAMPLES_FILE (samples carry `kl`, and `score` unless --proxy) or SERIES/NAME=POLICY_DIR (needs --sft). Repeat."),
    judge: str = typer.Option(..., "--judge", help="Held-out reward model folder (the 'true' reward)."),
    proxy: str = typer.Option("", "--proxy", help="Proxy (training) RM folder; without it each sample's `score` is used."),
    sft: str = typer.Option("", "--sft", help="SFT policy folder: the KL reference for policy-folder points."),
    split: str = typer.Option("test", "--split", help="Posts: those policy-folder points summarize; samples of other posts are ignored (all: any)."),
    limit: int = typer.Option(0, "--limit", help="Policy-folder points summarize the first N posts only (0: all)."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Longest summary of policy-folder points, in tokens."),
    temperature: float = typer.Option(0.7, "--temperature", help="Policy-folder points are sampled, and their KL measured, at this temperature."),
    no_eos_score: Optional[float] = typer.Option(None, "--no-eos-score", help="Score of a sample that never ended, for both RMs (as PPO's no_eos_penalty)."),
    data_dir: str = typer.Option("", "--data-dir"),
    batch_size: int = typer.Option(16, "--batch-size"),
    out: str = typer.Option("runs/eval", "--out", help="Folder for overoptimization.json and overoptimization.png."),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Proxy and judge reward against KL to SFT for PPO checkpoints, PPO at several β and best-of-N, in one plot."""
    from fromfeedback.evaluate.overoptimization import run_overoptimization

    result = run_overoptimization(point, judge, proxy, data_dir, split, out, batch_size, sft, limit, max_new_tokens, temperature, no_eos_score)
    if json_output:
        print(json.dumps(result, indent=2))
        return
    print(f"{'point':30} {'KL':>7} {'proxy':>7} {'judge':>7} {'judge win':>9}")
    for row in result["points"]:
        win = "—" if row["judge_win_rate"] is None else f"{100 * row['judge_win_rate']:.1f}%"
        print(f"{row['label']:30} {row['kl']:7.2f} {row['proxy_score']:7.3f} {row['judge_score']:7.3f} {win:>9}")
    print(f"plot: {out}/overoptimization.png")


@eval_app.command("transfer", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_transfer(ctx: typer.Context, preset: Optional[str] = typer.Option(None, "--preset", help="Preset name in configs/ ([transfer] table) or a .toml path.")) -> None:
    """Summarize CNN/DM articles with a TL;DR policy; ROUGE against the highlights, and a judge's verdict.

    Fields: --policy DIR --judge RM_DIR --limit N --out DIR --query-max-tokens N --max-new-tokens N --batch-size N."""
    from fromfeedback.config import build_config
    from fromfeedback.evaluate.transfer import TransferConfig, run_transfer

    result = run_transfer(build_config(TransferConfig, preset, "transfer", ctx.args))
    print(json.dumps(result, indent=2))


@eval_app.command("export-samples")
def eval_export_samples(
    source: str = typer.Argument(..., help="A samples key of posts.jsonl (openai_ppo_1.3b), reference, or a comparisons file."),
    out: str = typer.Option(..., "--out", help="Samples file to write."),
    split: str = typer.Option("test", "--split", help="For posts.jsonl sources: the posts to export (all: every post)."),
    data_dir: str = typer.Option("", "--data-dir"),
) -> None:
    """Writes summaries stored elsewhere as a samples file: those in posts.jsonl (e.g. for RUN_DIR/samples/
    and the report), or every labeled policy of a comparisons file (to evaluate them with `human:FILE`)."""
    from pathlib import Path

    from fromfeedback.config import default_data_dir
    from fromfeedback.data import load_tldr, write_samples
    from fromfeedback.evaluate.policy import posts_source, samples_from_comparisons

    if Path(source).is_file():
        samples = samples_from_comparisons(source)
    else:
        samples = list(posts_source(load_tldr(data_dir or default_data_dir(), None if split == "all" else split), source).values())
    write_samples(out, samples)
    policies = sorted({s.policy for s in samples})
    print(f"wrote {len(samples)} samples of {', '.join(policies)} to {out}")


def report_command(
    run_dir: str = typer.Argument(..., help="Run folder: reads eval/*.json, eval/*.png, */metrics.jsonl, samples/*.jsonl."),
    out: str = typer.Option("", "--out", help="HTML file to write (default RUN_DIR/report.html)."),
    examples: int = typer.Option(6, "--examples", help="Posts shown with their summaries side by side."),
    data_dir: str = typer.Option("", "--data-dir", help="Folder with tldr/posts.jsonl."),
) -> None:
    """One self-contained HTML page: tables, over-optimization plot, training curves, samples side by side."""
    from fromfeedback.evaluate.report import write_report

    print(f"wrote {write_report(run_dir, out or None, data_dir, examples)}")
