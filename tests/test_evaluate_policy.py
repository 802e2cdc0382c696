import json

import pytest

from fromfeedback.cli import main
from fromfeedback.data import Sample, load_samples, load_tldr, write_samples
from fromfeedback.evaluate.policy import PolicyEvalConfig, evaluate_policies, format_table, load_policies, response_ids
from fromfeedback.files import UserError


class LongerWins:
    """Prefers the longer summary: a judge with a pure length bias."""

    name = "longer-wins"

    def prefer(self, posts, first, second):
        return [1.0 if len(a.split()) > len(b.split()) else 0.0 if len(a.split()) < len(b.split()) else 0.5 for a, b in zip(first, second)]


@pytest.fixture()
def test_posts(data_dir):
    return load_tldr(data_dir, "test")[:30]


def write_policy(path, posts, name, make_text, **extra):
    write_samples(path, [Sample(p.id, name, make_text(p), dict(extra)) for p in posts])
    return str(path)


def test_policy_table_on_real_posts(tmp_path, data_dir, test_posts):
    padded = write_policy(tmp_path / "padded.jsonl", test_posts, "padded", lambda p: p.reference + " and then some more words", eos=True, kl=2.0)
    config = PolicyEvalConfig(samples=[padded, "posts:openai_ppo_1.3b"], judge="longer-wins", data_dir=str(data_dir), limit=30)
    result = evaluate_policies(config, LongerWins())
    rows = result["policies"]
    assert list(rows) == ["reference", "padded", "openai_ppo_1.3b"]
    assert result["posts"] == 30 and rows["reference"].get("win_rate") is None
    assert rows["reference"]["rouge1"] == pytest.approx(1.0)
    assert rows["padded"]["win_rate"] == 1.0 and rows["padded"]["n"] == 30
    assert rows["padded"]["ci_low"] > 0.85
    assert rows["padded"]["eos_rate"] == 1.0 and rows["padded"]["kl"] == 2.0
    assert rows["padded"]["mean_words"] == pytest.approx(rows["reference"]["mean_words"] + 5)
    assert 0 < rows["openai_ppo_1.3b"]["rouge1"] < 1 and rows["openai_ppo_1.3b"]["eos_rate"] is None
    assert 0 <= rows["openai_ppo_1.3b"]["lc_win_rate"] <= 1
    assert "padded" in format_table(result) and "100.0%" in format_table(result)


def test_an_unfinished_summary_loses_to_a_finished_one(tmp_path, data_dir, test_posts):
    looping = write_policy(tmp_path / "looping.jsonl", test_posts, "looping", lambda p: p.reference + " again and again and again", eos=False)
    config = PolicyEvalConfig(samples=[looping], judge="longer-wins", data_dir=str(data_dir), limit=30)
    assert evaluate_policies(config, LongerWins())["policies"]["looping"]["win_rate"] == 0.0
    config.unfinished_loses = False
    assert evaluate_policies(config, LongerWins())["policies"]["looping"]["win_rate"] == 1.0


def test_another_policy_as_baseline(tmp_path, data_dir, test_posts):
    short = write_policy(tmp_path / "short.jsonl", test_posts, "short", lambda p: p.reference.split()[0])
    config = PolicyEvalConfig(samples=[short, "reference"], judge="longer-wins", baseline="short", data_dir=str(data_dir), limit=30)
    rows = evaluate_policies(config, LongerWins())["policies"]
    assert rows["reference"]["win_rate"] > 0.9 and rows["short"].get("win_rate") is None


def test_bad_inputs_are_user_errors(tmp_path, data_dir, test_posts):
    with pytest.raises(UserError, match="baseline"):
        evaluate_policies(PolicyEvalConfig(samples=["reference"], baseline="nope", data_dir=str(data_dir), limit=5), LongerWins())
    with pytest.raises(UserError, match="not found"):
        load_policies([str(tmp_path / "missing.jsonl")], test_posts)
    with pytest.raises(UserError, match="samples"):
        load_policies(["posts:no_such_policy"], test_posts)
    with pytest.raises(UserError, match="NAME=PATH"):
        evaluate_policies(PolicyEvalConfig(samples=["reference"], policy_models=["oops"], data_dir=str(data_dir), limit=5), LongerWins())


