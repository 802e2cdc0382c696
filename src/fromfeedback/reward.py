"""The reward model: the SFT model plus a scalar head read at the response's EOS token.

Training (`fromfeedback rm train`): loss `-log σ(r_chosen − r_rejected)` on human comparisons, or on
all C(K, 2) pairs of K-way rankings, each prompt counting once. After training a bias makes the mean
reward of reference summaries 0. Evaluation (`rm eval`) reports accuracy beside the two reference lines
the data gives: "the longer summary wins" (the floor) and labeler-labeler agreement (the ceiling).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fromfeedback import stage_info
from fromfeedback.config import default_data_dir
from fromfeedback.data import (
    Comparison,
    QueryResponseBatch,
    Ranking,
    encode_response,
    load_rankings,
    load_samples,
    load_tldr,
    load_tldr_comparisons,
    make_query,
    write_samples,
)
from fromfeedback.files import UserError, atomic_path, write_json
from fromfeedback.models import (
    ScalarHeadModel,
    count_parameters,
    freeze_lower,
    inference_copy,
    load_scalar_model,
    load_tokenizer,
    resolve_model,
    shared_query_hidden,
)
from fromfeedback.runtime import (
    Checkpointer,
    MetricsLogger,
    Precision,
    adamw,
    autocast,
    batch_plan,
    check_lr_schedule,
    check_precision,
    default_device,
    inference_dtype,
    learning_rate,
    peak_memory_mb,
    progress,
    seed_everything,
    use_bf16,
)
from fromfeedback.stats import calibration_bins, expected_calibration_error, pairwise_accuracy, similar_length, wilson_interval


def eos_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Column of each response's last real token (its EOS when it has one), from the explicit mask."""
    return (response_mask.sum(-1) - 1).clamp(min=0)


@torch.no_grad()
def score_batch(model: ScalarHeadModel, batch: QueryResponseBatch, precision: Precision = "auto") -> torch.Tensor:
    """Scores [B] of a tokenized batch, read at each response's last token, minus the model's bias."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    with autocast(precision, device):
        return model(batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask, eos_index(batch.response_mask)).float().cpu()


def score_summaries(
    model: ScalarHeadModel,
    tokenizer,
    posts: Sequence,
    summaries: Sequence[str],
    query_max_tokens: int = 512,
    response_max_tokens: int = 48,
    batch_size: int = 16,
    precision: Precision = "auto",
    show_progress: bool = False,
) -> list[float]:
    """Reward of each (post, summary) pair; `posts` need `subreddit`, `title` and `post` attributes."""
    if len(posts) != len(summaries):
        raise ValueError(f"{len(posts)} posts but {len(summaries)} summaries")
    scores: list[float] = []
    bar = progress(total=len(posts), desc="score", enabled=show_progress)
    for start in range(0, len(posts), batch_size):
        chunk_posts, chunk_summaries = posts[start : start + batch_size], summaries[start : start + batch_size]
        queries = [tokenizer.encode(make_query(p.subreddit, p.title, p.post, tokenizer, query_max_tokens), add_special_tokens=False) for p in chunk_posts]
        responses = [encode_response(tokenizer, s, response_max_tokens) for s in chunk_summaries]
        batch = QueryResponseBatch.from_ids(queries, responses, tokenizer.pad_token_id)
        scores.extend(score_batch(model, batch, precision).tolist())
        bar.update(len(chunk_posts))
    bar.close()
    return scores


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class RMConfig:
    sft: str = "smollm2-135m"
    """Model to start from (the SFT model folder); a fresh scalar head is put on its trunk."""
    data_dir: str = ""
    """Folder with tldr/posts.jsonl and tldr/comparisons/ (default: $FROMFEEDBACK_DATA_DIR or ../shared/data)."""
    out: str = "runs/rm"
    """Run folder: the reward model goes to OUT/model, metrics to OUT/metrics.jsonl, the evaluation to OUT/eval.json."""
    train_split: str = "rm_train"
    """Comparisons whose post is in this split (of posts.jsonl) are trained on."""
    comparisons: str = ""
    """Comma-separated comparison files to train on (default: every file in DATA_DIR/tldr/comparisons)."""
    rankings: str = ""
    """A K-way rankings file to train on as well (all C(K,2) pairs of a prompt in one batch, each prompt counting once)."""
    train_limit: int = 0
    """Use only the first N training comparisons (0: all)."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int = 0
    """Optimizer steps to take (0: as many as `epochs` passes need)."""
    batch_size: int = 16
    """Prompts (a comparison or a ranking) per optimizer step."""
    micro_batch_size: int = 4
    """Prompts per forward pass; gradients are accumulated up to batch_size."""
    lr: float = 1e-5
    """Peak learning rate (AdamW) of the trunk."""
    head_lr: float = 0.0
    """Learning rate of the fresh scalar head (0: same as lr)."""
    lr_schedule: str = "cosine"
    """cosine, linear or constant decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    soft_labels: bool = False
    """Use the labeler's confidence as a soft target: P(chosen better) = 0.5 + 0.125·strength (strength 1–4)."""
    merge_repeated_pairs: bool = False
    """Train on a pair of summaries that several labelers judged once, with the mean of their labels as its
    target (e.g. 3 of 4 prefer A: P(A better) = 0.75), instead of once per label."""
    mismatched_negatives: float = 0.0
    """Weight (per comparison) of synthetic pairs in which both summaries of a comparison beat a summary of
    another post: a summary that does not match the post is worse, which the human pairs rarely teach (0: off)."""
    query_max_tokens: int = 512
    """Query token budget; the post is cut at the last newline that fits. Stored with the model for scoring."""
    response_max_tokens: int = 48
    """Response token budget including EOS (a longer summary is cut and scored at its last token)."""
    freeze_embeddings: bool = False
    """Freeze the token embeddings."""
    freeze_layers: int = 0
    """Freeze the lowest N transformer layers (cheaper backward on CPU)."""
    frozen_cache: str = ""
    """Run the frozen layers (freeze_embeddings and freeze_layers > 0) once per training comparison instead of
    once per epoch: `memory`, or a file that keeps their hidden states for the next reward model trained on
    the same comparisons from the same model (another seed: the pipeline's judge). '' turns it off."""
    precision: str = "auto"
    """auto (bf16 autocast where the hardware supports it), bf16 or fp32."""
    bias_split: str = "sft_train"
    """Posts whose reference summaries get mean reward 0 after training."""
    bias_limit: int = 0
    """Use only the first N posts of bias_split for the bias (0: all)."""
    eval_split: str = "rm_valid"
    """Split evaluated after training into OUT/eval.json ('' to skip)."""
    eval_batch_size: int = 16
    """Sequences per forward pass when scoring."""
    checkpoint_every: int = 25
    """Save a resumable checkpoint every N steps (0: never)."""
    log_every: int = 1
    """Write metrics every N steps."""
    seed: int = 0
    """Seed for data order and head initialization."""
    data_seed: int = -1
    """Seed of the data order alone (-1: seed); ensemble members differ only in this."""
    ensemble: int = 1
    """Train N reward models that differ only in data order (data seeds seed … seed+N−1, the head starting
    from the same init, each in OUT/member-I) and average their weights into one model (WARM, Ramé et al.
    2024). With frozen_cache the lower layers run once. On the demo recipe the average scored below its
    members (configs/best.toml has the figures): measure before relying on it."""

    @property
    def freezes_lower_layers(self) -> bool:
        """Whether the embeddings and some lowest layers are frozen: their output then never changes (frozen_cache)."""
        return self.freeze_embeddings and self.freeze_layers > 0

    def validate(self) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise UserError("batch_size and micro_batch_size must be at least 1")
        check_lr_schedule(self.lr_schedule)
        check_precision(self.precision)
        if self.query_max_tokens < 32 or self.response_max_tokens < 2:
            raise UserError("query_max_tokens must be at least 32 and response_max_tokens at least 2")
        if self.ensemble < 1:
            raise UserError(f"ensemble must be at least 1 (1: a single reward model), got {self.ensemble}")
        if self.mismatched_negatives < 0:
            raise UserError(f"mismatched_negatives is a loss weight: 0 (off) or more, got {self.mismatched_negatives}")
        if self.frozen_cache and not self.freezes_lower_layers:
            raise UserError("frozen_cache needs frozen lower layers: set freeze_embeddings = true and freeze_layers > 0, or frozen_cache = ''")


