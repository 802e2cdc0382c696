"""Batched generation with a KV cache: greedy or temperature/top-p, stop at EOS, per-token log-probs.

`generate` returns everything PPO needs (token ids, response masks, log-probs of the sampled tokens
under the temperature-scaled distribution); `run_sample` is the `fromfeedback sample` stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fromfeedback import stage_info
from fromfeedback.data import QueryResponseBatch, Sample, load_tldr, make_query, pad_left, write_samples
from fromfeedback.files import UserError
from fromfeedback.models import load_policy, load_tokenizer, position_ids_from_mask, resolve_model
from fromfeedback.runtime import Precision, autocast, check_precision, default_device, inference_dtype, peak_memory_mb, progress, seed_everything


@dataclass
class Generation:
    """Queries [B, Q] left-padded; responses [B, R] right-padded, EOS included where it was produced."""

    batch: QueryResponseBatch
    logprobs: torch.Tensor
    """[B, R] log-prob of each sampled token under the sampling distribution (logits / temperature); 0 on padding."""
    ended: torch.Tensor
    """[B] whether the response ended with EOS within the token limit."""
    texts: list[str]


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their log-probs under softmax(logits / temperature) (greedy when temperature is 0)."""
    logits = logits.float()
    if temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    logprobs = torch.log_softmax(logits / temperature, -1)
    probs = logprobs.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    queries: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    precision: Precision = "auto",
    show_progress: bool = False,
    samples_per_query: int = 1,
) -> Generation:
    """Generates `samples_per_query` responses for each query (token ids, no padding), `batch_size` responses
    at a time. The responses to one query are consecutive rows, and its prompt is run once: the KV cache of
    the prompt is repeated for its samples."""
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses: list[list[int]] = []
    token_logprobs: list[list[float]] = []
    ended: list[bool] = []
    queries_per_batch = max(1, batch_size // samples_per_query)
    starts = range(0, len(queries), queries_per_batch)
    for start in progress(starts, desc="generate", enabled=show_progress):
        query_ids, query_mask = pad_left(queries[start : start + queries_per_batch], pad_id)
        query_ids, query_mask = query_ids.to(device), query_mask.to(device)
        rows = query_ids.shape[0] * samples_per_query
        attention_mask = query_mask
        position_ids = position_ids_from_mask(attention_mask)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        # Rows still decoded: once a quarter of them has finished, the finished ones leave the batch (and the KV
        # cache), so a few long responses do not keep the whole batch decoding.
        active = torch.arange(rows, device=device)
        new_tokens, new_logprobs, alive = [], [], []
        with autocast(precision, device):
            output = model(input_ids=query_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
            next_logits = output.logits[:, -1]
            if samples_per_query > 1:
                output.past_key_values.batch_repeat_interleave(samples_per_query)
                next_logits = next_logits.repeat_interleave(samples_per_query, 0)
                attention_mask = attention_mask.repeat_interleave(samples_per_query, 0)
                position_ids = position_ids.repeat_interleave(samples_per_query, 0)
            for _ in range(max_new_tokens):
                tokens, logprobs = sample_tokens(next_logits, temperature, top_p, generator)
                active_finished = finished[active]
                alive.append(~finished)
                tokens = torch.where(active_finished, torch.full_like(tokens, pad_id), tokens)
                new_tokens.append(torch.full((rows,), pad_id, dtype=tokens.dtype, device=device).index_copy(0, active, tokens))
                new_logprobs.append(torch.zeros(rows, dtype=logprobs.dtype, device=device).index_copy(0, active, logprobs.masked_fill(active_finished, 0.0)))
                finished = finished.index_copy(0, active, active_finished | (tokens == eos_id))
                if bool(finished.all()):
                    break
                still_decoding = ~finished[active]
                if int(still_decoding.sum()) <= 3 * len(active) // 4:
                    keep = still_decoding.nonzero().squeeze(-1)
                    output.past_key_values.batch_select_indices(keep)
                    active, tokens, attention_mask, position_ids = active[keep], tokens[keep], attention_mask[keep], position_ids[keep]
                attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
                position_ids = position_ids[:, -1:] + 1
                output = model(
                    input_ids=tokens[:, None],
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=output.past_key_values,
                    use_cache=True,
                )
                next_logits = output.logits[:, -1]
        token_matrix = torch.stack(new_tokens, 1).cpu()
        alive_matrix = torch.stack(alive, 1).cpu()
        logprob_matrix = torch.stack(new_logprobs, 1).float().cpu()
        for row in range(rows):
            length = int(alive_matrix[row].sum())
            responses.append(token_matrix[row, :length].tolist())
            token_logprobs.append(logprob_matrix[row, :length].tolist())
            ended.append(bool(finished[row]))
    batch = QueryResponseBatch.from_ids([q for q in queries for _ in range(samples_per_query)], responses, pad_id)
    logprobs = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
    for row, values in enumerate(token_logprobs):
        logprobs[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    return Generation(batch=batch, logprobs=logprobs, ended=torch.tensor(ended, dtype=torch.bool), texts=texts)


def repeated_ngram(text: str, n: int = 4) -> bool:
    """Whether any word n-gram occurs twice in `text`: the signature of a looping summary."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


@dataclass
class SampleConfig:
    model: str = "smollm2-135m"
    """Policy to sample from: a model name, or a folder written by `fromfeedback sft`/`ppo`."""
    data_dir: str = ""
    """Folder with tldr/posts.jsonl (default: $FROMFEEDBACK_DATA_DIR or ../shared/data)."""
    split: str = "test"
    """Which posts to summarize."""
    limit: int = 0
    """Summarize only the first N posts of the split (0: all)."""
    out: str = "samples.jsonl"
    """Samples file to write (post_id, policy, text, eos, tokens)."""
    policy_name: str = ""
    """Name recorded as `policy` in the samples (default: the model folder's name)."""
    temperature: float = 0.0
    """0 for greedy decoding; the paper samples at 0.7 for training and decodes greedily for evaluation."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    max_new_tokens: int = 48
    """Longest summary, in tokens (the paper's 48)."""
    query_max_tokens: int = 0
    """Query token budget (0: what the model was trained with, else 512)."""
    batch_size: int = 16
    """Queries generated together."""
    seed: int = 0
    """Seed for sampling."""
    precision: str = "auto"
    """auto (bf16 autocast where the hardware supports it), bf16 or fp32."""

    def validate(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("temperature must be >= 0 and top_p in (0, 1]")
        check_precision(self.precision)


def query_budget(model_dir: Path, requested: int) -> int:
    """The query budget to use with a model: the requested one, else what its training used, else 512."""
    if requested > 0:
        return requested
    return int(stage_info.read(model_dir).get("query_max_tokens", 512))


def run_sample(config: SampleConfig) -> Path:
    from fromfeedback.config import default_data_dir

    seed_everything(config.seed)
    model_dir = resolve_model(config.model)
    device = default_device()
    tokenizer = load_tokenizer(model_dir)
    model = load_policy(model_dir, inference_dtype(config.precision, device)).to(device).eval()  # type: ignore[arg-type]
    posts = load_tldr(config.data_dir or default_data_dir(), config.split)
    if config.limit:
        posts = posts[: config.limit]
    if not posts:
        raise UserError(f"split {config.split!r} has no posts")
    budget = query_budget(model_dir, config.query_max_tokens)
    queries = [tokenizer.encode(make_query(p.subreddit, p.title, p.post, tokenizer, budget), add_special_tokens=False) for p in posts]
    generator = torch.Generator(device=device).manual_seed(config.seed)
    started = time.perf_counter()
    generation = generate(
        model, tokenizer, queries, config.max_new_tokens, config.temperature, config.top_p, config.batch_size,
        generator, config.precision, show_progress=True,
    )
    seconds = time.perf_counter() - started
    policy = config.policy_name or model_dir.name
    lengths = generation.batch.response_lengths.tolist()
    samples = [
        Sample(post.id, policy, text, {"eos": bool(ended), "tokens": int(length)})
        for post, text, ended, length in zip(posts, generation.texts, generation.ended.tolist(), lengths)
    ]
    write_samples(config.out, samples)
    eos_rate = sum(s.extra["eos"] for s in samples) / len(samples)
    loops = sum(repeated_ngram(s.text) for s in samples) / len(samples)
    print(
        f"wrote {len(samples)} samples to {config.out}: EOS rate {eos_rate:.1%}, repeated 4-gram {loops:.1%}, "
        f"{sum(lengths) / seconds:.0f} tokens/s, peak memory {peak_memory_mb(device):.0f} MiB"
    )
    return Path(config.out)
