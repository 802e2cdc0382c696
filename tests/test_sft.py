import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fromfeedback.config import build_config
from fromfeedback.sft import SFTConfig, run_sft

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(data_dir, out, **overrides) -> list[str]:
    values = {
        "model": "tiny-random", "data_dir": str(data_dir), "out": str(out), "train_limit": 8, "valid_split": "sft_train",
        "valid_limit": 8, "batch_size": 4, "micro_batch_size": 2, "max_steps": 12, "lr": 3e-3, "query_max_tokens": 96,
        "precision": "fp32", "checkpoint_every": 0, **overrides,
    }
    return [f"--{k}={v}" for k, v in values.items()]


def test_sft_lowers_the_loss_and_saves_a_plain_hf_folder(tmp_path, data_dir):
    config = build_config(SFTConfig, None, "sft", tiny_args(data_dir, tmp_path / "run"))
    model_dir = run_sft(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["valid_loss_after"] < summary["valid_loss_before"] - 0.5
    assert json.loads((model_dir / "fromfeedback.json").read_text())["query_max_tokens"] == 96
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.num_hidden_layers == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 13))
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_eos_loss_weight_scales_only_the_eos_tokens_loss(tiny_model_dir):
    from fromfeedback.data import QueryResponseBatch
    from fromfeedback.models import load_policy, load_tokenizer, response_logits
    from fromfeedback.ops import logprobs_from_logits
    from fromfeedback.sft import response_nll

    tokenizer, model = load_tokenizer(tiny_model_dir), load_policy(tiny_model_dir)
    eos = tokenizer.eos_token_id
    # Two responses: one ends with EOS, one was cut before it (no EOS to weight).
    batch = QueryResponseBatch.from_ids([[5, 6, 7], [8, 9]], [[11, 12, eos], [13, 14]], tokenizer.pad_token_id)
    with torch.no_grad():
        plain, count = response_nll(model, batch, "fp32")
        weighted, weighted_count = response_nll(model, batch, "fp32", eos, 4.0)
        logits = response_logits(model, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
        eos_logprob = logprobs_from_logits(logits, batch.response_ids)[0, 2]
        unchanged = response_nll(model, batch, "fp32", eos, 1.0)[0]
    assert count == weighted_count == 5
    assert float(weighted) == pytest.approx(float(plain) - 3 * float(eos_logprob), rel=1e-5)
    assert float(unchanged) == pytest.approx(float(plain))


def test_repetition_unlikelihood_matches_a_hand_computation():
    from fromfeedback.sft import repetition_unlikelihood

    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    a, b, c = 1, 2, 3
    ids = torch.tensor([[a, b, a, c]])
    p = torch.softmax(logits, dim=-1)[0]
    # t=1 (target b): a; t=2 (target a): b; t=3 (target c): a and b, the repeated a counted once.
    terms = [p[1, a], p[2, b], p[3, a], p[3, b]]
    expected = -sum(torch.log(1 - q) for q in terms)
    log_probs = torch.log_softmax(logits, dim=-1)
    assert float(repetition_unlikelihood(log_probs, ids, torch.ones(1, 4))) == pytest.approx(float(expected), rel=1e-5)
    # A padded last position contributes nothing (and is no candidate).
    assert float(repetition_unlikelihood(log_probs, ids, torch.tensor([[1, 1, 1, 0]]))) == pytest.approx(float(-sum(torch.log(1 - q) for q in terms[:2])), rel=1e-5)


def test_frozen_layers_do_not_change(tmp_path, data_dir, tiny_model_dir):
    config = build_config(SFTConfig, None, "sft", tiny_args(data_dir, tmp_path / "run", max_steps=2, freeze_layers=1, freeze_embeddings=True))
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run_sft(config) / "model.safetensors")
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "FROMFEEDBACK_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fromfeedback.cli", "sft", *args], env=env, cwd=ROOT, **kwargs)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, data_dir):
    steps = 24
    killed = tmp_path / "killed"
    process = _cli(tiny_args(data_dir, killed, max_steps=steps, checkpoint_every=2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("step-*/state.pt")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    resumed = _cli(tiny_args(data_dir, killed, max_steps=steps, checkpoint_every=2), stdout=subprocess.PIPE, text=True)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming from" in output
    assert json.loads((killed / "summary.json").read_text())["resumed_at_step"] > 0

    straight = tmp_path / "straight"
    run_sft(build_config(SFTConfig, None, "sft", tiny_args(data_dir, straight, max_steps=steps, checkpoint_every=2)))
    a, b = load_file(killed / "model" / "model.safetensors"), load_file(straight / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train_loss" in r] == list(range(1, steps + 1)), "no step logged twice or lost"


def test_two_processes_under_accelerate_match_one(tmp_path, data_dir):
    """Two CPU processes under `accelerate launch` (torchrun + gloo) run the same code; global-batch loss
    normalization makes them take the same steps as one process."""
    args = tiny_args(data_dir, tmp_path / "ddp", max_steps=3)
    env = {**os.environ, "FROMFEEDBACK_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fromfeedback.cli", "sft", *args]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["processes"] == 2
    single = tmp_path / "single"
    run_sft(build_config(SFTConfig, None, "sft", tiny_args(data_dir, single, max_steps=3)))
    a, b = load_file(tmp_path / "ddp" / "model" / "model.safetensors"), load_file(single / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.smoke
def test_smoke_real_model_sft_then_sample(tmp_path, data_dir):
    from fromfeedback.data import load_samples
    from fromfeedback.sampling import SampleConfig, run_sample

    args = tiny_args(data_dir, tmp_path / "sft", model="smollm2-135m", max_steps=2, lr=2e-5, train_limit=4, valid_limit=2,
                     batch_size=2, micro_batch_size=2, freeze_layers=26, freeze_embeddings=True, precision="auto", query_max_tokens=128)
    model_dir = run_sft(build_config(SFTConfig, None, "sft", args))
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["valid_loss_before"] < 6 and summary["steps"] == 2
    run_sample(SampleConfig(model=str(model_dir), data_dir=str(data_dir), split="test", limit=3, out=str(tmp_path / "s.jsonl"), max_new_tokens=16))
    samples = load_samples(tmp_path / "s.jsonl")
    assert len(samples) == 3 and all(s.text for s in samples) and samples[0].policy == "model"
