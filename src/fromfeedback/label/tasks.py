"""The labeler's side: which comparison to show next, and storing a label exactly once."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fromfeedback.label.db import Assignment, ComparisonRow, Label, PostRow, Project, User, relaxed_commit, utcnow

RATING_AXES = ("accuracy", "coverage", "coherence", "overall")
SIDES = ("a", "b")


@dataclass
class Task:
    """What the task page shows: the post and the two summaries in the stored order (A left, B right)."""

    assignment: Assignment
    post: PostRow
    text_a: str
    text_b: str


def task_view(db: Session, assignment: Assignment) -> Task:
    comparison = db.get(ComparisonRow, assignment.comparison_id)
    post = db.get(PostRow, comparison.post_id)
    texts = (comparison.text_1, comparison.text_0) if assignment.swapped else (comparison.text_0, comparison.text_1)
    return Task(assignment, post, *texts)


def label_of(db: Session, assignment_id: int) -> Label | None:
    return db.scalar(select(Label).where(Label.assignment_id == assignment_id))


def _open_assignment(db: Session, user: User, project: Project) -> Assignment | None:
    query = (
        select(Assignment)
        .outerjoin(Label, Label.assignment_id == Assignment.id)
        .where(Assignment.labeler_id == user.id, Assignment.project_id == project.id, Label.id.is_(None))
        .order_by(Assignment.id)
        .limit(1)
    )
    return db.scalar(query)


def _wants_gold(db: Session, user: User, project: Project) -> bool:
    """Keeps the labeler's share of gold tasks at `gold_share`, deterministically (no lucky streaks)."""
    if project.gold_share <= 0:
        return False
    mine = select(func.count()).select_from(Assignment).where(Assignment.labeler_id == user.id, Assignment.project_id == project.id)
    total = int(db.scalar(mine) or 0)
    gold = int(db.scalar(mine.where(Assignment.is_gold.is_(True))) or 0)
    return gold < project.gold_share * (total + 1)


def _candidate(db: Session, user: User, project: Project, gold: bool) -> tuple[ComparisonRow, int | None] | None:
    """The next comparison for `user`: gold ones in id order; ordinary ones with a free overlap slot, those
    already started first (so overlaps complete and agreement can be measured early)."""
    seen = select(Assignment.comparison_id).where(Assignment.labeler_id == user.id)
    if gold:
        query = (
            select(ComparisonRow)
            .where(ComparisonRow.project_id == project.id, ComparisonRow.is_gold.is_(True), ComparisonRow.id.not_in(seen))
            .order_by(ComparisonRow.id)
            .limit(1)
        )
        comparison = db.scalar(query)
        return None if comparison is None else (comparison, None)
    # First a comparison others started that still has a free slot, then the first untouched one. Two
    # small queries rather than one ranking every comparison: that one is slow on PostgreSQL.
    started = (
        select(Assignment.comparison_id, func.count().label("n"))
        .where(Assignment.project_id == project.id, Assignment.is_gold.is_(False), Assignment.comparison_id.not_in(seen))
        .group_by(Assignment.comparison_id)
        .having(func.count() < project.overlap)
        .order_by(func.count().desc(), Assignment.comparison_id)
        .limit(1)
    )
    row = db.execute(started).first()
    if row is not None:
        return db.get(ComparisonRow, row[0]), int(row[1])
    untouched = (
        select(ComparisonRow)
        .where(
            ComparisonRow.project_id == project.id,
            ComparisonRow.is_gold.is_(False),
            ~select(Assignment.id).where(Assignment.comparison_id == ComparisonRow.id).exists(),
        )
        .order_by(ComparisonRow.id)
        .limit(1)
    )
    comparison = db.scalar(untouched)
    return None if comparison is None else (comparison, 0)


