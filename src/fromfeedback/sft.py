"""Supervised fine-tuning: next-token loss on the response tokens of (post, reference TL;DR) pairs."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fromfeedback import stage_info
from fromfeedback.config import default_data_dir
from fromfeedback.data import QueryResponseBatch, encode_response, load_tldr, make_query
from fromfeedback.files import UserError, atomic_path, write_json
from fromfeedback.models import count_parameters, freeze_lower, load_policy, load_tokenizer, resolve_model, response_logits
from fromfeedback.ops import logprobs_from_logits, masked_sum
from fromfeedback.runtime import Checkpointer, MetricsLogger, adamw, autocast, batch_plan, check_lr_schedule, check_precision, learning_rate, peak_memory_mb, progress, seed_everything, use_bf16


@dataclass
class SFTConfig:
    model: str = "smollm2-135m"
    """Model to fine-tune: `smollm2-135m`, `tiny-random`, a Hugging Face id or a local folder."""
    data_dir: str = ""
    """Folder with tldr/posts.jsonl (default: $FROMFEEDBACK_DATA_DIR or ../shared/data)."""
    out: str = "runs/sft"
    """Run folder: the model goes to OUT/model, metrics to OUT/metrics.jsonl and OUT/tensorboard."""
    train_split: str = "sft_train"
    """Posts to train on."""
    valid_split: str = "sft_valid"
    """Posts whose reference loss is reported before and after training."""
    train_limit: int = 0
    """Use only the first N training posts (0: all)."""
    valid_limit: int = 0
    """Use only the first N validation posts (0: all)."""
    epochs: int = 1
    """Passes over the training posts (ignored when max_steps is set)."""
    max_steps: int = 0
    """Optimizer steps to take (0: as many as `epochs` passes need)."""
    batch_size: int = 16
    """Examples per optimizer step, over all processes."""
    micro_batch_size: int = 8
    """Examples per forward pass; gradients are accumulated up to batch_size."""
    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    lr_schedule: str = "cosine"
    """cosine, linear or constant decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    query_max_tokens: int = 512
    """Query token budget; the post is cut at the last newline that fits."""
    response_max_tokens: int = 48
    """Longest reference, in tokens including EOS."""
    freeze_embeddings: bool = False
    """Freeze the token embeddings (and the tied LM head)."""
    freeze_layers: int = 0
    """Freeze the lowest N transformer layers (cheaper backward on CPU)."""
    eos_loss_weight: float = 1.0
    """Training weight of each reference's EOS token relative to its other tokens (validation loss stays the
    plain per-token mean). Above 1 it teaches a small model to stop where a summary ends: a 135M model
    trained briefly tends to repeat its first sentence under greedy decoding instead of emitting EOS."""
    unlikelihood_coef: float = 0.0
    """Weight α of the token-level unlikelihood loss (Welleck et al. 2019): at each reference token, −log(1 − p)
    for every earlier response token that is not the target, which discourages the repetition loops a small
    model falls into under greedy decoding (0: off; validation loss stays the plain per-token mean)."""
    precision: str = "auto"
    """auto (bf16 autocast where the hardware supports it), bf16 or fp32."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every N steps (0: never)."""
    eval_every: int = 0
    """Report validation loss every N steps as well as before and after (0: before and after only)."""
    log_every: int = 1
    """Write metrics every N steps."""
    seed: int = 0
    """Seed for data order and initialization."""

    def validate(self) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise UserError("batch_size and micro_batch_size must be at least 1")
        check_lr_schedule(self.lr_schedule)
        check_precision(self.precision)
        if self.query_max_tokens < 32 or self.response_max_tokens < 2:
            raise UserError("query_max_tokens must be at least 32 and response_max_tokens at least 2")
        if self.unlikelihood_coef < 0:
            raise UserError(f"unlikelihood_coef must be 0 (off) or positive, got {self.unlikelihood_coef}")
        if self.eos_loss_weight <= 0:
            raise UserError(f"eos_loss_weight must be positive (1: every token counts the same), got {self.eos_loss_weight}")


