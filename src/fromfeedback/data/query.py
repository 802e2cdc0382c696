"""Query formatting and truncation exactly as the paper: the post is cut to fit the token budget."""

from __future__ import annotations

from typing import Protocol

QUERY_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
NEWS_TEMPLATE = "ARTICLE: {article}\n\nTL;DR:"


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


def format_query(subreddit: str, title: str, post: str) -> str:
    return QUERY_TEMPLATE.format(subreddit=subreddit, title=title, post=post.strip())


def _fits(tokenizer: Tokenizer, text: str, max_tokens: int) -> bool:
    return len(tokenizer.encode(text, add_special_tokens=False)) <= max_tokens


def truncate_to_fit(template: str, body: str, tokenizer: Tokenizer, max_tokens: int, **fields: str) -> str:
    """Fills `template` with `body` (as `{post}` or `{article}`) cut so the whole text fits `max_tokens`.

    The body is cut at the last newline for which the query fits; when no newline cut fits, at the
    last whole token that fits. Raises ValueError when even an empty body does not fit.
    """
    key = "post" if "{post}" in template else "article"
    body = body.strip()

    def render(b: str) -> str:
        return template.format(**{**fields, key: b.rstrip()})

    if _fits(tokenizer, render(body), max_tokens):
        return render(body)
    if not _fits(tokenizer, render(""), max_tokens):
        raise ValueError(f"query budget of {max_tokens} tokens is too small for the template and title alone")
    # Cut before a newline: the longest prefix ending at a line break that still fits (binary search:
    # a longer prefix never has fewer tokens).
    cuts = [i for i, ch in enumerate(body) if ch == "\n" and body[:i].strip()]
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if _fits(tokenizer, render(body[: cuts[mid]]), max_tokens):
            best, lo = cuts[mid], mid + 1
        else:
            hi = mid - 1
    if best is not None:
        return render(body[:best])
    # No newline cut fits: keep the most whole tokens of the body that fit.
    body_ids = tokenizer.encode(body, add_special_tokens=False)
    lo, hi, n_best = 0, len(body_ids), 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if _fits(tokenizer, render(tokenizer.decode(body_ids[:mid])), max_tokens):
            n_best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return render(tokenizer.decode(body_ids[:n_best]))


def make_query(subreddit: str, title: str, post: str, tokenizer: Tokenizer, max_tokens: int) -> str:
    """`SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:` within `max_tokens` tokens."""
    return truncate_to_fit(QUERY_TEMPLATE, post, tokenizer, max_tokens, subreddit=subreddit, title=title.strip())


def make_news_query(article: str, tokenizer: Tokenizer, max_tokens: int) -> str:
    """A CNN/DM article in the same TL;DR style, cut the same way."""
    return truncate_to_fit(NEWS_TEMPLATE, article, tokenizer, max_tokens)


def format_response(summary: str) -> str:
    """A response is a leading space and the summary; the EOS token is appended at tokenization."""
    return " " + summary.strip()
