"""Load and faults over HTTP: 20 simulated labelers submit 100 labels each to a uvicorn subprocess, which
is killed with SIGKILL in the middle and restarted. Exactly 2,000 labels must be stored, none lost or
duplicated, and every label acknowledged before the kill must survive it. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections import Counter

from sqlalchemy import select

from fromfeedback.label.db import Label, User, open_database
from fromfeedback.label.simulate import length_judge, prepare_load_project, start_simulation
from label_support import PASSWORD, Server, db_url, postgres_server  # noqa: F401

LABELERS, LABELS_EACH, KILL_AFTER = 20, 100, 600


def stored_labels(db_url) -> list[tuple[int, str]]:
    sessions = open_database(db_url)
    with sessions() as db:
        rows = db.execute(select(Label.assignment_id, User.username).join(User, Label.labeler_id == User.id)).all()
    sessions.kw["bind"].dispose()
    return [tuple(row) for row in rows]


def test_2000_labels_survive_sigkill_mid_load(db_url, tmp_path):
    names = [f"load-{i}" for i in range(LABELERS)]
    # A few spare comparisons: at the very end the last free slots may sit on comparisons a labeler already did.
    prepare_load_project(db_url, "load", names, PASSWORD, comparisons=LABELERS * LABELS_EACH // 2 + 50, overlap=2)
    server = Server(db_url, tmp_path)
    server.start()
    try:
        labelers, threads = start_simulation(server.url, "load", names, PASSWORD, LABELS_EACH, length_judge, noise=0.1)
        deadline = time.monotonic() + 300
        while sum(len(l.result.acknowledged) for l in labelers) < KILL_AFTER and time.monotonic() < deadline:
            time.sleep(0.05)
        server.kill()  # SIGKILL in the middle of the load
        acknowledged_before_kill = {a for l in labelers for a in list(l.result.acknowledged)}
        assert KILL_AFTER <= len(acknowledged_before_kill) < LABELERS * LABELS_EACH
        survived = {assignment for assignment, _ in stored_labels(db_url)}
        assert acknowledged_before_kill <= survived  # no acknowledged label lost
        server.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        server.stop()

    assert [l.result.error for l in labelers] == [None] * LABELERS
    assert sum(l.result.retries for l in labelers) > 0  # the labelers did see the server go away
    stored = stored_labels(db_url)
    assert len(stored) == LABELERS * LABELS_EACH
    assert len({assignment for assignment, _ in stored}) == len(stored)  # no duplicates
    assert Counter(name for _, name in stored) == {name: LABELS_EACH for name in names}
    acknowledged = [a for l in labelers for a in l.result.acknowledged]
    assert len(acknowledged) == len(set(acknowledged)) == LABELERS * LABELS_EACH
    assert set(acknowledged) == {assignment for assignment, _ in stored}


def test_simulate_command_labels_with_a_reward_model_judge(tmp_path, tiny_model_dir, capsys):
    """`fromfeedback label simulate`: accounts made over HTTP by an admin, a reward-model judge, labels stored."""
    from fromfeedback.cli import main
    from fromfeedback.label import admin

    db = f"sqlite:///{tmp_path / 'sim.db'}"
    prepare_load_project(db, "sim", [], PASSWORD, comparisons=8, overlap=2)
    sessions = open_database(db)
    with sessions() as session:
        admin.create_user(session, "boss", PASSWORD, is_admin=True)
    sessions.kw["bind"].dispose()
    server = Server(db, tmp_path)
    server.start()
    try:
        main(["label", "simulate", "--url", server.url, "--judge", str(tiny_model_dir), "--labelers", "2",
              "--labels", "3", "--noise", "0.2", "--admin", "boss", "--admin-password", PASSWORD])
    finally:
        server.stop()
    out = capsys.readouterr().out
    assert "sim-1: 3 labels" in out and "sim-2: 3 labels" in out and "p95" in out
    assert Counter(name for _, name in stored_labels(db)) == {"sim-1": 3, "sim-2": 3}


def test_reward_model_judge_margin_is_antisymmetric(tiny_model_dir):
    from types import SimpleNamespace

    from fromfeedback.label.simulate import reward_model_judge

    judge = reward_model_judge(str(tiny_model_dir))
    post = SimpleNamespace(subreddit="relationships", title="A question", post="My friend never calls back.")
    forward, backward = judge(post, "a short summary", "a much longer and rather different summary"), judge(post, "a much longer and rather different summary", "a short summary")
    assert forward != 0.0 and forward == -backward
