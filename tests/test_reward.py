import json
import math
from pathlib import Path

import pytest
import torch

from fromfeedback.config import build_config
from fromfeedback.data import (
    Comparison,
    Ranking,
    Summary,
    comparison_to_json,
    encode_response,
    load_rankings,
    load_tldr_comparisons,
    rankings_from_comparisons,
    write_rankings,
)
from fromfeedback.data.inspect import validate_file
from fromfeedback.files import UserError
from fromfeedback.models import load_scalar_model, load_tokenizer
from fromfeedback.reward import (
    PreferenceGroup,
    RMConfig,
    add_mismatched_negatives,
    comparison_report,
    confidence_target,
    evaluate_model,
    frozen_hidden_states,
    group_scores,
    labeled_pair_mask,
    labeler_agreement,
    longer_wins,
    merged_pair_groups,
    pair_tensors,
    preference_loss,
    ranking_group,
    run_rm_train,
    score_summaries,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHOSEN = "the landlord kept the deposit, so I am taking him to small claims court"
REJECTED = "zebra zebra zebra zebra"


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_k_way_loss_matches_a_hand_computation():
    # One ranking of K=3 (best first: response 2, then 0, then 1) and one plain comparison (1 beats 0).
    ranking = PreferenceGroup(query=[1], responses=[[1], [2], [3]], pairs=[(2, 0, 1.0), (2, 1, 1.0), (0, 1, 1.0)])
    comparison = PreferenceGroup(query=[1], responses=[[1], [2]], pairs=[(1, 0, 1.0)])
    scores = torch.tensor([0.5, -1.0, 2.0, 0.3, 0.1])  # ranking's responses, then the comparison's
    better, worse, target, weight = pair_tensors([ranking, comparison])
    assert better.tolist() == [2, 2, 0, 4] and worse.tolist() == [0, 1, 1, 3]
    loss = preference_loss(scores, better, worse, target, weight) / 2
    # Each prompt counts once: the ranking's 3 pairs share weight 1/3, the comparison's pair weight 1.
    ranking_loss = -(logsigmoid(2.0 - 0.5) + logsigmoid(2.0 + 1.0) + logsigmoid(0.5 + 1.0)) / 3
    comparison_loss = -logsigmoid(0.1 - 0.3)
    assert float(loss) == pytest.approx((ranking_loss + comparison_loss) / 2, rel=1e-6)


def test_soft_labels_from_labeler_confidence():
    assert confidence_target(None) == 1.0
    assert confidence_target(1) == confidence_target(9) == 1.0
    assert confidence_target(4) == confidence_target(6) == 0.625
    scores, one = torch.tensor([1.0, 0.0]), torch.tensor([1.0])
    soft = preference_loss(scores, torch.tensor([0]), torch.tensor([1]), torch.tensor([0.625]), one)
    assert float(soft) == pytest.approx(-(0.625 * logsigmoid(1.0) + 0.375 * logsigmoid(-1.0)), rel=1e-6)


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_rankings_from_posts_with_several_comparisons(tmp_path):
    comparisons = load_tldr_comparisons(SHARED_DATA, "rm_train")
    rankings = rankings_from_comparisons(comparisons)
    assert rankings and all(len(r.responses) >= 3 for r in rankings)
    ranking = rankings[0]
    # The consensus order puts a summary above another only if its wins minus losses are at least as high.
    margin = {t: 0 for t in ranking.responses}
    for c in comparisons:
        if c.post_id == ranking.post_id:
            margin[c.chosen] += 1
            margin[c.rejected] -= 1
    ordered = [margin[ranking.responses[i]] for i in ranking.ranking]
    assert ordered == sorted(ordered, reverse=True)
    k = len(ranking.responses)
    assert len(ranking.pairs()) == k * (k - 1) // 2
    path = tmp_path / "rankings.jsonl"
    write_rankings(path, rankings)
    assert load_rankings(path) == rankings
    assert validate_file(path) == ("rankings", len(rankings))


def test_rankings_loader_rejects_a_bad_ranking(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"post_id": "p", "post": "x", "responses": ["a", "b", "c"], "ranking": [0, 0, 2]}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: field 'ranking'"):
        load_rankings(path)


def test_shared_query_scores_equal_the_joined_forward_with_gradients():
    tokenizer = load_tokenizer("tiny-random")
    model = load_scalar_model("tiny-random")
    ranking = Ranking("p", "tifu", "a title", "a short post\nwith two lines", ["first answer", "second, longer answer here", "third"], [1, 0, 2])
    groups = [ranking_group(ranking, tokenizer, 64, 16), PreferenceGroup(tokenizer.encode("other query"), [tokenizer.encode(" yes") + [tokenizer.eos_token_id]] * 2, [(0, 1, 1.0)])]
    shared = group_scores(model, groups, tokenizer.pad_token_id, "fp32")
    from fromfeedback.data import QueryResponseBatch
    from fromfeedback.reward import eos_index

    batch = QueryResponseBatch.from_ids([g.query for g in groups for _ in g.responses], [r for g in groups for r in g.responses], tokenizer.pad_token_id)
    joined = model(batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask, eos_index(batch.response_mask))
    assert shared.shape == (5,)
    assert torch.allclose(shared, joined, atol=1e-5)
    weight = model.model.model.layers[0].self_attn.q_proj.weight  # reached only through the shared query's keys/values
    (grad_shared,) = torch.autograd.grad(shared.sum(), weight)
    (grad_joined,) = torch.autograd.grad(joined.sum(), weight)
    assert torch.allclose(grad_shared, grad_joined, atol=1e-6) and grad_joined.abs().sum() > 0


def test_scoring_each_query_once_equals_scoring_the_joined_rows():
    from fromfeedback.data import QueryResponseBatch
    from fromfeedback.reward import score_batch, score_shared_queries

    torch.manual_seed(0)
    model = load_scalar_model("tiny-random")
    model.set_bias(0.5)
    batch = QueryResponseBatch.from_ids([[5, 6, 7, 8]] * 2 + [[9, 10]] * 2, [[11, 12, 2], [13, 2], [14, 15, 16], [17, 2]], pad_id=0)
    shared = score_shared_queries(model, batch, group_size=2, precision="fp32", micro_batch_size=2)
    assert shared.shape == (4,) and torch.allclose(shared, score_batch(model, batch, precision="fp32"), atol=1e-5)


def test_scores_from_the_frozen_layers_hidden_states_equal_the_full_forward():
    tokenizer = load_tokenizer("tiny-random")
    model = load_scalar_model("tiny-random")
    ranking = Ranking("p", "tifu", "a title", "a short post\nwith two lines", ["first answer", "second, longer answer here", "third"], [1, 0, 2])
    groups = [ranking_group(ranking, tokenizer, 64, 16), PreferenceGroup(tokenizer.encode("other query"), [tokenizer.encode(" yes") + [tokenizer.eos_token_id]] * 2, [(0, 1, 1.0)])]
    frozen = frozen_hidden_states(model, groups, 1, tokenizer.pad_token_id, "fp32", batch_size=1)
    assert [len(f.query) for f in frozen] == [len(g.query) for g in groups]
    assert [[len(r) for r in f.responses] for f in frozen] == [[len(r) for r in g.responses] for g in groups]
    full = group_scores(model, groups, tokenizer.pad_token_id, "fp32")
    from_frozen = group_scores(model, groups, tokenizer.pad_token_id, "fp32", frozen, start=1)
    assert torch.allclose(full, from_frozen, atol=1e-5)
    assert model.model.model.layers[1].self_attn.layer_idx == 1 and len(model.model.model.layers) == 2  # restored


def make_data(root: Path) -> Path:
    """A tiny data folder: 6 rm_train posts compared twice each, 2 rm_valid posts, 3 sft_train references."""
    tldr = root / "tldr"
    (tldr / "comparisons").mkdir(parents=True)
    posts, comparisons = [], []
    for i in range(8):
        split = "rm_train" if i < 6 else "rm_valid"
        post = {"id": f"t3_{i}", "subreddit": "legaladvice", "title": f"deposit trouble {i}", "post": f"My landlord kept my deposit number {i}.", "split": split}
        posts.append({**post, "reference": None})
        for worker, choice in (("w1", 0), ("w2", 1)):
            summaries = [Summary(CHOSEN, "a"), Summary(REJECTED, "b")] if choice == 0 else [Summary(REJECTED, "b"), Summary(CHOSEN, "a")]
            comparisons.append(Comparison(post["id"], post["subreddit"], post["title"], post["post"], summaries, choice, worker, "b1", 2 if choice == 0 else 8))
    for i in range(3):
        posts.append({"id": f"h_{i}", "subreddit": "cats", "title": "my cat", "post": f"My cat {i} sleeps all day.", "reference": f"cat {i} sleeps a lot", "split": "sft_train"})
    (tldr / "posts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in posts))
    (tldr / "comparisons" / "batch0.json").write_text("".join(json.dumps(comparison_to_json(c)) + "\n" for c in comparisons))
    return root


def test_training_learns_the_preference_normalizes_the_bias_and_saves_a_plain_hf_model(tmp_path, capsys):
    data_dir = make_data(tmp_path / "data")
    out = tmp_path / "rm"
    config = build_config(RMConfig, None, "rm", {
        "sft": "tiny-random", "data_dir": str(data_dir), "out": str(out), "max_steps": 8, "batch_size": 4, "micro_batch_size": 2,
        "lr": 3e-3, "lr_schedule": "constant", "query_max_tokens": 64, "response_max_tokens": 24, "checkpoint_every": 4, "precision": "fp32",
    })
    model_dir = run_rm_train(config)

    losses = [row["train_loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train_loss" in row]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    model, tokenizer = load_scalar_model(model_dir), load_tokenizer(model_dir)
    comparisons = load_tldr_comparisons(data_dir, ["rm_train", "rm_valid"])
    chosen = score_summaries(model, tokenizer, comparisons, [c.chosen for c in comparisons], 64, 24, precision="fp32")
    rejected = score_summaries(model, tokenizer, comparisons, [c.rejected for c in comparisons], 64, 24, precision="fp32")
    assert all(c > r for c, r in zip(chosen, rejected))

    # Bias: the sft_train references average reward 0, and the bias travels in the saved config.
    info = json.loads((model_dir / "fromfeedback.json").read_text())
    assert info["query_max_tokens"] == 64 and info["response_max_tokens"] == 24 and info["stage"] == "rm"
    assert model.bias == pytest.approx(info["reward_bias"]) and model.bias != 0.0
    from fromfeedback.data import load_tldr

    references = [p for p in load_tldr(data_dir, "sft_train")]
    reference_scores = score_summaries(model, tokenizer, references, [p.reference for p in references], 64, 24, precision="fp32")
    assert sum(reference_scores) / len(reference_scores) == pytest.approx(0.0, abs=1e-4)

    # Plain transformers reads the same score at the EOS (its pad token is not the EOS), before the bias.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    plain_tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert plain_tokenizer.pad_token_id != plain_tokenizer.eos_token_id
    from fromfeedback.data import make_query

    post = comparisons[0]
    ids = plain_tokenizer.encode(make_query(post.subreddit, post.title, post.post, plain_tokenizer, 64), add_special_tokens=False)
    ids += encode_response(plain_tokenizer, CHOSEN, 24)
    padded = torch.tensor([ids + [plain_tokenizer.pad_token_id] * 3])
    mask = torch.tensor([[1] * len(ids) + [0] * 3])
    with torch.no_grad():
        plain_score = plain(input_ids=padded, attention_mask=mask).logits[0, 0].item()
    assert plain_score - plain.config.reward_bias == pytest.approx(chosen[0], abs=1e-4)

    # The evaluation written after training, and a resumed run: it restarts from the last checkpoint.
    report = json.loads((out / "eval.json").read_text())
    assert report["comparisons"] == 4 and report["accuracy"] == 1.0
    assert (out / "reliability-rm_valid.png").read_bytes()[:4] == b"\x89PNG"
    (out / "summary.json").unlink()
    run_rm_train(config)
    assert json.loads((out / "summary.json").read_text())["resumed_at_step"] == 4

    # The command line: `rm eval --json` prints one JSON object; `rm score` adds a score to each sample.
    from fromfeedback.cli import main

    capsys.readouterr()
    main(["rm", "eval", "--model", str(model_dir), "--split", "rm_valid", "--data-dir", str(data_dir), "--json", "--plot", str(tmp_path / "r.png")])
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == 1.0 and printed["longer_wins"]["accuracy"] == 1.0 and printed["labeler_agreement"]["rm_valid"]["agreement"] == 1.0
    batches = set(printed["by_batch"])
    assert batches and batches == set(printed["longer_wins"]["by_batch"]) == set(printed["labeler_agreement"]["by_batch"])
    main(["rm", "eval", "--model", str(model_dir), "--data-dir", str(data_dir), "--plot", str(tmp_path / "r.png")])
    table = capsys.readouterr().out
    assert all(f"batch {batch}" in table for batch in batches) and "labelers" in table
    main(["rm", "eval", "--model", str(model_dir), "--data-dir", str(data_dir), "--json", "--plot", str(tmp_path / "r.png"), "--precision", "fp32"])
    in_fp32 = json.loads(capsys.readouterr().out)
    assert in_fp32["accuracy"] == 1.0 and in_fp32["mean_margin"] == pytest.approx(printed["mean_margin"], abs=5e-2)
    with pytest.raises(SystemExit) as exited:
        main(["rm", "eval", "--model", str(model_dir), "--data-dir", str(data_dir), "--precision", "fp16"])
    assert exited.value.code == 2 and "--precision must be auto, bf16 or fp32" in capsys.readouterr().err
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"post_id": "t3_6", "policy": "good", "text": CHOSEN}) + "\n" + json.dumps({"post_id": "t3_6", "policy": "bad", "text": REJECTED}) + "\n")
    main(["rm", "score", "--model", str(model_dir), "--samples", str(samples), "--out", str(tmp_path / "scored.jsonl"), "--data-dir", str(data_dir)])
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert scored[0]["policy"] == "good" and scored[0]["score"] > scored[1]["score"]
    assert scored[0]["score"] == pytest.approx(chosen[12], abs=2e-2)  # the RM's own budgets by default (bf16 here)


