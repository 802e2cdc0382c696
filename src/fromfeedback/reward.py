"""The reward model: the SFT model plus a scalar head read at the response's EOS token.

Scoring lives here; training (`fromfeedback rm train`), evaluation and the CLI build on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fromfeedback.data import QueryResponseBatch, encode_response, make_query
from fromfeedback.models import ScalarHeadModel
from fromfeedback.runtime import Precision, autocast


def eos_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Column of each response's last real token (its EOS when it has one), from the explicit mask."""
    return (response_mask.sum(-1) - 1).clamp(min=0)


@torch.no_grad()
def score_batch(model: ScalarHeadModel, batch: QueryResponseBatch, precision: Precision = "auto") -> torch.Tensor:
    """Scores [B] of a tokenized batch, read at each response's last token, minus the model's bias."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    with autocast(precision, device):
        return model(batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask, eos_index(batch.response_mask)).float().cpu()


def score_summaries(
    model: ScalarHeadModel,
    tokenizer,
    posts: Sequence,
    summaries: Sequence[str],
    query_max_tokens: int = 512,
    response_max_tokens: int = 48,
    batch_size: int = 16,
    precision: Precision = "auto",
) -> list[float]:
    """Reward of each (post, summary) pair; `posts` need `subreddit`, `title` and `post` attributes."""
    if len(posts) != len(summaries):
        raise ValueError(f"{len(posts)} posts but {len(summaries)} summaries")
    scores: list[float] = []
    for start in range(0, len(posts), batch_size):
        chunk_posts, chunk_summaries = posts[start : start + batch_size], summaries[start : start + batch_size]
        queries = [tokenizer.encode(make_query(p.subreddit, p.title, p.post, tokenizer, query_max_tokens), add_special_tokens=False) for p in chunk_posts]
        responses = [encode_response(tokenizer, s, response_max_tokens) for s in chunk_summaries]
        batch = QueryResponseBatch.from_ids(queries, responses, tokenizer.pad_token_id)
        scores.extend(score_batch(model, batch, precision).tolist())
    return scores
