"""Project operations shared by the admin pages and the CLI: accounts, projects, imports and exports."""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import argon2.profiles
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerifyMismatchError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fromfeedback.data import Comparison, Sample, Summary, comparison_to_json, format_query, format_response
from fromfeedback.files import UserError
from fromfeedback.label.db import Assignment, ComparisonRow, Label, PostRow, Project, User

# Argon2id with RFC 9106's low-memory parameters; $FROMFEEDBACK_ARGON2_PROFILE=CHEAPEST (any name in
# argon2.profiles) makes hashing instant for tests. Hashes record their parameters, so either verifies.
@functools.cache
def password_hasher() -> PasswordHasher:
    return PasswordHasher.from_parameters(getattr(argon2.profiles, os.environ.get("FROMFEEDBACK_ARGON2_PROFILE", "RFC_9106_LOW_MEMORY")))
MIN_PASSWORD_LENGTH = 8


def hash_password(password: str) -> str:
    return password_hasher().hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return password_hasher().verify(password_hash, password)
    except (VerifyMismatchError, InvalidHashError):
        return False


def create_user(db: Session, username: str, password: str, is_admin: bool = False) -> User:
    username = username.strip()
    if not username or len(username) > 100 or any(ch.isspace() for ch in username):
        raise UserError(f"username {username!r}: use 1-100 characters without spaces")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password for {username!r}: use at least {MIN_PASSWORD_LENGTH} characters")
    if db.scalar(select(User).where(User.username == username)) is not None:
        raise UserError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), is_admin=is_admin)
    db.add(user)
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise UserError(f"user {username!r} already exists") from None
    return user


def check_settings(overlap: int, gold_share: float) -> None:
    if overlap < 1:
        raise UserError(f"overlap {overlap}: each comparison needs at least 1 labeler")
    if not 0.0 <= gold_share < 1.0:
        raise UserError(f"gold share {gold_share}: use a fraction in [0, 1)")


def create_project(db: Session, name: str, overlap: int = 1, gold_share: float = 0.0, drift_policies: str = "") -> Project:
    name = name.strip()
    if not name or len(name) > 200:
        raise UserError(f"project name {name!r}: use 1-200 characters")
    check_settings(overlap, gold_share)
    if db.scalar(select(Project).where(Project.name == name)) is not None:
        raise UserError(f"project {name!r} already exists")
    project = Project(name=name, overlap=overlap, gold_share=gold_share, drift_policies=drift_policies.strip())
    db.add(project)
    db.commit()
    return project


def update_project(db: Session, project: Project, overlap: int, gold_share: float, drift_policies: str) -> None:
    check_settings(overlap, gold_share)
    project.overlap, project.gold_share, project.drift_policies = overlap, gold_share, drift_policies.strip()
    db.add(project)
    db.commit()


def find_project(db: Session, name_or_id: str | int) -> Project:
    project = db.get(Project, int(name_or_id)) if str(name_or_id).isdigit() else None
    project = project or db.scalar(select(Project).where(Project.name == str(name_or_id)))
    if project is None:
        raise UserError(f"no project {name_or_id!r} (create it with `fromfeedback label create-project`)")
    return project


def _post_row(db: Session, project: Project, cache: dict[str, PostRow], key: str, subreddit: str, title: str, body: str) -> PostRow:
    if key not in cache:
        row = db.scalar(select(PostRow).where(PostRow.project_id == project.id, PostRow.post_key == key))
        if row is None:
            row = PostRow(project_id=project.id, post_key=key, subreddit=subreddit, title=title, body=body)
            db.add(row)
            db.flush()
        cache[key] = row
    return cache[key]


def import_samples(
    db: Session,
    project: Project,
    samples: Iterable[Sample],
    posts: Mapping[str, Any],
    policies: Sequence[str] | None = None,
    limit: int | None = None,
) -> int:
    """Comparisons from samples: per post, two policies give one pair; K policies give all C(K,2) pairs of
    one ranking group. Post text comes from `posts` (objects with subreddit/title/post, by id) or from the
    sample's own `subreddit`/`title`/`post` fields. Returns the number of comparisons added."""
    by_post: dict[str, dict[str, Sample]] = defaultdict(dict)
    for sample in samples:
        if policies and sample.policy not in policies:
            continue
        by_post[sample.post_id].setdefault(sample.policy, sample)
    cache: dict[str, PostRow] = {}
    added = 0
    for post_key, by_policy in by_post.items():
        if len(by_policy) < 2:
            continue
        if limit is not None and added >= limit:
            break
        first = next(iter(by_policy.values()))
        source = posts.get(post_key)
        if source is None and "post" not in first.extra:
            raise UserError(f"post {post_key!r}: not in the posts file and its samples carry no `post` text")
        subreddit = getattr(source, "subreddit", None) or str(first.extra.get("subreddit", ""))
        title = getattr(source, "title", None) or str(first.extra.get("title", ""))
        body = getattr(source, "post", None) or str(first.extra.get("post", ""))
        post = _post_row(db, project, cache, post_key, subreddit, title, body)
        names = sorted(by_policy)
        group = f"{post_key}:{','.join(names)}" if len(names) > 2 else ""
        for policy_0, policy_1 in itertools.combinations(names, 2):
            db.add(
                ComparisonRow(
                    project_id=project.id, post_id=post.id, group_key=group,
                    text_0=by_policy[policy_0].text, policy_0=policy_0, text_1=by_policy[policy_1].text, policy_1=policy_1,
                )
            )
            added += 1
    db.commit()
    return added


