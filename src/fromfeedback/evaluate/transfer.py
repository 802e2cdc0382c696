"""`fromfeedback eval transfer`: a TL;DR-trained policy summarizes CNN/DailyMail news with no news training.

Each article becomes `ARTICLE: {article}\\n\\nTL;DR:` (cut to the query budget like a post), the policy
decodes greedily, and the summaries are scored with ROUGE against the detokenized highlights and, when
a judge RM is given, judged against the highlights on the same news query. Lead-3 (the article's first
three sentences) is reported beside them as the classic extractive baseline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fromfeedback.files import UserError


@dataclass
class TransferConfig:
    policy: str = ""
    """Policy folder (or model name) trained on TL;DR."""
    judge: str = ""
    """Reward model folder judging the summaries against the highlights (empty: ROUGE only)."""
    articles: str = ""
    """CNN/DM articles JSONL (default: DATA_DIR/cnndm/articles.jsonl)."""
    data_dir: str = ""
    """Data folder (default: $FROMFEEDBACK_DATA_DIR or ../shared/data)."""
    limit: int = 50
    """Summarize the first N articles (0: all 250)."""
    query_max_tokens: int = 0
    """Article query budget (0: what the policy was trained with, else 512)."""
    max_new_tokens: int = 48
    """Longest summary in tokens."""
    batch_size: int = 8
    """Articles generated together."""
    out: str = "runs/eval"
    """Folder for transfer.json and transfer-samples.jsonl."""
    precision: str = "auto"
    """auto, bf16 or fp32."""


def lead_sentences(article: str, count: int = 3) -> str:
    """The first `count` sentences of an article (split after . ! ? followed by a space)."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(article.split()))
    return " ".join(sentences[:count])


def run_transfer(config: TransferConfig) -> dict[str, Any]:
    from fromfeedback.config import default_data_dir
    from fromfeedback.data import Sample, detokenize_ptb, load_articles, make_news_query, write_samples
    from fromfeedback.evaluate import metrics
    from fromfeedback.evaluate.judges import RewardModelJudge, sigmoid
    from fromfeedback.files import write_json
    from fromfeedback.models import load_policy, load_tokenizer, resolve_model
    from fromfeedback.runtime import default_device, inference_dtype
    from fromfeedback.sampling import generate, query_budget

    if not config.policy:
        raise UserError("give --policy: the TL;DR policy folder to summarize news with")
    path = Path(config.articles or Path(config.data_dir or default_data_dir()) / "cnndm" / "articles.jsonl")
    articles = load_articles(path)
    if config.limit:
        articles = articles[: config.limit]
    if not articles:
        raise UserError(f"{path}: no articles")
    model_dir = resolve_model(config.policy)
    tokenizer = load_tokenizer(model_dir)
    device = default_device()
    model = load_policy(model_dir, inference_dtype(config.precision, device)).to(device).eval()  # type: ignore[arg-type]
    budget = query_budget(model_dir, config.query_max_tokens)
    query_texts = [make_news_query(a.article, tokenizer, budget) for a in articles]
    queries = [tokenizer.encode(q, add_special_tokens=False) for q in query_texts]
    generation = generate(model, tokenizer, queries, config.max_new_tokens, batch_size=config.batch_size, precision=config.precision, show_progress=True)  # type: ignore[arg-type]
    del model
    highlights = [detokenize_ptb(a.highlights) for a in articles]
    policy_name = model_dir.name if model_dir.name != "model" else model_dir.parent.name
    samples = [
        Sample(a.id, policy_name, text, {"eos": bool(ended)})
        for a, text, ended in zip(articles, generation.texts, generation.ended.tolist())
    ]
    leads = [lead_sentences(a.article) for a in articles]
    result: dict[str, Any] = {
        "kind": "transfer",
        "policy": str(config.policy),
        "articles": len(articles),
        "query_max_tokens": budget,
        "policy_summaries": {
            **metrics.rouge_scores(generation.texts, highlights),
            **metrics.text_statistics(generation.texts, [s.extra["eos"] for s in samples]),
        },
        "lead3": {**metrics.rouge_scores(leads, highlights), **metrics.text_statistics(leads, [None] * len(leads))},
        "highlights": metrics.text_statistics(highlights, [None] * len(highlights)),
    }
    if config.judge:
        judge = RewardModelJudge(config.judge, query_max_tokens=budget)
        policy_scores = judge.score_queries(query_texts, generation.texts)
        highlight_scores = judge.score_queries(query_texts, highlights)
        preferences = [sigmoid(a - b) for a, b in zip(policy_scores, highlight_scores)]
        result["judge"] = judge.name
        result["policy_summaries"].update(metrics.win_rate(preferences))
        result["policy_summaries"]["judge_score"] = sum(policy_scores) / len(policy_scores)
        result["highlights"]["judge_score"] = sum(highlight_scores) / len(highlight_scores)
    out = Path(config.out)
    write_samples(out / "transfer-samples.jsonl", samples)
    write_json(out / "transfer.json", result)
    return result
