"""`fromfeedback report RUN_DIR`: one self-contained HTML page (no external files; plots are PNGs
embedded as base64) that a person can read to judge a run.

What it looks for in RUN_DIR (each part is optional; a missing one becomes a short note on the page):
- `eval/*.json`: results written by `fromfeedback eval ... --out`, told apart by their `kind` field:
  `policy` (the win-rate table), `overoptimization` (its points; its PNG `eval/<plot>` is embedded),
  `transfer` (CNN/DM).
- `eval/*.png`: any other plot there is embedded too.
- `*/metrics.jsonl` (any depth, e.g. `sft/metrics.jsonl`, `rm/metrics.jsonl`, `ppo/metrics.jsonl`):
  training curves, one small panel per numeric metric against `step`.
- `*/summary.json` and `*/eval.json` (e.g. `sft/summary.json`, `rm/eval.json`): each stage's own
  summary, shown as a table of its numbers and short strings.
- `samples/*.jsonl`: samples files; shown side by side per post with the post, its reference and
  OpenAI's 1.3B summary from posts.jsonl.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from fromfeedback.files import UserError, write_text

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; }
.post { white-space: pre-wrap; background: #fafafa; padding: 8px; max-height: 16em; overflow: auto; font-size: 14px; }
.note { color: #777; font-style: italic; }
.summary-table td:first-child { width: 12em; font-weight: bold; }
"""
# Side-by-side column order: known policy names first, anything else after.
PREFERRED_ORDER = ["reference", "sft", "ppo", "best-of-n", "best_of_n", "openai_ppo_1.3b"]
MAX_CURVE_PANELS = 9


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def png_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def read_json_files(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # not a result of ours: skip rather than fail the whole report
        if isinstance(obj, dict) and "kind" in obj:
            results.append((path, obj))
    return results


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def curves_png(rows: list[dict[str, Any]], title: str) -> bytes | None:
    """Small multiples: every numeric metric logged at two or more steps, against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                series[key].append((row["step"], value))
    keys = [k for k, points in series.items() if len(points) >= 2][:MAX_CURVE_PANELS]
    if not keys:
        return None
    columns = min(3, len(keys))
    rows_count = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows_count, columns, figsize=(4 * columns, 2.6 * rows_count), dpi=90, squeeze=False)
    for axis, key in zip(axes.flat, keys):
        steps, values = zip(*series[key])
        axis.plot(steps, values, linewidth=1.2)
        axis.set_title(key, fontsize=9)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(keys) :]:
        axis.set_visible(False)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def policy_table_html(result: dict[str, Any]) -> str:
    from fromfeedback.evaluate.policy import TABLE_COLUMNS, table_cells, table_title

    head = "".join(f"<th>{esc(title)}</th>" for title in ["policy"] + [t for t, _, _ in TABLE_COLUMNS])
    body = "".join(
        "<tr><td>" + esc(name) + "</td>" + "".join(f'<td class="num">{esc(c)}</td>' for c in table_cells(row)) + "</tr>"
        for name, row in result.get("policies", {}).items()
    )
    caption = table_title(result)
    return f'<table class="policy-table"><caption>{esc(caption)}</caption><tr>{head}</tr>{body}</table>'


def rows_table_html(rows: list[dict[str, Any]], columns: list[str], css_class: str) -> str:
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else "—" if value is None else str(value)

    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell(row.get(c)))}</td>" for c in columns) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><tr>{head}</tr>{body}</table>'


def column_order(policy: str) -> tuple[float, str]:
    """Reference first, then SFT, PPO, best-of-N, other policies, and OpenAI's summaries last."""
    rank = {name: i for i, name in enumerate(PREFERRED_ORDER)}
    return (rank.get(policy, len(PREFERRED_ORDER) - 1.5), policy)


def samples_html(run_dir: Path, data_dir: str, examples: int) -> str:
    from fromfeedback.data import load_samples, load_tldr

    files = sorted((run_dir / "samples").glob("*.jsonl"))
    by_policy: dict[str, dict[str, str]] = defaultdict(dict)
    for path in files:
        for sample in load_samples(path):
            by_policy[sample.policy][sample.post_id] = sample.text
    if not by_policy:
        return '<p class="note">No samples: put samples files in RUN_DIR/samples/*.jsonl.</p>'
    try:
        posts = {p.id: p for p in load_tldr(data_dir)}
    except UserError as e:
        return f'<p class="note">Samples found, but posts.jsonl could not be read: {esc(e)}</p>'
    counts: dict[str, int] = defaultdict(int)
    for texts in by_policy.values():
        for post_id in texts:
            if post_id in posts:
                counts[post_id] += 1
    chosen = sorted(counts, key=lambda i: (-counts[i], list(posts).index(i)))[:examples]
    parts = []
    for post_id in chosen:
        post = posts[post_id]
        summaries = {"reference": post.reference or "", **{k: v for k, v in post.samples.items()}}
        summaries.update({name: texts[post_id] for name, texts in by_policy.items() if post_id in texts})
        rows = "".join(f"<tr><td>{esc(name)}</td><td>{esc(summaries[name])}</td></tr>" for name in sorted(summaries, key=column_order) if summaries[name])
        parts.append(
            f'<div class="example"><h3>r/{esc(post.subreddit)}: {esc(post.title)}</h3>'
            f'<div class="post">{esc(post.post)}</div><table class="summary-table">{rows}</table></div>'
        )
    return "".join(parts)


def flatten_scalars(obj: Any, prefix: str = "", depth: int = 2) -> list[tuple[str, Any]]:
    """(dotted key, value) for the numbers, booleans and short strings of a JSON object, 2 levels deep."""
    items: list[tuple[str, Any]] = []
    if isinstance(obj, dict) and depth > 0:
        for key, value in obj.items():
            items += flatten_scalars(value, f"{prefix}{key}.", depth - 1) if isinstance(value, dict) else flatten_scalars(value, f"{prefix}{key}", depth)
    elif isinstance(obj, (int, float, bool)) or (isinstance(obj, str) and len(obj) <= 120):
        items.append((prefix, f"{obj:.4g}" if isinstance(obj, float) else obj))
    return items


def stage_summaries_html(run_dir: Path) -> str:
    parts = []
    for path in sorted([*run_dir.glob("*/summary.json"), *run_dir.glob("*/eval.json")]):
        if path.parent.name == "eval":
            continue
        try:
            items = flatten_scalars(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
        rows = "".join(f"<tr><td>{esc(key)}</td><td>{esc(value)}</td></tr>" for key, value in items)
        parts.append(f'<h3>{esc(path.relative_to(run_dir))}</h3><table class="stage-summary">{rows}</table>')
    return "".join(parts) or '<p class="note">No stage summaries (RUN_DIR/*/summary.json, RUN_DIR/*/eval.json).</p>'


def build_report(run_dir: str | Path, data_dir: str = "", examples: int = 6) -> str:
    """The HTML text of the report for RUN_DIR."""
    from fromfeedback.config import default_data_dir

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run folder")
    eval_dir = run_dir / "eval"
    results = read_json_files(eval_dir) if eval_dir.is_dir() else []
    sections = [f"<h1>fromfeedback report: {esc(run_dir.resolve().name)}</h1>"]

    sections.append("<h2>Policies against a baseline</h2>")
    policy_results = [r for _, r in results if r["kind"] == "policy"]
    sections += [policy_table_html(r) for r in policy_results] or ['<p class="note">No policy evaluation: run `fromfeedback eval policy ... --out RUN_DIR/eval/policy.json`.</p>']
    sections.append(
        '<p>Win rate: the judge\'s mean preference for the policy over the baseline, with a 95% Wilson interval. '
        "Length-controlled: the preference a logistic regression on the policy and the log length ratio predicts at equal lengths.</p>"
    )

    sections.append("<h2>Over-optimization</h2>")
    embedded: set[str] = set()
    over = [r for _, r in results if r["kind"] == "overoptimization"]
    for result in over:
        plot = eval_dir / str(result.get("plot", ""))
        if plot.is_file():
            sections.append(png_tag(plot.read_bytes(), "over-optimization plot"))
            embedded.add(plot.name)
        sections.append(rows_table_html(result.get("points", []), ["label", "samples", "kl", "proxy_score", "judge_score", "judge_win_rate"], "overoptimization-table"))
    if not over:
        sections.append('<p class="note">No over-optimization sweep: run `fromfeedback eval overoptimization --out RUN_DIR/eval`.</p>')

    sections.append("<h2>Transfer to CNN/DailyMail</h2>")
    transfer = [r for _, r in results if r["kind"] == "transfer"]
    for result in transfer:
        rows = [{"summaries": name, **result.get(name, {})} for name in ("policy_summaries", "lead3", "highlights")]
        sections.append(f"<p>{esc(result.get('policy'))} on {esc(result.get('articles'))} articles</p>")
        sections.append(rows_table_html(rows, ["summaries", "rouge1", "rouge2", "rougeL", "mean_words", "eos_rate", "win_rate", "judge_score"], "transfer-table"))
    if not transfer:
        sections.append('<p class="note">No transfer evaluation: run `fromfeedback eval transfer --out RUN_DIR/eval`.</p>')

    other_plots = [p for p in sorted(eval_dir.glob("*.png")) if p.name not in embedded] if eval_dir.is_dir() else []
    if other_plots:
        sections.append("<h2>Other plots</h2>")
        sections += [png_tag(p.read_bytes(), p.stem) for p in other_plots]

    sections.append("<h2>Stage summaries</h2>")
    sections.append(stage_summaries_html(run_dir))

    sections.append("<h2>Training curves</h2>")
    curves = 0
    for path in sorted(run_dir.rglob("metrics.jsonl")):
        png = curves_png(read_metrics(path), str(path.parent.relative_to(run_dir)))
        if png is not None:
            sections.append(png_tag(png, f"training curves {path.parent.relative_to(run_dir)}"))
            curves += 1
    if not curves:
        sections.append('<p class="note">No training curves (no RUN_DIR/*/metrics.jsonl with two or more steps).</p>')

    sections.append("<h2>Samples side by side</h2>")
    sections.append(samples_html(run_dir, data_dir or default_data_dir(), examples))
    body = "\n".join(sections)
    return f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>fromfeedback report</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n'


def write_report(run_dir: str | Path, out: str | Path | None = None, data_dir: str = "", examples: int = 6) -> Path:
    path = Path(out) if out else Path(run_dir) / "report.html"
    write_text(path, build_report(run_dir, data_dir, examples))
    return path