def next_assignment(db: Session, user: User, project: Project, rng: random.Random | None = None, attempts: int = 20) -> Assignment | None:
    """The labeler's unfinished task, or a new one; None when nothing is left for them. Commits."""
    rng = rng or random.SystemRandom()
    for _ in range(attempts):
        relaxed_commit(db)  # a new assignment lost in a power cut is just served again: no fsync for it
        if db.get_bind().dialect.name == "postgresql":
            # Labelers of one project take turns choosing (until commit): otherwise they all race for the
            # same best comparison. SQLite needs nothing: its transactions already take the write lock.
            db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": project.id})
            db.execute(text("SET LOCAL synchronous_commit TO OFF"))  # as relaxed_commit on SQLite: no wait for the disk
        existing = _open_assignment(db, user, project)
        if existing is not None:
            db.commit()
            return existing
        wants_gold = _wants_gold(db, user, project)
        found = _candidate(db, user, project, gold=True) if wants_gold else None
        found = found or _candidate(db, user, project, gold=False)
        if found is None:
            db.commit()
            return None
        comparison, slot = found
        assignment = Assignment(
            comparison_id=comparison.id, labeler_id=user.id, project_id=project.id, slot=slot,
            swapped=rng.random() < 0.5, is_gold=comparison.is_gold,
        )
        db.add(assignment)
        try:
            db.commit()
            return assignment
        except IntegrityError:  # another request took that slot (PostgreSQL): pick again
            db.rollback()
    raise RuntimeError(f"could not assign a task to {user.username} after {attempts} attempts")


class LabelError(ValueError):
    """A submitted form that is not a valid label (the page shows the message)."""


def parse_label_form(form: dict[str, str]) -> tuple[int, dict[str, dict[str, int]], str]:
    """(confidence as shown 1–9, ratings {"a"/"b": {axis: 1–7}}, note) from the task form's fields."""
    try:
        confidence = int(form.get("confidence", ""))
    except ValueError:
        raise LabelError("choose a point on the scale") from None
    if not 1 <= confidence <= 9 or confidence == 5:
        raise LabelError("choose a point from 1 to 4 (A better) or 6 to 9 (B better)")
    ratings: dict[str, dict[str, int]] = {}
    for side in SIDES:
        for axis in RATING_AXES:
            raw = (form.get(f"{side}_{axis}") or "").strip()
            if not raw:
                continue
            if not raw.isdigit() or not 1 <= int(raw) <= 7:
                raise LabelError(f"rating {side}_{axis} must be 1 to 7, got {raw!r}")
            ratings.setdefault(side, {})[axis] = int(raw)
    note = form.get("note") or ""
    if len(note) > 10_000:
        raise LabelError("the note is limited to 10,000 characters")
    return confidence, ratings, note


def submit_label(db: Session, assignment: Assignment, confidence_shown: int, ratings_shown: dict[str, dict[str, int]], note: str) -> tuple[Label, bool]:
    """Stores the label of `assignment` in canonical order; (label, created). A repeated submission of the
    same assignment returns the stored label unchanged, so retries never duplicate. Commits."""
    existing = label_of(db, assignment.id)
    if existing is not None:
        db.commit()
        return existing, False
    swapped = assignment.swapped
    confidence = 10 - confidence_shown if swapped else confidence_shown
    side_index = {"a": 1 if swapped else 0, "b": 0 if swapped else 1}
    ratings = {str(side_index[side]): values for side, values in ratings_shown.items()}
    now = utcnow()
    served = assignment.served_at if assignment.served_at.tzinfo else assignment.served_at.replace(tzinfo=now.tzinfo)
    label = Label(
        assignment_id=assignment.id, comparison_id=assignment.comparison_id, labeler_id=assignment.labeler_id,
        project_id=assignment.project_id, choice=0 if confidence < 5 else 1, confidence=confidence,
        ratings=json.dumps(ratings, sort_keys=True), note=note, seconds=max(0.0, (now - served).total_seconds()), created_at=now,
    )
    db.add(label)
    try:
        db.commit()
        return label, True
    except IntegrityError:  # a concurrent retry stored it first
        db.rollback()
        return label_of(db, assignment.id), False
