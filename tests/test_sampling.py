import torch

from fromfeedback.models import load_policy, response_logits
from fromfeedback.ops import logprobs_from_logits
from fromfeedback.sampling import generate, repeated_ngram, sample_tokens

QUERIES = [
    "SUBREDDIT: r/a\n\nTITLE: short\n\nPOST: hi\n\nTL;DR:",
    "SUBREDDIT: r/b\n\nTITLE: a much longer title for padding\n\nPOST: several more words in this one\n\nTL;DR:",
    "SUBREDDIT: r/c\n\nTITLE: third\n\nPOST: x y z\n\nTL;DR:",
]


def _model_and_queries(tiny_model_dir, tokenizer):
    model = load_policy(tiny_model_dir).eval()
    return model, [tokenizer.encode(q) for q in QUERIES]


def test_greedy_batched_equals_one_at_a_time(tiny_model_dir, tokenizer):
    model, queries = _model_and_queries(tiny_model_dir, tokenizer)
    batched = generate(model, tokenizer, queries, max_new_tokens=12, batch_size=3, precision="fp32")
    for row, query in enumerate(queries):
        single = generate(model, tokenizer, [query], max_new_tokens=12, batch_size=1, precision="fp32")
        length = int(single.batch.response_mask.sum())
        assert batched.batch.response_ids[row, :length].tolist() == single.batch.response_ids[0, :length].tolist()
        assert batched.texts[row] == single.texts[0]


