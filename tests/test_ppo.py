"""PPO: the advantage and reward arithmetic by hand, a toy task PPO must learn, and resume determinism."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fromfeedback import ppo
from fromfeedback.files import UserError
from fromfeedback.models import transformer_layers
from fromfeedback.ops import masked_whiten
from fromfeedback.ppo import KLController, PPOConfig, gae, penalize_no_eos, policy_loss, run_ppo, sequence_kl, shaped_rewards, value_loss


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, tiny models run many times faster without thread sync."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0]])  # 9.0 sits on padding and must be ignored
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # t=2: δ = 3 − 1.5 = 1.5; t=1: δ = 2 + 1.5 − 1 = 2.5, A = 2.5 + 0.5·1.5; t=0: δ = 1 + 1 − 0.5, A = 1.5 + 0.5·3.25
    assert torch.allclose(advantages, torch.tensor([[3.125, 3.25, 1.5, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[3.625, 4.25, 3.0, 0.0]]))
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=1: δ = 2 + 0.9·1.5 − 1 = 2.35, A = 2.35 + 0.45·1.5; t=0: δ = 1 + 0.9·1 − 0.5 = 1.4, A = 1.4 + 0.45·3.025
    assert torch.allclose(advantages, torch.tensor([[2.76125, 3.025, 1.5, 0.0]]))


def test_gae_with_lambda_one_is_return_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 2.0], [0.5, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.3, 0.1, -0.4, 0.7], [1.0, 2.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = torch.tensor([[2.2, 2.1, 2.3, 2.0], [1.5, 1.0, 0.0, 0.0]])
    assert torch.allclose(returns, reward_to_go)
    assert torch.allclose(advantages, (reward_to_go - values) * mask)


def test_reward_shaping_and_no_eos_penalty_on_a_hand_made_batch():
    raw_scores = torch.tensor([2.0, 0.5, -0.3])
    ended = torch.tensor([True, False, True])
    scores = penalize_no_eos(raw_scores, ended, -1.0)
    assert scores.tolist() == [2.0, -1.0, pytest.approx(-0.3)]
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0], [-0.2, 0.0, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -3.0], [-0.4, -7.0, -7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0]])
    rewards, kl = shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    expected_kl = torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 2.0], [0.2, 0.0, 0.0]])
    assert torch.allclose(kl, expected_kl)
    expected = -0.1 * expected_kl
    expected[0, 2] += 2.0  # the score lands on the last response token: the EOS
    expected[1, 2] += -1.0  # no EOS: the penalty replaces the score
    expected[2, 0] += -0.3  # a one-token response, padding after it untouched
    assert torch.allclose(rewards, expected)


def test_masked_whitening_uses_only_real_tokens():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    whitened = masked_whiten(values, mask)
    real = whitened[mask.bool()]
    assert real.mean().abs() < 1e-6
    assert torch.allclose(real.var(), torch.tensor(1.0), atol=1e-4)
    assert (whitened[~mask.bool()] == 0).all()
    assert torch.allclose(masked_whiten(values.masked_fill(~mask.bool(), 1e6), mask), whitened)
    assert torch.allclose(real, (torch.tensor([1.0, 2, 3, 4, 5]) - 3) / torch.tensor([1.0, 2, 3, 4, 5]).std())


def test_kl_estimators_on_known_tokens():
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]])
    ref_logprobs = torch.tensor([[math.log(0.25), math.log(0.25), -5.0]])
    mask = torch.tensor([[1, 1, 0]])
    kl, k3 = sequence_kl(logprobs, ref_logprobs, mask)
    assert kl.item() == pytest.approx(math.log(2))
    # k3 with r = π_ref/π = 0.5 on the first token, 1 on the second
    assert k3.item() == pytest.approx(0.5 - 1 - math.log(0.5))


def test_kl_k3_estimator_is_unbiased():
    torch.manual_seed(0)
    p, q = torch.softmax(torch.randn(20), 0), torch.softmax(torch.randn(20), 0)
    tokens = torch.multinomial(p, 20000, replacement=True)
    _, k3 = sequence_kl(p.log()[tokens][:, None], q.log()[tokens][:, None], torch.ones(20000, 1))
    assert k3.mean().item() == pytest.approx(float((p * (p / q).log()).sum()), rel=0.05)


def test_clipped_losses():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))
    advantages = torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2)
    loss, clip_fraction, approx_kl = policy_loss(new, old, advantages, mask, clip_range=0.2, normalizer=2.0)
    # Positive advantage: the gain of a ratio above 1.2 is clipped; a ratio below 0.8 is not (pessimistic bound).
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2)
    assert clip_fraction.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2))
    loss, vf_clip = value_loss(torch.tensor([[1.0, 0.1]]), torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]), mask, clip_range=0.2, normalizer=2.0)
    # Token 1: v = 1 clipped to 0.2, errors 1 and 0.04 → 1. Token 2: v = 0.1, errors 0.81 (0.1 not clipped).
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.81) / 2)
    assert vf_clip.item() == pytest.approx(0.0)


def test_leave_one_out_baseline_on_a_hand_made_batch():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # Groups of 2: each score minus the other one of its pair.
    assert ppo.leave_one_out(scores, 2).tolist() == [-1.0, 1.0, -3.0, 3.0]
    # One group of 4: 1 − (2 + 3 + 6)/3, 2 − (1 + 3 + 6)/3, ...; the centred scores sum to 0.
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3])
    assert torch.allclose(ppo.leave_one_out(scores, 4), expected)
    assert ppo.leave_one_out(scores, 4).sum().item() == pytest.approx(0.0, abs=1e-6)


def test_learning_rate_warms_up_then_anneals():
    config = PPOConfig(lr=3e-4, warmup_iterations=2, iterations=6)
    assert [ppo.iteration_lr(config, i) for i in range(4)] == pytest.approx([1e-4, 2e-4, 3e-4, 3e-4])
    config.lr_anneal = True
    assert [ppo.iteration_lr(config, i) for i in (0, 3)] == pytest.approx([1e-4 * (1 - 0 / 6), 3e-4 * (1 - 3 / 6)])


def test_adaptive_kl_controller_moves_beta_towards_target():
    fixed = KLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    adaptive = KLController(0.05, adaptive=True, target=6.0, horizon=1000)
    adaptive.update(60.0, 100)  # far above target: error clipped at +0.2
    assert adaptive.value == pytest.approx(0.05 * (1 + 0.2 * 100 / 1000))
    adaptive.update(3.0, 100)  # half the target: error −0.5 clipped at −0.2
    assert adaptive.value == pytest.approx(0.05 * 1.02 * 0.98)


def test_prompt_order_covers_every_prompt_once_per_pass():
    indices = [i for it in range(5) for i in ppo.prompt_indices(it, 4, 10, seed=3)]
    assert sorted(indices[:10]) == list(range(10))
    assert sorted(indices[10:20]) == list(range(10))
    assert ppo.prompt_indices(2, 4, 10, seed=3) == indices[8:12]


def test_config_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="multiple"):
        PPOConfig(rollout_batch_size=10, minibatch_size=4).validate()
    with pytest.raises(UserError, match="value_model"):
        PPOConfig(value_model="big").validate()
    with pytest.raises(UserError, match="samples_per_prompt"):
        PPOConfig(rollout_batch_size=64, samples_per_prompt=3).validate()
    with pytest.raises(UserError, match="at least 2"):
        PPOConfig(score_baseline="leave_one_out").validate()
    with pytest.raises(UserError, match="micro_batch_size"):
        PPOConfig(rollout_batch_size=48, samples_per_prompt=3, minibatch_size=24, micro_batch_size=8).validate()
    with pytest.raises(UserError, match="--sft"):
        run_ppo(PPOConfig(out=str(tmp_path / "ppo")))


def test_shared_lower_layers_give_the_same_logits_and_values(tiny_model_dir):
    """Running the frozen lower layers once and the rest from their output changes no number."""
    from fromfeedback.data import QueryResponseBatch
    from fromfeedback.models import load_policy

    torch.manual_seed(0)
    policy, reference = load_policy(tiny_model_dir), load_policy(tiny_model_dir)
    critic = ppo.ValueHead(policy.config.hidden_size)
    batch = QueryResponseBatch.from_ids([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14]], pad_id=0)
    shared = PPOConfig(freeze_layers=1, freeze_embeddings=True, micro_batch_size=2, precision="fp32")
    full = ppo.forward_rollouts(policy, critic, reference, batch, PPOConfig(micro_batch_size=2, precision="fp32"))
    cached = ppo.forward_rollouts(policy, critic, reference, batch, shared)
    hidden_size = policy.config.hidden_size
    assert full["lower_query"] is None and cached["lower_query"].shape == (2, 4, hidden_size) and cached["lower_response"].shape == (2, 3, hidden_size)
    for key in ("logprobs", "ref_logprobs", "values", "entropy"):
        assert torch.allclose(full[key], cached[key], atol=1e-5), key
    lower = (cached["lower_query"], cached["lower_response"])
    logits, values = ppo.policy_and_values(policy, critic, batch, 0.7, 1, lower, start=1)
    expected_logits, expected_values = ppo.policy_and_values(policy, critic, batch, 0.7)
    assert torch.allclose(logits, expected_logits, atol=1e-5) and torch.allclose(values, expected_values, atol=1e-5)
    assert len(transformer_layers(policy)) == policy.config.num_hidden_layers == 2  # restored after the call


@pytest.mark.parametrize("value_model", ["head", "rm"])
def test_a_prompt_run_once_for_its_responses_gives_the_joined_numbers(tiny_model_dir, value_model):
    """Two prompts × 3 responses: running each prompt once for its responses (one row with a tree mask) gives
    the logits, values and reference logits of the 6 joined rows, and the same gradients."""
    from fromfeedback.data import QueryResponseBatch
    from fromfeedback.models import load_policy, load_scalar_model, response_logits

    torch.manual_seed(0)
    policy, reference = load_policy(tiny_model_dir), load_policy(tiny_model_dir)
    critic = ppo.ValueHead(policy.config.hidden_size) if value_model == "head" else load_scalar_model(tiny_model_dir)
    if value_model == "head":
        torch.nn.init.normal_(critic.linear.weight)
    queries = [[5, 6, 7, 8]] * 3 + [[9, 10]] * 3
    responses = [[11, 12, 13], [14], [15, 16], [17, 18], [19, 20, 21, 22], [23]]
    batch = QueryResponseBatch.from_ids(queries, responses, pad_id=0)
    grouped_logits, grouped_values = ppo.policy_and_values(policy, critic, batch, 0.7, group_size=3)
    joined_logits, joined_values = ppo.policy_and_values(policy, critic, batch, 0.7, group_size=1)
    mask = batch.response_mask.bool()
    assert grouped_logits.shape == (6, 4, policy.config.vocab_size) and grouped_values.shape == (6, 4)
    assert torch.allclose(grouped_logits[mask], joined_logits[mask], atol=1e-5)
    assert torch.allclose(grouped_values[mask], joined_values[mask], atol=1e-5)
    plain = response_logits(reference, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
    assert torch.allclose(ppo.reference_logits(reference, batch, group_size=3)[mask], plain[mask], atol=1e-5)
    weight = transformer_layers(policy)[0].self_attn.k_proj.weight  # reaches the responses only through the query's keys
    (grouped_grad,) = torch.autograd.grad((grouped_logits[mask].logsumexp(-1).sum() + grouped_values[mask].sum()), weight)
    (joined_grad,) = torch.autograd.grad((joined_logits[mask].logsumexp(-1).sum() + joined_values[mask].sum()), weight)
    assert torch.allclose(grouped_grad, joined_grad, atol=1e-5) and joined_grad.abs().sum() > 0


@pytest.fixture(scope="module")
def eos_prone_model(tmp_path_factory):
    """The tiny random model with one embedding dimension made constant and the EOS row large along it,
    so EOS gets a context-independent logit: about half the 12-token samples end with EOS."""
    from fromfeedback.models import load_policy, load_tokenizer

    folder = tmp_path_factory.mktemp("eos-prone") / "model"
    tokenizer, model = load_tokenizer("tiny-random"), load_policy("tiny-random")
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[:, 0] = 0.1
        embeddings[tokenizer.eos_token_id, 0] = 2.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_ppo_learns_a_toy_reward_with_bounded_kl(eos_prone_model, data_dir, tmp_path, one_thread):
    """Reward = −length/12 (shorter is better) and −1 without EOS: PPO must learn to end early."""

    def shorter_is_better(batch):
        return -batch.response_mask.sum(-1).float() / 12

    config = PPOConfig(
        sft=str(eos_prone_model), out=str(tmp_path / "ppo"), data_dir=str(data_dir), iterations=5, rollout_batch_size=16,
        minibatch_size=8, micro_batch_size=8, generation_batch_size=16, response_max_tokens=12, query_max_tokens=128,
        lr=3e-3, freeze_embeddings=True, checkpoint_every=0, precision="fp32", log_samples=2,
    )
    model_dir = run_ppo(config, reward_fn=shorter_is_better)
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    first, last = rows[0], rows[-1]
    assert first["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollouts come from the SFT policy itself
    assert last["score"] > first["score"] + 0.25
    assert last["eos_rate"] > first["eos_rate"]
    assert last["response_length"] < first["response_length"]
    assert all(0 <= r["kl"] < 10 and r["kl_k3"] >= 0 for r in rows)
    for key in ("entropy", "policy_loss", "value_loss", "clip_fraction", "approx_kl", "seconds_generate", "seconds_score", "seconds_update"):
        assert math.isfinite(first[key])
    samples = (tmp_path / "ppo" / "samples" / "iter-000005.jsonl").read_text().splitlines()
    assert len(samples) == 2 and "score" in json.loads(samples[0])
    summary = json.loads((tmp_path / "ppo" / "summary.json").read_text())
    assert summary["final_score"] == pytest.approx(last["score"])
    assert (model_dir / "config.json").exists()
    assert json.loads((model_dir / "fromfeedback.json").read_text())["query_max_tokens"] == 128


class Interrupted(Exception):
    pass


def test_killed_run_resumes_to_the_same_metrics(data_dir, tmp_path, monkeypatch, one_thread):
    """A run stopped during iteration 3 (after the checkpoint at 2) and resumed matches an uninterrupted run.
    It also exercises the reward-model path, the value model initialized from the RM, PPO-ptx and the shared
    frozen lower layers."""
    from fromfeedback.cli import main

    args = [
        "--sft", "tiny-random", "--rm", "tiny-random", "--value-model", "rm", "--data-dir", str(data_dir),
        "--iterations", "4", "--rollout-batch-size", "8", "--minibatch-size", "4", "--micro-batch-size", "4",
        "--generation-batch-size", "8", "--response-max-tokens", "6", "--query-max-tokens", "128", "--ppo-epochs", "2",
        "--lr", "1e-3", "--ptx-coef", "0.1", "--ptx-batch-size", "2", "--adaptive-kl", "true", "--kl-horizon", "100",
        "--checkpoint-every", "2", "--precision", "fp32", "--penalize-no-eos", "false", "--freeze-embeddings", "true", "--freeze-layers", "1",
        "--samples-per-prompt", "2", "--score-baseline", "leave_one_out", "--warmup-iterations", "1",
    ]
    main(["ppo", *args, "--out", str(tmp_path / "straight")])

    real_update = ppo.ppo_update

    def update_then_die(*a, iteration, **kw):
        if iteration == 2:
            raise Interrupted
        return real_update(*a, iteration=iteration, **kw)

    monkeypatch.setattr(ppo, "ppo_update", update_then_die)
    with pytest.raises(Interrupted):
        main(["ppo", *args, "--out", str(tmp_path / "killed")])
    assert (tmp_path / "killed" / "checkpoints" / "step-0000002").exists()
    assert not (tmp_path / "killed" / "summary.json").exists()
    monkeypatch.setattr(ppo, "ppo_update", real_update)
    main(["ppo", *args, "--out", str(tmp_path / "killed")])

    def metrics(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("seconds") and k != "peak_memory_mib"} for r in rows]

    straight, resumed = metrics("straight"), metrics("killed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert straight[-1]["kl_coef"] != 0.05  # the adaptive β moved, so its restore is tested
    assert "ptx_loss" in straight[-1]
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["resumed_at_iteration"] == 2
    from safetensors.torch import load_file

    straight_weights = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed_weights = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    for name, tensor in straight_weights.items():
        assert torch.allclose(tensor, resumed_weights[name], atol=1e-6), name