def tokenize_pairs(posts, tokenizer, query_max_tokens: int, response_max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(query ids, response ids) for each post with a reference."""
    pairs = []
    for post in posts:
        if not post.reference:
            continue
        query = make_query(post.subreddit, post.title, post.post, tokenizer, query_max_tokens)
        pairs.append((tokenizer.encode(query, add_special_tokens=False), encode_response(tokenizer, post.reference, response_max_tokens)))
    return pairs


def repetition_unlikelihood(log_probs: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Token-level unlikelihood (Welleck et al. 2019), summed: Σ_t Σ_c −log(1 − p(c | <t)) over the
    candidates c of position t: the distinct tokens at earlier response positions that differ from the
    target at t. log_probs [B, R, V] (log-softmax) predict response_ids [B, R]."""
    width = response_ids.shape[1]
    valid = response_mask.bool()
    earlier = torch.ones(width, width, dtype=torch.bool, device=log_probs.device).tril(-1)  # [t, j]: j < t
    same = response_ids[:, :, None] == response_ids[:, None, :]  # [B, t, j]: token t equals token j
    # Count each distinct earlier token once: j is a candidate only at its first occurrence.
    first_occurrence = ~(same & earlier).any(-1)  # [B, j]
    candidates = earlier & ~same & first_occurrence[:, None, :] & valid[:, None, :] & valid[:, :, None]
    candidate_probs = log_probs.gather(-1, response_ids[:, None, :].expand(-1, width, -1)).exp()  # [B, t, j]: p(token j at t)
    return -(torch.log1p(-candidate_probs.clamp(max=1 - 1e-5)) * candidates).sum()


def response_nll(
    model, batch: QueryResponseBatch, precision: str, eos_id: int | None = None, eos_weight: float = 1.0, unlikelihood_coef: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed training loss of the response tokens and their count: the negative log-likelihood (EOS tokens,
    id `eos_id`, weighted by `eos_weight`), plus `unlikelihood_coef` × the repetition unlikelihood. With the
    defaults, the plain summed NLL."""
    device = batch.query_ids.device
    with autocast(precision, device):
        logits = response_logits(model, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
    # The unlikelihood term needs the whole distribution: normalize over the vocabulary once for both terms.
    log_probs = torch.log_softmax(logits.float(), dim=-1) if unlikelihood_coef else None
    if log_probs is None:
        logprobs = logprobs_from_logits(logits, batch.response_ids)
    else:
        logprobs = log_probs.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    weights = batch.response_mask.float()
    if eos_weight != 1.0 and eos_id is not None:
        weights = torch.where((batch.response_ids == eos_id) & batch.response_mask.bool(), eos_weight, weights)
    loss = -masked_sum(logprobs, weights)
    if log_probs is not None:
        loss = loss + unlikelihood_coef * repetition_unlikelihood(log_probs, batch.response_ids, batch.response_mask)
    return loss, batch.response_mask.sum()


@torch.no_grad()
def evaluate_loss(model, pairs, pad_id: int, micro_batch_size: int, precision: str, accelerator) -> float:
    """Mean per-token loss on `pairs`, sharded over processes."""
    model.eval()
    device = accelerator.device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    mine = pairs[accelerator.process_index :: accelerator.num_processes]
    for start in range(0, len(mine), micro_batch_size):
        chunk = mine[start : start + micro_batch_size]
        batch = QueryResponseBatch.from_ids([q for q, _ in chunk], [r for _, r in chunk], pad_id).to(device)
        nll, count = response_nll(model, batch, precision)
        total += torch.stack([nll.double(), count.double()])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def run_sft(config: SFTConfig) -> Path:
    """Fine-tunes `config.model` on references; returns the folder of the fine-tuned model."""
    from accelerate import Accelerator

    out = Path(config.out)
    final_dir = out / "model"
    if (out / "summary.json").exists() and final_dir.exists():
        print(f"SFT already finished in {out}; delete {out / 'summary.json'} to train again")
        return final_dir
    # cpu=True on a machine without CUDA turns torchrun-launched processes into gloo data parallelism
    # (`accelerate launch --multi_gpu --num_processes 2`); accelerate's own `--cpu` launcher needs MPI for that.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, is_main = accelerator.device, accelerator.is_main_process
    seed_everything(config.seed)
    model_dir = resolve_model(config.model)
    tokenizer = load_tokenizer(model_dir)
    model = load_policy(model_dir)
    freeze_lower(model, config.freeze_layers, config.freeze_embeddings)
    model.to(device).train()

    data_dir = config.data_dir or default_data_dir()
    train_posts = load_tldr(data_dir, config.train_split)[: config.train_limit or None]
    valid_posts = load_tldr(data_dir, config.valid_split)[: config.valid_limit or None]
    train_pairs = tokenize_pairs(train_posts, tokenizer, config.query_max_tokens, config.response_max_tokens)
    valid_pairs = tokenize_pairs(valid_posts, tokenizer, config.query_max_tokens, config.response_max_tokens)
    plan = batch_plan(len(train_pairs), config.batch_size, config.epochs, config.max_steps, config.seed)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(trainable, lr=config.lr, weight_decay=config.weight_decay)
    checkpointer = Checkpointer(out)
    start_step, state = 0, {}
    latest = checkpointer.latest()
    if latest is not None:
        start_step, state = checkpointer.load(latest, {"model": model}, optimizer)
        if is_main:
            print(f"resuming from {latest} (step {start_step})")
    model, optimizer = accelerator.prepare(model, optimizer)
    logger = MetricsLogger(out, resume_step=start_step if latest else None, enabled=is_main)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", asdict(config))
        print(
            f"SFT: {len(train_pairs)} examples, {len(plan)} steps of {config.batch_size}, "
            f"{count_parameters(model, trainable_only=True) / 1e6:.1f}M of {count_parameters(model) / 1e6:.1f}M parameters trained, "
            f"bf16 autocast {'on' if use_bf16(config.precision, device) else 'off'}, {accelerator.num_processes} process(es)"
        )
    pad_id = tokenizer.pad_token_id
    if "valid_loss_before" not in state:
        state["valid_loss_before"] = evaluate_loss(model, valid_pairs, pad_id, config.micro_batch_size, config.precision, accelerator)
        logger.log(0, {"valid_loss": state["valid_loss_before"]})
    state.setdefault("train_seconds", 0.0)

    bar = progress(total=len(plan), initial=start_step, desc="sft", enabled=is_main)
    for step in range(start_step, len(plan)):
        step_started = time.perf_counter()
        lr = learning_rate(step, len(plan), config.lr, config.warmup_steps, config.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        global_pairs = [train_pairs[i] for i in plan[step]]
        # Every process normalizes by the token count of the whole global batch, so the summed gradient
        # (DDP averages over processes, hence the factor) is the per-token mean over the global batch.
        global_tokens = sum(len(r) for _, r in global_pairs)
        mine = global_pairs[accelerator.process_index :: accelerator.num_processes]
        loss_total = 0.0
        for start in range(0, len(mine), config.micro_batch_size):
            chunk = mine[start : start + config.micro_batch_size]
            batch = QueryResponseBatch.from_ids([q for q, _ in chunk], [r for _, r in chunk], pad_id).to(device)
            nll, _ = response_nll(model, batch, config.precision, tokenizer.eos_token_id, config.eos_loss_weight, config.unlikelihood_coef)
            loss = nll / global_tokens * accelerator.num_processes
            accelerator.backward(loss)
            loss_total += float(nll.detach()) / global_tokens
        grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm) if config.max_grad_norm > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - step_started
        state["train_seconds"] += seconds
        done = step + 1
        loss_value = float(accelerator.reduce(torch.tensor(loss_total, device=device), reduction="sum"))
        metrics = {"train_loss": loss_value, "lr": lr, "seconds_per_step": seconds}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if config.eval_every and done % config.eval_every == 0 and done < len(plan):
            metrics["valid_loss"] = evaluate_loss(model, valid_pairs, pad_id, config.micro_batch_size, config.precision, accelerator)
        if done % config.log_every == 0 or "valid_loss" in metrics:
            logger.log(done, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < len(plan):
            accelerator.wait_for_everyone()
            if is_main:
                checkpointer.save(done, {"model": accelerator.unwrap_model(model)}, optimizer, state)
    bar.close()

    valid_loss_after = evaluate_loss(model, valid_pairs, pad_id, config.micro_batch_size, config.precision, accelerator)
    logger.log(len(plan), {"valid_loss": valid_loss_after})
    logger.close()
    accelerator.wait_for_everyone()
    if is_main:
        with atomic_path(final_dir) as tmp:
            accelerator.unwrap_model(model).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            stage_info.write(tmp, stage="sft", base_model=str(config.model), query_max_tokens=config.query_max_tokens,
                             response_max_tokens=config.response_max_tokens)
        trained_steps = len(plan) - start_step
        summary = {
            "valid_loss_before": state["valid_loss_before"],
            "valid_loss_after": valid_loss_after,
            "steps": len(plan),
            "examples": len(plan) * config.batch_size,
            "train_seconds": state["train_seconds"],
            "seconds_per_step": state["train_seconds"] / max(1, len(plan)),
            "resumed_at_step": start_step,
            "trained_steps_this_run": trained_steps,
            "peak_memory_mib": peak_memory_mb(device),
            "processes": accelerator.num_processes,
        }
        write_json(out / "summary.json", summary)
        print(json.dumps(summary, indent=2))
        print(f"SFT model saved to {final_dir}")
    accelerator.wait_for_everyone()
    return final_dir