def test_response_ids_keep_eos_only_where_the_policy_ended(tokenizer):
    ended = response_ids(tokenizer, Sample("p", "x", "a summary", {"eos": True}))
    cut = response_ids(tokenizer, Sample("p", "x", "a summary", {"eos": False}))
    assert ended[-1] == tokenizer.eos_token_id and ended[:-1] == cut
    assert len(response_ids(tokenizer, Sample("p", "x", "word " * 100), max_tokens=48)) == 48


def test_eval_policy_cli_with_a_reward_model_judge_and_kl(tmp_path, data_dir, test_posts, tiny_model_dir, capsys):
    samples = write_policy(tmp_path / "s.jsonl", test_posts[:4], "mine", lambda p: "a plain summary of the post", eos=True)
    out = tmp_path / "eval" / "policy.json"
    main([
        "eval", "policy", "--samples", samples, "--samples", "posts:openai_ppo_1.3b", "--judge", f"rm:{tiny_model_dir}",
        "--data-dir", str(data_dir), "--limit", "4", "--sft", str(tiny_model_dir), "--policy-model", f"mine={tiny_model_dir}",
        "--out", str(out), "--json",
    ])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    rows = printed["policies"]
    assert rows["mine"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is its own SFT model
    assert rows["openai_ppo_1.3b"]["kl"] is None
    for name in ("mine", "openai_ppo_1.3b"):
        assert rows[name]["n"] == 4 and 0 <= rows[name]["ci_low"] <= rows[name]["win_rate"] <= rows[name]["ci_high"] <= 1


def test_eval_policy_cli_reports_user_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "policy", "--samples", str(tmp_path / "none.jsonl"), "--judge", "human:" + str(tmp_path / "none.json")])
    assert exit_info.value.code == 2
    assert "not found" in capsys.readouterr().err


def test_export_samples(tmp_path, data_dir):
    out = tmp_path / "openai.jsonl"
    main(["eval", "export-samples", "openai_ppo_1.3b", "--out", str(out), "--data-dir", str(data_dir)])
    samples = load_samples(out)
    assert len(samples) == 246 and {s.policy for s in samples} == {"openai_ppo_1.3b"}


def test_human_labels_of_the_real_comparisons(tmp_path, data_dir):
    """batch13: OpenAI's labelers preferred the 12B human-feedback policy to the 12B supervised one."""
    from fromfeedback.evaluate.judges import HumanLabelsJudge
    from fromfeedback.evaluate.policy import samples_from_comparisons

    labels = data_dir / "tldr" / "comparisons" / "batch13.json"
    samples = samples_from_comparisons(labels)
    assert {s.policy for s in samples} == {"sup4_ppo_rm4_t.7", "sup4_12b_t0.7"}
    write_samples(tmp_path / "b13.jsonl", samples)
    config = PolicyEvalConfig(samples=[str(tmp_path / "b13.jsonl")], baseline="sup4_12b_t0.7", split="all", data_dir=str(data_dir))
    result = evaluate_policies(config, HumanLabelsJudge(labels))
    ppo = result["policies"]["sup4_ppo_rm4_t.7"]
    assert list(result["policies"])[0] == "sup4_12b_t0.7"
    assert ppo["n"] == 905  # one judged pair per labeled post
    assert 0.69 < ppo["win_rate"] < 0.75 and ppo["ci_low"] > 0.65
    assert ppo["lc_win_rate"] < ppo["win_rate"]  # part of the preference is for the longer RL summaries
    assert ppo["mean_words"] > result["policies"]["sup4_12b_t0.7"]["mean_words"]
