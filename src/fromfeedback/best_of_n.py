"""Best-of-N: sample N summaries per post at temperature 0.7, keep the one the reward model scores highest.

The KL of the best-of-N distribution to the policy it samples from is log N − (N − 1)/N (Stiennon et al.
2020, appendix), so best-of-N traces a reward-against-KL curve without any training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fromfeedback.data import QueryResponseBatch, Sample, load_tldr, make_query, write_samples
from fromfeedback.files import UserError, write_json
from fromfeedback.models import load_policy, load_scalar_model, load_tokenizer, resolve_model
from fromfeedback.ppo import penalize_no_eos
from fromfeedback.reward import score_shared_queries
from fromfeedback.runtime import check_precision, default_device, inference_dtype, peak_memory_mb, progress, seed_everything
from fromfeedback.sampling import generate, query_budget


@dataclass
class BestOfNConfig:
    policy: str = ""
    """Policy to sample from (usually the SFT model folder)."""
    rm: str = ""
    """Reward model folder that picks the best sample."""
    n: int = 4
    """Samples per post."""
    also_n: list[int] = field(default_factory=list)
    """Also write best-of-k for each k here (k < n), from the first k of the same N samples of each post: one
    sampling pass serves every N. Needs `{n}` in `out`."""
    data_dir: str = ""
    """Folder with tldr/posts.jsonl (default: $FROMFEEDBACK_DATA_DIR or ../shared/data)."""
    split: str = "test"
    """Which posts to summarize."""
    limit: int = 100
    """Summarize only the first N posts of the split (0: all)."""
    out: str = "best_of_n.jsonl"
    """Samples file to write (post_id, policy, text, score, kl, n, eos, tokens); a summary goes beside it.
    `{n}` in it is replaced by N (needed with also_n)."""
    temperature: float = 0.7
    """Sampling temperature."""
    max_new_tokens: int = 48
    """Longest summary, in tokens."""
    query_max_tokens: int = 0
    """Query token budget (0: what the policy was trained with, else 512)."""
    no_eos_penalty: float = -1.0
    """Score of a sample that ends without EOS (as in PPO), so an unfinished summary is never preferred."""
    penalize_no_eos: bool = True
    """Replace the score of a sample without EOS by no_eos_penalty."""
    batch_size: int = 16
    """Sequences generated or scored together."""
    seed: int = 0
    """Seed for sampling."""
    threads: int = 0
    """CPU threads for torch (0: torch's default); 1 is often fastest on a CPU shared with other jobs."""
    precision: str = "auto"
    """auto (bf16 autocast where the hardware supports it), bf16 or fp32."""

    def validate(self) -> None:
        if self.n < 1:
            raise UserError(f"n must be at least 1, got {self.n}")
        if any(not 1 <= k <= self.n for k in self.also_n):
            raise UserError(f"also_n must hold sizes from 1 to n = {self.n}, got {self.also_n}")
        if self.also_n and "{n}" not in self.out:
            raise UserError(f"with also_n, out needs a {{n}} placeholder for each file (e.g. best-of-{{n}}.jsonl), got {self.out!r}")
        if self.temperature <= 0:
            raise UserError("temperature must be > 0: best-of-N needs distinct samples")
        check_precision(self.precision)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-N ‖ policy) = log N − (N − 1)/N, in nats."""
    return math.log(n) - (n - 1) / n


def pick_best(scores: torch.Tensor, n: int, k: int | None = None) -> torch.Tensor:
    """Scores [P·N] of N consecutive samples per post → index [P] of the best of each post's first k
    samples (all N by default; first on ties)."""
    return scores.view(-1, n)[:, : k or n].argmax(-1) + torch.arange(scores.numel() // n) * n


def run_best_of_n(config: BestOfNConfig, reward_fn: Callable[[QueryResponseBatch], torch.Tensor] | None = None) -> Path:
    """Writes each post's best of N samples with its score and the analytic KL (and best of k for each k
    of also_n); returns the samples file of N."""
    from fromfeedback.config import default_data_dir

    if not config.policy:
        raise UserError("give the policy with --policy DIR")
    seed_everything(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = default_device()
    policy_dir = resolve_model(config.policy)
    tokenizer = load_tokenizer(policy_dir)
    dtype = inference_dtype(config.precision, device)  # type: ignore[arg-type]
    policy = load_policy(policy_dir, dtype).to(device).eval()
    if reward_fn is None:
        if not config.rm:
            raise UserError("give the reward model with --rm DIR")
        reward_model = load_scalar_model(config.rm, dtype).to(device).eval()

        def reward_fn(batch: QueryResponseBatch) -> torch.Tensor:
            # The N samples of a post come together (a chunk of whole posts): the post runs once for them.
            return score_shared_queries(reward_model, batch, config.n, config.precision)

    posts = load_tldr(config.data_dir or default_data_dir(), config.split)[: config.limit or None]
    if not posts:
        raise UserError(f"split {config.split!r} has no posts")
    budget = query_budget(policy_dir, config.query_max_tokens)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    started = time.perf_counter()
    sizes = sorted({config.n, *config.also_n})
    samples: dict[int, list[Sample]] = {k: [] for k in sizes}
    # A chunk of posts at a time, each query repeated N times, so memory stays bounded for any N.
    posts_per_chunk = max(1, config.batch_size // config.n)
    for start in progress(range(0, len(posts), posts_per_chunk), desc=f"best-of-{config.n}"):
        chunk = posts[start : start + posts_per_chunk]
        queries = [tokenizer.encode(make_query(p.subreddit, p.title, p.post, tokenizer, budget), add_special_tokens=False) for p in chunk]
        generation = generate(
            policy, tokenizer, queries, config.max_new_tokens, config.temperature, 1.0, config.batch_size, generator, config.precision, samples_per_query=config.n
        )
        scores = reward_fn(generation.batch.to(device)).float().cpu()
        if config.penalize_no_eos:
            scores = penalize_no_eos(scores, generation.ended, config.no_eos_penalty)
        lengths = generation.batch.response_lengths.tolist()
        for k in sizes:
            for post, best in zip(chunk, pick_best(scores, config.n, k).tolist()):
                extra = {"score": float(scores[best]), "kl": best_of_n_kl(k), "n": k, "eos": bool(generation.ended[best]), "tokens": int(lengths[best])}
                samples[k].append(Sample(post.id, f"best-of-{k}", generation.texts[best], extra))
    seconds = time.perf_counter() - started
    for k in sizes:
        out = config.out.replace("{n}", str(k))
        write_samples(out, samples[k])
        summary = {
            "n": k,
            "posts": len(samples[k]),
            "mean_score": sum(s.extra["score"] for s in samples[k]) / len(samples[k]),
            "kl": best_of_n_kl(k),
            "eos_rate": sum(s.extra["eos"] for s in samples[k]) / len(samples[k]),
            "mean_tokens": sum(s.extra["tokens"] for s in samples[k]) / len(samples[k]),
            "seconds": seconds,
            "peak_memory_mib": peak_memory_mb(device),
        }
        write_json(Path(out).with_suffix(".summary.json"), summary)
        print(f"wrote {len(samples[k])} best-of-{k} samples to {out}: mean score {summary['mean_score']:.3f}, "
              f"KL {summary['kl']:.3f} nats, EOS rate {summary['eos_rate']:.1%}")
    print(f"{len(posts) * config.n} samples generated and scored in {seconds:.0f} s")
    return Path(config.out.replace("{n}", str(config.n)))
