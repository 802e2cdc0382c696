"""Best-of-N: the analytic KL, picking the best sample per post, and the stage end to end on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from fromfeedback.best_of_n import BestOfNConfig, best_of_n_kl, pick_best, run_best_of_n
from fromfeedback.data import load_samples
from fromfeedback.files import UserError


def test_analytic_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)


def test_pick_best_per_group():
    scores = torch.tensor([0.1, 0.9, 0.3, -1.0, -2.0, -0.5, 2.0, 2.0, 0.0])
    assert pick_best(scores, 3).tolist() == [1, 5, 6]
    assert pick_best(scores, 1).tolist() == list(range(9))


def test_n_must_be_positive():
    with pytest.raises(UserError, match="n must be"):
        BestOfNConfig(n=0).validate()


def test_keeps_the_highest_scoring_of_n_samples(data_dir, tmp_path):
    seen: list[torch.Tensor] = []

    def mean_token_id(batch):
        # A known function of the tokens, with distinct values for distinct samples.
        mask = batch.response_mask.float()
        scores = (batch.response_ids.float() * mask).sum(-1) / mask.sum(-1) / 1000
        seen.append(scores)
        return scores

    out = tmp_path / "best.jsonl"
    config = BestOfNConfig(
        policy="tiny-random", n=4, data_dir=str(data_dir), split="test", limit=3, out=str(out), max_new_tokens=6,
        query_max_tokens=128, batch_size=8, penalize_no_eos=False, precision="fp32",
    )
    run_best_of_n(config, reward_fn=mean_token_id)
    samples = load_samples(out)
    assert len(samples) == 3 and len({s.post_id for s in samples}) == 3
    all_scores = torch.cat(seen).view(3, 4)
    assert [s.extra["score"] for s in samples] == pytest.approx(all_scores.max(-1).values.tolist())
    assert all_scores.std(-1).min() > 0  # the N samples differ, so picking the best matters
    assert all(s.extra["kl"] == pytest.approx(best_of_n_kl(4)) and s.policy == "best-of-4" for s in samples)
    assert (tmp_path / "best.summary.json").exists()


def test_smaller_n_are_the_best_of_the_first_k_samples(data_dir, tmp_path):
    seen: list[torch.Tensor] = []

    def mean_token_id(batch):
        mask = batch.response_mask.float()
        seen.append((batch.response_ids.float() * mask).sum(-1) / mask.sum(-1) / 1000)
        return seen[-1]

    config = BestOfNConfig(
        policy="tiny-random", n=4, also_n=[1, 2], data_dir=str(data_dir), split="test", limit=3, out=str(tmp_path / "best-of-{n}.jsonl"),
        max_new_tokens=6, query_max_tokens=128, batch_size=8, penalize_no_eos=False, precision="fp32",
    )
    assert run_best_of_n(config, reward_fn=mean_token_id) == tmp_path / "best-of-4.jsonl"
    all_scores = torch.cat(seen).view(3, 4)
    for k in (1, 2, 4):
        samples = load_samples(tmp_path / f"best-of-{k}.jsonl")
        assert [s.extra["score"] for s in samples] == pytest.approx(all_scores[:, :k].max(-1).values.tolist())
        assert all(s.policy == f"best-of-{k}" and s.extra["kl"] == pytest.approx(best_of_n_kl(k)) for s in samples)
    with pytest.raises(UserError, match="placeholder"):
        BestOfNConfig(n=4, also_n=[2], out="best.jsonl").validate()
    with pytest.raises(UserError, match="also_n"):
        BestOfNConfig(n=4, also_n=[8], out="best-{n}.jsonl").validate()
