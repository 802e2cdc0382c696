import json

import pytest
import torch

from fromfeedback.cli import main
from fromfeedback.data import load_samples
from fromfeedback.evaluate.transfer import lead_sentences


def test_lead_sentences():
    article = "First one. Second one!  Third one? Fourth.\nFifth."
    assert lead_sentences(article) == "First one. Second one! Third one?"
    assert lead_sentences(article, 1) == "First one."


def test_transfer_on_news_with_a_tiny_policy(tmp_path, data_dir, tiny_model_dir, capsys):
    torch.manual_seed(0)
    out = tmp_path / "eval"
    main(["eval", "transfer", "--policy", str(tiny_model_dir), "--judge", str(tiny_model_dir), "--data-dir", str(data_dir),
          "--limit", "3", "--max-new-tokens", "6", "--query-max-tokens", "96", "--out", str(out)])
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((out / "transfer.json").read_text())
    assert result["articles"] == 3 and result["query_max_tokens"] == 96
    policy = result["policy_summaries"]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert 0 <= policy[key] <= 1 and 0 < result["lead3"][key] <= 1
    assert result["lead3"]["rouge1"] > policy["rouge1"]  # a random model is no match for lead-3
    assert policy["n"] == 3 and 0 <= policy["win_rate"] <= 1 and "judge_score" in result["highlights"]
    samples = load_samples(out / "transfer-samples.jsonl")
    assert len(samples) == 3 and all("eos" in s.extra for s in samples)


def test_transfer_needs_a_policy(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "transfer"])
    assert exit_info.value.code == 2 and "--policy" in capsys.readouterr().err
