import re

import pytest

from fromfeedback.data.query import QUERY_TEMPLATE, format_response, make_query


class WordTokenizer:
    """One token per run of non-space or space characters, so budgets can be worked out by hand."""

    def __init__(self):
        self.vocab: list[str] = []

    def encode(self, text, add_special_tokens=False):
        ids = []
        for piece in re.findall(r"\s+|\S+", text):
            if piece not in self.vocab:
                self.vocab.append(piece)
            ids.append(self.vocab.index(piece))
        return ids

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


# Around a non-empty post the template is 12 tokens: "SUBREDDIT:" " " "r/a" "\n\n" "TITLE:" " " "t" "\n\n"
# "POST:" " " <post> "\n\n" "TL;DR:".
def test_template_matches_the_paper():
    tok = WordTokenizer()
    query = make_query("relationships", "Help", "My post.", tok, 1000)
    assert query == "SUBREDDIT: r/relationships\n\nTITLE: Help\n\nPOST: My post.\n\nTL;DR:"
    assert format_response("  a summary ") == " a summary"


def test_short_post_is_untouched():
    tok = WordTokenizer()
    assert len(tok.encode(QUERY_TEMPLATE.format(subreddit="a", title="t", post="one two"))) == 15
    assert make_query("a", "t", "one two", tok, 15) == "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: one two\n\nTL;DR:"


def test_long_post_is_cut_at_the_last_newline_that_fits():
    tok = WordTokenizer()
    post = "one two\nthree four\nfive six"  # tokens: one,_,two,\n,three,_,four,\n,five,_,six = 11
    # With 12 tokens of template, a budget of 19 fits 7 post tokens: "one two\nthree four" (7 tokens).
    assert make_query("a", "t", post, tok, 19) == "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: one two\nthree four\n\nTL;DR:"
    # A budget of 18 fits 6 tokens: the newline cut before "three" is the last that fits.
    assert make_query("a", "t", post, tok, 18) == "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: one two\n\nTL;DR:"


def test_post_without_newline_is_cut_at_the_last_whole_token():
    tok = WordTokenizer()
    post = "alpha beta gamma delta"
    # 12 + 3 tokens: "alpha beta" (alpha, space, beta); the trailing space of a 4-token cut is stripped.
    assert make_query("a", "t", post, tok, 15) == "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: alpha beta\n\nTL;DR:"


def test_first_line_longer_than_budget_falls_back_to_tokens():
    tok = WordTokenizer()
    post = "a b c d e f\nshort"
    assert make_query("a", "t", post, tok, 15) == "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: a b\n\nTL;DR:"


def test_budget_too_small_for_template_is_an_error():
    with pytest.raises(ValueError, match="too small"):
        make_query("a", "t", "x", WordTokenizer(), 5)


def test_unicode_and_blank_lines_with_the_real_tokenizer(tokenizer):
    two_lines = "Première ligne avec un émoji 😀 et des accents.\n\nDeuxième ligne, après une ligne vide."
    post = two_lines + "\n\n\n" + "Troisième ligne très longue " * 30
    title = "Un titre ünïcode"

    def n_tokens(text):
        return len(tokenizer.encode(text, add_special_tokens=False))

    budget = n_tokens(make_query("france", title, two_lines, tokenizer, 10**6))
    assert make_query("france", title, post, tokenizer, budget) == make_query("france", title, two_lines, tokenizer, 10**6)
    # One token less: the cut moves back over the blank line to the end of the first line.
    query = make_query("france", title, post, tokenizer, budget - 1)
    assert n_tokens(query) <= budget - 1
    assert query.endswith("et des accents.\n\nTL;DR:")