def test_frozen_cache_trains_the_same_model_and_serves_a_second_seed(tmp_path, capsys):
    data_dir = make_data(tmp_path / "data")
    values = {
        "sft": "tiny-random", "data_dir": str(data_dir), "max_steps": 4, "batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "query_max_tokens": 64,
        "response_max_tokens": 24, "checkpoint_every": 0, "precision": "fp32", "freeze_embeddings": True, "freeze_layers": 1, "eval_split": "",
    }
    plain = run_rm_train(build_config(RMConfig, None, "rm", {**values, "out": str(tmp_path / "plain")}))
    cache = tmp_path / "frozen.pt"
    cached = run_rm_train(build_config(RMConfig, None, "rm", {**values, "out": str(tmp_path / "cached"), "frozen_cache": str(cache)}))
    assert cache.exists() and "computed" in capsys.readouterr().out
    plain_state, cached_state = load_scalar_model(plain).state_dict(), load_scalar_model(cached).state_dict()
    assert all(torch.allclose(plain_state[name], cached_state[name], atol=1e-5) for name in plain_state)
    # With evaluation: the first model computes the evaluation comparisons' frozen layers into a file beside
    # the cache, the next seed reads both files, and the scores match a full forward.
    evaluated = {**values, "frozen_cache": str(cache), "eval_split": "rm_valid"}
    run_rm_train(build_config(RMConfig, None, "rm", {**evaluated, "out": str(tmp_path / "seed1"), "seed": 1}))
    assert (tmp_path / "frozen-rm_valid.pt").exists() and "computed" in capsys.readouterr().out
    seed2 = run_rm_train(build_config(RMConfig, None, "rm", {**evaluated, "out": str(tmp_path / "seed2"), "seed": 2}))
    assert capsys.readouterr().out.count("read from") == 2
    cached_eval = json.loads((tmp_path / "seed2" / "eval.json").read_text())
    full_eval = evaluate_model(seed2, "rm_valid", str(data_dir), precision="fp32")
    assert cached_eval["mean_margin"] == pytest.approx(full_eval["mean_margin"], abs=1e-4)
    assert cached_eval["accuracy"] == full_eval["accuracy"]
    with pytest.raises(UserError, match="frozen_cache needs"):
        build_config(RMConfig, None, "rm", {**values, "freeze_layers": 0, "frozen_cache": "memory"})


