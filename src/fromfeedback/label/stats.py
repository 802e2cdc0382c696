"""Dashboard figures: per-labeler throughput and agreement, overall agreement, and preference drift."""

from __future__ import annotations

import itertools
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from fromfeedback.label.admin import labeled_rows
from fromfeedback.label.db import Project


@dataclass
class LabelerStats:
    username: str
    labels: int = 0
    median_seconds: float | None = None
    gold_labels: int = 0
    gold_agreement: float | None = None
    """Share of this labeler's gold tasks where they chose the researcher's summary."""
    shared_pairs: int = 0
    peer_agreement: float | None = None
    """Share of (this labeler, other labeler) pairs on a shared comparison that chose the same summary."""


@dataclass
class DriftWindow:
    start: datetime
    end: datetime
    labels: int
    preference: float
    """Share of labels in the window preferring the pair's first policy."""


@dataclass
class Dashboard:
    labelers: list[LabelerStats]
    total_labels: int
    shared_pairs: int
    agreement: float | None
    """Labeler-labeler agreement over all pairs of labels on the same comparison."""
    drift_pair: tuple[str, str] | None
    drift: list[DriftWindow] = field(default_factory=list)


def _rate(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def drift_windows(times_and_wins: list[tuple[datetime, bool]], windows: int = 10) -> list[DriftWindow]:
    """Splits time-ordered (time, first policy preferred) labels into up to `windows` consecutive,
    equally sized windows, with the preference rate in each."""
    ordered = sorted(times_and_wins, key=lambda tw: tw[0])
    n = min(windows, len(ordered))
    result = []
    for i in range(n):
        chunk = ordered[i * len(ordered) // n : (i + 1) * len(ordered) // n]
        result.append(DriftWindow(chunk[0][0], chunk[-1][0], len(chunk), sum(w for _, w in chunk) / len(chunk)))
    return result


def dashboard(db: Session, project: Project, windows: int = 10) -> Dashboard:
    rows = labeled_rows(db, project)
    per_user: dict[str, LabelerStats] = {}
    seconds: dict[str, list[float]] = defaultdict(list)
    gold_hits: dict[str, list[bool]] = defaultdict(list)
    by_comparison: dict[int, list[tuple[str, int]]] = defaultdict(list)
    pair_counts: Counter = Counter()
    for label, comp, _post, user, _assignment in rows:
        stats = per_user.setdefault(user.username, LabelerStats(user.username))
        stats.labels += 1
        seconds[user.username].append(label.seconds)
        if comp.is_gold and comp.gold_choice is not None:
            gold_hits[user.username].append(label.choice == comp.gold_choice)
        by_comparison[comp.id].append((user.username, label.choice))
        pair_counts[tuple(sorted((comp.policy_0, comp.policy_1)))] += 1

    peer_hits: dict[str, list[bool]] = defaultdict(list)
    all_hits: list[bool] = []
    for labels in by_comparison.values():
        for (user_a, choice_a), (user_b, choice_b) in itertools.combinations(labels, 2):
            agree = choice_a == choice_b
            peer_hits[user_a].append(agree)
            peer_hits[user_b].append(agree)
            all_hits.append(agree)

    for name, stats in per_user.items():
        stats.median_seconds = statistics.median(seconds[name])
        stats.gold_labels, stats.gold_agreement = len(gold_hits[name]), _rate(gold_hits[name])
        stats.shared_pairs, stats.peer_agreement = len(peer_hits[name]), _rate(peer_hits[name])

    pair = tuple(p.strip() for p in project.drift_policies.split(",")) if project.drift_policies else None
    if pair is None and pair_counts:
        pair = pair_counts.most_common(1)[0][0]
    drift = []
    if pair is not None and len(pair) == 2:
        first = pair[0]
        points = [
            (label.created_at, (comp.policy_0, comp.policy_1)[label.choice] == first)
            for label, comp, *_ in rows
            if {comp.policy_0, comp.policy_1} == set(pair)
        ]
        drift = drift_windows(points, windows)
    return Dashboard(
        labelers=sorted(per_user.values(), key=lambda s: s.username),
        total_labels=len(rows),
        shared_pairs=len(all_hits),
        agreement=_rate(all_hits),
        drift_pair=pair if pair is None or len(pair) == 2 else None,
        drift=drift,
    )
