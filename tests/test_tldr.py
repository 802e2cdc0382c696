import json

import pytest

from fromfeedback.cli import main
from fromfeedback.data import Sample, load_comparisons, load_posts, load_samples, load_tldr, load_tldr_comparisons, write_samples
from fromfeedback.data.tldr import comparison_to_json
from fromfeedback.files import UserError


def test_real_posts_and_splits(data_dir):
    posts = load_tldr(data_dir)
    assert len(posts) == 2614
    counts = {s: sum(p.split == s for p in posts) for s in ("sft_train", "sft_valid", "test", "rm_train", "rm_valid")}
    assert counts == {"sft_train": 1278, "sft_valid": 87, "test": 246, "rm_train": 772, "rm_valid": 231}
    assert all(p.reference for p in posts if p.split in ("sft_train", "sft_valid", "test"))


def test_real_comparisons_take_the_split_of_their_post(data_dir):
    everything = load_tldr_comparisons(data_dir)
    assert len(everything) == 1771
    valid = load_tldr_comparisons(data_dir, "rm_valid")
    train = load_tldr_comparisons(data_dir, "rm_train")
    assert len(valid) + len(train) == 1771
    assert len(valid) == 380
    c = valid[0]
    assert c.chosen == c.summaries[c.choice].text and c.rejected == c.summaries[1 - c.choice].text
    # A file named by its bare name is found in the data folder's tldr/comparisons/.
    batch18 = load_tldr_comparisons(data_dir, None, ["batch18.json"])
    assert len(batch18) == 674 and {c.batch for c in batch18} == {"batch18"}
    with pytest.raises(UserError, match="batch99.json"):
        load_tldr_comparisons(data_dir, None, ["batch99.json"])


def test_a_comparisons_file_given_by_path_needs_no_comparisons_folder(tmp_path, data_dir):
    (tmp_path / "tldr").mkdir()
    (tmp_path / "tldr" / "posts.jsonl").write_text((data_dir / "tldr" / "posts.jsonl").read_text())
    elsewhere = data_dir / "tldr" / "comparisons" / "batch18.json"
    assert len(load_tldr_comparisons(tmp_path, "rm_valid", [str(elsewhere)])) == len(load_tldr_comparisons(data_dir, "rm_valid", ["batch18.json"])) > 0


def test_comparison_round_trip(tmp_path, data_dir):
    original = load_comparisons(data_dir / "tldr" / "comparisons" / "batch18.json")[:5]
    path = tmp_path / "out.json"
    path.write_text("".join(json.dumps(comparison_to_json(c)) + "\n" for c in original))
    assert load_comparisons(path) == original


def test_samples_round_trip_keeps_extra_fields(tmp_path):
    samples = [Sample("t3_a", "sft", "a summary", {"eos": True, "score": 0.5})]
    write_samples(tmp_path / "s.jsonl", samples)
    assert load_samples(tmp_path / "s.jsonl") == samples


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "x", "subreddit": "a", "title": "t", "post": "p", "split": "test"', "not valid JSON"),
        ('{"id": "x", "subreddit": "a", "title": "t", "split": "test"}', "missing field 'post'"),
        ('{"id": 3, "subreddit": "a", "title": "t", "post": "p", "split": "test"}', "field 'id' must be a string"),
        ('{"id": "x", "subreddit": "a", "title": "t", "post": "p", "split": "nope"}', "field 'split' must be one of"),
    ],
)
def test_bad_post_line_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "posts.jsonl"
    good = '{"id": "ok", "subreddit": "a", "title": "t", "post": "p", "reference": null, "split": "test"}'
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(UserError, match=message) as error:
        load_posts(path)
    assert str(error.value).startswith(f"{path}:3:")


def test_bad_comparison_choice(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"info": {"id": "a", "post": "p"}, "summaries": [{"text": "x"}, {"text": "y"}], "choice": 2}) + "\n")
    with pytest.raises(UserError, match=r":1: field 'choice' must be 0 or 1"):
        load_comparisons(path)


def test_cli_validate_exits_2_with_one_line(tmp_path, capsys, data_dir):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"post_id": "a", "policy": "p", "text": 5}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "validate", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{path}:1: field 'text' must be a string" in err
    main(["data", "validate", str(data_dir / "tldr" / "posts.jsonl")])
    assert "OK (2614 posts)" in capsys.readouterr().out
