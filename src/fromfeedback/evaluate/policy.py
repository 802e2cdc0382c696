"""`fromfeedback eval policy`: every policy's summaries against a baseline's, judged, plus ROUGE, length,
EOS rate, repetition and KL to the SFT policy.

A policy's summaries come from a samples file (JSONL: post_id, policy, text, optional eos/tokens/kl;
one file may hold several policies), from `posts:NAME` (the `samples[NAME]` of posts.jsonl, e.g.
`posts:openai_ppo_1.3b`, OpenAI's released 1.3B human-feedback policy), or `reference` (the human TL;DRs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fromfeedback.data import Post, Sample, load_samples
from fromfeedback.evaluate import metrics
from fromfeedback.evaluate.judges import Judge
from fromfeedback.files import UserError

REFERENCE = "reference"


@dataclass
class PolicyEvalConfig:
    samples: list[str] = field(default_factory=list)
    """Samples files, `posts:NAME` (samples stored in posts.jsonl) or `reference`; each adds its policies."""
    judge: str = ""
    """`rm:DIR` (a reward model; a bare folder works too), `human:FILE` (exported comparisons) or `simulated:DIR`."""
    baseline: str = REFERENCE
    """Policy every other policy is compared with: `reference` or the name of a loaded policy."""
    data_dir: str = ""
    """Folder with tldr/posts.jsonl (default: $FROMFEEDBACK_DATA_DIR or ../shared/data)."""
    split: str = "test"
    """Posts to evaluate on (the paper's 246 `test` posts by default; `all` for every post)."""
    limit: int = 0
    """Evaluate on the first N posts of the split only (0: all)."""
    sft: str = ""
    """SFT policy folder: with `policy_models`, KL(policy ‖ SFT) is estimated on each policy's samples."""
    policy_models: list[str] = field(default_factory=list)
    """`NAME=DIR`: the model folder of policy NAME, needed for its KL to the SFT policy."""
    unfinished_loses: bool = True
    """A summary that never produced EOS within its token limit (sample `eos` false) loses to a finished one,
    whatever the judge says: RM judges score truncated, looping text far above finished summaries, and no
    labeler would. Two unfinished or two finished summaries are left to the judge."""
    flip_prob: float = 0.16
    """For `simulated:` judges: probability that a simulated labeler flips the judge RM's choice."""
    batch_size: int = 16
    """Batch size for scoring and log-prob computation."""
    seed: int = 0
    """Seed of the simulated labelers' noise."""
    out: str = ""
    """Also write the result as JSON here (e.g. RUN_DIR/eval/policy.json, which `fromfeedback report` reads)."""


def posts_source(posts: list[Post], name: str) -> dict[str, Sample]:
    """Summaries stored in posts.jsonl: `reference` or a `samples` key such as `openai_ppo_1.3b`."""
    if name == REFERENCE:
        return {p.id: Sample(p.id, REFERENCE, p.reference) for p in posts if p.reference}
    found = {p.id: Sample(p.id, name, p.samples[name]) for p in posts if name in p.samples}
    if not found:
        known = sorted({key for p in posts for key in p.samples})
        raise UserError(f"no post of the split has samples[{name!r}]; posts.jsonl has {known}")
    return found


def samples_from_comparisons(path: str | Path) -> list[Sample]:
    """Every summary of a comparisons file as a sample of its policy (the first one per post and policy),
    so labeled policies can be evaluated with `human:` that same file as judge."""
    from fromfeedback.data import load_comparisons

    seen: dict[tuple[str, str], Sample] = {}
    for comparison in load_comparisons(path):
        for summary in comparison.summaries:
            seen.setdefault((summary.policy, comparison.post_id), Sample(comparison.post_id, summary.policy, summary.text))
    return list(seen.values())


def load_policies(specs: list[str], posts: list[Post]) -> dict[str, dict[str, Sample]]:
    """{policy name: {post id: sample}} from samples files, `posts:NAME` and `reference`, in the given order."""
    wanted = {p.id for p in posts}
    policies: dict[str, dict[str, Sample]] = {}
    for spec in specs:
        if spec == REFERENCE or spec.startswith("posts:"):
            name = spec.removeprefix("posts:")
            policies.setdefault(name, {}).update(posts_source(posts, name))
            continue
        if not Path(spec).exists():
            raise UserError(f"{spec}: samples file not found (or use posts:NAME / reference)")
        for sample in load_samples(spec):
            if sample.post_id in wanted:
                policies.setdefault(sample.policy, {})[sample.post_id] = sample
    if not policies:
        raise UserError("no samples for the posts of this split: check --samples and --split")
    return policies


def parse_named_paths(items: list[str], what: str) -> dict[str, str]:
    """`["ppo=runs/x/model"]` → {"ppo": "runs/x/model"}."""
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{what} {item!r}: expected NAME=PATH")
        named[name] = path
    return named


def response_ids(tokenizer, sample: Sample, max_tokens: int = 48) -> list[int]:
    """The response tokens as the policy produced them: EOS only where the sample records one."""
    from fromfeedback.data import encode_response

    ids = encode_response(tokenizer, sample.text, max_tokens + 1)
    if sample.extra.get("eos") is False or len(ids) > max_tokens:
        ids = ids[:-1][:max_tokens]
    return ids


def sample_kls(
    samples: list[Sample], posts: dict[str, Post], policy_dir: str, sft_dir: str, batch_size: int, temperature: float = 1.0, precision: str = "fp32"
) -> list[float]:
    """log π(y|x) − log π_SFT(y|x) of each sample in nats, both under softmax(logits / temperature), each
    model with its own query budget.

    Their mean over samples drawn from π at that temperature estimates KL(π_T ‖ π_SFT,T) without bias; on
    greedy samples it is only the log-likelihood ratio of the summaries produced (and can be negative).
    fp32 by default: KLs near 0 drown in bf16 noise; at ~1 nat bf16 was within 4% of fp32, 3x faster.
    """
    from fromfeedback.data import make_query
    from fromfeedback.models import load_policy, load_tokenizer, resolve_model
    from fromfeedback.runtime import default_device, inference_dtype
    from fromfeedback.sampling import query_budget

    logprobs = []
    for folder in (policy_dir, sft_dir):
        model_dir = resolve_model(folder)
        tokenizer = load_tokenizer(model_dir)
        model = load_policy(model_dir, inference_dtype(precision, default_device())).to(default_device()).eval()  # type: ignore[arg-type]
        budget = query_budget(model_dir, 0)
        queries = [tokenizer.encode(make_query(posts[s.post_id].subreddit, posts[s.post_id].title, posts[s.post_id].post, tokenizer, budget), add_special_tokens=False) for s in samples]
        responses = [response_ids(tokenizer, s) for s in samples]
        logprobs.append(metrics.sequence_logprobs(model, tokenizer, queries, responses, batch_size, precision, temperature))
        del model
    return [p - r for p, r in zip(*logprobs)]


def policy_kl(samples: list[Sample], posts: dict[str, Post], policy_dir: str, sft_dir: str, batch_size: int) -> float:
    """KL(π ‖ π_SFT) estimated on the policy's own samples (see `sample_kls`)."""
    kls = sample_kls(samples, posts, policy_dir, sft_dir, batch_size)
    return sum(kls) / max(len(kls), 1)


def finished(sample: Sample) -> bool:
    """Whether a summary ended (samples without an `eos` field, such as references, count as finished)."""
    return sample.extra.get("eos") is not False


def finished_first(sample: Sample, baseline: Sample, verdict: float | None) -> float | None:
    """P(sample preferred): 0 or 1 when exactly one of the two summaries never ended, else the judge's verdict."""
    if finished(sample) == finished(baseline):
        return verdict
    return 1.0 if finished(sample) else 0.0


def evaluate_policies(config: PolicyEvalConfig, judge: Judge) -> dict[str, Any]:
    """The table: one row per policy (the baseline's row has no win rate)."""
    from fromfeedback.config import default_data_dir
    from fromfeedback.data import load_tldr

    posts = load_tldr(config.data_dir or default_data_dir(), None if config.split == "all" else config.split)
    if config.limit:
        posts = posts[: config.limit]
    post_by_id = {p.id: p for p in posts}
    policies = load_policies(config.samples, posts)
    if config.baseline not in policies:
        if config.baseline != REFERENCE:
            raise UserError(f"baseline {config.baseline!r} is not among the loaded policies {sorted(policies)}")
        policies = {REFERENCE: posts_source(posts, REFERENCE), **policies}
    policies = {config.baseline: policies[config.baseline], **policies}  # the baseline's row first
    baseline = policies[config.baseline]
    models = parse_named_paths(config.policy_models, "--policy-model")
    unknown = sorted(set(models) - set(policies))
    if unknown:
        raise UserError(f"--policy-model names {unknown} match no loaded policy {sorted(policies)}")

    rows: dict[str, dict[str, Any]] = {}
    regression: dict[str, list] = {"policy": [], "preference": [], "policy_words": [], "baseline_words": []}
    for name, by_post in policies.items():
        ids = [post_id for post_id in post_by_id if post_id in by_post]
        samples = [by_post[i] for i in ids]
        texts = [s.text for s in samples]
        with_reference = [(s.text, post_by_id[s.post_id].reference) for s in samples if post_by_id[s.post_id].reference]
        row: dict[str, Any] = {"samples": len(samples)}
        if name != config.baseline:
            shared = [i for i in ids if i in baseline]
            verdicts = judge.prefer([post_by_id[i] for i in shared], [by_post[i].text for i in shared], [baseline[i].text for i in shared])
            if config.unfinished_loses:
                verdicts = [finished_first(by_post[i], baseline[i], v) for i, v in zip(shared, verdicts)]
            judged = [(i, v) for i, v in zip(shared, verdicts) if v is not None]
            row.update(metrics.win_rate([v for _, v in judged]))
            for post_id, verdict in judged:
                regression["policy"].append(name)
                regression["preference"].append(verdict)
                regression["policy_words"].append(metrics.word_count(by_post[post_id].text))
                regression["baseline_words"].append(metrics.word_count(baseline[post_id].text))
        row.update(metrics.rouge_scores([t for t, _ in with_reference], [r for _, r in with_reference]))
        row.update(metrics.text_statistics(texts, [s.extra.get("eos") for s in samples]))
        row["kl"] = None
        if samples and all(isinstance(s.extra.get("kl"), (int, float)) for s in samples):
            row["kl"] = sum(s.extra["kl"] for s in samples) / len(samples)
        elif name in models and config.sft:
            row["kl"] = policy_kl(samples, post_by_id, models[name], config.sft, config.batch_size)
        rows[name] = row
    slope = None
    if regression["policy"]:
        rates, slope = metrics.length_controlled_win_rates(regression["policy"], regression["preference"], regression["policy_words"], regression["baseline_words"])
        for name, rate in rates.items():
            rows[name]["lc_win_rate"] = rate
    return {
        "kind": "policy",
        "judge": getattr(judge, "name", config.judge),
        "baseline": config.baseline,
        "split": config.split,
        "posts": len(posts),
        "length_slope": slope,
        "policies": rows,
    }


def _cell(value: Any, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


TABLE_COLUMNS = [
    ("win rate", "win_rate", True), ("95% CI", None, True), ("length-controlled", "lc_win_rate", True), ("judged", "n", False),
    ("ROUGE-1", "rouge1", False), ("ROUGE-2", "rouge2", False), ("ROUGE-L", "rougeL", False), ("words", "mean_words", False),
    ("EOS", "eos_rate", True), ("repeated 4-gram", "repeated_4gram", True), ("duplicates", "duplicate_rate", True), ("KL to SFT", "kl", False),
]


def table_cells(row: dict[str, Any]) -> list[str]:
    """The formatted cells of one policy's row, in TABLE_COLUMNS order (shared by the CLI and the report)."""
    cells = []
    for _, key, percent in TABLE_COLUMNS:
        if key is None:
            low, high = row.get("ci_low"), row.get("ci_high")
            missing = low is None or (isinstance(low, float) and math.isnan(low))
            cells.append("—" if missing else f"{_cell(low, True)} – {_cell(high, True)}")
        else:
            cells.append(_cell(row.get(key), percent))
    return cells


def table_title(result: dict[str, Any]) -> str:
    posts = f"all {result.get('posts')} posts" if result.get("split") == "all" else f"{result.get('posts')} {result.get('split')} posts"
    return f"judge {result.get('judge')} vs baseline {result.get('baseline')}, on {posts}"


def format_table(result: dict[str, Any]) -> str:
    header = ["policy"] + [title for title, _, _ in TABLE_COLUMNS]
    lines = [[name] + table_cells(row) for name, row in result["policies"].items()]
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    title = table_title(result)
    return "\n".join([title, render(header)] + [render(line) for line in lines])
