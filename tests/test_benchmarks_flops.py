import pytest
from torch import nn

from fromfeedback.flops import matmul_parameters, model_flops, model_flops_utilization


def test_forward_is_two_flops_per_parameter_per_token_and_backward_twice_that():
    assert model_flops(params=1000, tokens=10, backward=False) == 20_000
    assert model_flops(params=1000, tokens=10, backward=True) == 60_000


def test_utilization_by_hand():
    # 100M parameters, 500 tokens, forward+backward: 6·1e8·500 = 3e11 FLOPs in 2 s = 150 GFLOP/s; peak 600 → 25%.
    assert model_flops_utilization(100_000_000, 500, 2.0, backward=True, peak_gflops=600.0) == pytest.approx(0.25)
    # Forward only: 1e11 FLOPs in 1 s against 1000 GFLOP/s → 10%.
    assert model_flops_utilization(100_000_000, 500, 1.0, backward=False, peak_gflops=1000.0) == pytest.approx(0.10)
    with pytest.raises(ValueError):
        model_flops_utilization(1, 1, 0.0, backward=False, peak_gflops=1.0)


class TinyTied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.layer = nn.Linear(8, 8)  # 72 parameters
        self.head = nn.Linear(8, 50, bias=False)
        self.head.weight = self.embed.weight  # tied: counted nowhere

    def get_input_embeddings(self):
        return self.embed


def test_matmul_parameters_skip_the_embedding_table_and_count_shared_weights_once():
    model = TinyTied()
    assert sum(p.numel() for p in model.parameters()) == 400 + 72
    assert matmul_parameters(model) == 72
    assert matmul_parameters(nn.Linear(3, 2)) == 8
