"""`fromfeedback data validate` and `data stats`: format detection, full validation, length statistics."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fromfeedback.data.cnndm import load_articles
from fromfeedback.data.query import make_query
from fromfeedback.data.tldr import load_comparisons, load_posts, load_samples
from fromfeedback.files import UserError, read_jsonl

LOADERS = {"posts": load_posts, "comparisons": load_comparisons, "samples": load_samples, "articles": load_articles}


def detect_kind(path: str | Path) -> str:
    """The format of a file, from the keys of its first record."""
    for line, obj in read_jsonl(path):
        if "summaries" in obj:
            return "comparisons"
        if "responses" in obj and "ranking" in obj:
            return "rankings"
        if "post_id" in obj and "policy" in obj:
            return "samples"
        if "article" in obj and "highlights" in obj:
            return "articles"
        if "post" in obj and "split" in obj:
            return "posts"
        raise UserError(f"{path}:{line}: cannot tell the format from keys {sorted(obj)[:8]}")
    raise UserError(f"{path}: empty file")


def validate_file(path: str | Path) -> tuple[str, int]:
    kind = detect_kind(path)
    loader = LOADERS.get(kind)
    if loader is None:
        from fromfeedback.data import tldr

        loader = getattr(tldr, "load_rankings", None)
        if loader is None:
            raise UserError(f"{path}: no loader for {kind} files")
    return kind, len(loader(path))


def percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values)
    return {f"p{q}": float(np.percentile(array, q)) for q in (5, 50, 95, 100)} | {"mean": float(array.mean())}


def posts_stats(path: str | Path, model: str) -> dict[str, Any]:
    from fromfeedback.models import load_tokenizer

    posts = load_posts(path)
    tokenizer = load_tokenizer(model)
    full_query = [len(tokenizer.encode(make_query(p.subreddit, p.title, p.post, tokenizer, 10**9), add_special_tokens=False)) for p in posts]
    references = [len(tokenizer.encode(" " + p.reference, add_special_tokens=False)) + 1 for p in posts if p.reference]
    return {
        "posts": len(posts),
        "splits": dict(sorted(Counter(p.split for p in posts).items())),
        "with_reference": len(references),
        "query_tokens": percentiles(full_query),
        "reference_tokens_with_eos": percentiles(references),
        "queries_over_512_tokens": sum(n > 512 for n in full_query),
    }


def print_stats(stats: dict[str, Any]) -> None:
    print(f"{stats['posts']} posts, {stats['with_reference']} with a reference")
    for split, count in stats["splits"].items():
        print(f"  {split:10s} {count:6d}")
    for key in ("query_tokens", "reference_tokens_with_eos"):
        row = "  ".join(f"{k} {v:.0f}" for k, v in stats[key].items())
        print(f"{key}: {row}")
    print(f"queries over 512 tokens (cut to fit): {stats['queries_over_512_tokens']}")
