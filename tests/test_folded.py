"""`shared: folded`: the shared part in the stored base (free), the budget spent on experts of τ_t − M_s.

References: brute-force enumeration of rank allocations, errors materialised from dense matrices, and the
artifact's own task weights compared with the fine-tunes.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from didi.artifact import load_artifact
from didi.backbones import Adapter, Zoo
from didi.budget import folded_error, folded_ranks
from didi.cli import main
from didi.methods.published import artifact_ratio_row
from didi.pipeline import MergeOptions, run_merge
from didi.refine import RefineConfig, refine_adam, refine_als, task_errors
from helpers import CPU_QUIET


def _spectra(g, L, T, K):
    return [
        torch.sort(torch.rand(T, K, generator=g, dtype=torch.float64), descending=True).values
        for _ in range(L)
    ]


def _brute_force(sigma, mt_sq, unit, bound, budget):
    """min over every integer allocation within the budget of the dense error formula."""
    L, T = bound.shape
    best = None
    for flat in itertools.product(*[range(int(b) + 1) for b in bound.reshape(-1)]):
        r = torch.tensor(flat).reshape(L, T)
        if int((r * unit[:, None]).sum()) > budget:
            continue
        err = sum(
            float(mt_sq[l, t]) - float((sigma[l][t, : r[l, t]] ** 2).sum())
            for l in range(L)
            for t in range(T)
        )
        best = err if best is None else min(best, err)
    return best


@pytest.mark.parametrize("budget", [0, 40, 100, 170, 260, 400])
def test_greedy_is_optimal_for_equal_units(budget):
    g = torch.Generator().manual_seed(budget)
    L, T, K = 2, 2, 4
    sigma = _spectra(g, L, T, K)
    mt_sq = torch.stack([(s**2).sum(-1) + 0.1 for s in sigma])
    unit = torch.tensor([20, 20])
    bound = torch.tensor([[4, 3], [4, 4]])
    r = folded_ranks(sigma, bound, unit, budget)
    assert int((r * unit[:, None]).sum()) <= budget and (r <= bound).all()
    assert float(folded_error(sigma, mt_sq, r).sum()) == pytest.approx(
        _brute_force(sigma, mt_sq, unit, bound, budget)
    )


@pytest.mark.slow
def test_greedy_with_unequal_units_is_within_one_unit_of_optimal():
    g = torch.Generator().manual_seed(7)
    sigma = _spectra(g, 3, 2, 3)
    mt_sq = torch.stack([(s**2).sum(-1) for s in sigma])
    unit, bound = torch.tensor([10, 17, 31]), torch.full((3, 2), 3)
    for budget in range(0, 350, 23):
        r = folded_ranks(sigma, bound, unit, budget)
        assert int((r * unit[:, None]).sum()) <= budget
        err = float(folded_error(sigma, mt_sq, r).sum())
        # LP-bound guarantee of the ratio greedy: no worse than the optimum with one largest unit less
        assert _brute_force(sigma, mt_sq, unit, bound, budget) - 1e-12 <= err
        assert err <= _brute_force(sigma, mt_sq, unit, bound, max(0, budget - 31)) + 1e-12


def test_folded_error_equals_materialised():
    g = torch.Generator().manual_seed(3)
    taus = torch.randn(3, 9, 6, generator=g, dtype=torch.float64)
    M_s = taus.mean(0)
    U, S, Vh = torch.linalg.svd(taus - M_s, full_matrices=False)
    r = torch.tensor([[2, 0, 5]])
    dense = sum(
        float(((taus[t] - M_s - U[t, :, :k] @ torch.diag(S[t, :k]) @ Vh[t, :k]) ** 2).sum())
        for t, k in enumerate(r[0].tolist())
    )
    mt_sq = ((taus - M_s) ** 2).sum((-2, -1))
    assert float(folded_error([S], mt_sq[None], r)[0]) == pytest.approx(dense)


def test_refinement_of_a_dense_shared_part():
    """ALS with B_s None: every sweep ends on the exact shared optimum M_s = mean_t(τ_t − A_tB_t) and the
    error never increases; Adam keeps the dense shape and never ends worse than it started."""
    g = torch.Generator().manual_seed(0)
    T, m, n = 3, 12, 10
    common = torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)
    taus = torch.stack([common + torch.randn(m, n, generator=g) * 0.3 for _ in range(T)])
    M_s = taus.mean(0)
    A_t, B_t = [], []
    for t in range(T):
        U, S, Vh = torch.linalg.svd(taus[t] - M_s)
        A_t.append(U[:, :2] * S[:2]), B_t.append(Vh[:2])
    e0 = float(task_errors(taus, M_s, None, A_t, B_t).sum())
    errs = [e0]
    state = (M_s, None, list(A_t), list(B_t))
    for _ in range(3):
        state = refine_als(taus, *state, sweeps=1, power_iters=3)
        errs.append(float(task_errors(taus, *state).sum()))
        assert state[1] is None and state[0].shape == (m, n)
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])) and errs[-1] < 0.99 * e0
    M, _, At, Bt = state
    torch.testing.assert_close(M, torch.stack([taus[t] - At[t] @ Bt[t] for t in range(T)]).mean(0))
    M2, B2, At2, Bt2 = refine_adam(taus, M_s, None, list(A_t), list(B_t), steps=30, lr=0.01)
    assert B2 is None and M2.shape == (m, n)
    assert float(task_errors(taus, M2, None, At2, Bt2).sum()) <= e0 + 1e-6


def _dense_errors(artifact, base, tasks, names=None):
    """Σ_t ‖θ̂_t − θ_t‖² / Σ_t ‖τ_t‖² over `names` (default: all tensors), from the artifact's task weights."""
    th0 = load_file(base)
    num = den = 0.0
    for t, path in tasks.items():
        sd, tt = artifact.task_state_dict(t), load_file(path)
        for k in names or tt:
            num += float(((sd[k].double() - tt[k].double()) ** 2).sum())
            den += float(((tt[k].double() - th0[k].double()) ** 2).sum())
    return num / den


