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

from fromfeedback.config import build_config, config_to_dict, default_data_dir, load_preset, parse_overrides
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


def fingerprint(config: Any) -> str:
    return hashlib.sha256(json.dumps(config_to_dict(config), sort_keys=True).encode()).hexdigest()[:16]


def run_stage(run_dir: Path, name: str, config: Any, action: Callable[[Any], Any]) -> dict[str, Any]:
    """Runs `action(config)` unless `run_dir/name` already finished with the same configuration."""
    marker = run_dir / name / "stage.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done["fingerprint"] == fingerprint(config):
            print(f"[{name}] already done ({done['seconds']:.0f}s), skipping")
            return done
        raise UserError(f"{run_dir / name} was made with another configuration: delete that folder or use a new --out")
    print(f"[{name}] starting")
    started = time.perf_counter()
    action(config)
    done = {"stage": name, "fingerprint": fingerprint(config), "config": config_to_dict(config),
            "seconds": time.perf_counter() - started, "peak_memory_mib": peak_memory_mb()}
    write_json(marker, done)
    print(f"[{name}] done in {done['seconds']:.0f}s")
    return done


def stage_config(cls: type, preset: dict[str, Any], section: str, overrides: dict[str, Any], where: str) -> Any:
    from fromfeedback.config import make_config

    return make_config(cls, {**preset.get(section, {}), **overrides}, f"{where} [{section}]")


def run_pipeline(preset_name: str, out: str, overrides: list[str] | None = None) -> Path:
    """SFT → samples → evaluation tables, as the preset says; returns the run directory."""
    from fromfeedback.evaluate.metrics import rouge_scores, text_statistics
    from fromfeedback.data import load_samples, load_tldr
    from fromfeedback.sampling import SampleConfig, run_sample
    from fromfeedback.sft import SFTConfig, run_sft

    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = overrides or []
    write_json(run_dir / "run.json", {"preset": preset_name, "overrides": overrides})
    preset = load_preset(preset_name)
    run = build_config(RunConfig, preset_name, "run", overrides)
    data_dir = run.data_dir or default_data_dir()
    where = preset_name
    stages: dict[str, dict[str, Any]] = {}

    sft = stage_config(SFTConfig, preset, "sft", {"model": run.base_model, "data_dir": data_dir, "out": str(run_dir / "sft")}, where)
    stages["sft"] = run_stage(run_dir, "sft", sft, run_sft)
    sft_model = run_dir / "sft" / "model"

    samples_dir = run_dir / "samples"
    policies = {"base": run.base_model, "sft": str(sft_model)}
    for policy, model in policies.items():
        sample = stage_config(
            SampleConfig, preset, "sample",
            {"model": model, "data_dir": data_dir, "split": run.eval_split, "limit": run.eval_limit, "temperature": 0.0,
             "policy_name": policy, "out": str(samples_dir / f"{policy}.jsonl"), "query_max_tokens": sft.query_max_tokens},
            where,
        )
        stages[f"samples-{policy}"] = run_stage(run_dir, f"samples-{policy}", sample, run_sample)

    posts = {p.id: p for p in load_tldr(data_dir, run.eval_split)}
    table = {}
    for policy in policies:
        samples = load_samples(samples_dir / f"{policy}.jsonl")
        references = [posts[s.post_id].reference or "" for s in samples]
        texts = [s.text for s in samples]
        table[policy] = {**text_statistics(texts, [s.extra.get("eos") for s in samples]), **rouge_scores(texts, references),
                         "n": len(samples)}
    sft_summary = json.loads((run_dir / "sft" / "summary.json").read_text())
    summary = {
        "preset": preset_name,
        "sft": {k: sft_summary[k] for k in ("valid_loss_before", "valid_loss_after", "seconds_per_step", "steps")},
        "policies": table,
        "stage_seconds": {name: round(done["seconds"], 1) for name, done in stages.items()},
        "peak_memory_mib": max(done["peak_memory_mib"] for done in stages.values()),
    }
    write_json(run_dir / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return run_dir


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
