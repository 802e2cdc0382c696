"""Shared fixtures: the real data folder, the tiny random model, a quiet environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"

os.environ.setdefault("FROMFEEDBACK_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
