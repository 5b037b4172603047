"""Bad decomposition inputs (issue 11) are refused before any SVD, naming the option, and write nothing; the
search width bound `budget_width` from the budget alone."""

import pytest
import torch

from didi.allocation import budget_width, check_decompose_inputs, greedy_ranks
from didi.backbones import Adapter, Zoo
from didi.decompose import DecomposeConfig, decompose
from didi.errors import DidiError
from didi.pipeline import MergeOptions, run_merge, work_dir_for
from didi.synthetic import write_zoo


def _opts(fast, dcfg, target=1.3):
    return MergeOptions(target, dcfg, fast[1], fast[2], fast[3])


BAD = [
    ({"max_rank": 0}, "decompose.max_rank"),
    ({"max_rank": -3}, "decompose.max_rank"),
    ({"max_rank": 17}, "decompose.max_rank"),  # above every matrix's min(m, n) = 16 at most
    ({"svd": "randomized"}, "decompose.svd"),
    ({"max_rank": 8, "svd": "randomized", "oversample": -1}, "decompose.oversample"),
    ({"max_rank": 8, "svd": "randomized", "power_iters": -1}, "decompose.power_iters"),
    ({"svd": "lapack"}, "decompose.svd"),
    ({"device": "cuda"}, "decompose.device"),
    ({"device": "cuda:0"}, "decompose.device"),
]


@pytest.mark.parametrize("kwargs,option", BAD)
def test_bad_inputs_are_refused_before_anything_is_written(
    tmp_path, tiny_zoo, fast, monkeypatch, kwargs, option
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cache = tmp_path / "cache"
    dcfg = DecomposeConfig(**{"cache_dir": str(cache), "device": "cpu", **kwargs})
    out = tmp_path / "art"
    with pytest.raises(DidiError, match=option):
        run_merge(Zoo(Adapter(), *tiny_zoo), out, _opts(fast, dcfg))
    assert not cache.exists() and not out.exists() and not work_dir_for(out).exists()


def test_messages_say_what_was_expected_and_found(tmp_path, tiny_zoo, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    zoo = Zoo(Adapter(), *tiny_zoo)
    cache = str(tmp_path / "cache")
    with pytest.raises(
        DidiError, match=r"'cuda' asked for, but this machine has no CUDA device.*cpu or auto"
    ):
        decompose(zoo, DecomposeConfig(cache_dir=cache, device="cuda"), progress=False)
    with pytest.raises(DidiError, match=r"auto.*full.*max_rank"):
        decompose(zoo, DecomposeConfig(cache_dir=cache, device="cpu", svd="randomized"), progress=False)
    with pytest.raises(DidiError, match=r"at most 16.*found 40.*does nothing"):
        check_decompose_inputs(zoo, DecomposeConfig(max_rank=40), 1.3)
    check_decompose_inputs(zoo, DecomposeConfig(max_rank=10), 1.3)  # above the frozen 16×4's rank: normal
    assert not (tmp_path / "cache").exists()


def test_cuda_index_beyond_the_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DidiError, match=r"decompose.device: 'cuda:1'.*1 CUDA device"):
        DecomposeConfig(device="cuda:1").validate()
    DecomposeConfig(device="cuda:0").validate()
    with pytest.raises(DidiError, match="decompose.device"):
        DecomposeConfig(device="gpu").validate()


def _two_matrix_zoo(root, policy="shared"):
    g = torch.Generator().manual_seed(0)
    base = {
        "a.weight": torch.randn(12, 8, generator=g),
        "b.weight": torch.randn(6, 20, generator=g),
        "c.bias": torch.randn(10, generator=g),
    }
    taus = {k: 0.1 * torch.randn(2, *v.shape, generator=g) for k, v in base.items()}
    root.mkdir(parents=True)
    b, tasks = write_zoo(root, base, taus, 2)
    return Zoo(Adapter(nonmatrix_policy=policy), str(b), {k: str(v) for k, v in tasks.items()})


@pytest.mark.parametrize("policy", ["shared", "per_task"])
def test_budget_width_by_hand_and_bounds_the_greedy_ranks(tmp_path, policy):
    zoo = _two_matrix_zoo(tmp_path / "zoo", policy)
    assert [p.matrix_shape for p in zoo.matrices] == [(12, 8), (6, 20)]
    assert zoo.base_params == 96 + 120 + 10
    fixed = 2 * 10 if policy == "per_task" else 0  # T · the per-task bias
    store = decompose(zoo, DecomposeConfig(cache_dir=str(tmp_path / "c"), device="cpu"), progress=False)
    for target in (1.2, 1.5, 2.0, 3.0):
        budget = int((target - 1) * 226 + 1e-6) - fixed
        expect = min(budget // min(12 + 8, 6 + 20), max(8, 6))
        assert budget_width(zoo, target) == expect, target
        r_s, r_t, _, _ = greedy_ranks(store, target, policy)
        assert int(max(r_s.max(), r_t.max())) <= expect, target
    assert budget_width(zoo, 1.5) == (4 if policy == "per_task" else 5)


def test_max_rank_above_the_budget_width_is_said_once(tiny_zoo, capsys):
    zoo = Zoo(Adapter(), *tiny_zoo)
    bound = budget_width(zoo, 1.05)
    assert bound < 16
    for _ in range(2):
        check_decompose_inputs(zoo, DecomposeConfig(max_rank=16), 1.05)
    err = capsys.readouterr().err
    assert err.count(f"above the largest rank this budget (1.05) can give any module ({bound})") == 1
    check_decompose_inputs(zoo, DecomposeConfig(max_rank=bound), 1.05)
    assert capsys.readouterr().err == ""


def test_valid_randomized_config_still_merges(tmp_path, tiny_zoo, fast):
    dcfg = DecomposeConfig(
        max_rank=8, svd="randomized", oversample=2, cache_dir=str(tmp_path / "cache"), device="cpu"
    )
    out = run_merge(Zoo(Adapter(), *tiny_zoo), tmp_path / "art", _opts(fast, dcfg))
    assert out is not None and (out / "manifest.json").exists()
