import math

import numpy as np
import pytest
import torch

from fromfeedback.evaluate import metrics
from fromfeedback.stats import wilson_interval


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_win_rate_and_wilson_interval_match_hand_values():
    result = metrics.win_rate([1.0] * 70 + [0.0] * 30)
    assert result["n"] == 100 and result["win_rate"] == pytest.approx(0.7)
    # Wilson 95% interval for 70/100, computed by hand: center 0.6960, half-width 0.0884.
    assert result["ci_low"] == pytest.approx(0.6041, abs=1e-3)
    assert result["ci_high"] == pytest.approx(0.7810, abs=1e-3)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0) and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert math.isnan(metrics.win_rate([])["win_rate"])


def test_win_rate_interval_covers_the_true_rate_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(400):
        outcomes = (rng.random(200) < 0.62).astype(float)
        result = metrics.win_rate(outcomes.tolist())
        covered += result["ci_low"] <= 0.62 <= result["ci_high"]
    assert 0.92 <= covered / 400 <= 0.98


def test_soft_preferences_average():
    assert metrics.win_rate([0.9, 0.6, 0.3])["win_rate"] == pytest.approx(0.6)


def test_fit_logistic_recovers_known_weights():
    rng = np.random.default_rng(1)
    x = rng.normal(size=20000)
    features = np.stack([np.ones_like(x), x], axis=1)
    labels = (rng.random(20000) < sigmoid(0.5 + 2.0 * x)).astype(float)
    weights = metrics.fit_logistic(features, labels)
    assert weights == pytest.approx([0.5, 2.0], abs=0.1)


def synthetic_pairs(rng, n, edge, length_effect, mean_log_ratio):
    """Pairs where the judge's preference is σ(edge + length_effect · log length ratio)."""
    baseline_words = rng.integers(15, 40, size=n)
    log_ratio = rng.normal(mean_log_ratio, 0.35, size=n)
    policy_words = np.maximum(1, np.round(baseline_words * np.exp(log_ratio))).astype(int)
    true_log_ratio = np.log(policy_words / baseline_words)
    preferences = (rng.random(n) < sigmoid(edge + length_effect * true_log_ratio)).astype(float)
    return policy_words.tolist(), baseline_words.tolist(), preferences.tolist()


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    rng = np.random.default_rng(2)
    # "long": only longer, no better (the judge likes length); "good": better at equal length, and longer too.
    long_words, long_base, long_pref = synthetic_pairs(rng, 3000, edge=0.0, length_effect=3.0, mean_log_ratio=0.4)
    good_words, good_base, good_pref = synthetic_pairs(rng, 3000, edge=1.0, length_effect=3.0, mean_log_ratio=0.4)
    assert metrics.win_rate(long_pref)["win_rate"] > 0.7  # raw win rate: inflated by length
    rates, slope = metrics.length_controlled_win_rates(
        ["long"] * 3000 + ["good"] * 3000, long_pref + good_pref, long_words + good_words, long_base + good_base
    )
    assert rates["long"] == pytest.approx(0.5, abs=0.04)
    assert rates["good"] == pytest.approx(sigmoid(1.0), abs=0.04)
    assert slope == pytest.approx(3.0, abs=0.3)


def test_length_controlled_rate_stays_finite_when_the_policy_always_wins():
    rates, _ = metrics.length_controlled_win_rates(["p"] * 20, [1.0] * 20, list(range(10, 30)), [20] * 20)
    assert 0.9 < rates["p"] <= 1.0


def test_rouge_on_a_hand_example():
    scores = metrics.rouge_scores(["the cat sat"], ["the cat sat on the mat"])
    # unigrams: precision 3/3, recall 3/6; bigrams: 2/2 and 2/5; the LCS is the 3 unigrams.
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(2 * 1 * 0.4 / 1.4)
    assert scores["rougeL"] == pytest.approx(2 / 3)
    assert metrics.rouge_scores(["Cats sitting"], ["cat sits"])["rouge1"] == pytest.approx(1.0)  # Porter stemming


def test_text_statistics():
    stats = metrics.text_statistics(["a b c d a b c d", "one two three", "x"], [True, False, None])
    assert stats["mean_words"] == pytest.approx(4.0)
    assert stats["eos_rate"] == pytest.approx(0.5)  # the unknown one is left out
    assert stats["repeated_4gram"] == pytest.approx(1 / 3)
    assert metrics.text_statistics(["a"], [None])["eos_rate"] is None
    assert stats["duplicate_rate"] == 0.0
    same = metrics.text_statistics(["I'm not sure what to do", "i'm  not sure what to do ", "my landlord kept the deposit", "x"], [True] * 4)
    assert same["duplicate_rate"] == pytest.approx(0.5)  # case and spacing ignored


def test_sequence_logprobs_match_a_full_forward_pass():
    from fromfeedback.models import load_policy, load_tokenizer

    tokenizer = load_tokenizer("tiny-random")
    model = load_policy("tiny-random").eval()
    queries = [tokenizer.encode("TITLE: a post\n\nTL;DR:"), tokenizer.encode("short one TL;DR:")]
    responses = [tokenizer.encode(" a summary") + [tokenizer.eos_token_id], tokenizer.encode(" x")]
    totals = metrics.sequence_logprobs(model, tokenizer, queries, responses, batch_size=2, precision="fp32")
    for query, response, total in zip(queries, responses, totals):
        ids = torch.tensor([query + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(query) - 1 : -1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum()
        assert total == pytest.approx(float(expected), abs=1e-3)