def import_gold(db: Session, project: Project, comparisons: Iterable[Comparison], limit: int | None = None) -> int:
    """Researcher-labeled comparisons (OpenAI format) as gold tasks. A pair labeled several times keeps its
    first label. Returns the number of gold comparisons added."""
    cache: dict[str, PostRow] = {}
    seen: set[tuple[str, str, str]] = set()
    added = 0
    for c in comparisons:
        if limit is not None and added >= limit:
            break
        key = (c.post_id, c.summaries[0].text, c.summaries[1].text)
        if key in seen:
            continue
        seen.add(key)
        post = _post_row(db, project, cache, c.post_id, c.subreddit, c.title, c.post)
        db.add(
            ComparisonRow(
                project_id=project.id, post_id=post.id, is_gold=True,
                text_0=c.summaries[0].text, policy_0=c.summaries[0].policy,
                text_1=c.summaries[1].text, policy_1=c.summaries[1].policy,
                gold_choice=c.choice, gold_confidence=c.confidence, gold_worker=c.worker,
            )
        )
        added += 1
    db.commit()
    return added


def project_counts(db: Session, project: Project) -> dict[str, int]:
    def count(model, *where) -> int:
        return int(db.scalar(select(func.count()).select_from(model).where(model.project_id == project.id, *where)) or 0)

    return {
        "posts": count(PostRow),
        "comparisons": count(ComparisonRow, ComparisonRow.is_gold.is_(False)),
        "gold": count(ComparisonRow, ComparisonRow.is_gold.is_(True)),
        "labels": count(Label),
    }


def labeled_rows(db: Session, project: Project) -> list[tuple[Label, ComparisonRow, PostRow, User, Assignment]]:
    query = (
        select(Label, ComparisonRow, PostRow, User, Assignment)
        .join(ComparisonRow, Label.comparison_id == ComparisonRow.id)
        .join(PostRow, ComparisonRow.post_id == PostRow.id)
        .join(User, Label.labeler_id == User.id)
        .join(Assignment, Label.assignment_id == Assignment.id)
        .where(Label.project_id == project.id)
        .order_by(Label.id)
    )
    return [tuple(row) for row in db.execute(query)]


def export_openai(db: Session, project: Project) -> list[dict[str, Any]]:
    """Every label as one OpenAI-format comparison (loads with `fromfeedback.data.load_comparisons`)."""
    rows = []
    for label, comp, post, user, assignment in labeled_rows(db, project):
        comparison = Comparison(
            post_id=post.post_key, subreddit=post.subreddit, title=post.title, post=post.body,
            summaries=[Summary(comp.text_0, comp.policy_0), Summary(comp.text_1, comp.policy_1)],
            choice=label.choice, worker=user.username, batch=project.name, confidence=label.confidence,
        )
        row = comparison_to_json(comparison)
        row["extra"].update(
            label_id=label.id, note=label.note, ratings=json.loads(label.ratings), seconds=round(label.seconds, 3),
            gold=assignment.is_gold, shown_swapped=assignment.swapped, created_at=label.created_at.isoformat(),
        )
        rows.append(row)
    return rows


def export_pairs(db: Session, project: Project) -> list[dict[str, str]]:
    """The `prompt`/`chosen`/`rejected` format of TRL and other preference libraries, one row per label."""
    rows = []
    for label, comp, post, _user, _assignment in labeled_rows(db, project):
        texts = (comp.text_0, comp.text_1)
        rows.append(
            {
                "prompt": format_query(post.subreddit, post.title, post.body),
                "chosen": format_response(texts[label.choice]),
                "rejected": format_response(texts[1 - label.choice]),
            }
        )
    return rows
