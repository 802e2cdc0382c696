"""Shared fixtures: the real data folder, the tiny random model, a quiet environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"

os.environ.setdefault("FROMFEEDBACK_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker (and its subprocesses): two workers with two OpenMP threads each on a
    # 2-core machine spin against each other and run several times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.exists():
        pytest.skip(f"real data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from fromfeedback.models import resolve_model

    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from fromfeedback.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)
