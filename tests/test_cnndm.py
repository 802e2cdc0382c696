from fromfeedback.data import detokenize_ptb, load_articles


def test_detokenize_ptb():
    assert detokenize_ptb("He said -LRB- quietly -RRB- that it does n't work , really .") == "He said (quietly) that it doesn't work, really."
    assert detokenize_ptb("Locke 's first six games cost $ 5 .") == "Locke's first six games cost $5."


def test_real_articles(data_dir):
    articles = load_articles(data_dir / "cnndm" / "articles.jsonl")
    assert len(articles) == 250
    assert all(a.article and a.highlights for a in articles)