def test_comparison_report_on_a_synthetic_case():
    def comparison(chosen: str, rejected: str, confidence: int, batch: str, choice: int = 0) -> Comparison:
        summaries = [Summary(chosen, "x"), Summary(rejected, "y")] if choice == 0 else [Summary(rejected, "y"), Summary(chosen, "x")]
        return Comparison("p", "s", "t", "post", summaries, choice, "w", batch, confidence if choice == 0 else 10 - confidence)

    comparisons = [
        comparison("a" * 10, "b" * 9, 1, "b13"),  # similar length, certain
        comparison("a" * 10, "b" * 30, 4, "b13", choice=1),  # the shorter one wins, barely sure
        comparison("a" * 50, "b" * 10, 1, "b18"),
        comparison("a" * 20, "b" * 19, 4, "b18", choice=1),  # similar length
    ]
    report = comparison_report(comparisons, [1.0, 0.0, 2.0, 0.5], [0.0, 1.0, 2.0, 0.0])
    assert report["comparisons"] == 4
    assert report["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    low, high = report["accuracy_ci95"]
    assert 0 < low < report["accuracy"] < high < 1
    assert report["similar_length"]["pairs"] == 2 and report["similar_length"]["accuracy"] == 1.0
    # Strength = |confidence − 5|: the certain labels (1 or 9) are bucket 4, the barely sure (4 or 6) bucket 1.
    assert report["by_confidence"]["4"]["pairs"] == 2 and report["by_confidence"]["4"]["accuracy"] == 0.75
    assert report["by_confidence"]["1"]["pairs"] == 2 and report["by_confidence"]["1"]["accuracy"] == 0.5
    assert report["by_batch"]["b13"]["pairs"] == 2 and report["by_batch"]["b13"]["accuracy"] == 0.5
    assert report["by_batch"]["b18"]["accuracy"] == pytest.approx((0.5 + 1) / 2)
    margins = [1.0, -1.0, 0.0, 0.5]
    assert report["log_loss"] == pytest.approx(sum(-logsigmoid(m) for m in margins) / 4)
    assert 0.0 <= report["ece"] <= 1.0 and sum(row["count"] for row in report["calibration"]) == 4
    # The floor by the same code: the longer summary was chosen in 3 of the 4 comparisons.
    assert longer_wins(comparisons)["accuracy"] == pytest.approx(3 / 4)
    assert longer_wins(comparisons)["by_batch"]["b13"]["accuracy"] == pytest.approx(1 / 2)


def test_labeler_agreement_counts_label_pairs_of_different_workers():
    def label(worker: str, choice: int, texts=("one", "two"), post_id: str = "p") -> Comparison:
        return Comparison(post_id, "s", "t", "post", [Summary(texts[0], "a"), Summary(texts[1], "b")], choice, worker)

    comparisons = [
        label("w1", 0), label("w2", 0), label("w3", 1),  # 3 label pairs, 1 agrees
        label("w1", 1, texts=("two", "one")),  # the same pair shown in the other order; w1 again picks "one"
        label("w4", 0, post_id="q"),  # a pair labeled once: no label pair
    ]
    result = labeler_agreement(comparisons)
    # Picks w1:"one", w2:"one", w3:"two", w1':"one": w1-w2 agree, w1-w3 no, w2-w3 no, w2-w1' agree,
    # w3-w1' no; w1-w1' is the same worker and skipped → 2 of 5.
    assert result["label_pairs"] == 5 and result["agreement"] == pytest.approx(2 / 5)


def test_repeated_pairs_merge_into_one_group_with_the_mean_label():
    tokenizer = load_tokenizer("tiny-random")

    def label(choice: int, confidence: int, texts=("one", "two"), post_id: str = "p") -> Comparison:
        return Comparison(post_id, "s", "t", "post", [Summary(texts[0], "a"), Summary(texts[1], "b")], choice, "w", confidence=confidence)

    comparisons = [
        label(0, 1),  # "one", certain: P(one) 1.0
        label(1, 2, texts=("two", "one")),  # the same pair in the other order; "one", strength 3: 0.875
        label(1, 6),  # "two", barely: P(one) 1 − 0.625
        label(1, 9, post_id="q"),  # another post: its own group
    ]
    hard = merged_pair_groups(comparisons, tokenizer, 64, 16, soft_labels=False)
    assert len(hard) == 2
    assert hard[0].pairs == [(0, 1, pytest.approx(2 / 3))] and hard[1].pairs == [(1, 0, 1.0)]
    assert hard[0].responses == [encode_response(tokenizer, "one", 16), encode_response(tokenizer, "two", 16)]
    soft = merged_pair_groups(comparisons, tokenizer, 64, 16, soft_labels=True)
    assert soft[0].pairs == [(0, 1, pytest.approx((1.0 + 0.875 + 0.375) / 3))]
    # A pair the labelers split evenly is oriented either way with target 0.5.
    even = merged_pair_groups(comparisons[:1] + [label(1, 9)], tokenizer, 64, 16, soft_labels=False)
    assert even[0].pairs == [(0, 1, 0.5)]


def test_mismatched_negatives_add_a_summary_of_another_post_that_both_summaries_beat():
    groups = [PreferenceGroup([1, 2], [[10], [11]], [(0, 1, 1.0)]), PreferenceGroup([1, 2], [[12], [13]], [(1, 0, 0.75)]),
              PreferenceGroup([3], [[20], [21], [22]], [(0, 1, 1.0), (1, 2, 1.0), (0, 2, 1.0)])]
    add_mismatched_negatives(groups, weight=0.5)
    for group, own, other_posts in zip(groups, ([[10], [11]], [[12], [13]], [[20], [21], [22]]), ([[20], [21], [22]], [[20], [21], [22]], [[10], [11], [12], [13]])):
        assert group.responses[:-1] == own and group.responses[-1] in other_posts
        k = len(own)
        assert group.pairs[-k:] == [(i, k, 1.0) for i in range(k)]
    assert groups[1].pairs[0] == (1, 0, 0.75) and groups[1].weights == [1.0, 0.25, 0.25]
    assert groups[2].weights == pytest.approx([1 / 3] * 3 + [0.5 / 3] * 3)
    better, worse, target, weight = pair_tensors(groups)
    assert better.tolist()[:3] == [0, 0, 1] and worse.tolist()[:3] == [1, 2, 2]  # offsets: 3 responses per comparison group
    assert weight.sum().item() == pytest.approx(3 * 1.5)
    # Training accuracy counts the 1, 1 and 3 labeled pairs, not the 2, 2 and 3 synthetic ones appended.
    assert labeled_pair_mask(groups).tolist() == [True, False, False, True, False, False, True, True, True, False, False, False]
    # One post only: there is nothing to mismatch with.
    alone = [PreferenceGroup([1], [[10], [11]], [(0, 1, 1.0)])]
    add_mismatched_negatives(alone, weight=0.5)
    assert alone[0].responses == [[10], [11]] and alone[0].weights is None


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_reference_lines_on_the_real_validation_comparisons():
    """The numbers the issue quotes come out of the same code: 380 comparisons, 146 similar-length pairs."""
    valid = load_tldr_comparisons(SHARED_DATA, "rm_valid")
    floor = longer_wins(valid)
    assert len(valid) == 380 and floor["similar_length"]["pairs"] == 146
    assert round(floor["accuracy"], 3) == 0.624 and round(floor["similar_length"]["accuracy"], 3) == 0.541
    assert round(labeler_agreement(load_tldr_comparisons(SHARED_DATA))["agreement"], 3) == 0.720


def test_eval_of_a_missing_split_is_a_user_error(tmp_path):
    data_dir = make_data(tmp_path / "data")
    with pytest.raises(UserError, match="no comparisons in split 'test'"):
        evaluate_model("tiny-random", "test", str(data_dir))


def test_weight_averaged_ensemble_is_the_mean_of_members_trained_on_one_frozen_cache(tmp_path, capsys):
    data_dir = make_data(tmp_path / "data")
    out = tmp_path / "ensemble"
    config = build_config(RMConfig, None, "rm", {
        "sft": "tiny-random", "data_dir": str(data_dir), "max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "query_max_tokens": 64,
        "response_max_tokens": 24, "checkpoint_every": 0, "precision": "fp32", "freeze_embeddings": True, "freeze_layers": 1, "frozen_cache": "memory",
        "eval_split": "rm_valid", "ensemble": 2, "out": str(out),
    })
    model_dir = run_rm_train(config)
    printed = capsys.readouterr().out
    assert printed.count("computed in") == 1 and printed.count("read from") == 1  # the frozen layers ran once for both members
    assert not (out / "frozen-layers.pt").exists()
    members = [load_scalar_model(out / f"member-{i}" / "model").model.state_dict() for i in range(2)]
    averaged = load_scalar_model(model_dir).model.state_dict()
    trained = [name for name in averaged if not torch.equal(members[0][name], members[1][name])]
    assert trained and all(".layers.0." not in name for name in trained)  # data order differs; the frozen layer does not
    assert any("score" in name for name in trained)
    for name in averaged:
        assert torch.allclose(averaged[name], (members[0][name] + members[1][name]) / 2, atol=1e-6)
    assert all(torch.equal(averaged[name], members[0][name]) for name in averaged if name not in trained)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and "rm_valid_accuracy" in summary and (out / "eval.json").exists()
    assert load_scalar_model(model_dir).bias == pytest.approx(summary["bias"])
    with pytest.raises(UserError, match="ensemble must be"):
        build_config(RMConfig, None, "rm", {"ensemble": 0})
    with pytest.raises(UserError, match="mismatched_negatives is a loss weight"):
        build_config(RMConfig, None, "rm", {"mismatched_negatives": -0.5})
