import json

import pytest

from fromfeedback.cli import main
from fromfeedback.data import Sample, load_tldr, write_samples
from fromfeedback.evaluate.overoptimization import plot_points
from fromfeedback.evaluate.report import build_report, column_order
from fromfeedback.files import write_json

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
HOSTILE = '<script>window.pwned = 1</script><b>bold</b> & "quotes"'


def make_run(run_dir, data_dir):
    """A tiny run folder with every part the report reads."""
    posts = load_tldr(data_dir, "test")[:3]
    policy_row = {"n": 3, "win_rate": 0.6, "ci_low": 0.2, "ci_high": 0.9, "lc_win_rate": 0.55, "rouge1": 0.3, "rouge2": 0.1,
                  "rougeL": 0.25, "mean_words": 20.0, "eos_rate": 1.0, "repeated_4gram": 0.0, "kl": 3.2, "samples": 3}
    write_json(run_dir / "eval" / "policy.json", {
        "kind": "policy", "judge": "rm:judge", "baseline": "reference", "split": "test", "posts": 3,
        "policies": {"reference": {"samples": 3, "rouge1": 1.0}, HOSTILE: policy_row},
    })
    points = [{"label": "ppo/a", "series": "ppo", "samples": 3, "kl": 1.0, "proxy_score": 0.5, "judge_score": 0.4, "judge_win_rate": 0.6},
              {"label": "ppo/b", "series": "ppo", "samples": 3, "kl": 8.0, "proxy_score": 1.5, "judge_score": 0.1, "judge_win_rate": 0.5}]
    plot_points(points, run_dir / "eval" / "overoptimization.png")
    write_json(run_dir / "eval" / "overoptimization.json", {"kind": "overoptimization", "plot": "overoptimization.png", "points": points})
    write_json(run_dir / "eval" / "transfer.json", {"kind": "transfer", "policy": "ppo", "articles": 3,
                                                     "policy_summaries": {"rouge1": 0.2}, "lead3": {"rouge1": 0.4}, "highlights": {}})
    (run_dir / "eval" / "notes.json").write_text("not json")  # ignored, not fatal
    (run_dir / "sft").mkdir()
    write_json(run_dir / "sft" / "summary.json", {"valid_loss": {"before": 3.25, "after": 2.5}, "steps": 5, "samples": [1, 2]})
    (run_dir / "sft" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-5}) + "\n" for s in range(1, 6)))
    write_samples(run_dir / "samples" / "sft.jsonl", [Sample(p.id, "sft", f"sft summary {i}") for i, p in enumerate(posts)])
    write_samples(run_dir / "samples" / "ppo.jsonl", [Sample(p.id, "ppo", HOSTILE) for p in posts])
    return posts


def test_report_escapes_text_and_degrades_gracefully(tmp_path, data_dir):
    empty = build_report(tmp_path, str(data_dir))
    assert "No policy evaluation" in empty and "No training curves" in empty and "No samples" in empty and "No stage summaries" in empty
    make_run(tmp_path, data_dir)
    page = build_report(tmp_path, str(data_dir), examples=2)
    assert "<script>window.pwned" not in page and "&lt;script&gt;window.pwned" in page
    assert page.count("data:image/png;base64,") == 2  # the over-optimization plot and the SFT curves
    assert "No policy evaluation" not in page and "openai_ppo_1.3b" in page
    assert "<td>valid_loss.after</td><td>2.5</td>" in page and "<td>steps</td><td>5</td>" in page


def test_side_by_side_column_order():
    names = ["openai_ppo_1.3b", "zzz", "ppo", "reference", "sft", "best-of-n"]
    assert sorted(names, key=column_order) == ["reference", "sft", "ppo", "best-of-n", "zzz", "openai_ppo_1.3b"]


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path, data_dir):
    playwright_api = pytest.importorskip("playwright.sync_api")
    posts = make_run(tmp_path, data_dir)
    main(["report", str(tmp_path), "--data-dir", str(data_dir), "--examples", "3"])
    page_path = tmp_path / "report.html"
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:")) else route.abort())
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.alt])")
            assert len(images) == 2 and all(complete and width > 0 for complete, width, _ in images)
            assert any("over-optimization" in alt for _, _, alt in images)
            assert page.locator("table.policy-table tr").count() == 3  # header + 2 policies
            assert page.locator("table.overoptimization-table tr").count() == 3
            assert page.locator("table.transfer-table").count() == 1
            assert page.locator("div.example").count() == 3
            assert page.locator("table.stage-summary tr").count() == 3
            assert page.evaluate("window.pwned") is None  # the hostile summary was shown, not run
            assert HOSTILE in page.locator("table.policy-table").inner_text()
            assert posts[0].title.strip() in page.inner_text("body")
        finally:
            browser.close()
