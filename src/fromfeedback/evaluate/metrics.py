"""The paper's measurements of a policy: win rate with its interval, length-controlled win rate, ROUGE,
length, EOS rate, repetition and KL to the SFT policy.

Every function takes plain lists, so the same code serves model judges, human labels and tests.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from fromfeedback.sampling import repeated_ngram
from fromfeedback.stats import wilson_interval


def word_count(text: str) -> int:
    return len(text.split())


def win_rate(preferences: Sequence[float]) -> dict[str, float]:
    """Mean preference for the policy (each value P(policy better) in [0, 1], or a 0/1 label) with a
    95% Wilson interval; 0.5 counts as a tie."""
    n = len(preferences)
    if n == 0:
        return {"n": 0, "win_rate": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    total = float(sum(preferences))
    low, high = wilson_interval(total, n)
    return {"n": n, "win_rate": total / n, "ci_low": low, "ci_high": high}


def fit_logistic(features: np.ndarray, targets: np.ndarray, l2: float = 1e-4, steps: int = 50) -> np.ndarray:
    """Weights of a logistic regression (no implicit intercept) fitted by Newton's method.

    `targets` may be soft (probabilities): the loss is the cross-entropy either way. The small L2 term
    keeps the fit finite when the outcomes are separable (a policy that always wins).
    """
    features = np.asarray(features, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    weights = np.zeros(features.shape[1])
    for _ in range(steps):
        probs = 1.0 / (1.0 + np.exp(-(features @ weights)))
        gradient = features.T @ (probs - targets) + l2 * weights
        hessian = (features * (probs * (1 - probs))[:, None]).T @ features + l2 * np.eye(len(weights))
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-10:
            break
    return weights


def length_controlled_win_rates(
    policies: Sequence[str], preferences: Sequence[float], policy_words: Sequence[int], baseline_words: Sequence[int]
) -> tuple[dict[str, float], float]:
    """The paper's length control: regress the preference on a per-policy indicator and the log ratio
    of the policy summary's length to the baseline's (one slope shared by all policies), then read
    each policy's predicted preference at ratio 1 (log ratio 0). Returns ({policy: rate}, slope)."""
    names = sorted(set(policies))
    column = {name: i for i, name in enumerate(names)}
    features = np.zeros((len(policies), len(names) + 1))
    for row, (name, mine, theirs) in enumerate(zip(policies, policy_words, baseline_words)):
        features[row, column[name]] = 1.0
        features[row, -1] = math.log(max(mine, 1) / max(theirs, 1))
    weights = fit_logistic(features, np.asarray(preferences, dtype=np.float64))
    rates = {name: float(1.0 / (1.0 + math.exp(-weights[column[name]]))) for name in names}
    return rates, float(weights[-1])


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (Porter stemming, as in the paper's tables) against the references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references):
        for key, score in scorer.score(reference, prediction).items():
            totals[key] += score.fmeasure
    n = max(len(predictions), 1)
    return {key: value / n for key, value in totals.items()}


def text_statistics(texts: Sequence[str], eos: Sequence[bool | None]) -> dict[str, float | None]:
    """Mean length in words, EOS rate (None when no sample records `eos`), share with a repeated 4-gram, and
    share of summaries written word for word for another post too (a policy that found one summary the reward
    model likes whatever the post, e.g. "I'm not sure what to do", shows here first)."""
    known = [bool(e) for e in eos if e is not None]
    normalized = [" ".join(t.lower().split()) for t in texts]
    counts = Counter(normalized)
    return {
        "mean_words": sum(map(word_count, texts)) / max(len(texts), 1),
        "eos_rate": sum(known) / len(known) if known else None,
        "repeated_4gram": sum(repeated_ngram(t, 4) for t in texts) / max(len(texts), 1),
        "duplicate_rate": sum(counts[t] > 1 for t in normalized) / max(len(texts), 1),
    }


@torch.no_grad()
def sequence_logprobs(
    model, tokenizer, queries: Sequence[list[int]], responses: Sequence[list[int]], batch_size: int = 8, precision: str = "auto", temperature: float = 1.0
) -> list[float]:
    """Sum of log π(response token | query, earlier tokens) for each (query, response) of token ids, under
    softmax(logits / temperature)."""
    from fromfeedback.data import QueryResponseBatch
    from fromfeedback.models import response_logits
    from fromfeedback.ops import logprobs_from_logits, masked_sum
    from fromfeedback.runtime import autocast

    device = next(model.parameters()).device
    totals: list[float] = []
    for start in range(0, len(queries), batch_size):
        batch = QueryResponseBatch.from_ids(queries[start : start + batch_size], responses[start : start + batch_size], tokenizer.pad_token_id).to(device)
        with autocast(precision, device):
            logits = response_logits(model, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
        token_logprobs = logprobs_from_logits(logits.float() / temperature, batch.response_ids)
        totals.extend(masked_sum(token_logprobs, batch.response_mask.float(), dim=-1).tolist())
    return totals