@pytest.mark.parametrize("optimizer", ["none", "als"])
def test_folded_merge_end_to_end(tiny_zoo, fast, tmp_path, optimizer):
    dcfg, scfg, _, tcfg = fast
    base, tasks = tiny_zoo
    zoo = Zoo(Adapter(), base, tasks)
    rcfg = RefineConfig(optimizer=optimizer, sweeps=3)
    path = run_merge(
        zoo, tmp_path / "folded", MergeOptions(1.3, dcfg, scfg, rcfg, tcfg, shared="folded"), progress=False
    )
    a = load_artifact(path)
    m = a.manifest
    assert m["method"]["hyper_parameters"]["shared"] == "folded"
    assert m["metrics"]["allocation"]["shared"] == "folded"
    assert all(rs["shared"] == 0 for rs in m["ranks"].values())
    row = artifact_ratio_row(m)  # `didi inspect`: the paper's S beside ours, and why the layouts differ
    assert row["paper"] is None and "folded" in row["reason"]
    # the decomposed matrices' shared part is in the fold (free); the experts alone price the storage
    assert set(m["ranks"]) <= set(a.fold())
    assert not any(k.endswith("::lora_A") for k in a.shared())
    lora = sum(s.numel for s in a.stored() if s.kind == "lora")
    shapes = {n: t["matrix_shape"] for n, t in m["tensors"].items()}
    assert lora == sum(r * sum(shapes[n]) for n, rs in m["ranks"].items() for r in rs.values())
    assert a.storage_ratio == pytest.approx(m["metrics"]["allocation"]["ratio"]) and a.storage_ratio <= 1.3
    # the reported errors are the artifact's own: matrices only, materialised from its task weights
    dense = _dense_errors(a, base, tasks, list(m["ranks"]))
    assert m["metrics"]["refine"]["rec_err_after"] == pytest.approx(dense, rel=1e-4)
    if optimizer == "none":
        assert m["metrics"]["allocation"]["rec_err"] == pytest.approx(dense, rel=1e-4)
    else:
        assert dense < m["metrics"]["allocation"]["rec_err"]
    # the paper's layout at the same budget pays for its shared module: the folded merge is more exact
    low = run_merge(zoo, tmp_path / "low_rank", MergeOptions(1.3, dcfg, scfg, rcfg, tcfg), progress=False)
    assert dense < 0.8 * _dense_errors(load_artifact(low), base, tasks, list(m["ranks"]))


def test_folded_search_then_refine_cli(tmp_path, tiny_zoo, capsys):
    """`didi search --shared folded` writes the mode into the ranks file and `didi refine` honours it."""
    base, tasks = tiny_zoo
    common = ["--decompose.cache_dir", str(tmp_path / "cache"), *CPU_QUIET]
    ranks = tmp_path / "ranks.json"
    assert (
        main(
            ["search", base, json.dumps(tasks), str(ranks), "--budget", "1.2", "--shared", "folded", *common]
        )
        == 0
    )
    rk = json.loads(ranks.read_text())
    assert rk["info"]["shared"] == "folded" and all(v["shared"] == 0 for v in rk["ranks"].values())
    out = tmp_path / "merged"
    assert main(["refine", base, json.dumps(tasks), str(ranks), str(out), *common]) == 0
    a = load_artifact(out)
    assert set(rk["ranks"]) <= set(a.fold()) and a.storage_ratio <= 1.2
    with pytest.raises(SystemExit) as e:  # the option's choices are checked by the parser
        main(["merge", base, json.dumps(tasks), str(tmp_path / "bad"), "--shared", "dense", *common])
    assert e.value.code != 0 and "shared" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_folded_two_process_ddp_reproduces_one_process(tmp_path, tiny_zoo, fast):
    """Folded refinement under ddp_spawn on 2 CPU processes writes the same fold and experts as 1 process."""
    from didi.trainer import TrainerConfig

    zoo = Zoo(Adapter(), *tiny_zoo)
    d, s, r, t = fast
    r.layer_batch_size = 3  # uneven shares of the matrices across the two processes
    one = run_merge(zoo, tmp_path / "one", MergeOptions(1.3, d, s, r, t, shared="folded"), progress=False)
    two = run_merge(
        zoo,
        tmp_path / "two",
        MergeOptions(
            1.3,
            d,
            s,
            r,
            TrainerConfig(
                accelerator="cpu", devices=2, strategy="ddp_spawn", logger="none", progress_bar=False
            ),
            shared="folded",
        ),
        progress=False,
    )
    assert load_artifact(one).manifest["ranks"] == load_artifact(two).manifest["ranks"]
    for f in ["fold.safetensors", "tasks/task_0.safetensors", "tasks/task_3.safetensors"]:
        x, y = load_file(str(one / f)), load_file(str(two / f))
        assert x.keys() == y.keys() and x
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6)
