"""PPO against a reward model with a KL penalty to the SFT policy (Stiennon et al. 2020), with the
implementation details of Huang et al. 2024 ("The N+ implementation details of RLHF with PPO").

One iteration: sample responses at temperature 0.7 from a batch of prompts; score them (a response
without EOS gets a fixed penalty score); recompute the log-probs of the policy and of the frozen SFT
reference and the values; per-token reward −β·(log π − log π_SFT) with the score added at the last
response token; GAE (γ = 1, λ = 0.95); whitened advantages; then several epochs of minibatches of the
clipped policy and value losses (plus an optional pretraining next-token loss, PPO-ptx).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fromfeedback import stage_info
from fromfeedback.config import default_data_dir
from fromfeedback.data import QueryResponseBatch, load_tldr, make_query
from fromfeedback.files import UserError, atomic_path, write_json, write_jsonl
from fromfeedback.models import (
    ScalarHeadModel,
    copy_trainable_weights,
    count_parameters,
    freeze_lower,
    inference_copy,
    load_policy,
    load_scalar_model,
    load_tokenizer,
    predictor_hidden,
    resolve_model,
    shared_query_hidden,
)
from fromfeedback.ops import entropy_from_logits, logprobs_from_logits, masked_mean, masked_sum, masked_whiten
from fromfeedback.reward import eos_index, score_shared_queries
from fromfeedback.runtime import Checkpointer, MetricsLogger, adamw, autocast, check_precision, default_device, inference_dtype, peak_memory_mb, progress, seed_everything, use_bf16
from fromfeedback.sampling import generate, query_budget

RewardFn = Callable[[QueryResponseBatch], torch.Tensor]
"""Scores [B] of a batch of (query, response) token ids: the reward model, or any function in tests."""


@dataclass
class PPOConfig:
    sft: str = ""
    """The SFT policy: PPO starts from it and it is the frozen reference of the KL penalty."""
    rm: str = ""
    """The reward model folder written by `fromfeedback rm train` (its bias is subtracted from scores)."""
    out: str = "runs/ppo"
    """Run folder: OUT/model (the policy), OUT/metrics.jsonl, OUT/samples/, OUT/summary.json."""
    data_dir: str = ""
    """Folder with tldr/posts.jsonl (default: $FROMFEEDBACK_DATA_DIR or ../shared/data)."""
    prompt_splits: str = "sft_train,rm_train"
    """Comma-separated splits whose posts are the rollout prompts."""
    query_max_tokens: int = 0
    """Query token budget (0: what the SFT model was trained with)."""
    response_max_tokens: int = 48
    """Longest response in tokens; a response that reaches it without EOS gets `no_eos_penalty`."""
    iterations: int = 10
    """Rollout-and-update iterations."""
    rollout_batch_size: int = 64
    """Responses sampled per iteration."""
    samples_per_prompt: int = 1
    """Responses sampled for each prompt of an iteration (rollout_batch_size / this many prompts)."""
    score_baseline: str = "none"
    """none: the score enters the reward as it is (the paper); leave_one_out: minus the mean score of the
    other responses to the same prompt (RLOO's baseline, Ahmadian et al. 2024). It removes how good a
    summary of this post tends to score, which a young value head cannot predict, without biasing the
    gradient (the other samples are independent of this one). Needs samples_per_prompt ≥ 2."""
    minibatch_size: int = 16
    """Responses per optimizer step."""
    micro_batch_size: int = 8
    """Responses per forward pass; gradients are accumulated up to minibatch_size."""
    generation_batch_size: int = 32
    """Prompts generated together."""
    ppo_epochs: int = 4
    """Passes of minibatch updates over each batch of rollouts."""
    lr: float = 1e-5
    """Learning rate (AdamW, eps 1e-5)."""
    lr_anneal: bool = False
    """Anneal the learning rate linearly to 0 over the iterations."""
    warmup_iterations: int = 0
    """Ramp the learning rate up linearly over the first N iterations. Adam's first steps move every weight by
    about lr whatever its gradient's noise, which makes the first update far larger than the later ones."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    temperature: float = 0.7
    """Sampling temperature of the rollouts; log-probs are those of logits / temperature."""
    kl_coef: float = 0.05
    """β of the per-token KL penalty (the start value when adaptive_kl is on)."""
    adaptive_kl: bool = False
    """Adapt β towards target_kl (Ziegler et al. 2019) instead of keeping it fixed."""
    target_kl: float = 6.0
    """KL to the SFT policy (nats per response) the adaptive controller aims at."""
    kl_horizon: int = 10000
    """Horizon (in responses) of the adaptive KL controller."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    clip_range: float = 0.2
    """Clipping ε of the policy ratio."""
    clip_range_value: float = 0.2
    """Clipping of the value prediction around the rollout's value."""
    value_coef: float = 0.1
    """Weight of the value loss."""
    no_eos_penalty: float = -1.0
    """Score given to a response that ends without EOS (when penalize_no_eos is on)."""
    penalize_no_eos: bool = True
    """Replace the score of a response without EOS by no_eos_penalty."""
    value_model: str = "head"
    """head: a value head on the policy trunk (cheaper); rm: a separate value model initialized from the RM."""
    ptx_coef: float = 0.0
    """Weight of the pretraining-mix next-token loss (PPO-ptx; 0: off)."""
    ptx_split: str = "sft_train"
    """Split whose (post, reference) pairs make the PPO-ptx loss."""
    ptx_batch_size: int = 8
    """Pairs per optimizer step for the PPO-ptx loss."""
    freeze_embeddings: bool = False
    """Freeze the token embeddings (and the tied LM head) of the policy and value model."""
    freeze_layers: int = 0
    """Freeze the lowest N transformer layers of the policy and value model (cheaper on CPU)."""
    precision: str = "auto"
    """auto (bf16 autocast where the hardware supports it), bf16 or fp32."""
    checkpoint_every: int = 5
    """Save a resumable checkpoint every N iterations (0: never)."""
    log_samples: int = 4
    """Sample summaries written to OUT/samples/iter-NNNNNN.jsonl each iteration."""
    seed: int = 0
    """Seed of the prompt order, sampling and minibatch order."""
    threads: int = 0
    """CPU threads for torch (0: torch's default); 1 is often fastest on a CPU shared with other jobs."""

    def validate(self) -> None:
        if self.rollout_batch_size % self.minibatch_size or self.minibatch_size % self.micro_batch_size:
            raise UserError("rollout_batch_size must be a multiple of minibatch_size, and minibatch_size of micro_batch_size")
        if self.samples_per_prompt < 1 or self.rollout_batch_size % self.samples_per_prompt:
            raise UserError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of samples_per_prompt ({self.samples_per_prompt})")
        if self.micro_batch_size % self.samples_per_prompt:
            raise UserError(f"micro_batch_size ({self.micro_batch_size}) must be a multiple of samples_per_prompt ({self.samples_per_prompt}): "
                            "a prompt's responses run together")
        if self.score_baseline not in ("none", "leave_one_out"):
            raise UserError(f"score_baseline must be none or leave_one_out, got {self.score_baseline!r}")
        if self.score_baseline == "leave_one_out" and self.samples_per_prompt < 2:
            raise UserError("score_baseline = leave_one_out needs samples_per_prompt of at least 2")
        if self.value_model not in ("head", "rm"):
            raise UserError(f"value_model must be head or rm, got {self.value_model!r}")
        check_precision(self.precision)
        if self.temperature <= 0:
            raise UserError("temperature must be > 0 (PPO needs the log-probs of a sampling distribution)")
        if self.iterations < 1 or self.ppo_epochs < 1 or self.response_max_tokens < 2:
            raise UserError("iterations and ppo_epochs must be at least 1, response_max_tokens at least 2")


# --- the algorithm, as plain tensor functions ---------------------------------------------------


def penalize_no_eos(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores with those of responses that never produced EOS replaced by `penalty`."""
    return torch.where(ended.to(scores.device), scores, torch.full_like(scores, penalty))


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each score minus the mean of the other scores of its group; groups are consecutive runs of `group_size`."""
    groups = scores.view(-1, group_size)
    others_mean = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).view_as(scores)


def shaped_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, R]: −β·(log π − log π_ref) on every response token, plus the score on the last one.

    Returns (rewards, per-token KL); both are 0 on padding."""
    mask = response_mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, eos_index(response_mask)] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns [B, R]; the value after the last response token is 0."""
    mask = response_mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    width = values.shape[1]
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(π‖π_ref) per response [B], two estimators from samples of π: Σ(log π − log π_ref), and Σ k3
    with k3 = (r − 1) − log r, r = π_ref/π (unbiased, never negative, lower variance)."""
    log_ratio = (ref_logprobs - logprobs).float()
    k3 = log_ratio.exp() - 1 - log_ratio
    return masked_sum(-log_ratio, response_mask, dim=1), masked_sum(k3, response_mask, dim=1)


def policy_loss(logprobs, old_logprobs, advantages, response_mask, clip_range: float, normalizer: float):
    """The clipped surrogate, summed over tokens and divided by `normalizer`; with its clip fraction and approx KL."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_sum(torch.maximum(unclipped, clipped), response_mask) / normalizer
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), response_mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, response_mask)
    return loss, clip_fraction, approx_kl


