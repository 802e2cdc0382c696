"""CNN/DailyMail articles for the transfer evaluation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fromfeedback.data.schema import field
from fromfeedback.files import read_jsonl

_PTB = {"-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{", "-RCB-": "}", "``": '"', "''": '"'}


@dataclass
class Article:
    id: str
    article: str
    highlights: str
    """Reference summary, PTB-tokenized as in the source; see `detokenize_ptb`."""


def load_articles(path: str | Path) -> list[Article]:
    return [
        Article(
            id=field(obj, "id", str, path, line),
            article=field(obj, "article", str, path, line),
            highlights=field(obj, "highlights", str, path, line),
        )
        for line, obj in read_jsonl(path)
    ]


def detokenize_ptb(text: str) -> str:
    """Undoes PTB tokenization: `-LRB- a -RRB-` → `(a)`, `do n't` → `don't`, `word ,` → `word,`."""
    words = [_PTB.get(w, w) for w in text.split()]
    text = " ".join(words)
    text = re.sub(r"\( ", "(", text)
    text = re.sub(r"\[ ", "[", text)
    text = re.sub(r"\{ ", "{", text)
    text = re.sub(r" ([)\]}.,;:!?%])", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", text, flags=re.IGNORECASE)
    text = re.sub(r"\$ (\d)", r"$\1", text)
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    return text.strip()
