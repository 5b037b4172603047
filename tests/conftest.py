"""Shared fixtures: tiny synthetic zoos and settings that keep every test to seconds on 2 CPU cores."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from didi.decompose import DecomposeConfig  # noqa: E402
from didi.refine import RefineConfig  # noqa: E402
from didi.search import SearchConfig  # noqa: E402
from didi.synthetic import make_zoo  # noqa: E402
from didi.trainer import TrainerConfig  # noqa: E402


@pytest.fixture
def tiny_zoo(tmp_path):
    """4 tasks, 2 blocks of width 16, planted ranks, biases/norms and a frozen tensor."""
    base, tasks = make_zoo(tmp_path / "zoo", T=4, width=16, layers=2, noise=0.01, seed=0)
    return str(base), {k: str(v) for k, v in tasks.items()}


@pytest.fixture
def fast(tmp_path):
    """(decompose, search, refine, trainer) settings for tests."""
    return (
        DecomposeConfig(cache_dir=str(tmp_path / "cache"), device="cpu"),
        SearchConfig(steps=30),
        RefineConfig(sweeps=2),
        TrainerConfig(accelerator="cpu", logger="none", progress_bar=False),
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
