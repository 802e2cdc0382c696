"""`fromfeedback eval overoptimization`: proxy reward and judge reward against KL to the SFT policy.

Input contract (what PPO and best-of-N write, so the pipeline can feed this directly): one samples
file per point, given as `--point LABEL=FILE`. Each sample carries
- `kl`: its KL to the SFT policy in nats. PPO: the sample's log π − log π_SFT summed over its tokens;
  best-of-N: the analytic log N − (N−1)/N. The point's KL is the mean over its samples.
- `score` (optional): the proxy (training) RM's score. Without it, pass `--proxy DIR` and it is computed.
A point may instead name a policy folder (`--point ppo-beta0.05/final=runs/x/ppo/model`, e.g. a
PPO run's final policy or a saved checkpoint): it then summarizes the split's posts by sampling at
`--temperature` (0.7, as PPO's rollouts and best-of-N), each sample's `kl` is log π − log π_SFT on it at
that temperature (an unbiased estimate of the KL; needs `--sft`), and the samples are kept as
OUT/points/<label>.jsonl for the report.
The part of LABEL before the first `/` names the series the point belongs to and the rest names the
point: `ppo-beta0.05/iter-40`, `ppo-beta0.01/final`, `best-of-n/N=16`. Points of one series are joined
by a line in order of KL. The paper's finding to look for: the proxy score keeps rising with KL while
the judge's score peaks and falls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fromfeedback.data import load_samples
from fromfeedback.evaluate.judges import RewardModelJudge
from fromfeedback.files import UserError


def parse_points(items: list[str]) -> dict[str, str]:
    """`LABEL=FILE` items → {label: file}. Labels and paths may both hold `=` (`best-of-n/N=16=bon16.jsonl`):
    the split is at the first `=` after which an existing file is named."""
    points = {}
    for item in items:
        cuts = [i for i, ch in enumerate(item) if ch == "="]
        existing = [i for i in cuts if Path(item[i + 1 :]).is_file()]
        cut = (existing or cuts or [-1])[0]
        if cut <= 0 or cut == len(item) - 1:
            raise UserError(f"--point {item!r}: expected LABEL=SAMPLES_FILE")
        points[item[:cut]] = item[cut + 1 :]
    return points


def point_series(label: str) -> str:
    return label.split("/", 1)[0]


def sample_policy_point(
    label: str, model: str, sft: str, posts: list[Any], out_dir: Path, batch_size: int, max_new_tokens: int = 48, temperature: float = 0.7, seed: int = 0
) -> Path:
    """A summary of each of `posts` sampled at `temperature` from the policy in `model`, each with its `kl`
    to the SFT policy at that temperature (bf16 where supported: these KLs are ~1 nat, not ~0): the same
    footing as best-of-N points (the best of N samples of the SFT policy at 0.7, with the analytic KL) and
    as PPO's training KL."""
    from fromfeedback.data import Sample, make_query, write_samples
    from fromfeedback.evaluate.policy import sample_kls
    from fromfeedback.models import load_policy, load_tokenizer, resolve_model
    from fromfeedback.runtime import default_device, inference_dtype
    from fromfeedback.sampling import generate, query_budget

    if not sft:
        raise UserError(f"point {label!r} is a policy folder: give --sft DIR to measure its KL")
    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    policy = load_policy(model_dir, inference_dtype("auto", default_device())).to(default_device()).eval()
    budget = query_budget(model_dir, 0)
    queries = [tokenizer.encode(make_query(p.subreddit, p.title, p.post, tokenizer, budget), add_special_tokens=False) for p in posts]
    generator = torch.Generator(device=default_device()).manual_seed(seed)
    generation = generate(policy, tokenizer, queries, max_new_tokens, temperature, 1.0, batch_size, generator, show_progress=True)
    del policy
    samples = [Sample(p.id, label, text, {"eos": bool(ended)}) for p, text, ended in zip(posts, generation.texts, generation.ended.tolist())]
    for sample, kl in zip(samples, sample_kls(samples, {p.id: p for p in posts}, str(model_dir), sft, batch_size, temperature, "auto")):
        sample.extra["kl"] = kl
    path = out_dir / "points" / (label.replace("/", "_").replace("=", "") + ".jsonl")
    write_samples(path, samples)
    return path