def test_shapes_masks_and_logprobs_match_a_forward_pass(tiny_model_dir, tokenizer):
    model, queries = _model_and_queries(tiny_model_dir, tokenizer)
    generator = torch.Generator().manual_seed(0)
    out = generate(model, tokenizer, queries, max_new_tokens=10, temperature=0.7, batch_size=2, generator=generator, precision="fp32")
    batch = out.batch
    assert batch.query_ids.shape[0] == batch.response_ids.shape[0] == 3
    assert batch.response_ids.shape == batch.response_mask.shape == out.logprobs.shape
    assert batch.response_ids.shape[1] <= 10
    # The mask is a prefix of ones; padding after it carries zero log-prob.
    lengths = batch.response_mask.sum(-1)
    for row in range(3):
        assert batch.response_mask[row, : lengths[row]].all() and not batch.response_mask[row, lengths[row] :].any()
        assert torch.all(out.logprobs[row, lengths[row] :] == 0)
        ids = batch.response_ids[row, : lengths[row]].tolist()
        assert out.ended[row] == (tokenizer.eos_token_id in ids)
        if out.ended[row]:
            assert ids.index(tokenizer.eos_token_id) == len(ids) - 1
    with torch.no_grad():
        logits = response_logits(model, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
    recomputed = logprobs_from_logits(logits / 0.7, batch.response_ids) * batch.response_mask
    assert torch.allclose(recomputed, out.logprobs, atol=1e-3)


def test_eos_stops_generation(tokenizer):
    class AlwaysEos(torch.nn.Module):
        """Emits EOS at the third step."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.calls = 0

        def forward(self, input_ids, attention_mask, position_ids, use_cache, past_key_values=None, logits_to_keep=0):
            self.calls += 1
            logits = torch.zeros(input_ids.shape[0], 1, 8)
            logits[:, :, 5 if self.calls < 3 else tokenizer.eos_token_id % 8] = 10.0
            return type("Out", (), {"logits": logits, "past_key_values": None})()

    class SmallVocab:
        eos_token_id = tokenizer.eos_token_id % 8
        pad_token_id = eos_token_id

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(i) for i in ids if i != self.eos_token_id)

    out = generate(AlwaysEos(), SmallVocab(), [[1, 2], [3]], max_new_tokens=20, precision="fp32")
    assert out.batch.response_ids.shape[1] == 3
    assert out.ended.tolist() == [True, True]
    assert out.texts == ["5 5", "5 5"]


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    drawn = {int(sample_tokens(logits, 1.0, 0.75, generator)[0]) for _ in range(200)}
    assert drawn == {0, 1}
    greedy, logprob = sample_tokens(logits, 0.0, 1.0, None)
    assert greedy.item() == 0 and abs(logprob.item() - torch.log(torch.tensor(0.5)).item()) < 1e-6


def test_repeated_ngram():
    assert repeated_ngram("I like cats. I like cats. I like cats.")
    assert not repeated_ngram("a short summary without loops")


def test_samples_per_query_share_the_prompt(tiny_model_dir, tokenizer):
    """Several responses per query from one prompt pass: greedy ones equal the plain generation, sampled ones
    are consecutive rows whose log-probs are those of a full forward pass over the repeated queries."""
    model, queries = _model_and_queries(tiny_model_dir, tokenizer)
    plain = generate(model, tokenizer, queries, max_new_tokens=8, batch_size=3, precision="fp32")
    shared = generate(model, tokenizer, queries, max_new_tokens=8, batch_size=4, precision="fp32", samples_per_query=2)
    assert shared.texts == [text for text in plain.texts for _ in range(2)]

    generator = torch.Generator().manual_seed(0)
    out = generate(model, tokenizer, queries, max_new_tokens=10, temperature=0.7, batch_size=6, generator=generator, precision="fp32", samples_per_query=2)
    batch = out.batch
    assert batch.query_ids.shape[0] == 6
    for row in range(6):
        assert batch.query_ids[row][batch.query_mask[row].bool()].tolist() == queries[row // 2]
    assert any(out.texts[2 * i] != out.texts[2 * i + 1] for i in range(3))
    with torch.no_grad():
        logits = response_logits(model, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
    recomputed = logprobs_from_logits(logits / 0.7, batch.response_ids) * batch.response_mask
    assert torch.allclose(recomputed, out.logprobs, atol=1e-3)


class EosSometimes(torch.nn.Module):
    """A real model whose next token is EOS whenever token id + position is a multiple of 4, so rows of one batch
    end at different steps; records the rows of every forward pass."""

    def __init__(self, model, eos_id: int):
        super().__init__()
        self.model, self.eos_id, self.rows = model, eos_id, []

    def forward(self, input_ids, position_ids, **kwargs):
        self.rows.append(input_ids.shape[0])
        out = self.model(input_ids=input_ids, position_ids=position_ids, **kwargs)
        columns = out.logits.shape[1]
        boost = ((input_ids[:, -columns:] + position_ids[:, -columns:]) % 4 == 0).float() * 50.0
        out.logits[..., self.eos_id] += boost
        return out


def test_finished_rows_leave_the_batch(tiny_model_dir, tokenizer):
    """Rows that ended drop out of decoding; what the others generate, and their log-probs, do not change."""
    model, queries = _model_and_queries(tiny_model_dir, tokenizer)
    queries = queries * 3
    model = EosSometimes(model, tokenizer.eos_token_id)
    batched = generate(model, tokenizer, queries, max_new_tokens=16, batch_size=len(queries), precision="fp32")
    assert min(model.rows[1:]) < len(queries), "no finished row left the batch"
    lengths = batched.batch.response_lengths.tolist()
    assert len(set(lengths)) > 1 and any(batched.ended.tolist())
    for row, query in enumerate(queries[:3]):
        single = generate(model, tokenizer, [query], max_new_tokens=16, batch_size=1, precision="fp32")
        assert batched.batch.response_ids[row, : lengths[row]].tolist() == single.batch.response_ids[0].tolist()
        assert batched.ended[row] == single.ended[0]

    generator = torch.Generator().manual_seed(0)
    model.rows.clear()
    out = generate(model, tokenizer, queries, max_new_tokens=16, temperature=0.7, batch_size=18, generator=generator, precision="fp32", samples_per_query=2)
    assert min(model.rows[1:]) < 18
    batch = out.batch
    with torch.no_grad():
        logits = response_logits(model, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
    recomputed = logprobs_from_logits(logits / 0.7, batch.response_ids) * batch.response_mask
    assert torch.allclose(recomputed, out.logprobs, atol=1e-3)
