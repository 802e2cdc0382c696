"""Token-level batching: left-padded queries, right-padded responses ending in EOS."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fromfeedback.data.query import format_response


def encode_response(tokenizer, summary: str, max_tokens: int) -> list[int]:
    """` summary<EOS>`, at most `max_tokens` tokens (a summary cut to fit loses its EOS)."""
    ids = tokenizer.encode(format_response(summary), add_special_tokens=False) + [tokenizer.eos_token_id]
    return ids[:max_tokens]


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
    return ids, mask


@dataclass
class QueryResponseBatch:
    """Queries [B, Q] left-padded and responses [B, R] right-padded, with explicit masks."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    @classmethod
    def from_ids(cls, queries: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> QueryResponseBatch:
        query_ids, query_mask = pad_left(queries, pad_id)
        response_ids, response_mask = pad_right(responses, pad_id)
        return cls(query_ids, query_mask, response_ids, response_mask)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def to(self, device: torch.device) -> QueryResponseBatch:
        return QueryResponseBatch(*(t.to(device) for t in (self.query_ids, self.query_mask, self.response_ids, self.response_mask)))

    def select(self, rows: torch.Tensor | Sequence[int]) -> QueryResponseBatch:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return QueryResponseBatch(self.query_ids[rows], self.query_mask[rows], self.response_ids[rows], self.response_mask[rows])

    def trim(self) -> tuple[QueryResponseBatch, int, int]:
        """The batch without all-padding query columns (left) and response columns (right); with the first
        query column and the response width kept."""
        query_start = int(self.query_mask.any(0).long().argmax())
        width = max(1, int(self.response_mask.sum(-1).max()))
        trimmed = QueryResponseBatch(self.query_ids[:, query_start:], self.query_mask[:, query_start:], self.response_ids[:, :width], self.response_mask[:, :width])
        return trimmed, query_start, width

    def shared_queries(self, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For rows that come in runs of `group_size` responses to one query (as `generate(...,
        samples_per_query=k)` returns them): each query once (ids [G, Q], mask [G, Q]) and the query of each row [B]."""
        query_of_row = torch.arange(self.query_ids.shape[0], device=self.query_ids.device) // group_size
        return self.query_ids[::group_size], self.query_mask[::group_size], query_of_row
