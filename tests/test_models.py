import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fromfeedback.data import QueryResponseBatch, encode_response
from fromfeedback.files import UserError
from fromfeedback.models import (
    copy_trainable_weights,
    freeze_lower,
    inference_copy,
    load_policy,
    load_scalar_model,
    resolve_model,
    response_logits,
    shared_query_layout,
)
from fromfeedback.reward import eos_index, score_batch


def test_tiny_random_is_a_plain_hf_folder(tiny_model_dir, tokenizer):
    assert (tiny_model_dir / "config.json").exists()
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.padding_side == "left"
    model = load_policy(tiny_model_dir)
    assert model.config.num_hidden_layers == 2


def test_unknown_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such model folder"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="not a model folder"):
        resolve_model(str(tmp_path))


def test_freeze_lower(tiny_model_dir):
    model = load_policy(tiny_model_dir)
    freeze_lower(model, 1, freeze_embeddings=True)
    assert not model.get_input_embeddings().weight.requires_grad
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    assert all(p.requires_grad for p in model.model.layers[1].parameters())
    with pytest.raises(UserError, match="only 2 layers"):
        freeze_lower(model, 3, False)


def test_inference_copy_follows_the_trained_weights(tiny_model_dir):
    policy = load_policy(tiny_model_dir)
    freeze_lower(policy, 1, freeze_embeddings=True)
    sampler = inference_copy(policy, torch.bfloat16)
    assert next(sampler.parameters()).dtype == torch.bfloat16
    assert inference_copy(policy, torch.float32) is policy
    trained = dict(policy.named_parameters())
    with torch.no_grad():
        for parameter in trained.values():
            if parameter.requires_grad:
                parameter.add_(1.0)
    copy_trainable_weights(policy, sampler)
    for name, parameter in sampler.named_parameters():
        assert not parameter.requires_grad
        torch.testing.assert_close(parameter.float(), trained[name].detach().to(torch.bfloat16).float())


def _batch(tokenizer):
    queries = [tokenizer.encode("SUBREDDIT: r/a\n\nTITLE: short\n\nPOST: hi\n\nTL;DR:"), tokenizer.encode("SUBREDDIT: r/b\n\nTITLE: a longer title here\n\nPOST: some more words in this post\n\nTL;DR:")]
    responses = [encode_response(tokenizer, "one two three four", 48), encode_response(tokenizer, "five", 48)]
    return queries, responses, QueryResponseBatch.from_ids(queries, responses, tokenizer.pad_token_id)


def test_response_logits_do_not_depend_on_padding(tiny_model_dir, tokenizer):
    model = load_policy(tiny_model_dir).eval()
    queries, responses, batch = _batch(tokenizer)
    with torch.no_grad():
        batched = response_logits(model, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
        for row in range(2):
            alone = QueryResponseBatch.from_ids([queries[row]], [responses[row]], tokenizer.pad_token_id)
            single = response_logits(model, alone.query_ids, alone.query_mask, alone.response_ids, alone.response_mask)
            length = len(responses[row])
            assert torch.allclose(batched[row, :length], single[0], atol=1e-4)
            # Same as the plain forward pass over the unpadded sequence.
            full = model(torch.tensor([queries[row] + responses[row]])).logits[0, len(queries[row]) - 1 : -1]
            assert torch.allclose(single[0], full, atol=1e-4)


def test_scalar_model_reads_the_eos_and_loads_in_plain_transformers(tiny_model_dir, tokenizer, tmp_path):
    torch.manual_seed(0)
    reward_model = load_scalar_model(tiny_model_dir).eval()
    queries, responses, batch = _batch(tokenizer)
    assert eos_index(batch.response_mask).tolist() == [len(responses[0]) - 1, len(responses[1]) - 1]
    scores = score_batch(reward_model, batch, precision="fp32")
    reward_model.set_bias(0.25)
    assert torch.allclose(score_batch(reward_model, batch, precision="fp32"), scores - 0.25)
    reward_model.save(tmp_path / "rm", tokenizer)

    reloaded = load_scalar_model(tmp_path / "rm").eval()
    assert reloaded.bias == 0.25
    assert torch.allclose(score_batch(reloaded, batch, precision="fp32"), scores - 0.25, atol=1e-5)
    # Plain transformers: right padding with the RM folder's own pad token reads the same EOS position.
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert plain_tokenizer.pad_token_id != plain_tokenizer.eos_token_id
    plain_tokenizer.padding_side = "right"
    texts = [tokenizer.decode(q + r) for q, r in zip(queries, responses)]
    encoded = plain_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        plain_scores = plain(**encoded).logits.squeeze(-1)
    assert torch.allclose(plain_scores, scores, atol=1e-4)


def test_shared_query_layout_by_hand():
    # One query (a pad, then 2 tokens) with 2 responses of width 2, the second one token long; a second query
    # with 1 response. Row: [pad q1 q2 | a1 a2 | b1 b2].
    query_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    response_mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    slot, attention_mask, positions = shared_query_layout(query_mask, response_mask, torch.tensor([0, 0, 1]))
    assert slot.tolist() == [0, 1, 0]
    assert positions[0].tolist() == [0, 0, 1, 2, 3, 2, 3]
    assert positions[1].tolist() == [0, 1, 2, 3, 4, 3, 4]
    assert attention_mask.shape == (2, 1, 7, 7)
    assert attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],  # the pad sees only itself
        [0, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0, 0],  # a1: the query and itself
        [0, 1, 1, 1, 1, 0, 0],
        [0, 1, 1, 0, 0, 1, 0],  # b1: the query, not a
        [0, 1, 1, 0, 0, 1, 1],  # b's pad: itself
    ]
    # The second query's empty slot sees the query and itself; its output is never read.
    assert attention_mask[1, 0, 5:].int().tolist() == [[1, 1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0, 1]]
