"""Judges: anything that compares two summaries of the same post and says how likely the first is better.

- `RewardModelJudge`: a reward model folder; P(a better) = σ(r_a − r_b) (the Bradley-Terry model the RM
  was trained with).
- `HumanLabelsJudge`: labels from an exported comparisons file in OpenAI's format (what `fromfeedback
  label` exports, and what OpenAI released): the share of labelers who preferred a; pairs nobody
  labeled get no verdict (None) and drop out of the win rate.
- `SimulatedLabelerJudge`: a judge RM's hard choice, flipped with probability p, like a noisy labeler.

On the command line a judge is one string: `rm:DIR` (or just `DIR`), `human:FILE`, `simulated:DIR`.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from fromfeedback.files import UserError


class Judge(Protocol):
    name: str

    def prefer(self, posts: Sequence, first: Sequence[str], second: Sequence[str]) -> list[float | None]:
        """P(first[i] is a better summary of posts[i] than second[i]) for each i; None: no verdict."""
        ...


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def post_key(post) -> str:
    """A post's id, or for a post without one (e.g. read off a labeling page), its text."""
    return getattr(post, "id", None) or f"{post.subreddit}\n{post.title}\n{post.post}"


class RewardModelJudge:
    """A reward model as judge. Scores are cached by (post, summary), so a baseline shared by many
    policies is scored once."""

    def __init__(self, model: str | Path, query_max_tokens: int = 0, response_max_tokens: int = 48, batch_size: int = 16, precision: str = "auto"):
        from fromfeedback.models import resolve_model
        from fromfeedback.sampling import query_budget

        self.model_dir = resolve_model(model)
        self.name = f"rm:{model}"
        self.query_max_tokens = query_budget(self.model_dir, query_max_tokens)
        self.response_max_tokens = response_max_tokens
        self.batch_size = batch_size
        self.precision = precision
        self._model = None
        self._tokenizer = None
        self._cache: dict[tuple[str, str], float] = {}

    def _load(self):
        if self._model is None:
            from fromfeedback.models import load_scalar_model, load_tokenizer
            from fromfeedback.runtime import default_device, inference_dtype

            self._tokenizer = load_tokenizer(self.model_dir)
            self._model = load_scalar_model(self.model_dir, inference_dtype(self.precision, default_device())).to(default_device()).eval()
        return self._model, self._tokenizer

    def score(self, posts: Sequence, texts: Sequence[str]) -> list[float]:
        """Reward of each (post, summary); posts need `subreddit`, `title`, `post` (and `id`, if they have one, keys the cache)."""
        from fromfeedback.reward import score_summaries

        todo = sorted({(post_key(p), t): (p, t) for p, t in zip(posts, texts) if (post_key(p), t) not in self._cache}.items())
        if todo:
            model, tokenizer = self._load()
            scores = score_summaries(
                model, tokenizer, [p for _, (p, _) in todo], [t for _, (_, t) in todo],
                self.query_max_tokens, self.response_max_tokens, self.batch_size, self.precision,  # type: ignore[arg-type]
            )
            self._cache.update(zip((key for key, _ in todo), scores))
        return [self._cache[(post_key(p), t)] for p, t in zip(posts, texts)]

    def score_queries(self, queries: Sequence[str], texts: Sequence[str]) -> list[float]:
        """Reward of each summary of an already formatted query (e.g. a CNN/DM `ARTICLE: ... TL;DR:`)."""
        from fromfeedback.data import QueryResponseBatch, encode_response
        from fromfeedback.reward import score_batch

        model, tokenizer = self._load()
        scores: list[float] = []
        for start in range(0, len(queries), self.batch_size):
            query_ids = [tokenizer.encode(q, add_special_tokens=False) for q in queries[start : start + self.batch_size]]
            response_ids = [encode_response(tokenizer, t, self.response_max_tokens) for t in texts[start : start + self.batch_size]]
            batch = QueryResponseBatch.from_ids(query_ids, response_ids, tokenizer.pad_token_id)
            scores.extend(score_batch(model, batch, self.precision).tolist())  # type: ignore[arg-type]
        return scores

    def prefer(self, posts: Sequence, first: Sequence[str], second: Sequence[str]) -> list[float | None]:
        first_scores = self.score(posts, first)
        second_scores = self.score(posts, second)
        return [sigmoid(a - b) for a, b in zip(first_scores, second_scores)]


def _normalize(text: str) -> str:
    return " ".join(text.split())


class HumanLabelsJudge:
    """Human labels from a comparisons file (OpenAI format, as exported by the labeling app).

    A pair is matched by post id and the two summary texts (whitespace-normalized, either order); with
    several labels the verdict is the share preferring the first summary.
    """

    def __init__(self, path: str | Path):
        from fromfeedback.data import load_comparisons

        self.name = f"human:{path}"
        self.votes: dict[tuple[str, str, str], list[int]] = defaultdict(list)
        comparisons = load_comparisons(path)
        if not comparisons:
            raise UserError(f"{path}: no comparisons to judge with")
        for c in comparisons:
            texts = [_normalize(s.text) for s in c.summaries]
            self.votes[(c.post_id, texts[0], texts[1])].append(1 if c.choice == 0 else 0)
            self.votes[(c.post_id, texts[1], texts[0])].append(1 if c.choice == 1 else 0)

    def prefer(self, posts: Sequence, first: Sequence[str], second: Sequence[str]) -> list[float | None]:
        verdicts: list[float | None] = []
        for post, a, b in zip(posts, first, second):
            votes = self.votes.get((post.id, _normalize(a), _normalize(b)))
            verdicts.append(sum(votes) / len(votes) if votes else None)
        return verdicts


class SimulatedLabelerJudge:
    """A noisy labeler: the judge RM's hard choice, flipped with probability `flip_prob`.

    Two such labelers agree with probability (1−p)² + p²; p = 0.16 gives the 72% labeler-labeler
    agreement measured on the real comparisons.
    """

    def __init__(self, judge: RewardModelJudge, flip_prob: float = 0.16, seed: int = 0):
        if not 0 <= flip_prob <= 1:
            raise UserError(f"flip probability must be in [0, 1], got {flip_prob}")
        self.judge = judge
        self.flip_prob = flip_prob
        self.rng = random.Random(seed)
        self.name = f"simulated:{judge.model_dir}@{flip_prob}"

    def prefer(self, posts: Sequence, first: Sequence[str], second: Sequence[str]) -> list[float | None]:
        verdicts: list[float | None] = []
        for p in self.judge.prefer(posts, first, second):
            choice = 1.0 if p is not None and p > 0.5 else 0.0 if p is not None and p < 0.5 else float(self.rng.random() < 0.5)
            verdicts.append(1.0 - choice if self.rng.random() < self.flip_prob else choice)
        return verdicts


def make_judge(spec: str, flip_prob: float = 0.16, batch_size: int = 16, seed: int = 0) -> Judge:
    """`rm:DIR` (or a bare model folder/name), `human:FILE`, or `simulated:DIR`."""
    kind, sep, target = spec.partition(":")
    if not sep or kind not in ("rm", "human", "simulated"):
        kind, target = "rm", spec
    if not target:
        raise UserError(f"judge {spec!r}: give rm:DIR, human:FILE or simulated:DIR")
    if kind == "human":
        return HumanLabelsJudge(target)
    judge = RewardModelJudge(target, batch_size=batch_size)
    return SimulatedLabelerJudge(judge, flip_prob, seed) if kind == "simulated" else judge