def value_loss(values, old_values, returns, response_mask, clip_range: float, normalizer: float):
    """0.5·max((v − G)², (clip(v, v_old ± ε) − G)²), summed over tokens / `normalizer`; with its clip fraction."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_sum(torch.maximum(unclipped_error, clipped_error), response_mask) / normalizer
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).float(), response_mask)
    return loss, clip_fraction


class KLController:
    """β of the KL penalty: fixed, or adapted towards a target KL (Ziegler et al. 2019, eq. 2)."""

    def __init__(self, value: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10000):
        self.value, self.adaptive, self.target, self.horizon = value, adaptive, target, horizon

    def update(self, kl: float, n_responses: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_responses / self.horizon


# --- models ----------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """A linear value head on the policy's last hidden states (the value model that shares the trunk).

    Its weights start at zero and its bias at the mean score of the first rollouts: a randomly initialized head
    predicts values that jump from token to token, and GAE turns those jumps into advantages of random sign on
    every token before the head has learned anything."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1).float()


def shared_lower_layers(config: PPOConfig) -> int:
    """Layers at the bottom of the policy that never train: with the embeddings frozen too, they compute the
    same hidden states in the policy and the reference at every update, so they run once per rollout."""
    return config.freeze_layers if config.freeze_embeddings else 0


