"""Loaders, schemas and query formatting for the TL;DR posts, human comparisons, samples and CNN/DM."""

from fromfeedback.data.cnndm import Article, detokenize_ptb, load_articles
from fromfeedback.data.query import format_query, format_response, make_news_query, make_query
from fromfeedback.data.tldr import (
    SPLITS,
    Comparison,
    Post,
    Ranking,
    Sample,
    Summary,
    comparison_to_json,
    load_comparisons,
    load_posts,
    load_rankings,
    load_samples,
    load_tldr,
    load_tldr_comparisons,
    rankings_from_comparisons,
    write_rankings,
    write_samples,
)

__all__ = [
    "SPLITS", "Article", "Comparison", "Post", "Sample", "Summary", "comparison_to_json", "detokenize_ptb",
    "format_query", "format_response", "load_articles", "load_comparisons", "load_posts", "load_samples",
    "load_tldr", "load_tldr_comparisons", "make_news_query", "make_query", "write_samples",
    "Ranking", "load_rankings", "rankings_from_comparisons", "write_rankings",
]

from fromfeedback.data.batch import QueryResponseBatch, encode_response, pad_left, pad_right  # noqa: E402

__all__ += ["QueryResponseBatch", "encode_response", "pad_left", "pad_right"]
