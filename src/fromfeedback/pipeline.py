"""`fromfeedback run`: the stages in order, in one run directory, each skipped when already done.

Every stage writes into `RUN_DIR/<stage>/` and finishes by writing `RUN_DIR/<stage>/stage.json` (its
configuration, wall seconds, peak memory). A stage whose `stage.json` matches its configuration is
skipped; a stage killed half-way resumes from its own checkpoints. `fromfeedback run --resume RUN_DIR`
reads the preset and overrides from `RUN_DIR/run.json` and carries on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fromfeedback.config import build_config, config_to_dict, default_data_dir, load_preset, make_config, parse_overrides
from fromfeedback.files import UserError, write_json
from fromfeedback.runtime import peak_memory_mb


@dataclass
class RunConfig:
    data_dir: str = ""
    """Folder with tldr/ and cnndm/ (default: $FROMFEEDBACK_DATA_DIR or ../shared/data)."""
    base_model: str = "smollm2-135m"
    """The pretrained model every stage starts from."""
    eval_split: str = "test"
    """Held-out posts the policies are compared on."""
    eval_limit: int = 100
    """Evaluate on the first N posts of eval_split (0: all)."""
    judge_seed: int = 1
    """Seed of the held-out judge: a second reward model, trained like the proxy RM with another seed, that
    the policies never optimize against."""
    best_of_n: list[int] = dataclasses.field(default_factory=lambda: [1, 4, 16])
    """The N of each best-of-N baseline (samples of the SFT policy ranked by the proxy RM)."""
    report_examples: int = 6
    """Posts shown side by side in the report."""


def fingerprint(config: Any, run_dir: Path | None = None) -> str:
    """Hash of a stage's configuration; paths inside `run_dir` count relative to it, so a run directory
    can be moved or copied and still resumed."""
    text = json.dumps(config_to_dict(config), sort_keys=True)
    if run_dir is not None:
        text = text.replace(str(run_dir), "{run_dir}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_stage(run_dir: Path, name: str, config: Any, action: Callable[[Any], Any]) -> dict[str, Any]:
    """Runs `action(config)` unless `run_dir/name` already finished with the same configuration."""
    marker = run_dir / name / "stage.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done["fingerprint"] == fingerprint(config, run_dir):
            print(f"[{name}] already done ({done['seconds']:.0f}s), skipping")
            return done
        raise UserError(f"{run_dir / name} was made with another configuration: delete that folder or use a new --out")
    print(f"[{name}] starting")
    started = time.perf_counter()
    action(config)
    done = {"stage": name, "fingerprint": fingerprint(config, run_dir), "config": config_to_dict(config),
            "seconds": time.perf_counter() - started, "peak_memory_mib": peak_memory_mb()}
    write_json(marker, done)
    print(f"[{name}] done in {done['seconds']:.0f}s")
    return done


def stage_config(cls: type, preset: dict[str, Any], section: str, overrides: dict[str, Any], where: str) -> Any:
    return make_config(cls, {**preset.get(section, {}), **overrides}, f"{where} [{section}]")


def run_pipeline(preset_name: str, out: str, overrides: list[str] | None = None, dry_run: bool = False) -> Path:
    """SFT → reward model (+ held-out judge) → PPO → best-of-N → evaluation → report; returns the run directory.

    With dry_run, every stage's configuration is built and validated (and printed), and nothing runs."""
    from fromfeedback.best_of_n import BestOfNConfig, run_best_of_n
    from fromfeedback.evaluate.judges import make_judge
    from fromfeedback.evaluate.overoptimization import run_overoptimization
    from fromfeedback.evaluate.policy import PolicyEvalConfig, evaluate_policies, format_table
    from fromfeedback.evaluate.report import write_report
    from fromfeedback.ppo import PPOConfig, run_ppo
    from fromfeedback.reward import RMConfig, run_rm_train
    from fromfeedback.sampling import SampleConfig, run_sample
    from fromfeedback.sft import SFTConfig, run_sft

    run_dir = Path(out)
    overrides = overrides or []
    if not dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "run.json", {"preset": preset_name, "overrides": overrides})
    preset = load_preset(preset_name)
    run = build_config(RunConfig, preset_name, "run", overrides)
    data_dir = run.data_dir or default_data_dir()
    stages: dict[str, dict[str, Any]] = {}

    def stage(name: str, cls: type, section: str, action: Callable[[Any], Any], **fields: Any) -> Any:
        config = stage_config(cls, preset, section, {"data_dir": data_dir, **fields}, preset_name)
        if dry_run:
            print(f"[{name}] {type(config).__name__}: {json.dumps(config_to_dict(config))}")
        else:
            stages[name] = run_stage(run_dir, name, config, action)
        return config

    sft = stage("sft", SFTConfig, "sft", run_sft, model=run.base_model, out=str(run_dir / "sft"))
    sft_model = str(run_dir / "sft" / "model")
    # The judge trains like the proxy RM with another seed; with frozen lower layers it reuses their hidden states.
    rm_preset = stage_config(RMConfig, preset, "rm", {}, preset_name)
    frozen_cache = str(run_dir / "rm-frozen-layers.pt") if rm_preset.freezes_lower_layers else ""
    stage("rm", RMConfig, "rm", run_rm_train, sft=sft_model, out=str(run_dir / "rm"), frozen_cache=frozen_cache)
    stage("judge", RMConfig, "rm", run_rm_train, sft=sft_model, out=str(run_dir / "judge"), seed=run.judge_seed, frozen_cache=frozen_cache)
    rm_model, judge_model = str(run_dir / "rm" / "model"), str(run_dir / "judge" / "model")
    ppo = stage("ppo", PPOConfig, "ppo", run_ppo, sft=sft_model, rm=rm_model, out=str(run_dir / "ppo"))
    ppo_model = str(run_dir / "ppo" / "model")

    samples_dir = run_dir / "samples"
    held_out = {"split": run.eval_split, "limit": run.eval_limit}
    for policy, model in {"sft": sft_model, "ppo": ppo_model}.items():
        stage(f"samples-{policy}", SampleConfig, "sample", run_sample, model=model, policy_name=policy, temperature=0.0,
              out=str(samples_dir / f"{policy}.jsonl"), query_max_tokens=sft.query_max_tokens, **held_out)
    largest_n = max(run.best_of_n, default=0)
    if largest_n:
        stage("best-of-n", BestOfNConfig, "best_of_n", run_best_of_n, policy=sft_model, rm=rm_model, n=largest_n,
              also_n=[n for n in run.best_of_n if n != largest_n], out=str(samples_dir / "best-of-{n}.jsonl"), **held_out)

    eval_dir = run_dir / "eval"
    policy_samples = [str(samples_dir / "sft.jsonl"), str(samples_dir / "ppo.jsonl"), "posts:openai_ppo_1.3b"]
    if largest_n:
        policy_samples.insert(2, str(samples_dir / f"best-of-{largest_n}.jsonl"))

    def evaluate(config: PolicyEvalConfig) -> None:
        judge = make_judge(config.judge, config.flip_prob, config.batch_size, config.seed)
        result = evaluate_policies(config, judge)
        write_json(config.out, result)
        print(format_table(result))
        # Head to head against the SFT policy, with the same judge (its scores are cached).
        trained = [path for path in config.samples if not path.startswith("posts:")]
        head_to_head = evaluate_policies(dataclasses.replace(config, samples=trained, baseline="sft"), judge)
        write_json(Path(config.out).with_name("policy-vs-sft.json"), head_to_head)
        print(format_table(head_to_head))

    # KL to SFT is measured where it is a KL: on samples at T = 0.7 (the over-optimization points), not on
    # these greedy summaries.
    stage("eval-policies", PolicyEvalConfig, "eval", evaluate, samples=policy_samples, judge=f"rm:{judge_model}",
          baseline="reference", out=str(eval_dir / "policy.json"), **held_out)

    points = [f"best-of-n/N={n}={samples_dir / f'best-of-{n}.jsonl'}" for n in run.best_of_n]
    points.append(f"ppo/final={ppo_model}")

    def overoptimization(config: OveroptimizationConfig) -> Any:
        return run_overoptimization(config.points, judge_model, rm_model, data_dir, run.eval_split, str(eval_dir), sft=sft_model,
                                    limit=run.eval_limit, no_eos_score=ppo.no_eos_penalty if ppo.penalize_no_eos else None)

    stage("eval-overoptimization", OveroptimizationConfig, "overoptimization", overoptimization, points=points)
    if dry_run:
        print(f"dry run: every stage of preset {preset_name!r} is configured and valid; nothing was run")
        return run_dir
    write_summary(run_dir, preset_name, stages)
    report = write_report(run_dir, data_dir=data_dir, examples=run.report_examples)
    print(f"report: {report.resolve()}")
    return run_dir


