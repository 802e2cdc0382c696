import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fromfeedback.files import UserError
from fromfeedback.pipeline import RunConfig, fingerprint, run_stage

ROOT = Path(__file__).resolve().parents[1]

TINY_PRESET = """
[run]
base_model = "tiny-random"
eval_limit = 4
best_of_n = [1, 2]
report_examples = 2

[sft]
max_steps = 3
batch_size = 4
micro_batch_size = 2
train_limit = 8
valid_limit = 4
query_max_tokens = 96
precision = "fp32"
checkpoint_every = 1

[rm]
max_steps = 2
batch_size = 4
micro_batch_size = 2
train_limit = 8
query_max_tokens = 96
bias_limit = 8
precision = "fp32"
freeze_embeddings = true
freeze_layers = 1

[ppo]
iterations = 2
rollout_batch_size = 4
minibatch_size = 4
micro_batch_size = 2
generation_batch_size = 4
ppo_epochs = 1
response_max_tokens = 8
precision = "fp32"
checkpoint_every = 1

[sample]
max_new_tokens = 8
batch_size = 4

[best_of_n]
max_new_tokens = 8
batch_size = 4

[eval]
batch_size = 4
"""


def test_run_stage_skips_finished_work_and_refuses_a_changed_config(tmp_path):
    calls = []
    first = run_stage(tmp_path, "demo", RunConfig(eval_limit=3), calls.append)
    again = run_stage(tmp_path, "demo", RunConfig(eval_limit=3), calls.append)
    assert len(calls) == 1 and first["fingerprint"] == again["fingerprint"] == fingerprint(RunConfig(eval_limit=3), tmp_path)
    # Paths inside the run directory count relative to it: a copied run directory resumes.
    assert fingerprint(RunConfig(data_dir=str(tmp_path / "x")), tmp_path) == fingerprint(RunConfig(data_dir=str(tmp_path.parent / "y" / "x")), tmp_path.parent / "y")
    with pytest.raises(UserError, match="another configuration"):
        run_stage(tmp_path, "demo", RunConfig(eval_limit=4), calls.append)


def _fromfeedback(*args: str) -> subprocess.Popen:
    env = {**os.environ, "FROMFEEDBACK_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fromfeedback.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_whole_loop_on_the_tiny_model_survives_a_kill_and_resumes(tmp_path, data_dir):
    preset = tmp_path / "tiny.toml"
    preset.write_text(TINY_PRESET)
    run_dir = tmp_path / "run"
    process = _fromfeedback("run", "--preset", str(preset), "--out", str(run_dir), "--data-dir", str(data_dir))
    deadline = time.time() + 300
    while not (run_dir / "rm" / "stage.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run_dir / "sft" / "stage.json").exists() and not (run_dir / "report.html").exists()

    resumed = _fromfeedback("run", "--resume", str(run_dir))
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    assert "[sft] already done" in output and "[rm] already done" in output
    assert (run_dir / "rm-frozen-layers.pt").exists()  # the judge trained from the proxy RM's frozen-layer states
    for stage in ("judge", "ppo", "samples-sft", "samples-ppo", "best-of-n", "eval-policies", "eval-overoptimization"):
        assert (run_dir / stage / "stage.json").exists(), stage
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reward_model"]["comparisons"] == 380
    assert 0.5 < summary["reward_model"]["longer_wins"]["accuracy"] < 0.7
    assert {"sft", "ppo", "best-of-2", "openai_ppo_1.3b"} <= set(summary["policies"])
    assert set(summary["stage_seconds"]) >= {"sft", "rm", "judge", "ppo", "eval-policies"}
    kls = {point["label"]: point["kl"] for point in summary["kl_points"]}
    assert kls["best-of-n/N=1"] == 0.0 and kls["best-of-n/N=2"] == pytest.approx(math.log(2) - 0.5) and "ppo/final" in kls
    assert summary["judge"]["accuracy"] is not None
    assert 0 <= summary["judged_against_sft"]["ppo"]["win_rate"] <= 1 and "best-of-2" in summary["judged_against_sft"]
    report = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in report and "openai_ppo_1.3b" in report


@pytest.mark.parametrize("preset", ["demo", "tldr-paper"])
def test_presets_build_and_validate_every_stage(preset, capsys):
    from fromfeedback.pipeline import run_pipeline

    run_pipeline(preset, "runs/never-written", dry_run=True)
    printed = capsys.readouterr().out
    assert "every stage" in printed and not Path("runs/never-written").exists()
    for stage in ("[sft]", "[rm]", "[judge]", "[ppo]", "[samples-ppo]", "[best-of-n]", "[eval-policies]", "[eval-overoptimization]"):
        assert stage in printed


def test_paper_preset_has_the_paper_settings():
    from fromfeedback.config import build_config
    from fromfeedback.ppo import PPOConfig
    from fromfeedback.sft import SFTConfig

    sft = build_config(SFTConfig, "tldr-paper", "sft")
    ppo = build_config(PPOConfig, "tldr-paper", "ppo")
    assert (sft.query_max_tokens, sft.response_max_tokens, sft.freeze_layers, sft.freeze_embeddings) == (512, 48, 0, False)
    assert (ppo.rollout_batch_size, ppo.kl_coef, ppo.value_model, ppo.temperature, ppo.freeze_layers) == (512, 0.05, "rm", 0.7, 0)
