"""The labeling app's behaviour: imports, task assignment, labels, dashboard, exports, CLI, migrations."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fromfeedback.data import Comparison, Sample, Summary, load_comparisons
from fromfeedback.label import admin, stats, tasks
from fromfeedback.label.app import create_app
from fromfeedback.label.db import Assignment, ComparisonRow, Label, User
from fromfeedback.label.simulate import choose
from label_support import DATA_DIR, PASSWORD, db_url, login, postgres_server, session_csrf  # noqa: F401

POST = {"subreddit": "test", "title": "A title", "post": "A post body."}


def make_app(db_url):
    app = create_app(db_url, str(DATA_DIR))
    return app, app.state.sessions


def small_project(db, name="p", n_posts=4, overlap=1, gold_share=0.0, policies=("ref", "ppo")):
    """A project with `n_posts` posts summarized by each of `policies` (texts `policy-i`)."""
    project = admin.create_project(db, name, overlap=overlap, gold_share=gold_share)
    samples = [Sample(f"post{i}", policy, f"{policy}-{i}") for i in range(n_posts) for policy in policies]
    posts = {f"post{i}": type("P", (), POST) for i in range(n_posts)}
    admin.import_samples(db, project, samples, posts)
    return project


def label_via_http(client, project_id, confidence_shown, note=""):
    """Fetches the next task page and submits it; returns the assignment id (None when no task is left)."""
    page = client.get(f"/projects/{project_id}/task")
    assert page.status_code == 200
    if "no-tasks" in page.text:
        return None
    import re

    action = re.search(r'action="/tasks/(\d+)" id="label-form"', page.text).group(1)
    response = client.post(f"/tasks/{action}", data={"csrf_token": session_csrf(client), "confidence": str(confidence_shown), "note": note}, follow_redirects=False)
    assert response.status_code == 303, response.text
    return int(action)


def test_migrations_match_the_models(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from fromfeedback.label.db import Base

    _app, sessions = make_app(db_url)
    with sessions().bind.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_import_two_policies_gives_pairs_and_k_gives_all_pairs(db_url):
    _app, sessions = make_app(db_url)
    db = sessions()
    pairs = small_project(db, "pairs", n_posts=3)
    ranking = small_project(db, "ranking", n_posts=2, policies=("a", "b", "c", "d"))
    assert admin.project_counts(db, pairs) == {"posts": 3, "comparisons": 3, "gold": 0, "labels": 0}
    assert admin.project_counts(db, ranking)["comparisons"] == 2 * 6  # C(4, 2) per post
    groups = db.scalars(select(ComparisonRow.group_key).where(ComparisonRow.project_id == ranking.id)).all()
    assert len(set(groups)) == 2 and all(g for g in groups)
    rows = db.scalars(select(ComparisonRow).where(ComparisonRow.project_id == pairs.id)).all()
    assert {(r.policy_0, r.policy_1) for r in rows} == {("ppo", "ref")}  # canonical order: sorted policy names
    assert all(r.text_0.startswith("ppo-") and r.text_1.startswith("ref-") for r in rows)


def test_overlap_order_and_canonical_confidence(db_url):
    app, sessions = make_app(db_url)
    db = sessions()
    project = small_project(db, n_posts=3, overlap=2)
    for name in ("u1", "u2", "u3"):
        admin.create_user(db, name, PASSWORD)
    per_user = {}
    for name in ("u1", "u2", "u3"):
        with TestClient(app) as client:
            assert login(client, name).status_code == 303
            seen = []
            while (assignment_id := label_via_http(client, project.id, 2)) is not None:
                seen.append(assignment_id)
            per_user[name] = seen
    db = sessions()
    assignments = db.scalars(select(Assignment)).all()
    by_comparison = {}
    for a in assignments:
        by_comparison.setdefault(a.comparison_id, []).append(a.labeler_id)
    assert all(len(labelers) == 2 and len(set(labelers)) == 2 for labelers in by_comparison.values())  # overlap 2, no repeats
    assert sum(len(v) for v in per_user.values()) == 6 and len(per_user["u1"]) == 3  # u1 took all 3, the others share the rest
    for label in db.scalars(select(Label)).all():
        assignment = db.get(Assignment, label.assignment_id)
        # "2" on the page = A fairly sure better; A is summary 1 when the stored order is swapped.
        assert (label.confidence, label.choice) == ((8, 1) if assignment.swapped else (2, 0))


def test_swapped_order_is_random_and_shown_as_stored(db_url):
    _app, sessions = make_app(db_url)
    db = sessions()
    project = small_project(db, n_posts=40)
    user = admin.create_user(db, "u1", PASSWORD)
    rng = random.Random(0)
    swaps = []
    for _ in range(40):
        assignment = tasks.next_assignment(db, user, project, rng)
        view = tasks.task_view(db, assignment)
        comparison = db.get(ComparisonRow, assignment.comparison_id)
        assert (view.text_a, view.text_b) == ((comparison.text_1, comparison.text_0) if assignment.swapped else (comparison.text_0, comparison.text_1))
        swaps.append(assignment.swapped)
        tasks.submit_label(db, assignment, 7, {}, "")
    assert 8 < sum(swaps) < 32


def test_submission_is_idempotent(db_url):
    app, sessions = make_app(db_url)
    db = sessions()
    project = small_project(db, n_posts=2)
    admin.create_user(db, "u1", PASSWORD)
    with TestClient(app) as client:
        login(client, "u1")
        page = client.get(f"/projects/{project.id}/task").text
        import re

        action = re.search(r'action="(/tasks/\d+)"', page).group(1)
        form = {"csrf_token": session_csrf(client), "confidence": "9", "a_accuracy": "6", "b_overall": "2", "note": "first"}
        for attempt in range(3):  # a browser retrying the same POST
            assert client.post(action, data={**form, "note": f"try {attempt}"}, follow_redirects=False).status_code == 303
        bad = client.post(action, data={**form, "confidence": "5"}, follow_redirects=False)
        assert bad.status_code == 303  # already stored: the retry is acknowledged, not re-validated
    db = sessions()
    labels = db.scalars(select(Label)).all()
    assert len(labels) == 1 and labels[0].note == "try 0"
    assignment = db.get(Assignment, labels[0].assignment_id)
    a, b = ("1", "0") if assignment.swapped else ("0", "1")
    assert json.loads(labels[0].ratings) == {a: {"accuracy": 6}, b: {"overall": 2}}


def test_invalid_labels_are_refused(db_url):
    app, sessions = make_app(db_url)
    db = sessions()
    project = small_project(db, n_posts=1)
    admin.create_user(db, "u1", PASSWORD)
    with TestClient(app) as client:
        login(client, "u1")
        import re

        action = re.search(r'action="(/tasks/\d+)"', client.get(f"/projects/{project.id}/task").text).group(1)
        token = session_csrf(client)
        for form in ({"confidence": "5"}, {"confidence": "10"}, {"confidence": ""}, {"confidence": "3", "a_overall": "8"}):
            response = client.post(action, data={"csrf_token": token, **form}, follow_redirects=False)
            assert response.status_code == 400 and 'id="error"' in response.text
    assert sessions().scalar(select(func.count()).select_from(Label)) == 0


def test_gold_share_and_dashboard_agreement(db_url):
    _app, sessions = make_app(db_url)
    db = sessions()
    project = small_project(db, n_posts=4, overlap=2, gold_share=0.5)
    gold = [Comparison(f"g{i}", "s", "t", "p", [Summary(f"x{i}", "x"), Summary(f"y{i}", "y")], choice=i % 2) for i in range(4)]
    assert admin.import_gold(db, project, gold + gold[:1]) == 4  # a repeated pair is kept once
    u1, u2 = admin.create_user(db, "u1", PASSWORD), admin.create_user(db, "u2", PASSWORD)
    rng = random.Random(1)
    choices = {}
    for user, pick in ((u1, lambda c: 0), (u2, lambda c: 0 if c.policy_0 == "ppo" and c.post_id % 2 else 1)):
        while (assignment := tasks.next_assignment(db, user, project, rng)) is not None:
            comparison = db.get(ComparisonRow, assignment.comparison_id)
            choice = pick(comparison)
            choices[(user.username, comparison.id)] = choice
            shown = (1 if choice == 0 else 9) if not assignment.swapped else (9 if choice == 0 else 1)
            tasks.submit_label(db, assignment, shown, {}, "")
    n_gold = db.scalar(select(func.count()).select_from(Assignment).where(Assignment.labeler_id == u1.id, Assignment.is_gold.is_(True)))
    assert n_gold == 4  # half of u1's 8 tasks
    board = stats.dashboard(db, project)
    comparisons = db.scalars(select(ComparisonRow).where(ComparisonRow.project_id == project.id)).all()
    shared = [c for c in comparisons if ("u1", c.id) in choices and ("u2", c.id) in choices]
    expected = sum(choices[("u1", c.id)] == choices[("u2", c.id)] for c in shared) / len(shared)
    assert board.total_labels == 16 and board.shared_pairs == len(shared) == 8
    assert board.agreement == pytest.approx(expected)
    row = {r.username: r for r in board.labelers}
    assert row["u1"].gold_agreement == pytest.approx(sum(choices[("u1", c.id)] == c.gold_choice for c in comparisons if c.is_gold) / 4)
    assert row["u1"].peer_agreement == pytest.approx(expected) and row["u1"].labels == 8


def test_drift_windows_follow_the_preference_over_time():
    start = datetime(2026, 1, 1)
    points = [(start + timedelta(minutes=i), i >= 6) for i in range(12)]  # the policy starts winning halfway
    windows = stats.drift_windows(points, windows=3)
    assert [w.labels for w in windows] == [4, 4, 4]
    assert [w.preference for w in windows] == [0.0, 0.5, 1.0]
    assert windows[0].start == start and windows[-1].end == start + timedelta(minutes=11)


def test_exports_load_as_comparisons_and_pairs(db_url, tmp_path):
    _app, sessions = make_app(db_url)
    db = sessions()
    project = small_project(db, n_posts=3)
    user = admin.create_user(db, "u1", PASSWORD)
    while (assignment := tasks.next_assignment(db, user, project)) is not None:
        tasks.submit_label(db, assignment, 3, {"a": {"coherence": 5}}, "why")
    path = tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in admin.export_openai(db, project)))
    loaded = load_comparisons(path)
    assert len(loaded) == 3
    for comparison, row in zip(loaded, admin.export_openai(db, project)):
        label = db.get(Label, row["extra"]["label_id"])
        assert comparison.choice == label.choice and comparison.confidence == label.confidence and comparison.worker == "u1"
        assert comparison.post == POST["post"] and comparison.summaries[0].policy == "ppo"
        assert row["extra"]["note"] == "why"
    pairs = admin.export_pairs(db, project)
    for pair, comparison in zip(pairs, loaded):
        assert pair["prompt"].startswith("SUBREDDIT: r/test") and pair["prompt"].endswith("TL;DR:")
        assert pair["chosen"] == " " + comparison.chosen and pair["rejected"] == " " + comparison.rejected


def test_cli_admin_commands(tmp_path, capsys):
    from fromfeedback.cli import main
    from label_support import posts_with_two_summaries, write_samples_file

    db = str(tmp_path / "cli.db")
    samples = write_samples_file(tmp_path / "samples.jsonl", posts_with_two_summaries(5))
    main(["label", "create-user", "boss", "--admin", "--db", db, "--password", PASSWORD])
    main(["label", "create-project", "proj", "--db", db, "--overlap", "2"])
    main(["label", "import-samples", "proj", str(samples), "--db", db, "--data-dir", str(DATA_DIR)])
    main(["label", "import-comparisons", "proj", str(DATA_DIR / "tldr/comparisons/batch18.json"), "--db", db, "--limit", "7"])
    main(["label", "export", "proj", str(tmp_path / "out.jsonl"), "--db", db])
    out = capsys.readouterr().out
    assert "imported 5 comparisons" in out and "imported 7 gold comparisons" in out and "wrote 0 labels" in out
    from fromfeedback.label.db import open_database

    db_session = open_database(db)()
    boss = db_session.scalar(select(User).where(User.username == "boss"))
    assert boss.is_admin and boss.password_hash.startswith("$argon2id$")
    gold = db_session.scalars(select(ComparisonRow).where(ComparisonRow.is_gold.is_(True))).all()
    first = load_comparisons(DATA_DIR / "tldr/comparisons/batch18.json")[0]
    assert gold[0].gold_choice == first.choice and gold[0].text_0 == first.summaries[0].text
    db_session.close()
    with pytest.raises(SystemExit) as exit_info:
        main(["label", "create-project", "proj", "--db", db])
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err


def test_simulated_choice_follows_margin_and_noise():
    rng = random.Random(0)
    sure_a = [choose(10.0, 0.0, rng) for _ in range(200)]  # A far better: mostly "A definitely better"
    assert all(c <= 4 for c in sure_a) and sum(c == 1 for c in sure_a) > 140
    assert all(choose(-10.0, 0.0, rng) >= 6 for _ in range(50))
    assert all(choose(10.0, 1.0, rng) >= 6 for _ in range(50))  # always flipped
    flips = sum(choose(10.0, 0.3, rng) > 5 for _ in range(2000)) / 2000
    assert 0.26 < flips < 0.34
    weak = [choose(0.05, 0.0, rng) for _ in range(200)]
    assert all(1 <= c <= 4 for c in weak) and sum(c >= 3 for c in weak) > 150  # a small margin: unsure