@dataclass
class PreferenceGroup:
    """One prompt with K responses and the pairs a labeler judged among them."""

    query: list[int]
    responses: list[list[int]]
    pairs: list[tuple[int, int, float]]
    """(better, worse, target): target is P(better is preferred), 1 for a hard label."""
    weights: list[float] | None = None
    """Each pair's weight in the loss (None: 1/len(pairs) each, so the prompt counts once)."""
    synthetic_pairs: int = 0
    """How many of the last pairs no labeler judged (mismatched negatives): trained on, but left out of the
    training accuracy, which they would inflate."""


def confidence_target(confidence: int | None) -> float:
    """Soft label from the 1–9 confidence scale (5 = unsure, 1 or 9 = certain): 0.625 … 1.0 for the chosen side."""
    if confidence is None:
        return 1.0
    return 0.5 + 0.125 * min(4, abs(confidence - 5))


def comparison_group(c: Comparison, tokenizer, query_max_tokens: int, response_max_tokens: int, soft_labels: bool) -> PreferenceGroup:
    query = tokenizer.encode(make_query(c.subreddit, c.title, c.post, tokenizer, query_max_tokens), add_special_tokens=False)
    responses = [encode_response(tokenizer, s.text, response_max_tokens) for s in c.summaries]
    target = confidence_target(c.confidence) if soft_labels else 1.0
    return PreferenceGroup(query, responses, [(c.choice, 1 - c.choice, target)])


def labels_by_pair(comparisons: Sequence[Comparison]) -> list[list[Comparison]]:
    """The comparisons grouped by post and pair of summaries (whichever order each labeler saw them in)."""
    by_pair: dict[tuple[str, frozenset[str]], list[Comparison]] = {}
    for c in comparisons:
        by_pair.setdefault((c.post_id, frozenset(s.text for s in c.summaries)), []).append(c)
    return list(by_pair.values())


def merged_pair_groups(comparisons: Sequence[Comparison], tokenizer, query_max_tokens: int, response_max_tokens: int,
                       soft_labels: bool) -> list[PreferenceGroup]:
    """One group per distinct pair of summaries of a post; its target is the labels' mean P(summary preferred)."""
    groups = []
    for labels in labels_by_pair(comparisons):
        first = labels[0]
        first_text = first.summaries[0].text
        targets = [confidence_target(c.confidence) if soft_labels else 1.0 for c in labels]
        p_first = sum(t if c.chosen == first_text else 1 - t for c, t in zip(labels, targets)) / len(labels)
        group = comparison_group(first, tokenizer, query_max_tokens, response_max_tokens, soft_labels)
        group.pairs = [(0, 1, p_first) if p_first >= 0.5 else (1, 0, 1 - p_first)]
        groups.append(group)
    return groups


def ranking_group(r: Ranking, tokenizer, query_max_tokens: int, response_max_tokens: int) -> PreferenceGroup:
    query = tokenizer.encode(make_query(r.subreddit, r.title, r.post, tokenizer, query_max_tokens), add_special_tokens=False)
    responses = [encode_response(tokenizer, text, response_max_tokens) for text in r.responses]
    return PreferenceGroup(query, responses, [(better, worse, 1.0) for better, worse in r.pairs()])