@dataclass
class OveroptimizationConfig:
    points: list[str] = dataclasses.field(default_factory=list)
    """`SERIES/NAME=SOURCE` points (samples files or policy folders) of the over-optimization plot."""
    data_dir: str = ""
    """Folder with tldr/posts.jsonl."""


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def write_summary(run_dir: Path, preset_name: str, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`RUN_DIR/summary.json`: the report's main figures in machine-readable form."""
    rm_eval = _read(run_dir / "rm" / "eval.json")
    policy_eval = _read(run_dir / "eval" / "policy.json")
    vs_sft = _read(run_dir / "eval" / "policy-vs-sft.json").get("policies", {})
    overoptimization = _read(run_dir / "eval" / "overoptimization.json")
    # Wall seconds of each stage (for a stage resumed after an interruption: of its last run only).
    seconds = {name: round(done["seconds"], 1) for name, done in stages.items()}
    summary = {
        "preset": preset_name,
        "reward_model": {key: rm_eval.get(key) for key in ("comparisons", "accuracy", "accuracy_ci95", "similar_length", "longer_wins", "labeler_agreement")},
        "judge": {key: _read(run_dir / "judge" / "eval.json").get(key) for key in ("accuracy", "similar_length")},
        "policies": policy_eval.get("policies", {}),
        "judged_against_sft": {name: {key: row.get(key) for key in ("win_rate", "ci_low", "ci_high", "lc_win_rate", "n")} for name, row in vs_sft.items() if name != "sft"},
        # KL to SFT and proxy/judge reward of T = 0.7 samples: best-of-N (analytic KL) and PPO (estimated).
        "kl_points": overoptimization.get("points", []),
        "sft": _read(run_dir / "sft" / "summary.json"),
        "ppo": _read(run_dir / "ppo" / "summary.json"),
        "stage_seconds": seconds,
        "peak_memory_mib": max(done["peak_memory_mib"] for done in stages.values()),
    }
    write_json(run_dir / "summary.json", summary)
    print(json.dumps({k: summary[k] for k in ("reward_model", "stage_seconds", "peak_memory_mib")}, indent=2))
    return summary


def resume_pipeline(run_dir: str) -> Path:
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise UserError(f"{path}: not found; --resume takes a folder made by `fromfeedback run`")
    saved = json.loads(path.read_text())
    return run_pipeline(saved["preset"], run_dir, saved["overrides"])


def split_run_overrides(args: list[str]) -> list[str]:
    """Checks `--field value` overrides for the [run] table early, so typos fail before hours of work."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(parse_overrides(args)) - fields)
    if unknown:
        raise UserError(f"unknown run option(s) {unknown}; valid: {sorted(fields)} (stage fields go in the preset)")
    return args
