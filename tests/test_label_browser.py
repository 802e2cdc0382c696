"""The labeling app in real headless Chromium: an admin sets up a project, two labelers label with mouse and
keyboard, the dashboard shows their agreement, and the exported labels train a reward model for a step."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from fromfeedback.data import load_comparisons
from fromfeedback.label import admin
from fromfeedback.label.db import open_database
from label_support import DATA_DIR, PASSWORD, Server, db_url, posts_with_two_summaries, postgres_server, write_samples_file  # noqa: F401

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
EVIL = '<script>alert("post")</script><img src=x onerror="alert(1)">'


@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromium") and not shutil.which("/usr/bin/chromium"):
        pytest.skip("Debian's chromium is not installed (run scripts/system-deps.sh)")
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')").sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def log_in(browser, url, username, dialogs):
    context = browser.new_context(base_url=url, accept_downloads=True)
    page = context.new_page()
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto("/")  # redirected to the login page
    assert page.url.endswith("/login")
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    with page.expect_navigation():
        page.click("#login")
    assert page.inner_text("#who") == username
    return page


def label_all(page, project_name, references, keyboard_from, disagree_at):
    """Labels every task of the project: picks the reference summary (or the other at task `disagree_at`),
    with the mouse for the first `keyboard_from` tasks, then with the keyboard. Returns the number labeled."""
    page.goto("/")
    with page.expect_navigation():
        page.click(f"a.project-link[data-project-name='{project_name}']")
    done = 0
    while page.query_selector("#label-form") is not None:
        assert page.evaluate("document.querySelectorAll('main script, main img').length") == 0  # post text is inert
        reference_is_a = page.inner_text("#summary-a").strip() in references
        pick_a = reference_is_a != (done == disagree_at)
        if done < keyboard_from:
            page.click(f"#confidence-{2 if pick_a else 7}")
            page.select_option("#a-overall", "6")
            page.select_option("#b-accuracy", "3")
            page.fill("#note", f"mouse label {done}")
            with page.expect_navigation():
                page.click("#submit")
        else:
            page.focus("body")
            page.keyboard.press("1" if pick_a else "9")
            assert page.is_checked(f"#confidence-{1 if pick_a else 9}")
            with page.expect_navigation():
                page.keyboard.press("Enter")
        done += 1
    assert page.query_selector("#no-tasks") is not None
    return done


def test_admin_and_two_labelers_in_chromium(browser, db_url, tmp_path):
    posts = posts_with_two_summaries(4, split="sft_train")
    samples = write_samples_file(tmp_path / "samples.jsonl", posts)
    with open(samples, "a") as f:  # one more post whose every field is a script payload
        for policy, text in (("ref", f"the reference {EVIL}"), ("ppo", f"the policy {EVIL}")):
            f.write(json.dumps({"post_id": "evil", "policy": policy, "text": text, "subreddit": EVIL, "title": EVIL, "post": EVIL}) + "\n")
    references = {p["reference"].strip() for p in posts} | {f"the reference {EVIL}"}
    sessions = open_database(db_url)
    with sessions() as db:
        admin.create_user(db, "boss", PASSWORD, is_admin=True)
    sessions.kw["bind"].dispose()
    server = Server(db_url, tmp_path)
    server.start()
    dialogs: list[str] = []
    try:
        boss = log_in(browser, server.url, "boss", dialogs)
        boss.goto("/admin")
        boss.fill("#project-name", "browser test")
        boss.fill("#project-overlap", "2")
        with boss.expect_navigation():
            boss.click("#create-project")
        boss.set_input_files("#samples-file", str(samples))
        with boss.expect_navigation():
            boss.click("#import-samples-button")
        assert boss.inner_text("#message") == "imported 5 comparisons"
        for name in ("alice", "bob"):
            boss.goto("/admin")
            boss.fill("#new-username", name)
            boss.fill("#new-password", PASSWORD)
            with boss.expect_navigation():
                boss.click("#create-user")
        assert "alice" in boss.inner_text("#users") and "bob" in boss.inner_text("#users")

        alice, bob = log_in(browser, server.url, "alice", dialogs), log_in(browser, server.url, "bob", dialogs)
        assert label_all(alice, "browser test", references, keyboard_from=2, disagree_at=-1) == 5
        assert label_all(bob, "browser test", references, keyboard_from=3, disagree_at=4) == 5
        alice.goto("/admin")
        assert "admins only" in alice.inner_text("#error")

        boss.goto("/admin")
        with boss.expect_navigation():
            boss.click("text=browser test")
        with boss.expect_navigation():
            boss.click("#dashboard-link")
        assert boss.inner_text("#agreement") == "80.0%"  # bob disagreed with alice on 1 of their 5 shared comparisons
        rows = {row.get_attribute("data-username"): row for row in boss.query_selector_all("tr.labeler")}
        assert set(rows) == {"alice", "bob"}
        for row in rows.values():
            assert row.query_selector(".labels").inner_text() == "5" and row.query_selector(".peer").inner_text() == "80.0%"
        boss.go_back()
        with boss.expect_download() as download:
            boss.click("#export-openai")
        exported = tmp_path / "export.jsonl"
        download.value.save_as(exported)
        assert dialogs == []
    finally:
        server.stop()

    comparisons = load_comparisons(exported)
    assert len(comparisons) == 10 and {c.worker for c in comparisons} == {"alice", "bob"}
    alice_labels = [c for c in comparisons if c.worker == "alice"]
    assert all(c.chosen.strip() in references for c in alice_labels)  # she always chose the reference
    assert sum(json.loads(line)["extra"]["note"].startswith("mouse") for line in open(exported)) == 5
    if db_url.startswith("sqlite"):  # the file is the same whatever the database: train on it once
        train_one_step(exported, tmp_path / "rm")


def train_one_step(comparisons_file, out):
    """One optimizer step of `fromfeedback rm train` on the exported labels, with the tiny random model."""
    from fromfeedback.reward import RMConfig, run_rm_train

    config = RMConfig(
        sft="tiny-random", data_dir=str(DATA_DIR), out=str(out), comparisons=str(comparisons_file), train_split="sft_train",
        max_steps=1, batch_size=4, micro_batch_size=4, query_max_tokens=128, response_max_tokens=32, bias_limit=2,
        eval_split="", checkpoint_every=0, precision="fp32",
    )
    model_dir = run_rm_train(config)
    assert (model_dir / "config.json").exists()
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    losses = [m[k] for m in metrics for k in m if "loss" in k]
    assert losses and all(math.isfinite(x) for x in losses)
