"""Budgets: presets, refusing unreachable targets, exactness (never over, < one unit short), planted ranks."""

import pytest
import torch

from didi.allocation import TermsCache, allocate, rank_problem
from didi.backbones import Adapter, Zoo
from didi.budget import Allocator, parse_budget
from didi.decompose import decompose
from didi.errors import DidiError
from didi.search import SearchConfig
from didi.synthetic import make_zoo


def test_presets_and_parsing():
    assert parse_budget("S") == 1.24 and parse_budget("m") == 1.4 and parse_budget("L") == 2.0
    assert parse_budget("1.05") == 1.05 and parse_budget(1.5) == 1.5
    for bad in ("XL", 0.9, 1.0, "-2"):
        with pytest.raises(DidiError, match="budget"):
            parse_budget(bad)


def _store(tmp_path, fast, **kw):
    base, tasks = make_zoo(tmp_path / "zoo", **kw)
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in tasks.items()})
    return zoo, decompose(zoo, fast[0], progress=False)


def _allocator(tmp_path, fast, layers: int):
    """The exact allocator of a 3-task zoo's store at full width: (problem, allocator, L, T)."""
    _, store = _store(tmp_path, fast, T=3, width=12, layers=layers, noise=0.1)
    widths = [e.K for e in store.matrices]
    problem = rank_problem(store, widths, "shared")
    alloc = Allocator(TermsCache(store, widths).groups(list(range(len(widths))), torch.float64), problem)
    return (problem, alloc, *problem.bound_t.shape)


@pytest.mark.parametrize("target", [1.02, 1.1, 1.24, 1.5])
@pytest.mark.parametrize("allocation", ["search", "greedy", "uniform"])
def test_budget_never_exceeded_and_within_one_unit(tmp_path, fast, target, allocation):
    zoo, store = _store(tmp_path, fast, T=3, width=16, layers=2, noise=0.05)
    ranks = allocate(store, target, fast[1], fast[3], "shared", allocation)
    problem = rank_problem(store, [e.K for e in store.matrices], "shared")
    elements = float(problem.elements(ranks.r_s, ranks.r_t))
    allowed = (target - 1) * store.base_params
    assert elements <= allowed + 1e-6
    if allocation != "uniform":  # greedy fill: nothing that is still addable would fit
        room = (ranks.r_s < problem.bound_s).any() or (ranks.r_t < problem.bound_t).any()
        if room:
            addable = [
                int(problem.unit[i])
                for i in range(len(problem.unit))
                if ranks.r_s[i] < problem.bound_s[i] or (ranks.r_t[i] < problem.bound_t[i]).any()
            ]
            assert allowed - elements < min(addable)
    assert ranks.info["ratio"] == pytest.approx(1 + elements / store.base_params)


def test_unreachable_budgets_are_refused(tmp_path, fast):
    zoo, store = _store(tmp_path, fast, T=3, width=16, layers=1)
    with pytest.raises(DidiError, match="above full rank"):
        allocate(store, 50.0, fast[1], fast[3], "shared")
    with pytest.raises(DidiError, match="below"):
        allocate(store, 1.00001, fast[1], fast[3], "shared")
    with pytest.raises(DidiError, match="below what must be stored anyway"):
        allocate(store, 1.01, fast[1], fast[3], "per_task")  # per-task norms/biases alone cost more