def measure_points(
    points: dict[str, str], posts: dict[str, Any], judge: RewardModelJudge, proxy: RewardModelJudge | None, no_eos_score: float | None = None
) -> list[dict[str, Any]]:
    """One row per point (a samples file): KL, proxy score, judge score, and the judge's win rate
    against the references. With `no_eos_score`, a sample that never ended (`eos` false) gets that score
    from both reward models, as PPO and best-of-N scored it when they optimized."""
    from fromfeedback.evaluate.judges import sigmoid
    from fromfeedback.evaluate.policy import finished

    rows = []
    for label, path in points.items():
        samples = [s for s in load_samples(path) if s.post_id in posts]
        if not samples:
            raise UserError(f"{path}: no sample of a known post (point {label!r})")
        missing_kl = [s.post_id for s in samples if not isinstance(s.extra.get("kl"), (int, float))]
        if missing_kl:
            raise UserError(f"{path}: samples need a numeric `kl` field (first without: post {missing_kl[0]})")
        chosen = [posts[s.post_id] for s in samples]
        if proxy is not None:
            proxy_scores = proxy.score(chosen, [s.text for s in samples])
        elif all(isinstance(s.extra.get("score"), (int, float)) for s in samples):
            proxy_scores = [float(s.extra["score"]) for s in samples]
        else:
            raise UserError(f"{path}: samples lack a `score` field; pass --proxy DIR to score them with the proxy RM")
        judge_scores = judge.score(chosen, [s.text for s in samples])
        if no_eos_score is not None:
            proxy_scores = [score if finished(s) else no_eos_score for s, score in zip(samples, proxy_scores)]
            judge_scores = [score if finished(s) else no_eos_score for s, score in zip(samples, judge_scores)]
        with_reference = [(p, score) for p, score in zip(chosen, judge_scores) if p.reference]
        reference_scores = judge.score([p for p, _ in with_reference], [p.reference for p, _ in with_reference])
        wins = [sigmoid(score - ref) for (_, score), ref in zip(with_reference, reference_scores)]
        n = len(samples)
        rows.append({
            "label": label,
            "series": point_series(label),
            "samples": n,
            "kl": sum(s.extra["kl"] for s in samples) / n,
            "proxy_score": sum(proxy_scores) / n,
            "judge_score": sum(judge_scores) / n,
            "judge_win_rate": sum(wins) / len(wins) if wins else None,
        })
    return rows


def plot_points(rows: list[dict[str, Any]], path: str | Path, title: str = "Over-optimization") -> Path:
    """Proxy (dashed, hollow) and judge (solid) reward against KL, one color per series, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fromfeedback.files import atomic_path

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, series in enumerate(dict.fromkeys(r["series"] for r in rows)):
        points = sorted((r for r in rows if r["series"] == series), key=lambda r: r["kl"])
        color = colors[index % len(colors)]
        kls = [r["kl"] for r in points]
        axes.plot(kls, [r["proxy_score"] for r in points], "--o", color=color, markerfacecolor="none", label=f"{series}: proxy RM")
        axes.plot(kls, [r["judge_score"] for r in points], "-o", color=color, label=f"{series}: judge")
    axes.axhline(0.0, color="gray", linewidth=0.8)
    axes.set_xlabel("KL(π ‖ π_SFT), nats")
    axes.set_ylabel("reward (references = 0)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return Path(path)


def run_overoptimization(
    point_items: list[str], judge_dir: str, proxy_dir: str, data_dir: str, split: str, out_dir: str, batch_size: int = 16, sft: str = "", limit: int = 0,
    max_new_tokens: int = 48, temperature: float = 0.7, no_eos_score: float | None = None,
) -> dict[str, Any]:
    """Measures every point, writes OUT/overoptimization.json and OUT/overoptimization.png.

    Policy-folder points summarize the first `limit` posts of `split` (0: all)."""
    from fromfeedback.config import default_data_dir
    from fromfeedback.data import load_tldr
    from fromfeedback.files import write_json

    points = parse_points(point_items)
    if not points:
        raise UserError("give at least one --point LABEL=SAMPLES_FILE")
    post_list = load_tldr(data_dir or default_data_dir(), None if split == "all" else split)
    posts = {p.id: p for p in post_list}
    for label, path in points.items():
        if Path(path).is_dir():
            points[label] = str(sample_policy_point(label, path, sft, post_list[: limit or None], Path(out_dir), batch_size, max_new_tokens, temperature))
    judge = RewardModelJudge(judge_dir, batch_size=batch_size)
    proxy = RewardModelJudge(proxy_dir, batch_size=batch_size) if proxy_dir else None
    rows = measure_points(points, posts, judge, proxy, no_eos_score)
    plot = plot_points(rows, Path(out_dir) / "overoptimization.png")
    result = {"kind": "overoptimization", "judge": judge.name, "proxy": proxy.name if proxy else "score field", "plot": plot.name, "points": rows}
    write_json(Path(out_dir) / "overoptimization.json", result)
    return result
