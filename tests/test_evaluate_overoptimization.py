import json

import pytest
import torch

from fromfeedback.cli import main
from fromfeedback.data import Sample, load_samples, load_tldr, write_samples
from fromfeedback.evaluate.overoptimization import parse_points, plot_points, point_series, run_overoptimization
from fromfeedback.files import UserError


def test_parse_points_allows_equals_signs(tmp_path):
    path = tmp_path / "bon_N=16.jsonl"
    path.write_text("")
    assert parse_points([f"best-of-n/N=16={path}", f"ppo/iter-1={path}"]) == {"best-of-n/N=16": str(path), "ppo/iter-1": str(path)}
    assert parse_points(["a=missing.jsonl"]) == {"a": "missing.jsonl"}  # reported as a missing file later
    for bad in ("nolabel", "=file", "label="):
        with pytest.raises(UserError):
            parse_points([bad])


def test_point_series():
    assert point_series("ppo-beta0.05/iter-10") == "ppo-beta0.05"
    assert point_series("best-of-n/N=16") == "best-of-n"
    assert point_series("sft") == "sft"


def test_plot_is_a_png(tmp_path):
    rows = [
        {"series": "ppo", "kl": 0.0, "proxy_score": 0.0, "judge_score": 0.0},
        {"series": "ppo", "kl": 5.0, "proxy_score": 1.0, "judge_score": 0.6},
        {"series": "ppo", "kl": 20.0, "proxy_score": 2.0, "judge_score": 0.1},
        {"series": "bon", "kl": 1.2, "proxy_score": 0.7, "judge_score": 0.5},
    ]
    path = plot_points(rows, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_overoptimization_points_from_samples_files(tmp_path, data_dir, tiny_model_dir, capsys):
    posts = load_tldr(data_dir, "test")[:3]
    files = {}
    for label, kl in [("ppo/iter-1", 0.5), ("ppo/iter-2", 3.0), ("best-of-n/N=4", 4.0)]:
        path = tmp_path / f"{label.replace('/', '_')}.jsonl"
        write_samples(path, [Sample(p.id, label, f"summary {i} of {label}", {"kl": kl + i, "score": float(i)}) for i, p in enumerate(posts)])
        files[label] = path
    torch.manual_seed(0)
    out = tmp_path / "eval"
    main(["eval", "overoptimization", *[a for label, path in files.items() for a in ("--point", f"{label}={path}")],
          "--judge", str(tiny_model_dir), "--split", "test", "--data-dir", str(data_dir), "--out", str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((out / "overoptimization.json").read_text())
    assert (out / result["plot"]).read_bytes()[:4] == b"\x89PNG"
    points = {row["label"]: row for row in result["points"]}
    assert points["ppo/iter-2"]["kl"] == pytest.approx(4.0)  # mean of 3, 4, 5
    assert points["best-of-n/N=4"]["series"] == "best-of-n"
    assert points["ppo/iter-1"]["proxy_score"] == pytest.approx(1.0)  # mean of the `score` fields 0, 1, 2
    for row in result["points"]:
        assert row["samples"] == 3 and 0 <= row["judge_win_rate"] <= 1


def test_unfinished_samples_get_the_no_eos_score_from_both_models(tmp_path, data_dir, tiny_model_dir):
    from fromfeedback.evaluate.judges import RewardModelJudge
    from fromfeedback.evaluate.overoptimization import measure_points

    posts = load_tldr(data_dir, "test")[:2]
    path = tmp_path / "points.jsonl"
    write_samples(path, [Sample(posts[0].id, "x", "it ended", {"kl": 1.0, "score": 2.0, "eos": True}),
                         Sample(posts[1].id, "x", "it never ended and", {"kl": 1.0, "score": 3.0, "eos": False})])
    judge = RewardModelJudge(tiny_model_dir)
    finished_judge_score = judge.score([posts[0]], ["it ended"])[0]
    (row,) = measure_points({"p/1": str(path)}, {p.id: p for p in posts}, judge, None, no_eos_score=-4.0)
    assert row["proxy_score"] == pytest.approx((2.0 - 4.0) / 2)
    assert row["judge_score"] == pytest.approx((finished_judge_score - 4.0) / 2, abs=1e-4)


def test_samples_without_kl_or_score_are_rejected(tmp_path, data_dir, tiny_model_dir):
    post = load_tldr(data_dir, "test")[0]
    no_kl = tmp_path / "no_kl.jsonl"
    write_samples(no_kl, [Sample(post.id, "p", "text", {"score": 1.0})])
    no_score = tmp_path / "no_score.jsonl"
    write_samples(no_score, [Sample(post.id, "p", "text", {"kl": 1.0})])
    with pytest.raises(UserError, match="kl"):
        run_overoptimization([f"a={no_kl}"], str(tiny_model_dir), "", str(data_dir), "test", str(tmp_path / "out"))
    with pytest.raises(UserError, match="--proxy"):
        run_overoptimization([f"a={no_score}"], str(tiny_model_dir), "", str(data_dir), "test", str(tmp_path / "out"))
    with pytest.raises(UserError, match="LABEL=SAMPLES_FILE"):
        run_overoptimization(["nolabel"], str(tiny_model_dir), "", str(data_dir), "test", str(tmp_path / "out"))


def test_a_policy_folder_point_is_sampled_and_measured(tmp_path, data_dir, tiny_model_dir):
    torch.manual_seed(0)
    out = tmp_path / "eval"
    result = run_overoptimization(
        [f"sft/self={tiny_model_dir}"], str(tiny_model_dir), str(tiny_model_dir), str(data_dir), "test", str(out), batch_size=2,
        sft=str(tiny_model_dir), limit=2, max_new_tokens=6,
    )
    (row,) = result["points"]
    assert row["samples"] == 2 and row["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is its own SFT model
    samples = load_samples(out / "points" / "sft_self.jsonl")
    assert [s.post_id for s in samples] == [p.id for p in load_tldr(data_dir, "test")[:2]]
    with pytest.raises(UserError, match="--sft"):
        run_overoptimization([f"p={tiny_model_dir}"], str(tiny_model_dir), "", str(data_dir), "test", str(out), limit=1)
