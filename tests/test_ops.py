import torch

from fromfeedback.ops import entropy_from_logits, first_true_index, logprobs_from_logits, masked_mean, masked_var, masked_whiten


def test_masked_mean_and_var_by_hand():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mean(values, mask).item() == 2.5
    assert torch.equal(masked_mean(values, mask, dim=1), torch.tensor([1.5, 3.5]))
    # (2.25 + 0.25 + 0.25 + 2.25) / 3 with Bessel's correction
    assert abs(masked_var(values, mask).item() - 5.0 / 3) < 1e-6
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_masked_whiten_zero_mean_unit_variance_on_mask_only():
    torch.manual_seed(0)
    values = torch.randn(4, 6) * 3 + 7
    mask = torch.ones(4, 6)
    mask[:, 4:] = 0
    whitened = masked_whiten(values, mask)
    assert abs(masked_mean(whitened, mask).item()) < 1e-5
    assert abs(masked_var(whitened, mask).item() - 1) < 1e-4
    assert torch.all(whitened[:, 4:] == 0)
    kept_mean = masked_whiten(values, mask, shift_mean=False)
    assert abs(masked_mean(kept_mean, mask).item() - masked_mean(values, mask).item()) < 1e-4


def test_first_true_index():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    assert first_true_index(bools).tolist() == [1, 3, 0]


def test_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, 0.0], [torch.log(torch.tensor(3.0)), 0.0]]])
    tokens = torch.tensor([[1, 0]])
    assert torch.allclose(logprobs_from_logits(logits, tokens), torch.log(torch.tensor([[0.5, 0.75]])))
    assert torch.allclose(entropy_from_logits(logits)[0, 0], torch.log(torch.tensor(2.0)))
