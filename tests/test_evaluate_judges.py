import math

import pytest
import torch

from fromfeedback.data import Comparison, Post, Summary, comparison_to_json
from fromfeedback.evaluate.judges import HumanLabelsJudge, RewardModelJudge, SimulatedLabelerJudge, make_judge, sigmoid
from fromfeedback.files import UserError, write_jsonl


def make_post(i):
    return Post(id=f"p{i}", subreddit="test", title=f"title {i}", post=f"The body of post {i}.\nSecond line.", reference=f"ref {i}", split="test")


def test_reward_model_judge_is_bradley_terry_on_its_scores(tiny_model_dir):
    torch.manual_seed(0)  # the tiny model's scalar head is freshly initialized
    judge = RewardModelJudge(tiny_model_dir, query_max_tokens=64, batch_size=2, precision="fp32")
    posts = [make_post(i) for i in range(3)]
    first = ["a short summary", "another one here", "third"]
    second = ["something else entirely", "b", "third again, longer"]
    forward = judge.prefer(posts, first, second)
    backward = judge.prefer(posts, second, first)
    for p, q in zip(forward, backward):
        assert p + q == pytest.approx(1.0)
    scores_a, scores_b = judge.score(posts, first), judge.score(posts, second)
    assert forward == pytest.approx([sigmoid(a - b) for a, b in zip(scores_a, scores_b)])
    assert judge.prefer(posts[:1], ["same"], ["same"]) == [pytest.approx(0.5)]

    from fromfeedback.reward import score_summaries

    model, tokenizer = judge._load()
    assert scores_a == pytest.approx(score_summaries(model, tokenizer, posts, first, 64, 48, 3, "fp32"), abs=1e-4)
    assert len(judge.score_queries(["ARTICLE: news\n\nTL;DR:"], ["a summary"])) == 1


def test_sigmoid_is_stable():
    assert sigmoid(1000.0) == 1.0 and sigmoid(-1000.0) == 0.0 and sigmoid(0.0) == 0.5


def labeled(post, a, b, choice, worker):
    return Comparison(post.id, post.subreddit, post.title, post.post, [Summary(a, "x"), Summary(b, "y")], choice, worker)


def test_human_labels_judge_reads_exported_comparisons(tmp_path):
    posts = [make_post(i) for i in range(3)]
    path = tmp_path / "labels.json"
    write_jsonl(path, [
        comparison_to_json(labeled(posts[0], "good summary", "bad summary", 0, "w1")),
        comparison_to_json(labeled(posts[1], "left", "right", 1, "w1")),
        comparison_to_json(labeled(posts[1], "right", "left", 1, "w2")),  # same pair, other order: w2 prefers "left"
    ])
    judge = HumanLabelsJudge(path)
    verdicts = judge.prefer(posts, ["good  summary", "left", "x"], ["bad summary", "right", "y"])
    assert verdicts[0] == 1.0  # whitespace is normalized
    assert verdicts[1] == 0.5  # one labeler each way
    assert verdicts[2] is None  # nobody labeled this pair
    assert judge.prefer(posts[:1], ["bad summary"], ["good summary"]) == [0.0]
    assert isinstance(make_judge(f"human:{path}"), HumanLabelsJudge)


def test_human_labels_judge_rejects_an_empty_file(tmp_path):
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(UserError):
        HumanLabelsJudge(tmp_path / "empty.json")


class FixedJudge:
    """Always prefers the first summary with probability 0.9."""

    model_dir = "fixed"

    def prefer(self, posts, first, second):
        return [0.9] * len(first)


def test_simulated_labelers_flip_with_the_given_probability():
    posts = [make_post(0)] * 4000
    texts = ["a"] * 4000
    assert set(SimulatedLabelerJudge(FixedJudge(), 0.0).prefer(posts, texts, texts)) == {1.0}
    assert set(SimulatedLabelerJudge(FixedJudge(), 1.0).prefer(posts, texts, texts)) == {0.0}
    noisy = SimulatedLabelerJudge(FixedJudge(), 0.25, seed=3).prefer(posts, texts, texts)
    assert set(noisy) == {0.0, 1.0}
    assert sum(noisy) / len(noisy) == pytest.approx(0.75, abs=0.03)
    with pytest.raises(UserError):
        SimulatedLabelerJudge(FixedJudge(), 1.5)


def test_make_judge_parses_specs(tiny_model_dir):
    assert isinstance(make_judge(f"rm:{tiny_model_dir}"), RewardModelJudge)
    assert isinstance(make_judge(str(tiny_model_dir)), RewardModelJudge)
    simulated = make_judge(f"simulated:{tiny_model_dir}", flip_prob=0.3)
    assert isinstance(simulated, SimulatedLabelerJudge) and math.isclose(simulated.flip_prob, 0.3)
    with pytest.raises(UserError):
        make_judge("rm:")
