"""`fromfeedback label ...`: run the labeling server, manage accounts and projects, import, export, simulate."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Optional

import typer

from fromfeedback.files import UserError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

label_app = typer.Typer(no_args_is_help=True, help="The human-feedback labeling app: serve, manage, import, export, simulate.")

DB_HELP = "SQLite file path or database URL (sqlite:///x.db, postgresql+psycopg://user@host/db)."
DEFAULT_DB = "labels.db"


@contextmanager
def _session(db: str) -> Iterator[Session]:
    """A database session, closed (and its engine's connections released) when the command ends."""
    from fromfeedback.label.db import open_database

    sessions = open_database(db)
    session = sessions()
    try:
        yield session
    finally:
        session.close()
        sessions.kw["bind"].dispose()


@label_app.command("serve")
def serve(
    db: str = typer.Option(DEFAULT_DB, "--db", help=DB_HELP),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    data_dir: Optional[str] = typer.Option(None, help="Data folder whose tldr/posts.jsonl gives post text to sample imports."),
    secure_cookies: bool = typer.Option(False, help="HTTPS-only cookies (set behind TLS)."),
) -> None:
    """Runs the web app (migrating the database first)."""
    import uvicorn

    from fromfeedback.config import default_data_dir
    from fromfeedback.label.app import create_app

    app = create_app(db, data_dir or default_data_dir(), secure_cookies)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@label_app.command("create-user")
def create_user(
    username: str = typer.Argument(..., help="Account name."),
    db: str = typer.Option(DEFAULT_DB, "--db", help=DB_HELP),
    admin: bool = typer.Option(False, "--admin", help="An admin account (projects, imports, dashboard, exports)."),
    password: Optional[str] = typer.Option(None, envvar="FROMFEEDBACK_LABEL_PASSWORD", help="Password (default: asked for; or $FROMFEEDBACK_LABEL_PASSWORD)."),
) -> None:
    """Creates an admin or labeler account (password hashed with argon2)."""
    from fromfeedback.label import admin as ops

    if password is None:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    with _session(db) as session:
        ops.create_user(session, username, password, is_admin=admin)
    print(f"created {'admin' if admin else 'labeler'} {username}")


@label_app.command("create-project")
def create_project(
    name: str = typer.Argument(..., help="Project name."),
    db: str = typer.Option(DEFAULT_DB, "--db", help=DB_HELP),
    overlap: int = typer.Option(1, help="How many labelers see each comparison."),
    gold_share: float = typer.Option(0.0, help="Share of each labeler's tasks drawn from gold comparisons."),
    drift_policies: str = typer.Option("", help="`policy_a,policy_b` whose preference rate the dashboard follows over time."),
) -> None:
    """Creates a labeling project."""
    from fromfeedback.label import admin as ops

    with _session(db) as session:
        project = ops.create_project(session, name, overlap, gold_share, drift_policies)
    print(f"created project {project.name} (id {project.id})")


@label_app.command("import-samples")
def import_samples(
    project: str = typer.Argument(..., help="Project name or id."),
    files: list[str] = typer.Argument(..., help="Samples files (JSONL: post_id, policy, text)."),
    db: str = typer.Option(DEFAULT_DB, "--db", help=DB_HELP),
    data_dir: Optional[str] = typer.Option(None, help="Data folder whose tldr/posts.jsonl gives the post text."),
    policies: str = typer.Option("", help="Comma-separated policies to compare (default: all in the files)."),
    limit: Optional[int] = typer.Option(None, help="At most this many comparisons."),
) -> None:
    """Adds comparisons: per post, 2 policies give one pair, K policies give all C(K,2) pairs."""
    from fromfeedback.config import default_data_dir
    from fromfeedback.data import load_samples, load_tldr
    from fromfeedback.label import admin as ops

    samples = [s for path in files for s in load_samples(path)]
    folder = data_dir or default_data_dir()
    posts = {p.id: p for p in load_tldr(folder)} if os.path.exists(os.path.join(folder, "tldr", "posts.jsonl")) else {}
    wanted = [p.strip() for p in policies.split(",") if p.strip()] or None
    with _session(db) as session:
        added = ops.import_samples(session, ops.find_project(session, project), samples, posts, wanted, limit)
    print(f"imported {added} comparisons")


@label_app.command("import-comparisons")
def import_comparisons(
    project: str = typer.Argument(..., help="Project name or id."),
    files: list[str] = typer.Argument(..., help="OpenAI-format comparison files (e.g. ../shared/data/tldr/comparisons/batch13.json)."),
    db: str = typer.Option(DEFAULT_DB, "--db", help=DB_HELP),
    limit: Optional[int] = typer.Option(None, help="At most this many comparisons."),
) -> None:
    """Adds researcher-labeled comparisons as gold tasks (their labels measure labelers' agreement)."""
    from fromfeedback.data import load_comparisons
    from fromfeedback.label import admin as ops

    comparisons = [c for path in files for c in load_comparisons(path)]
    with _session(db) as session:
        added = ops.import_gold(session, ops.find_project(session, project), comparisons, limit)
    print(f"imported {added} gold comparisons")


@label_app.command("export")
def export(
    project: str = typer.Argument(..., help="Project name or id."),
    out: str = typer.Argument(..., help="Output JSONL file."),
    db: str = typer.Option(DEFAULT_DB, "--db", help=DB_HELP),
    format: str = typer.Option("openai", "--format", help="openai (comparison format the reward model trains on) or pairs (prompt/chosen/rejected)."),
) -> None:
    """Writes every label of the project, atomically."""
    from fromfeedback.files import write_jsonl
    from fromfeedback.label import admin as ops

    if format not in ("openai", "pairs"):
        raise UserError(f"--format {format!r}: choose openai or pairs")
    with _session(db) as session:
        found = ops.find_project(session, project)
        rows = ops.export_openai(session, found) if format == "openai" else ops.export_pairs(session, found)
    write_jsonl(out, rows)
    print(f"wrote {len(rows)} labels to {out}")


@label_app.command("simulate")
def simulate(
    url: str = typer.Option(..., "--url", help="The labeling server, e.g. http://127.0.0.1:8000."),
    project: str = typer.Option("", "--project", help="Project name or id (default: the first project)."),
    judge: str = typer.Option(..., "--judge", help="Reward model folder, or `length` / `random`."),
    labelers: int = typer.Option(4, "--labelers", help="Number of simulated labelers, working at once."),
    noise: float = typer.Option(0.0, "--noise", help="Probability of flipping the judge's choice."),
    labels: int = typer.Option(100, "--labels", help="Labels per labeler (fewer when the project runs out)."),
    prefix: str = typer.Option("sim", help="Accounts are PREFIX-1 … PREFIX-N."),
    password: str = typer.Option("simulated-labeler", envvar="FROMFEEDBACK_SIM_PASSWORD", help="The simulated accounts' password."),
    admin_user: Optional[str] = typer.Option(None, "--admin", help="Admin account that creates missing simulated accounts over HTTP."),
    admin_password: Optional[str] = typer.Option(None, envvar="FROMFEEDBACK_LABEL_PASSWORD", help="The admin's password ($FROMFEEDBACK_LABEL_PASSWORD)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Simulated labelers log in and label over HTTP like people: a judge's preference, flipped with
    probability --noise, with a confidence drawn from the score margin."""
    from fromfeedback.label.simulate import ensure_accounts, make_judge, percentile, run_simulation

    if not 0.0 <= noise <= 1.0:
        raise UserError(f"--noise {noise}: use a probability in [0, 1]")
    names = [f"{prefix}-{i + 1}" for i in range(labelers)]
    if admin_user:
        ensure_accounts(url, admin_user, admin_password or typer.prompt("admin password", hide_input=True), names, password)
    results = run_simulation(url, project, names, password, labels, make_judge(judge), noise, seed)
    latencies = [x for r in results for x in r.latencies]
    for r in results:
        print(f"{r.username}: {len(r.acknowledged)} labels{'' if r.error is None else ' (error: ' + r.error + ')'}")
    total = sum(len(r.acknowledged) for r in results)
    print(f"{total} labels; request latency p50 {percentile(latencies, 50) * 1000:.1f} ms, p95 {percentile(latencies, 95) * 1000:.1f} ms")
    if any(r.error for r in results):
        raise UserError("some simulated labelers stopped with an error (see above)")
