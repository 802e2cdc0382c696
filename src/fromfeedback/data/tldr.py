"""The Reddit TL;DR data: posts with references, OpenAI-format human comparisons, and samples files."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any

from fromfeedback.data.schema import check, field
from fromfeedback.files import UserError, read_jsonl, write_jsonl

SPLITS = ("sft_train", "sft_valid", "test", "rm_train", "rm_valid")


@dataclass
class Post:
    id: str
    subreddit: str
    title: str
    post: str
    reference: str | None
    split: str
    samples: dict[str, str] = dc_field(default_factory=dict)
    """Other summaries of this post by policy name (e.g. `openai_ppo_1.3b`)."""


@dataclass
class Summary:
    text: str
    policy: str
    note: str | None = None


@dataclass
class Comparison:
    """One human judgement between two summaries of one post (OpenAI's released format)."""

    post_id: str
    subreddit: str
    title: str
    post: str
    summaries: list[Summary]
    choice: int
    """Index (0 or 1) of the summary the labeler preferred."""
    worker: str | None = None
    batch: str | None = None
    confidence: int | None = None
    """1–9: 1 = very sure summary 0 is better, 9 = very sure summary 1 is better."""

    @property
    def chosen(self) -> str:
        return self.summaries[self.choice].text

    @property
    def rejected(self) -> str:
        return self.summaries[1 - self.choice].text


@dataclass
class Ranking:
    """K responses to one post ordered by one labeler (InstructGPT's format)."""

    post_id: str
    subreddit: str
    title: str
    post: str
    responses: list[str]
    ranking: list[int]
    """Indices into `responses`, best first: a permutation of 0..K-1."""
    worker: str | None = None

    def pairs(self) -> list[tuple[int, int]]:
        """All C(K, 2) (better, worse) response-index pairs the ranking implies."""
        return [(self.ranking[i], self.ranking[j]) for i in range(len(self.ranking)) for j in range(i + 1, len(self.ranking))]


@dataclass
class Sample:
    """One summary of one post by one policy: the format every stage reads and writes."""

    post_id: str
    policy: str
    text: str
    extra: dict[str, Any] = dc_field(default_factory=dict)
    """Optional per-sample fields (e.g. `eos`, `score`, `logprob`, `kl`) kept as they are."""

    def to_json(self) -> dict[str, Any]:
        return {"post_id": self.post_id, "policy": self.policy, "text": self.text, **self.extra}


def data_path(data_dir: str | Path, *parts: str) -> Path:
    path = Path(data_dir, *parts)
    if not path.exists():
        raise UserError(f"{path}: not found (set --data-dir or $FROMFEEDBACK_DATA_DIR to the data folder)")
    return path


def load_posts(path: str | Path) -> list[Post]:
    """Reads posts.jsonl; a bad line raises UserError naming file, line and field."""
    posts = []
    seen: set[str] = set()
    for line, obj in read_jsonl(path):
        post_id = field(obj, "id", str, path, line)
        check(post_id not in seen, path, line, "id", f"duplicates post {post_id!r}")
        seen.add(post_id)
        split = field(obj, "split", str, path, line)
        check(split in SPLITS, path, line, "split", f"must be one of {list(SPLITS)}, got {split!r}")
        samples = field(obj, "samples", dict, path, line, optional=True) or {}
        for name, text in samples.items():
            check(isinstance(text, str), path, line, f"samples.{name}", "must be a string")
        posts.append(
            Post(
                id=post_id,
                subreddit=field(obj, "subreddit", str, path, line),
                title=field(obj, "title", str, path, line),
                post=field(obj, "post", str, path, line),
                reference=field(obj, "reference", str, path, line, optional=True),
                split=split,
                samples=samples,
            )
        )
    return posts


def load_tldr(data_dir: str | Path, splits: Iterable[str] | None = None) -> list[Post]:
    posts = load_posts(data_path(data_dir, "tldr", "posts.jsonl"))
    if splits is None:
        return posts
    wanted = set([splits] if isinstance(splits, str) else splits)
    unknown = wanted - set(SPLITS)
    if unknown:
        raise UserError(f"unknown split(s) {sorted(unknown)}: choose from {list(SPLITS)}")
    return [p for p in posts if p.split in wanted]


def load_comparisons(path: str | Path) -> list[Comparison]:
    """Reads one OpenAI-format comparison file (one JSON object a line)."""
    comparisons = []
    for line, obj in read_jsonl(path):
        summaries_raw = field(obj, "summaries", list, path, line)
        check(len(summaries_raw) == 2, path, line, "summaries", f"must hold 2 summaries, got {len(summaries_raw)}")
        summaries = []
        for i, raw in enumerate(summaries_raw):
            check(isinstance(raw, dict), path, line, f"summaries[{i}]", "must be an object")
            summaries.append(
                Summary(
                    text=field(raw, "text", str, path, line),
                    policy=field(raw, "policy", str, path, line, optional=True) or "unknown",
                    note=field(raw, "note", str, path, line, optional=True),
                )
            )
        choice = field(obj, "choice", int, path, line)
        check(choice in (0, 1), path, line, "choice", f"must be 0 or 1, got {choice}")
        confidence = field(obj, "extra.confidence", int, path, line, optional=True)
        if confidence is not None:
            check(1 <= confidence <= 9, path, line, "extra.confidence", f"must be in 1..9, got {confidence}")
        worker = field(obj, "worker", (str, int), path, line, optional=True)
        batch = field(obj, "batch", (str, int), path, line, optional=True)
        comparisons.append(
            Comparison(
                post_id=field(obj, "info.id", str, path, line),
                subreddit=field(obj, "info.subreddit", str, path, line, optional=True) or "",
                title=field(obj, "info.title", str, path, line, optional=True) or "",
                post=field(obj, "info.post", str, path, line),
                summaries=summaries,
                choice=choice,
                worker=None if worker is None else str(worker),
                batch=None if batch is None else str(batch),
                confidence=confidence,
            )
        )
    return comparisons


def comparison_to_json(c: Comparison) -> dict[str, Any]:
    """The OpenAI format, so files written here load with `load_comparisons` and with OpenAI's tools."""
    return {
        "info": {"id": c.post_id, "subreddit": c.subreddit, "title": c.title, "post": c.post},
        "summaries": [{"text": s.text, "policy": s.policy, "note": s.note} for s in c.summaries],
        "choice": c.choice,
        "worker": c.worker,
        "batch": c.batch,
        "extra": {"confidence": c.confidence},
    }


def comparison_files(data_dir: str | Path) -> list[Path]:
    return sorted(data_path(data_dir, "tldr", "comparisons").glob("*.json"))


def comparison_file(data_dir: str | Path, name: str | Path) -> Path:
    """A comparisons file named by path, or by its bare name in the data dir's tldr/comparisons/ (`batch18.json`)."""
    path = Path(name)
    if path.exists() or path.name != str(name):
        return path
    in_data_dir = Path(data_dir, "tldr", "comparisons", path)
    return in_data_dir if in_data_dir.exists() else path


def load_tldr_comparisons(data_dir: str | Path, splits: Iterable[str] | None = None, files: Iterable[str | Path] | None = None) -> list[Comparison]:
    """Comparisons from `files` (default: all of the data dir's), keeping those whose post is in `splits`.

    The split of a comparison is the split of its post in posts.jsonl, never the file's own `split` tag.
    """
    post_split = {p.id: p.split for p in load_posts(data_path(data_dir, "tldr", "posts.jsonl"))}
    comparisons = [c for f in (files or comparison_files(data_dir)) for c in load_comparisons(comparison_file(data_dir, f))]
    if splits is None:
        return comparisons
    wanted = {splits} if isinstance(splits, str) else set(splits)
    return [c for c in comparisons if post_split.get(c.post_id) in wanted]


def load_samples(path: str | Path) -> list[Sample]:
    samples = []
    for line, obj in read_jsonl(path):
        post_id = field(obj, "post_id", str, path, line)
        policy = field(obj, "policy", str, path, line)
        text = field(obj, "text", str, path, line)
        extra = {k: v for k, v in obj.items() if k not in ("post_id", "policy", "text")}
        samples.append(Sample(post_id=post_id, policy=policy, text=text, extra=extra))
    return samples


def write_samples(path: str | Path, samples: Iterable[Sample]) -> None:
    write_jsonl(path, (s.to_json() for s in samples))


def load_rankings(path: str | Path) -> list[Ranking]:
    """Reads a rankings file: one JSON object a line with post_id, subreddit, title, post,
    responses (K ≥ 2 texts), ranking (response indices best first) and an optional worker."""
    rankings = []
    for line, obj in read_jsonl(path):
        responses = field(obj, "responses", list, path, line)
        check(len(responses) >= 2, path, line, "responses", f"must hold at least 2 responses, got {len(responses)}")
        for i, text in enumerate(responses):
            check(isinstance(text, str), path, line, f"responses[{i}]", "must be a string")
        ranking = field(obj, "ranking", list, path, line)
        check(sorted(ranking) == list(range(len(responses))) and all(type(i) is int for i in ranking), path, line, "ranking",
              f"must list each of the {len(responses)} response indices 0..{len(responses) - 1} once, best first, got {ranking}")
        worker = field(obj, "worker", (str, int), path, line, optional=True)
        rankings.append(
            Ranking(
                post_id=field(obj, "post_id", str, path, line),
                subreddit=field(obj, "subreddit", str, path, line, optional=True) or "",
                title=field(obj, "title", str, path, line, optional=True) or "",
                post=field(obj, "post", str, path, line),
                responses=list(responses),
                ranking=list(ranking),
                worker=None if worker is None else str(worker),
            )
        )
    return rankings


def ranking_to_json(r: Ranking) -> dict[str, Any]:
    return {"post_id": r.post_id, "subreddit": r.subreddit, "title": r.title, "post": r.post,
            "responses": r.responses, "ranking": r.ranking, "worker": r.worker}


def write_rankings(path: str | Path, rankings: Iterable[Ranking]) -> None:
    write_jsonl(path, (ranking_to_json(r) for r in rankings))


def rankings_from_comparisons(comparisons: Iterable[Comparison], min_responses: int = 3) -> list[Ranking]:
    """One ranking per post with at least `min_responses` distinct compared summaries, ordered by
    wins minus losses over all its comparisons (ties keep first-seen order). Turns the posts that
    several labelers compared into K-way data; the order is a consensus, not one labeler's ranking."""
    by_post: dict[str, list[Comparison]] = {}
    for c in comparisons:
        by_post.setdefault(c.post_id, []).append(c)
    rankings = []
    for post_id, group in by_post.items():
        texts: list[str] = []
        for c in group:
            texts.extend(s.text for s in c.summaries if s.text not in texts)
        if len(texts) < min_responses:
            continue
        margin = {text: 0 for text in texts}
        for c in group:
            margin[c.chosen] += 1
            margin[c.rejected] -= 1
        order = sorted(range(len(texts)), key=lambda i: (-margin[texts[i]], i))
        first = group[0]
        rankings.append(Ranking(post_id, first.subreddit, first.title, first.post, texts, order))
    return rankings