def add_mismatched_negatives(groups: Sequence[PreferenceGroup], weight: float, seed: int = 0) -> None:
    """Appends to each group a response to another post that all the group's own responses beat, the new
    pairs sharing `weight`; the group's own pairs keep their total weight 1."""
    rng = random.Random(seed)
    own_responses = [group.responses for group in groups]
    for group in groups:
        draws = (rng.randrange(len(groups)) for _ in range(100))
        other = next((i for i in draws if groups[i].query != group.query), None)
        if other is None:
            continue
        foreign = rng.choice(own_responses[other])
        if foreign in group.responses:
            continue
        own_pairs, k = len(group.pairs), len(group.responses)
        group.weights = (group.weights or [1.0 / own_pairs] * own_pairs) + [weight / k] * k
        group.pairs = group.pairs + [(own, k, 1.0) for own in range(k)]
        group.responses = group.responses + [foreign]
        group.synthetic_pairs += k


def pair_tensors(groups: Sequence[PreferenceGroup]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs of `groups` as indices into their responses laid end to end: better [P], worse [P],
    target [P], and weight [P] (the group's `weights`; by default its pairs share 1, so every prompt counts once)."""
    better, worse, target, weight = [], [], [], []
    offset = 0
    for group in groups:
        for b, w, t in group.pairs:
            better.append(offset + b)
            worse.append(offset + w)
            target.append(t)
        weight.extend(group.weights or [1.0 / len(group.pairs)] * len(group.pairs))
        offset += len(group.responses)
    return torch.tensor(better), torch.tensor(worse), torch.tensor(target), torch.tensor(weight)


def labeled_pair_mask(groups: Sequence[PreferenceGroup]) -> torch.Tensor:
    """[P], in `pair_tensors`' order: True for the pairs a labeler judged, False for synthetic ones."""
    return torch.tensor([i < len(g.pairs) - g.synthetic_pairs for g in groups for i in range(len(g.pairs))])


def preference_loss(scores: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_pairs weight · −[t·log σ(d) + (1−t)·log σ(−d)], d = r_better − r_worse; with t = 1 the paper's
    `-log σ(r_chosen − r_rejected)`. Divide by the number of prompts for the per-prompt mean."""
    margin = scores[better] - scores[worse]
    losses = -(target * F.logsigmoid(margin) + (1 - target) * F.logsigmoid(-margin))
    return (weight * losses).sum()


def shared_query_scores(
    model: ScalarHeadModel, queries: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor,
    query_of_row: torch.Tensor, start: int = 0,
) -> torch.Tensor:
    """Scores [N] of responses to shared queries (see `shared_query_hidden`), read at each response's EOS."""
    _, hidden = shared_query_hidden(model.model, queries, query_mask, responses, response_mask, query_of_row, start)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return model.model.score(hidden[rows, eos_index(response_mask)]).squeeze(-1).float() - model.bias


@torch.no_grad()
def score_shared_queries(model: ScalarHeadModel, batch: QueryResponseBatch, group_size: int, precision: Precision = "auto", micro_batch_size: int = 0) -> torch.Tensor:
    """Scores [B] of a batch whose rows come in runs of `group_size` responses to one query, each query run
    once for its responses; `micro_batch_size` rows (a multiple of group_size; 0: all) per forward pass."""
    device = next(model.parameters()).device
    rows = batch.query_ids.shape[0]
    step = micro_batch_size or rows
    parts = []
    for first in range(0, rows, step):
        micro, _, _ = batch.select(range(first, min(first + step, rows))).trim()
        queries, query_mask, query_of_row = micro.shared_queries(group_size)
        with autocast(precision, device):
            parts.append(shared_query_scores(model, queries, query_mask, micro.response_ids, micro.response_mask, query_of_row))
    return torch.cat(parts)


@dataclass
class FrozenHidden:
    """One preference group's hidden states entering the first trained layer: query [Q, H], responses K × [R, H]."""

    query: torch.Tensor
    responses: list[torch.Tensor]


def stack_padded(rows: Sequence[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[L_i, H] rows → zero-padded [B, L, H] and its mask [B, L]; padded on the left (queries) or the right."""
    width = max(len(r) for r in rows)
    stacked = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        columns = slice(width - len(r), width) if left else slice(0, len(r))
        stacked[i, columns], mask[i, columns] = r, 1
    return stacked, mask


def padded_groups(groups: Sequence[PreferenceGroup], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Query ids and mask [G, Q] (left-padded), response ids and mask [N, R] (right-padded), and the query
    of each response [N]."""
    from fromfeedback.data import pad_left, pad_right

    query_ids, query_mask = pad_left([g.query for g in groups], pad_id)
    response_ids, response_mask = pad_right([r for g in groups for r in g.responses], pad_id)
    query_of_row = torch.tensor([i for i, g in enumerate(groups) for _ in g.responses])
    return query_ids, query_mask, response_ids, response_mask, query_of_row


def group_scores(
    model: ScalarHeadModel, groups: Sequence[PreferenceGroup], pad_id: int, precision: str, frozen: Sequence[FrozenHidden] | None = None, start: int = 0
) -> torch.Tensor:
    """Scores [N] of every response of `groups`, in order, each prompt computed once; with `frozen` (their
    hidden states entering layer `start`), only the layers from `start` on run."""
    device = next(model.parameters()).device
    queries, query_mask, responses, response_mask, query_of_row = padded_groups(groups, pad_id)
    if frozen is not None:
        queries, _ = stack_padded([f.query.float() for f in frozen], left=True)
        responses, _ = stack_padded([r.float() for f in frozen for r in f.responses], left=False)
    tensors = (t.to(device) for t in (queries, query_mask, responses, response_mask, query_of_row))
    with autocast(precision, device):  # type: ignore[arg-type]
        return shared_query_scores(model, *tensors, start if frozen else 0)


@torch.no_grad()
def frozen_hidden_states(model: ScalarHeadModel, groups: Sequence[PreferenceGroup], layers: int, pad_id: int, precision: str, batch_size: int) -> list[FrozenHidden]:
    """The hidden states entering layer `layers` for every group (bf16 under bf16 autocast), computed once."""
    device = next(model.parameters()).device
    dtype = inference_dtype(precision, device)  # type: ignore[arg-type]
    # Forward only: weights already in bf16 spare autocast from casting them again on every call.
    model = ScalarHeadModel(inference_copy(model.model, dtype))
    frozen: list[FrozenHidden] = []
    for start in progress(range(0, len(groups), batch_size), desc="frozen layers"):
        chunk = groups[start : start + batch_size]
        tensors = (t.to(device) for t in padded_groups(chunk, pad_id))
        with autocast(precision, device):  # type: ignore[arg-type]
            query_hidden, response_hidden = shared_query_hidden(model.model, *tensors, 0, layers)
        row = 0
        for i, group in enumerate(chunk):
            responses = []
            for response in group.responses:
                responses.append(response_hidden[row, : len(response)].to(dtype).cpu().clone())
                row += 1
            frozen.append(FrozenHidden(query_hidden[i, query_hidden.shape[1] - len(group.query) :].to(dtype).cpu().clone(), responses))
    return frozen


def frozen_cache_key(model_dir: Path, groups: Sequence[PreferenceGroup], config: RMConfig) -> str:
    """What the frozen hidden states depend on: the model's weight files, the layers, precision and the tokens."""
    import hashlib

    digest = hashlib.sha256()
    for weights in sorted(model_dir.glob("*.safetensors")):
        digest.update(f"{weights.resolve()}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}".encode())
    digest.update(f"{config.freeze_layers}:{config.precision}".encode())
    for group in groups:
        digest.update(json.dumps([group.query, group.responses]).encode())
    return digest.hexdigest()


def load_or_compute_frozen(model: ScalarHeadModel, model_dir: Path, groups: Sequence[PreferenceGroup], config: RMConfig, pad_id: int) -> list[FrozenHidden]:
    """The frozen layers' hidden states of `groups`: read from config.frozen_cache when it holds these, else
    computed (and written there unless it is `memory`)."""
    key = frozen_cache_key(model_dir, groups, config)
    path = None if config.frozen_cache == "memory" else Path(config.frozen_cache)
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        if saved["key"] == key:
            print(f"frozen layers: hidden states of {len(groups)} prompts read from {path}")
            return [FrozenHidden(query, responses) for query, responses in saved["hidden"]]
        print(f"frozen layers: {path} holds other data or another model; computing again")
    started = time.perf_counter()
    frozen = frozen_hidden_states(model, groups, config.freeze_layers, pad_id, config.precision, config.eval_batch_size)
    print(f"frozen layers: hidden states of {len(groups)} prompts computed in {time.perf_counter() - started:.0f}s")
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save({"key": key, "hidden": [(f.query, f.responses) for f in frozen]}, tmp)
    return frozen


@dataclass
class FrozenLayers:
    """The frozen lower layers shared by reward models trained from one model: their hidden states for a
    set of groups are read from `cache` (a file) when it holds them, else computed and written there."""

    base_model: Path
    """The model the reward models were trained from (its weights key the cache)."""
    config: RMConfig
    """Supplies freeze_layers, precision and batch size; its frozen_cache is replaced by `cache`."""
    cache: str
    """The file that keeps the hidden states."""

    @property
    def layers(self) -> int:
        return self.config.freeze_layers

    def hidden_states(self, model: ScalarHeadModel, groups: Sequence[PreferenceGroup], pad_id: int) -> list[FrozenHidden]:
        return load_or_compute_frozen(model, self.base_model, groups, replace(self.config, frozen_cache=self.cache), pad_id)


def training_groups(config: RMConfig, tokenizer, data_dir: str) -> list[PreferenceGroup]:
    files = [f for f in config.comparisons.split(",") if f] or None
    comparisons = load_tldr_comparisons(data_dir, config.train_split, files)[: config.train_limit or None]
    if config.merge_repeated_pairs:
        groups = merged_pair_groups(comparisons, tokenizer, config.query_max_tokens, config.response_max_tokens, config.soft_labels)
    else:
        groups = [comparison_group(c, tokenizer, config.query_max_tokens, config.response_max_tokens, config.soft_labels) for c in comparisons]
    if config.mismatched_negatives > 0:
        # A fixed seed: reward models trained with other seeds (the judge) share the frozen-layer cache.
        add_mismatched_negatives(groups, config.mismatched_negatives)
    if config.rankings:
        groups += [ranking_group(r, tokenizer, config.query_max_tokens, config.response_max_tokens) for r in load_rankings(config.rankings)]
    if not groups:
        raise UserError(f"no training comparisons: no comparison's post is in split {config.train_split!r} of {data_dir}")
    return groups


def normalize_bias(model: ScalarHeadModel, tokenizer, posts, config: RMConfig) -> float:
    """Sets the bias so the reference summaries of `posts` have mean reward 0; returns it."""
    posts = [p for p in posts if p.reference]
    if not posts:
        raise UserError(f"no posts with a reference in split {config.bias_split!r} to normalize the reward bias")
    model.set_bias(0.0)
    raw = score_summaries(model, tokenizer, posts, [p.reference for p in posts], config.query_max_tokens, config.response_max_tokens,
                          config.eval_batch_size, config.precision)  # type: ignore[arg-type]
    bias = sum(raw) / len(raw)
    model.set_bias(bias)
    return bias


def run_rm_train(config: RMConfig) -> Path:
    """Trains a reward model on human comparisons; returns the folder of the saved model."""
    out = Path(config.out)
    final_dir = out / "model"
    if (out / "summary.json").exists() and final_dir.exists():
        print(f"reward model already trained in {out}; delete {out / 'summary.json'} to train again")
        return final_dir
    if config.ensemble > 1:
        return run_rm_ensemble(config)
    device = default_device()
    seed_everything(config.seed)
    model_dir = resolve_model(config.sft)
    tokenizer = load_tokenizer(model_dir)
    model = load_scalar_model(model_dir)
    model.set_bias(0.0)
    freeze_lower(model.model, config.freeze_layers, config.freeze_embeddings)
    model.to(device).train()

    data_dir = config.data_dir or default_data_dir()
    groups = training_groups(config, tokenizer, data_dir)
    plan = batch_plan(len(groups), config.batch_size, config.epochs, config.max_steps, config.seed if config.data_seed < 0 else config.data_seed)

    head = list(model.model.score.parameters())
    head_ids = {id(p) for p in head}
    trunk = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    head_lr = config.head_lr or config.lr
    optimizer = adamw(
        [{"params": trunk, "lr_scale": 1.0}, {"params": head, "lr_scale": head_lr / config.lr}], lr=config.lr, weight_decay=config.weight_decay
    )
    checkpointer = Checkpointer(out)
    start_step, state = 0, {}
    latest = checkpointer.latest()
    if latest is not None:
        start_step, state = checkpointer.load(latest, {"model": model}, optimizer)
        print(f"resuming from {latest} (step {start_step})")
    logger = MetricsLogger(out, resume_step=start_step if latest else None)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(config))
    print(
        f"RM: {len(groups)} prompts, {len(plan)} steps of {config.batch_size}, "
        f"{count_parameters(model, trainable_only=True) / 1e6:.1f}M of {count_parameters(model) / 1e6:.1f}M parameters trained, "
        f"bf16 autocast {'on' if use_bf16(config.precision, device) else 'off'}"  # type: ignore[arg-type]
    )
    state.setdefault("train_seconds", 0.0)
    state.setdefault("train_cpu_seconds", 0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    pad_id = tokenizer.pad_token_id
    frozen_started = time.perf_counter()
    frozen = load_or_compute_frozen(model, model_dir, groups, config, pad_id) if config.frozen_cache and start_step < len(plan) else None
    frozen_seconds = time.perf_counter() - frozen_started
    bar = progress(total=len(plan), initial=start_step, desc="rm")
    for step in range(start_step, len(plan)):
        step_started, cpu_started = time.perf_counter(), time.process_time()
        lr = learning_rate(step, len(plan), config.lr, config.warmup_steps, config.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        step_groups = [groups[i] for i in plan[step]]
        loss_total, correct, pairs = 0.0, 0.0, 0
        for start in range(0, len(step_groups), config.micro_batch_size):
            micro_groups = step_groups[start : start + config.micro_batch_size]
            better, worse, target, weight = (t.to(device) for t in pair_tensors(micro_groups))
            micro_frozen = [frozen[i] for i in plan[step][start : start + config.micro_batch_size]] if frozen else None
            scores = group_scores(model, micro_groups, pad_id, config.precision, micro_frozen, config.freeze_layers)
            loss = preference_loss(scores, better, worse, target, weight) / len(step_groups)
            loss.backward()
            loss_total += loss.item()
            labeled = labeled_pair_mask(micro_groups).to(device)
            margin = (scores[better] - scores[worse]).detach()[labeled]
            correct += float(((margin > 0) + 0.5 * (margin == 0)).float().sum())
            pairs += len(margin)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm) if config.max_grad_norm > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - step_started
        state["train_seconds"] += seconds
        state["train_cpu_seconds"] += time.process_time() - cpu_started
        done = step + 1
        metrics = {"train_loss": loss_total, "train_accuracy": correct / max(1, pairs), "lr": lr, "seconds_per_step": seconds}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if done % config.log_every == 0:
            logger.log(done, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_total:.3f}")
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < len(plan):
            checkpointer.save(done, {"model": model}, optimizer, state)
    bar.close()
    summary: dict[str, Any] = {
        "prompts": len(groups),
        "steps": len(plan),
        "train_seconds": state["train_seconds"],
        "seconds_per_step": state["train_seconds"] / max(1, len(plan)),
        # CPU seconds of this process: on a shared machine, CPU seconds / threads estimates the uncontended time.
        "train_cpu_seconds": state["train_cpu_seconds"],
        "frozen_cache_seconds": frozen_seconds,
        "torch_threads": torch.get_num_threads(),
        "resumed_at_step": start_step,
    }
    finish_reward_model(model, tokenizer, config, data_dir, summary, logger, len(plan))
    return final_dir


def finish_reward_model(model: ScalarHeadModel, tokenizer, config: RMConfig, data_dir: str, summary: dict[str, Any], logger: MetricsLogger | None = None,
                        step: int = 0) -> None:
    """Sets the reference bias, saves OUT/model, evaluates on config.eval_split and writes OUT/summary.json."""
    out, device = Path(config.out), next(model.parameters()).device
    final_dir = out / "model"
    model.eval()
    bias_started = time.perf_counter()
    bias_posts = load_tldr(data_dir, config.bias_split)[: config.bias_limit or None]
    scorer = ScalarHeadModel(inference_copy(model.model, inference_dtype(config.precision, device)))  # type: ignore[arg-type]
    bias = normalize_bias(scorer, tokenizer, bias_posts, config)
    model.set_bias(bias)
    summary.update({"bias": bias, "bias_seconds": time.perf_counter() - bias_started})
    with atomic_path(final_dir) as tmp:
        model.save(tmp, tokenizer)
        stage_info.write(tmp, stage="rm", base_model=str(config.sft), query_max_tokens=config.query_max_tokens,
                         response_max_tokens=config.response_max_tokens, reward_bias=bias, bias_split=config.bias_split,
                         bias_posts=len(bias_posts), ensemble=config.ensemble)
    if config.eval_split:
        eval_started = time.perf_counter()
        # With a frozen-layer cache file, the evaluation comparisons' frozen layers go to a file beside it, for the
        # next reward model trained from the same model (the pipeline's judge).
        frozen = None
        if config.frozen_cache and config.frozen_cache != "memory":
            cache = Path(config.frozen_cache)
            frozen = FrozenLayers(resolve_model(config.sft), config, str(cache.with_name(f"{cache.stem}-{config.eval_split}{cache.suffix}")))
        report = evaluate_model(final_dir, config.eval_split, data_dir, config.eval_batch_size, config.precision, out / f"reliability-{config.eval_split}.png",
                                model=scorer, tokenizer=tokenizer, frozen=frozen)
        write_json(out / "eval.json", report)
        summary["eval_seconds"] = time.perf_counter() - eval_started
        summary.update({f"{config.eval_split}_accuracy": report["accuracy"], f"{config.eval_split}_similar_length_accuracy": report["similar_length"]["accuracy"]})
        if logger is not None:
            logger.log(step, {"valid_accuracy": report["accuracy"], "valid_similar_length_accuracy": report["similar_length"]["accuracy"]})
    if logger is not None:
        logger.close()
    summary["peak_memory_mib"] = peak_memory_mb(device)
    write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    print(f"reward model saved to {final_dir}")


def average_weights(model_dirs: Sequence[Path]) -> ScalarHeadModel:
    """The reward model whose every weight is the mean of the same weight in `model_dirs` (models of one
    architecture fine-tuned from one init); weights equal in all of them (the frozen layers) stay bit-exact."""
    averaged = load_scalar_model(model_dirs[0])
    state = averaged.model.state_dict()
    totals = {name: tensor.clone() for name, tensor in state.items() if tensor.is_floating_point()}
    differs = dict.fromkeys(totals, False)
    for other_dir in model_dirs[1:]:
        other = load_scalar_model(other_dir).model.state_dict()
        if other.keys() != state.keys() or any(other[name].shape != state[name].shape for name in totals):
            raise UserError(f"{other_dir} and {model_dirs[0]} are not the same architecture: their weights cannot be averaged")
        for name in totals:
            totals[name] += other[name]
            differs[name] = differs[name] or not torch.equal(other[name], state[name])
    for name, total in totals.items():
        if differs[name]:
            state[name].copy_(total / len(model_dirs))
    return averaged


def run_rm_ensemble(config: RMConfig) -> Path:
    """Trains config.ensemble members (OUT/member-I, resumable one by one) that differ only in data order, and
    saves the average of their weights as OUT/model."""
    out = Path(config.out)
    # Members share the frozen layers' hidden states; "memory" cannot outlive one member, so they go to a file.
    cache = str(out / "frozen-layers.pt") if config.frozen_cache == "memory" else config.frozen_cache
    started = time.perf_counter()
    members = [
        run_rm_train(replace(config, ensemble=1, data_seed=config.seed + i, out=str(out / f"member-{i}"), frozen_cache=cache, eval_split=""))
        for i in range(config.ensemble)
    ]
    train_seconds = time.perf_counter() - started
    model = average_weights(members).to(default_device())
    tokenizer = load_tokenizer(members[0])
    member_summaries = [json.loads((m.parent / "summary.json").read_text()) for m in members]
    write_json(out / "config.json", asdict(config))
    summary: dict[str, Any] = {
        "members": [str(m) for m in members],
        "prompts": member_summaries[0]["prompts"],
        "steps": sum(m["steps"] for m in member_summaries),
        "train_seconds": sum(m["train_seconds"] for m in member_summaries),
        "frozen_cache_seconds": sum(m["frozen_cache_seconds"] for m in member_summaries),
        "ensemble_seconds": train_seconds,
    }
    finish_reward_model(model, tokenizer, config, config.data_dir or default_data_dir(), summary)
    if config.frozen_cache == "memory":
        Path(cache).unlink(missing_ok=True)
    return out / "model"


# ----------------------------------------------------------------------------------------------
# Evaluation


def confidence_strength(confidence: int | None) -> int | None:
    """How sure the labeler was, 1 (barely) … 4 (certain), from the 1–9 scale centred on 5."""
    return None if confidence is None else abs(confidence - 5)


def comparison_report(comparisons: Sequence[Comparison], score_chosen: Sequence[float], score_rejected: Sequence[float], bins: int = 10) -> dict[str, Any]:
    """Accuracy (ties count half) with a 95% Wilson interval, on all pairs and on similar-length pairs,
    by labeler confidence and by comparison batch (batches compare different policies: on this data the
    RL-vs-supervised batch is far easier than the reference-vs-samples one), log loss, and calibration
    of P(summary 0 preferred) = σ(r_0 − r_1)."""
    n = len(comparisons)
    chosen, rejected = torch.tensor(score_chosen, dtype=torch.float64), torch.tensor(score_rejected, dtype=torch.float64)
    margin = chosen - rejected

    def accuracy_of(rows: list[int]) -> dict[str, Any]:
        accuracy = pairwise_accuracy([score_chosen[i] for i in rows], [score_rejected[i] for i in rows])
        low, high = wilson_interval(accuracy * len(rows), len(rows)) if rows else (float("nan"), float("nan"))
        return {"pairs": len(rows), "accuracy": accuracy, "ci95": [low, high]}

    overall = accuracy_of(list(range(n)))
    similar = [i for i, c in enumerate(comparisons) if similar_length(c.chosen, c.rejected)]
    by_confidence: dict[str, Any] = {}
    for strength in sorted({confidence_strength(c.confidence) for c in comparisons}, key=lambda s: -1 if s is None else s):
        rows = [i for i, c in enumerate(comparisons) if confidence_strength(c.confidence) == strength]
        by_confidence["unknown" if strength is None else str(strength)] = accuracy_of(rows)
    by_batch = {batch: accuracy_of([i for i, c in enumerate(comparisons) if c.batch == batch]) for batch in sorted({c.batch for c in comparisons})}
    prob_first = [float(torch.sigmoid(margin[i] if c.choice == 0 else -margin[i])) for i, c in enumerate(comparisons)]
    first_preferred = [float(c.choice == 0) for c in comparisons]
    return {
        "comparisons": n,
        "accuracy": overall["accuracy"],
        "accuracy_ci95": overall["ci95"],
        "similar_length": accuracy_of(similar),
        "by_confidence": by_confidence,
        "by_batch": by_batch,
        "log_loss": float(-F.logsigmoid(margin).mean()) if n else float("nan"),
        "ece": expected_calibration_error(prob_first, first_preferred, bins),
        "calibration": calibration_bins(prob_first, first_preferred, bins),
        "mean_margin": float(margin.mean()) if n else float("nan"),
    }


def longer_wins(comparisons: Sequence[Comparison]) -> dict[str, Any]:
    """The length floor: accuracy of "the longer summary (in characters) wins", by the same code as the RM."""
    report = comparison_report(comparisons, [len(c.chosen) for c in comparisons], [len(c.rejected) for c in comparisons])
    return {key: report[key] for key in ("accuracy", "accuracy_ci95", "similar_length", "by_batch")}


def labeler_agreement(comparisons: Sequence[Comparison]) -> dict[str, Any]:
    """The human ceiling: over every two labels by different workers of the same pair of summaries of
    the same post, the fraction that prefer the same summary."""
    by_pair = labels_by_pair(comparisons)
    agree = label_pairs = 0
    for labels in by_pair:
        for a, b in itertools.combinations(labels, 2):
            if a.worker == b.worker:
                continue
            label_pairs += 1
            agree += a.chosen == b.chosen
    low, high = wilson_interval(agree, label_pairs)
    return {"agreement": agree / label_pairs if label_pairs else float("nan"), "ci95": [low, high], "label_pairs": label_pairs,
            "summary_pairs": sum(len({c.worker for c in labels}) > 1 for labels in by_pair)}


def reliability_plot(report: dict[str, Any], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["calibration"]
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    axes.plot([r["mean_prob"] for r in rows], [r["frequency"] for r in rows], marker="o", label=f"reward model (ECE {report['ece']:.3f})")
    for r in rows:
        axes.annotate(str(r["count"]), (r["mean_prob"], r["frequency"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    axes.set_xlabel("predicted P(summary 0 preferred)")
    axes.set_ylabel("observed frequency")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_title(title, fontsize=9)
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


@torch.no_grad()
def score_comparisons(model: ScalarHeadModel, tokenizer, comparisons: Sequence[Comparison], query_max_tokens: int, response_max_tokens: int,
                      batch_size: int, precision: str, show_progress: bool = True, frozen: FrozenLayers | None = None) -> tuple[list[float], list[float]]:
    """(scores of the chosen summaries, scores of the rejected ones), each post run through the trunk once;
    with `frozen`, the model's frozen lower layers come from there (computed once, shared by reward models
    trained from the same model)."""
    groups = [comparison_group(c, tokenizer, query_max_tokens, response_max_tokens, soft_labels=False) for c in comparisons]
    hidden = frozen.hidden_states(model, groups, tokenizer.pad_token_id) if frozen else None
    chosen: list[float] = []
    rejected: list[float] = []
    per_forward = max(1, batch_size // 2)
    bar = progress(total=len(groups), desc="score", enabled=show_progress)
    for start in range(0, len(groups), per_forward):
        chunk = groups[start : start + per_forward]
        better, worse, _, _ = pair_tensors(chunk)
        chunk_hidden = hidden[start : start + per_forward] if hidden else None
        scores = group_scores(model, chunk, tokenizer.pad_token_id, precision, chunk_hidden, frozen.layers if frozen else 0).cpu()
        chosen.extend(scores[better].tolist())
        rejected.extend(scores[worse].tolist())
        bar.update(len(chunk))
    bar.close()
    return chosen, rejected


def evaluate_model(model_dir: str | Path, split: str, data_dir: str = "", batch_size: int = 16, precision: str = "auto", plot: str | Path | None = None,
                   comparison_files: Sequence[str] | None = None, model: ScalarHeadModel | None = None, tokenizer=None,
                   frozen: FrozenLayers | None = None) -> dict[str, Any]:
    """The `rm eval` report of a saved reward model on the comparisons of `split`."""
    data_dir = data_dir or default_data_dir()
    info = stage_info.read(resolve_model(model_dir))
    if model is None:
        model = load_scalar_model(model_dir, inference_dtype(precision, default_device())).to(default_device())  # type: ignore[arg-type]
        tokenizer = load_tokenizer(model_dir)
    model.eval()
    all_comparisons = load_tldr_comparisons(data_dir, None, comparison_files)
    comparisons = load_tldr_comparisons(data_dir, split, comparison_files)
    if not comparisons:
        raise UserError(f"no comparisons in split {split!r} of {data_dir}")
    query_max_tokens, response_max_tokens = info.get("query_max_tokens", 512), info.get("response_max_tokens", 48)
    chosen, rejected = score_comparisons(model, tokenizer, comparisons, query_max_tokens, response_max_tokens, batch_size, precision, frozen=frozen)
    report: dict[str, Any] = {"model": str(model_dir), "split": split, **comparison_report(comparisons, chosen, rejected)}
    report["longer_wins"] = longer_wins(comparisons)
    report["labeler_agreement"] = {"all_comparisons": labeler_agreement(all_comparisons), split: labeler_agreement(comparisons),
                                   "by_batch": {batch: labeler_agreement([c for c in all_comparisons if c.batch == batch]) for batch in report["by_batch"]}}
    if plot:
        reliability_plot(report, plot, f"{Path(str(model_dir)).name} on {split}: accuracy {report['accuracy']:.3f}")
        report["reliability_plot"] = str(plot)
    return report


# ----------------------------------------------------------------------------------------------
# Scoring samples


def score_samples_file(model_dir: str | Path, samples_path: str | Path, out_path: str | Path, data_dir: str = "", batch_size: int = 16,
                       query_max_tokens: int = 0, response_max_tokens: int = 0, precision: str = "auto") -> dict[str, Any]:
    """Adds `score` (the reward) to every sample of a samples file; budgets default to the ones the RM was trained with."""
    info = stage_info.read(resolve_model(model_dir))
    query_max_tokens = query_max_tokens or info.get("query_max_tokens", 512)
    response_max_tokens = response_max_tokens or info.get("response_max_tokens", 48)
    samples = load_samples(samples_path)
    posts = {p.id: p for p in load_tldr(data_dir or default_data_dir())}
    missing = sorted({s.post_id for s in samples if s.post_id not in posts})
    if missing:
        raise UserError(f"{samples_path}: {len(missing)} post id(s) not in posts.jsonl, e.g. {missing[0]!r}")
    model = load_scalar_model(model_dir, inference_dtype(precision, default_device())).to(default_device())  # type: ignore[arg-type]
    tokenizer = load_tokenizer(model_dir)
    scores = score_summaries(model, tokenizer, [posts[s.post_id] for s in samples], [s.text for s in samples], query_max_tokens,
                             response_max_tokens, batch_size, precision, show_progress=True)  # type: ignore[arg-type]
    for sample, score in zip(samples, scores):
        sample.extra["score"] = score
    write_samples(out_path, samples)
    by_policy: dict[str, list[float]] = {}
    for sample, score in zip(samples, scores):
        by_policy.setdefault(sample.policy, []).append(score)
    return {"samples": len(samples), "out": str(out_path), "mean_score": {p: sum(v) / len(v) for p, v in by_policy.items()}}


# ----------------------------------------------------------------------------------------------
# Command line


def register_cli(parent, stage_command) -> None:
    """Adds `fromfeedback rm train|eval|score` to the Typer app `parent`."""
    import typer

    rm_app = typer.Typer(no_args_is_help=True, help="Train, evaluate and apply the reward model.")
    parent.add_typer(rm_app, name="rm")
    stage_command(rm_app, "train", RMConfig, "rm", run_rm_train, "Train a reward model on human comparisons (and optional K-way rankings).")

    @rm_app.command("eval")
    def rm_eval(
        model: str = typer.Option(..., "--model", help="Reward model folder."),
        split: str = typer.Option("rm_valid", "--split", help="Comparisons whose post is in this split."),
        data_dir: str = typer.Option("", "--data-dir", help="Data folder (default: $FROMFEEDBACK_DATA_DIR or ../shared/data)."),
        plot: str = typer.Option("", "--plot", help="Reliability plot PNG (default: reliability-SPLIT.png beside the model folder)."),
        batch_size: int = typer.Option(16, "--batch-size", help="Sequences per forward pass."),
        precision: str = typer.Option(
            "auto", "--precision",
            help="auto (bf16 weights where supported: fast; rounding moves some near-tie margins, ~1 point of accuracy), or fp32.",
        ),
        json_output: bool = typer.Option(False, "--json", help="Print one JSON object (else a short table)."),
    ) -> None:
        """Accuracy (95% CI), similar-length accuracy, by-confidence and by-batch accuracy, log loss, ECE, beside the length floor and labeler agreement."""
        check_precision(precision, "--precision")
        plot_path = plot or str(Path(resolve_model(model)).parent / f"reliability-{split}.png")
        report = evaluate_model(model, split, data_dir, batch_size, precision, plot=plot_path)
        if json_output:
            print(json.dumps(report))
            return
        agreement = report["labeler_agreement"]["all_comparisons"]
        print(f"{split}: {report['comparisons']} comparisons")
        print(f"  reward model       {report['accuracy']:.3f}  [{report['accuracy_ci95'][0]:.3f}, {report['accuracy_ci95'][1]:.3f}]"
              f"  similar length {report['similar_length']['accuracy']:.3f} ({report['similar_length']['pairs']} pairs)")
        print(f"  longer wins        {report['longer_wins']['accuracy']:.3f}  similar length {report['longer_wins']['similar_length']['accuracy']:.3f}")
        print(f"  labeler agreement  {agreement['agreement']:.3f}  ({agreement['label_pairs']} label pairs, all comparisons)")
        for batch, row in report["by_batch"].items():
            print(f"  batch {batch:12s} {row['accuracy']:.3f}  ({row['pairs']} pairs; longer wins {report['longer_wins']['by_batch'][batch]['accuracy']:.3f},"
                  f" labelers {report['labeler_agreement']['by_batch'][batch]['agreement']:.3f})")
        print(f"  log loss {report['log_loss']:.3f}  ECE {report['ece']:.3f}  plot {plot_path}")

    @rm_app.command("score")
    def rm_score(
        model: str = typer.Option(..., "--model", help="Reward model folder."),
        samples: str = typer.Option(..., "--samples", help="Samples file (JSONL: post_id, policy, text)."),
        out: str = typer.Option(..., "--out", help="Where to write the samples with a `score` field."),
        data_dir: str = typer.Option("", "--data-dir", help="Data folder with tldr/posts.jsonl."),
        batch_size: int = typer.Option(16, "--batch-size", help="Sequences per forward pass."),
        query_max_tokens: int = typer.Option(0, "--query-max-tokens", help="Query budget (default: the one the RM was trained with)."),
        response_max_tokens: int = typer.Option(0, "--response-max-tokens", help="Response budget (default: the RM's)."),
    ) -> None:
        """Scores every sample of a samples file with the reward model."""
        print(json.dumps(score_samples_file(model, samples, out, data_dir, batch_size, query_max_tokens, response_max_tokens), indent=2))