@pytest.mark.parametrize("allocation", ["search", "search_unguarded", "greedy"])
def test_planted_ranks_recovered_when_budget_fits_them(tmp_path, fast, allocation):
    """Planted ranks per matrix (shared a, experts b, b, 2b, growing with the layer) are found exactly,
    by the search on its own too (no fallback to the greedy allocation)."""
    zoo, store = _store(
        tmp_path, fast, T=3, width=24, layers=2, shared_rank=3, expert_rank=2, noise=1e-4, varied_ranks=True
    )
    planted_s, planted_t = [], []
    for e in store.matrices:
        layer = e.layer
        a, b = 3 + layer, 2 + layer // 2
        planted_s.append(a)
        planted_t.append([b, b, 2 * b])
    planted_s, planted_t = torch.tensor(planted_s), torch.tensor(planted_t)
    problem = rank_problem(store, [e.K for e in store.matrices], "shared")
    target = 1 + float(problem.elements(planted_s, planted_t)) / store.base_params + 1e-12
    scfg = fast[1]
    if allocation == "search_unguarded":
        scfg, allocation = SearchConfig(steps=scfg.steps, guard=False), "search"
    ranks = allocate(store, target, scfg, fast[3], "shared", allocation)
    assert torch.equal(ranks.r_s, planted_s)
    assert torch.equal(ranks.r_t, planted_t)


def test_marginal_gains_are_exact_error_differences(tmp_path, fast):
    problem, alloc, L, T = _allocator(tmp_path, fast, layers=1)
    g = torch.Generator().manual_seed(0)
    r_s = torch.randint(0, 5, (L,), generator=g)
    r_t = torch.randint(0, 5, (L, T), generator=g)
    e0 = alloc.error(r_s, r_t) * alloc.tau_total
    for idx, terms in alloc.groups:
        gs, gt = alloc._gains(idx, terms, r_s, r_t)
        for pos, l in enumerate(idx.tolist()):
            a = r_s.clone()
            a[l] += 1
            assert float(gs[pos]) == pytest.approx(
                e0 - alloc.error(a, r_t) * alloc.tau_total, rel=1e-7, abs=1e-9
            )
            for t in range(T):
                b = r_t.clone()
                b[l, t] += 1
                assert float(gt[pos, t]) == pytest.approx(
                    e0 - alloc.error(r_s, b) * alloc.tau_total, rel=1e-7, abs=1e-9
                )


@pytest.mark.parametrize("target", [1.05, 1.2])
def test_greedy_fill_equals_a_literal_greedy(tmp_path, fast, target):
    """The heap with versioned entries takes the units a literal greedy takes: every step recomputes every
    module's exact gain (`Allocator.error`), takes the best gain per element among those that fit, and
    drops for good a unit that does not fit until its matrix changes (as the heap discards it)."""
    problem, alloc, L, T = _allocator(tmp_path, fast, layers=2)
    budget = problem.max_elements(target)
    got = alloc.greedy_fill(torch.zeros(L, dtype=torch.long), torch.zeros(L, T, dtype=torch.long), budget)

    r_s, r_t = torch.zeros(L, dtype=torch.long), torch.zeros(L, T, dtype=torch.long)
    left = budget - int(problem.elements(r_s, r_t) - problem.fixed_elements)
    dead: set = set()  # (matrix, module) that did not fit, until the matrix changes
    while True:
        e0 = alloc.error(r_s, r_t) * alloc.tau_total
        best = None
        for l in range(L):
            for t in range(-1, T):
                if (l, t) in dead:
                    continue
                a, b = r_s.clone(), r_t.clone()
                if t < 0:
                    if r_s[l] >= problem.bound_s[l]:
                        continue
                    a[l] += 1
                    unit = int(problem.unit_s[l])
                else:
                    if r_t[l, t] >= problem.bound_t[l, t]:
                        continue
                    b[l, t] += 1
                    unit = int(problem.unit_t[l])
                gain = e0 - alloc.error(a, b) * alloc.tau_total
                if gain > 1e-9 * e0 and (best is None or (-gain / unit, l, t) < best[0]):
                    best = ((-gain / unit, l, t), l, t, unit, a, b)
        if best is None:
            break
        _, l, t, unit, a, b = best
        if unit > left:
            dead.add((l, t))
            continue
        r_s, r_t, left = a, b, left - unit
        dead = {d for d in dead if d[0] != l}
    assert torch.equal(got[0], r_s) and torch.equal(got[1], r_t)
    assert int(problem.elements(r_s, r_t) - problem.fixed_elements) <= budget