LowerHidden = tuple[torch.Tensor, torch.Tensor]
"""Hidden states entering the first trained layer: of the queries [G, Q, H] and of the responses [B, R, H]."""


def trunk_hidden(model, batch: QueryResponseBatch, group_size: int, lower: LowerHidden | None = None, start: int = 0, end: int | None = None):
    """`models.shared_query_hidden` of a grouped batch: each query runs once for its `group_size` responses.
    From token ids, or with `lower` from layer `start` on; up to layer `end`."""
    queries, query_mask, query_of_row = batch.shared_queries(group_size)
    query_inputs, response_inputs = (queries, batch.response_ids) if lower is None else lower
    return shared_query_hidden(model, query_inputs, query_mask, response_inputs, batch.response_mask, query_of_row, start if lower else 0, end)


def lower_hidden(policy, batch: QueryResponseBatch, group_size: int, start: int) -> LowerHidden:
    """The hidden states entering layer `start` (the first trained one) for a grouped batch."""
    return trunk_hidden(policy, batch, group_size, end=start)


def policy_and_values(
    policy, critic: ValueHead | ScalarHeadModel, batch: QueryResponseBatch, temperature: float, group_size: int = 1,
    lower: LowerHidden | None = None, start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-scaled logits [B, R, V] predicting each response token, and the value [B, R] of the state
    before each response token (read at the same position as the logits). The batch's rows come in runs of
    `group_size` responses to one query, which runs once for them. With `lower` (from `lower_hidden`) the
    policy runs only its layers from `start` on."""
    _, _, query_of_row = batch.shared_queries(group_size)
    hidden = predictor_hidden(*trunk_hidden(policy, batch, group_size, lower, start), query_of_row)
    logits = policy.get_output_embeddings()(hidden) / temperature
    if isinstance(critic, ValueHead):
        return logits, critic(hidden)
    critic_hidden = predictor_hidden(*trunk_hidden(critic.model, batch, group_size), query_of_row)
    return logits, critic.model.score(critic_hidden).squeeze(-1).float()


def reference_logits(reference, batch: QueryResponseBatch, group_size: int = 1, lower: LowerHidden | None = None, start: int = 0) -> torch.Tensor:
    """Logits [B, R, V] of the reference policy (grouped as in `policy_and_values`), from its layer `start` on
    when `lower` is given."""
    _, _, query_of_row = batch.shared_queries(group_size)
    hidden = predictor_hidden(*trunk_hidden(reference, batch, group_size, lower, start), query_of_row)
    return reference.get_output_embeddings()(hidden)


# --- rollouts --------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    batch: QueryResponseBatch
    texts: list[str]
    ended: torch.Tensor
    raw_scores: torch.Tensor
    """[B] reward model (or reward function) scores before the no-EOS penalty."""
    scores: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    """[B, R] entropy of the sampling distribution at each response token."""
    lower_query: torch.Tensor | None
    """[G, Q, H] hidden states of the queries (one per prompt) entering the first trained layer, when the layers
    below are shared (else None)."""
    lower_response: torch.Tensor | None
    """[B, R, H] the same for the responses."""


@torch.no_grad()
def forward_rollouts(policy, critic, reference, batch: QueryResponseBatch, config: PPOConfig):
    """Log-probs of the policy and the reference, values and entropies [B, R], by micro-batches of whole
    prompts (each prompt runs once for its samples_per_prompt responses); and, when the lower layers are
    shared, the hidden states entering the first trained layer (queries [G, Q, H], responses [B, R, H])."""
    device = batch.query_ids.device
    start = shared_lower_layers(config)
    group_size = config.samples_per_prompt
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in ("logprobs", "ref_logprobs", "values", "entropy", "lower_query", "lower_response")}
    full_width = batch.response_ids.shape[1]
    for first in range(0, batch.query_ids.shape[0], config.micro_batch_size):
        micro, query_start, width = batch.select(range(first, min(first + config.micro_batch_size, batch.query_ids.shape[0]))).trim()
        with autocast(config.precision, device):
            lower = lower_hidden(policy, micro, group_size, start) if start else None
            logits, values = policy_and_values(policy, critic, micro, config.temperature, group_size, lower, start)
            ref_logits = reference_logits(reference, micro, group_size, lower, start)
        pad = (0, full_width - width)
        mask = micro.response_mask.float()
        outputs["logprobs"].append(nn.functional.pad(logprobs_from_logits(logits, micro.response_ids) * mask, pad))
        outputs["ref_logprobs"].append(nn.functional.pad(logprobs_from_logits(ref_logits / config.temperature, micro.response_ids) * mask, pad))
        outputs["values"].append(nn.functional.pad(values * mask, pad))
        outputs["entropy"].append(nn.functional.pad(entropy_from_logits(logits) * mask, pad))
        if lower is not None:
            outputs["lower_query"].append(nn.functional.pad(lower[0], (0, 0, query_start, 0)))
            outputs["lower_response"].append(nn.functional.pad(lower[1], (0, 0, 0, full_width - width)))
    return {name: torch.cat(parts) if parts else None for name, parts in outputs.items()}


def prompt_indices(iteration: int, batch_size: int, n_prompts: int, seed: int) -> list[int]:
    """Prompts of an iteration: consecutive slices of a seeded shuffle, reshuffled each pass, so a resumed
    run continues exactly where the killed one was."""
    indices = []
    for position in range(iteration * batch_size, (iteration + 1) * batch_size):
        epoch, offset = divmod(position, n_prompts)
        order = list(range(n_prompts))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        indices.append(order[offset])
    return indices


def collect_rollouts(policy, sampler, critic, reference, tokenizer, reward_fn: RewardFn, queries: list[list[int]], config: PPOConfig, iteration: int, timings: dict):
    """Samples from `sampler` (the policy's weights, maybe in bf16), then scores and evaluates with the models."""
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + iteration)
    started = time.perf_counter()
    generation = generate(
        sampler, tokenizer, queries, config.response_max_tokens, config.temperature, 1.0, config.generation_batch_size, generator, config.precision,
        samples_per_query=config.samples_per_prompt,
    )
    timings["seconds_generate"] = time.perf_counter() - started
    started = time.perf_counter()
    batch = generation.batch.to(device)
    raw_scores = reward_fn(batch).float().to(device)
    scores = penalize_no_eos(raw_scores, generation.ended, config.no_eos_penalty) if config.penalize_no_eos else raw_scores
    timings["seconds_score"] = time.perf_counter() - started
    started = time.perf_counter()
    forward = forward_rollouts(policy, critic, reference, batch, config)
    timings["seconds_forward"] = time.perf_counter() - started
    return Rollouts(batch, generation.texts, generation.ended.to(device), raw_scores, scores, **forward)


# --- the update ------------------------------------------------------------------------------------


def ptx_loss(policy, tokenizer, posts, budget: int, config: PPOConfig, rng: random.Random, device) -> torch.Tensor:
    """Mean next-token loss on the references of a random batch of posts (the PPO-ptx term)."""
    from fromfeedback.sft import response_nll, tokenize_pairs

    chunk = tokenize_pairs(rng.sample(posts, min(config.ptx_batch_size, len(posts))), tokenizer, budget, config.response_max_tokens)
    pad_id = tokenizer.pad_token_id
    batch = QueryResponseBatch.from_ids([q for q, _ in chunk], [r for _, r in chunk], pad_id).to(device)
    nll, count = response_nll(policy, batch, config.precision)
    return nll / count.clamp(min=1)


def ppo_update(policy, critic, optimizer, trainable, rollouts: Rollouts, advantages, returns, config: PPOConfig, iteration: int, tokenizer, ptx_posts, budget: int) -> dict[str, float]:
    """`ppo_epochs` passes of minibatch steps over the rollouts; returns the mean of each statistic."""
    device = rollouts.batch.query_ids.device
    group_size = config.samples_per_prompt
    n_groups = rollouts.batch.query_ids.shape[0] // group_size
    order_generator = torch.Generator().manual_seed(config.seed * 7_919 + iteration)
    totals: dict[str, float] = {}
    steps = 0

    def add(name: str, value) -> None:
        totals[name] = totals.get(name, 0.0) + float(value.detach() if isinstance(value, torch.Tensor) else value)

    for _ in range(config.ppo_epochs):
        # Minibatches are whole prompts with all their responses (with one response per prompt: responses).
        order = torch.randperm(n_groups, generator=order_generator)
        for mb_start in range(0, n_groups, config.minibatch_size // group_size):
            minibatch_groups = order[mb_start : mb_start + config.minibatch_size // group_size]
            minibatch = (minibatch_groups[:, None] * group_size + torch.arange(group_size)).flatten()
            # Losses are sums over tokens divided by the minibatch's token count: a per-token mean over
            # the minibatch, whatever the micro-batching.
            tokens = float(rollouts.batch.response_mask[minibatch].sum())
            for micro_start in range(0, len(minibatch), config.micro_batch_size):
                rows = minibatch[micro_start : micro_start + config.micro_batch_size].to(device)
                micro, query_start, width = rollouts.batch.select(rows).trim()
                mask = micro.response_mask
                lower = None
                if rollouts.lower_query is not None and rollouts.lower_response is not None:
                    lower = (rollouts.lower_query[rows[::group_size] // group_size, query_start:], rollouts.lower_response[rows, :width])
                with autocast(config.precision, device):
                    logits, values = policy_and_values(policy, critic, micro, config.temperature, group_size, lower, shared_lower_layers(config))
                logprobs = logprobs_from_logits(logits, micro.response_ids)
                pg_loss, clip_fraction, approx_kl = policy_loss(
                    logprobs, rollouts.logprobs[rows, :width], advantages[rows, :width], mask, config.clip_range, tokens
                )
                vf_loss, vf_clip_fraction = value_loss(
                    values, rollouts.values[rows, :width], returns[rows, :width], mask, config.clip_range_value, tokens
                )
                (pg_loss + config.value_coef * vf_loss).backward()
                share = float(mask.sum()) / tokens
                add("policy_loss", pg_loss)
                add("value_loss", vf_loss)
                add("clip_fraction", clip_fraction * share)
                add("value_clip_fraction", vf_clip_fraction * share)
                add("approx_kl", approx_kl * share)
            if config.ptx_coef > 0:
                rng = random.Random(config.seed * 1_000_003 + iteration * 10_007 + steps)
                loss = ptx_loss(policy, tokenizer, ptx_posts, budget, config, rng, device)
                (config.ptx_coef * loss).backward()
                add("ptx_loss", loss)
            if config.max_grad_norm > 0:
                add("grad_norm", torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    return {name: total / steps for name, total in totals.items()}


# --- the stage -------------------------------------------------------------------------------------


def iteration_lr(config: PPOConfig, iteration: int) -> float:
    """The learning rate of an iteration (0-based): linear warm-up, then constant or annealed to 0."""
    scale = min(1.0, (iteration + 1) / (config.warmup_iterations + 1))
    if config.lr_anneal:
        scale *= 1 - iteration / config.iterations
    return config.lr * scale


def reward_model_fn(rm_dir: str, config: PPOConfig, device) -> RewardFn:
    if not rm_dir:
        raise UserError("give the reward model with --rm DIR (a folder written by `fromfeedback rm train`)")
    reward_model = load_scalar_model(rm_dir, inference_dtype(config.precision, device)).to(device).eval().requires_grad_(False)  # type: ignore[arg-type]

    def score(batch: QueryResponseBatch) -> torch.Tensor:
        # Rows come in runs of samples_per_prompt responses to one query: each query runs once for them.
        return score_shared_queries(reward_model, batch, config.samples_per_prompt, config.precision, config.micro_batch_size)

    return score


def build_critic(policy, config: PPOConfig, device) -> ValueHead | ScalarHeadModel:
    if config.value_model == "head":
        return ValueHead(policy.config.hidden_size).to(device)
    if not config.rm:
        raise UserError("value_model = rm needs --rm DIR")
    critic = load_scalar_model(config.rm)
    freeze_lower(critic.model, config.freeze_layers, config.freeze_embeddings)
    return critic.to(device).train()


def tokenize_prompts(posts, tokenizer, budget: int, cache: dict[int, list[int]], indices: list[int]) -> list[list[int]]:
    for i in indices:
        if i not in cache:
            post = posts[i]
            try:
                query = make_query(post.subreddit, post.title, post.post, tokenizer, budget)
            except ValueError as e:
                raise UserError(f"post {post.id}: {e}; raise query_max_tokens") from None
            cache[i] = tokenizer.encode(query, add_special_tokens=False)
    return [cache[i] for i in indices]


def run_ppo(config: PPOConfig, reward_fn: RewardFn | None = None) -> Path:
    """Trains the SFT policy with PPO against `config.rm` (or `reward_fn`); returns the folder of the final policy."""
    out = Path(config.out)
    final_dir = out / "model"
    if (out / "summary.json").exists() and final_dir.exists():
        print(f"PPO already finished in {out}; delete {out / 'summary.json'} to train again")
        return final_dir
    if not config.sft:
        raise UserError("give the SFT policy with --sft DIR (a folder written by `fromfeedback sft`, or a model name)")
    seed_everything(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = default_device()
    sft_dir = resolve_model(config.sft)
    tokenizer = load_tokenizer(sft_dir)
    budget = query_budget(sft_dir, config.query_max_tokens)
    policy = load_policy(sft_dir)
    freeze_lower(policy, config.freeze_layers, config.freeze_embeddings)
    policy.to(device).train()
    reference = load_policy(sft_dir, inference_dtype(config.precision, device)).to(device).eval().requires_grad_(False)  # type: ignore[arg-type]
    # Rollouts are sampled from a bf16 copy of the policy, refreshed before each batch (its log-probs are
    # recomputed by the trained policy, so sampling precision never enters the loss).
    sampler = inference_copy(policy, inference_dtype(config.precision, device))  # type: ignore[arg-type]
    critic = build_critic(policy, config, device)
    if reward_fn is None:
        reward_fn = reward_model_fn(config.rm, config, device)

    data_dir = config.data_dir or default_data_dir()
    posts = load_tldr(data_dir, [s.strip() for s in config.prompt_splits.split(",") if s.strip()])
    if len(posts) < config.rollout_batch_size:
        raise UserError(f"splits {config.prompt_splits!r} have {len(posts)} posts, fewer than rollout_batch_size {config.rollout_batch_size}")
    ptx_posts = [p for p in load_tldr(data_dir, config.ptx_split) if p.reference] if config.ptx_coef > 0 else []
    if config.ptx_coef > 0 and not ptx_posts:
        raise UserError(f"ptx_split {config.ptx_split!r} has no posts with a reference summary")
    query_cache: dict[int, list[int]] = {}

    trainable = [p for module in (policy, critic) for p in module.parameters() if p.requires_grad]
    # A value head on the trunk shares the policy's parameters; count each once.
    trainable = list({id(p): p for p in trainable}.values())
    optimizer = adamw(trainable, lr=config.lr, eps=1e-5, weight_decay=0.0)
    kl_controller = KLController(config.kl_coef, config.adaptive_kl, config.target_kl, config.kl_horizon)
    checkpointer = Checkpointer(out)
    modules = {"policy": policy, "critic": critic}
    start_iteration, state = 0, {}
    latest = checkpointer.latest()
    if latest is not None:
        start_iteration, state = checkpointer.load(latest, modules, optimizer)
        kl_controller.value = state["kl_coef"]
        print(f"resuming from {latest} (iteration {start_iteration})")
    state.setdefault("seconds", 0.0)
    state.setdefault("first_score", None)
    logger = MetricsLogger(out, resume_step=start_iteration if latest else None)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(config))
    print(
        f"PPO: {config.iterations} iterations of {config.rollout_batch_size} rollouts from {len(posts)} prompts, "
        f"{count_parameters(policy, trainable_only=True) / 1e6:.1f}M policy parameters trained, value model: {config.value_model}, "
        f"bf16 autocast {'on' if use_bf16(config.precision, device) else 'off'}"
    )

    metrics: dict = {}
    bar = progress(total=config.iterations, initial=start_iteration, desc="ppo")
    for iteration in range(start_iteration, config.iterations):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = iteration_lr(config, iteration)
        indices = prompt_indices(iteration, config.rollout_batch_size // config.samples_per_prompt, len(posts), config.seed)
        queries = tokenize_prompts(posts, tokenizer, budget, query_cache, indices)
        timings: dict[str, float] = {}
        policy.eval()
        copy_trainable_weights(policy, sampler)
        rollouts = collect_rollouts(policy, sampler, critic, reference, tokenizer, reward_fn, queries, config, iteration, timings)
        policy.train()
        mask = rollouts.batch.response_mask
        kl_coef = kl_controller.value
        scores = leave_one_out(rollouts.scores, config.samples_per_prompt) if config.score_baseline == "leave_one_out" else rollouts.scores
        if iteration == 0 and isinstance(critic, ValueHead):
            # A zero value is a poor baseline for scores that are all negative (or all positive): the last token,
            # which gets the score undiscounted, would look worse than every token before it. Start at their mean.
            start_value = float(scores.mean())
            critic.linear.bias.data.fill_(start_value)
            rollouts.values = torch.full_like(rollouts.values, start_value) * mask
        rewards, _ = shaped_rewards(scores, rollouts.logprobs, rollouts.ref_logprobs, mask, kl_coef)
        advantages, returns = gae(rewards, rollouts.values, mask, config.gamma, config.lam)
        advantages = masked_whiten(advantages, mask)
        update_started = time.perf_counter()
        update_stats = ppo_update(
            policy, critic, optimizer, trainable, rollouts, advantages, returns, config, iteration=iteration, tokenizer=tokenizer, ptx_posts=ptx_posts, budget=budget
        )
        timings["seconds_update"] = time.perf_counter() - update_started

        kl, kl_k3 = sequence_kl(rollouts.logprobs, rollouts.ref_logprobs, mask)
        kl_controller.update(float(kl.mean()), config.rollout_batch_size)
        seconds = time.perf_counter() - started
        state["seconds"] += seconds
        lengths = mask.sum(-1).float()
        metrics = {
            "score": float(rollouts.scores.mean()),
            "raw_score": float(rollouts.raw_scores.mean()),
            "kl": float(kl.mean()),
            "kl_k3": float(kl_k3.mean()),
            "non_score_reward": float(-kl_coef * kl.mean()),
            "entropy": float(masked_mean(rollouts.entropy, mask)),
            "response_length": float(lengths.mean()),
            "eos_rate": float(rollouts.ended.float().mean()),
            "kl_coef": kl_coef,
            "lr": optimizer.param_groups[0]["lr"],
            "value_mean": float(masked_mean(rollouts.values, mask)),
            "return_mean": float(masked_mean(returns, mask)),
            **update_stats,
            **timings,
            "seconds_iteration": seconds,
            "peak_memory_mib": peak_memory_mb(device),
        }
        if state["first_score"] is None:
            state["first_score"] = metrics["score"]
        done = iteration + 1
        logger.log(done, metrics)
        shown = range(min(config.log_samples, len(rollouts.texts)))
        write_jsonl(
            out / "samples" / f"iter-{done:06d}.jsonl",
            ({"iteration": done, "text": rollouts.texts[i], "score": float(rollouts.scores[i]), "eos": bool(rollouts.ended[i])} for i in shown),
        )
        bar.update(1)
        bar.set_postfix(score=f"{metrics['score']:.2f}", kl=f"{metrics['kl']:.2f}")
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.iterations:
            state.update(kl_coef=kl_controller.value, prompt_position=done * config.rollout_batch_size)
            checkpointer.save(done, modules, optimizer, state)
    bar.close()
    logger.close()

    with atomic_path(final_dir) as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stage_info.write(tmp, stage="ppo", base_model=str(config.sft), query_max_tokens=budget, response_max_tokens=config.response_max_tokens)
    if isinstance(critic, ValueHead):
        with atomic_path(out / "value_head.pt") as tmp:
            torch.save(critic.state_dict(), tmp)
    else:
        critic.save(out / "value_model", tokenizer)
    summary = {
        "iterations": config.iterations,
        "rollouts": config.iterations * config.rollout_batch_size,
        "first_score": state["first_score"],
        "final_score": metrics.get("score"),
        "final_kl": metrics.get("kl"),
        "final_kl_k3": metrics.get("kl_k3"),
        "final_kl_coef": kl_controller.value,
        "train_seconds": state["seconds"],
        "seconds_per_iteration": state["seconds"] / config.iterations,
        "resumed_at_iteration": start_iteration,
        "peak_memory_mib": peak_memory_mb(device),
    }
    write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    print(f"PPO policy saved to {final_dir}")
    return final_dir
