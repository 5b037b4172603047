"""Property-based tests (hypothesis): the storage accounting against a hand count, the budget fitting (never
over the target, short by less than one rank unit), and the artifact round trip with its checksums.

Examples are few and tiny (a handful of 2–6-wide matrices) so that the file runs in seconds; `deadline=None`
because the first torch call of a process can take longer than hypothesis's default deadline."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from didi.accounting import price_files, storage_report
from didi.artifact import load_artifact, write_artifact
from didi.budget import Allocator, RankProblem, rescale_to_budget
from didi.decompose import decompose_matrix, terms_from_factors
from didi.merges import shared_merge_fn
from didi.tensorfile import LazyTensor

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TASKS = ["a", "b", "c"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# ------------------------------------------------------------------------------------------------- accounting
@st.composite
def term_sets(draw) -> tuple[dict, dict, dict, float]:
    """Random artifact terms (fold, shared, per task) over a few m×n tensors, and their price counted by hand
    from the drawn sizes alone: r(m + n) per LoRA pair, m·n per dense delta or ref, m·n/32 per mask, 1 per
    scale, 0 per folded delta."""
    fold: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    tasks: dict[str, dict[str, torch.Tensor]] = {t: {} for t in TASKS}
    by_hand = 0.0
    for i in range(draw(st.integers(1, 4))):
        name = f"layer{i}.weight"
        m, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        if draw(st.booleans()):
            fold[name] = torch.randn(m, n)
        if draw(st.booleans()):
            r = draw(st.integers(1, min(m, n)))
            shared[f"{name}::lora_A"], shared[f"{name}::lora_B"] = torch.randn(m, r), torch.randn(r, n)
            by_hand += r * (m + n)
        if draw(st.booleans()):
            shared[f"{name}::dense"] = torch.randn(m * n)
            by_hand += m * n
        masked = draw(st.booleans())
        if masked:
            shared[f"{name}::ref"] = torch.randn(m, n)
            by_hand += m * n
        for t in TASKS:
            kind = draw(
                st.sampled_from(["none", "lora", "dense", "mask"] if masked else ["none", "lora", "dense"])
            )
            if kind == "lora":
                r = draw(st.integers(1, min(m, n)))
                tasks[t][f"{name}::lora_A"], tasks[t][f"{name}::lora_B"] = (
                    torch.randn(m, r),
                    torch.randn(r, n),
                )
                by_hand += r * (m + n)
            elif kind == "dense":
                tasks[t][f"{name}::dense"] = torch.randn(m, n)
                by_hand += m * n
            elif kind == "mask":
                tasks[t][f"{name}::mask"] = torch.rand(m, n) > 0.5
                tasks[t][f"{name}::scale"] = torch.tensor(0.5)
                by_hand += m * n / 32 + 1
    return fold, shared, tasks, by_hand


@SETTINGS
@given(terms=term_sets(), base_params=st.integers(100, 10**6))
def test_storage_ratio_equals_a_hand_count(terms, base_params: int) -> None:
    fold, shared, tasks, by_hand = terms
    with tempfile.TemporaryDirectory() as d:
        path = write_artifact(
            Path(d) / "art", {"tasks": TASKS, "base_params": base_params}, fold, shared, tasks
        )
        storage = load_artifact(path).manifest["storage"]
        assert storage["stored_elements"] == pytest.approx(by_hand, abs=1e-9)
        assert storage["ratio"] == pytest.approx(1 + by_hand / base_params, rel=1e-12)
        assert storage["by_module"].get("fold", 0.0) == 0.0  # a folded delta replaces a base tensor
        again = storage_report(load_artifact(path).stored(), base_params)  # priced again from the files
        assert again["ratio"] == pytest.approx(storage["ratio"], rel=1e-12)


# ----------------------------------------------------------------------------------------------------- budget
@st.composite
def rank_problems(draw) -> tuple[RankProblem, Allocator, float, torch.Tensor, torch.Tensor]:
    """A random small problem: L random m×n matrices of T task vectors (decomposed for real, so the greedy
    gains are the closed form's), bounds at or below their numerical ranks, |θ0| and a fixed cost, a target
    between the smallest and a bit above the largest reachable ratio, and continuous searched ranks."""
    L, T = draw(st.integers(1, 3)), draw(st.integers(2, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    merge = shared_merge_fn("mean")
    groups, ms, ns, bs, bt = [], [], [], [], []
    for l in range(L):
        m, n = draw(st.integers(2, 6)), draw(st.integers(2, 6))
        factors, bound_s, bound_t = decompose_matrix(
            torch.randn(T, m, n, generator=g, dtype=torch.float64), merge, None
        )
        K = factors["S_s"].shape[0]
        groups.append((torch.tensor([l]), terms_from_factors(factors, K, dtype=torch.float64)))
        cut = draw(st.integers(0, 1))  # sometimes a bound below the numerical rank (a narrower search width)
        (
            ms.append(m),
            ns.append(n),
            bs.append(max(0, bound_s - cut)),
            bt.append([max(0, b - cut) for b in bound_t]),
        )
    fixed = float(draw(st.integers(0, 40)))
    problem = RankProblem(torch.tensor(ms), torch.tensor(ns), torch.tensor(bs), torch.tensor(bt), 0, fixed)
    if draw(st.booleans()):  # priced per module kind, as in bytes with other expert dtypes (method.md §9.1)
        problem.cost_s = torch.tensor([draw(st.integers(1, 40)) for _ in range(L)])
        problem.cost_t = torch.tensor([draw(st.integers(1, 40)) for _ in range(L)])
    full = float(problem.elements(problem.bound_s, problem.bound_t))
    problem.base_params = draw(st.integers(max(1, int(full) // 4), 4 * int(full) + 10))
    lo, hi = problem.min_ratio(), problem.max_ratio()
    target = lo + draw(st.floats(0.0, 1.1)) * (hi - lo) + 1e-9
    r_s = torch.tensor([draw(st.floats(-1.0, 8.0)) for _ in range(L)], dtype=torch.float64)
    r_t = torch.tensor(
        [[draw(st.floats(-1.0, 8.0)) for _ in range(T)] for _ in range(L)], dtype=torch.float64
    )
    return problem, Allocator(groups, problem), target, r_s, r_t


def _assert_fits(problem: RankProblem, r_s: torch.Tensor, r_t: torch.Tensor, target: float) -> None:
    assert (r_s >= 0).all() and (r_t >= 0).all()
    assert (r_s <= problem.bound_s).all() and (r_t <= problem.bound_t).all()
    assert float(problem.elements(r_s, r_t)) <= (target - 1) * problem.base_params + 1e-6
    assert problem.ratio(r_s, r_t) <= target + 1e-12


@SETTINGS
@given(case=rank_problems())
def test_rescale_to_budget_never_exceeds_the_target(case) -> None:
    problem, _, target, r_s, r_t = case
    budget = problem.max_elements(target)
    if budget < 0:
        return  # below the fixed cost: refused by RankProblem.check before any rescaling
    a_s, a_t = rescale_to_budget(r_s, r_t, problem, budget)
    _assert_fits(problem, a_s, a_t, target)
    rounded_s = torch.minimum(r_s.clamp_min(0).round(), problem.bound_s.double()).long()
    rounded_t = torch.minimum(r_t.clamp_min(0).round(), problem.bound_t.double()).long()
    if float(problem.elements(rounded_s, rounded_t) - problem.fixed_elements) <= budget:  # already fits:
        assert (a_s >= rounded_s).all() and (a_t >= rounded_t).all()  # scaled up, never down


@SETTINGS
@given(case=rank_problems())
def test_greedy_fill_is_short_by_less_than_one_rank_unit(case) -> None:
    problem, alloc, target, r_s, r_t = case
    budget = problem.max_elements(target)
    if budget < 0:
        return
    f_s, f_t = alloc.greedy_fill(*rescale_to_budget(r_s, r_t, problem, budget), budget)
    _assert_fits(problem, f_s, f_t, target)
    left = budget - (float(problem.elements(f_s, f_t)) - problem.fixed_elements)
    # every module that could still take a unit and would lower the error costs more than what is left
    for idx, terms in alloc.groups:
        g_s, g_t = alloc._gains(idx, terms, f_s, f_t)
        l = int(idx[0])
        if f_s[l] < problem.bound_s[l] and g_s[0] > 0:
            assert float(problem.unit_s[l]) > left
        for t in range(alloc.T):
            if f_t[l, t] < problem.bound_t[l, t] and g_t[0, t] > 0:
                assert float(problem.unit_t[l]) > left


# ---------------------------------------------------------------------------------------- artifact round trip
@st.composite
def tensor_dicts(draw, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(draw(st.integers(0, 3))):
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        key = f"t{i}.w" + (f"::{draw(st.sampled_from(suffixes))}" if suffixes else "")
        out[key] = (torch.randn(shape, dtype=torch.float64) * 10).to(dtype)
    return out


@SETTINGS
@given(
    fold=tensor_dicts(()),
    shared=tensor_dicts(("dense", "ref")),
    tasks=st.fixed_dictionaries({t: tensor_dicts(("dense",)) for t in TASKS}),
    lazy=st.booleans(),
    group=st.one_of(st.none(), tensor_dicts(("dense",))),
)
def test_artifact_round_trip(fold, shared, tasks, lazy: bool, group) -> None:
    """What `write_artifact` writes (eager tensors or LazyTensors, with or without a group) reads back equal,
    dtype for dtype, and every file verifies against its checksum."""

    def maybe_lazy(d: dict[str, torch.Tensor]) -> dict:
        return {k: LazyTensor(tuple(v.shape), v.dtype, lambda v=v: v) for k, v in d.items()} if lazy else d

    groups = None if group is None else {"g1": (["a", "c"], maybe_lazy(group))}
    with tempfile.TemporaryDirectory() as d:
        manifest = {"tasks": TASKS, "base_params": 1000}
        path = write_artifact(
            Path(d) / "art",
            manifest,
            maybe_lazy(fold),
            maybe_lazy(shared),
            {t: maybe_lazy(v) for t, v in tasks.items()},
            groups=groups,
        )
        art = load_artifact(path, verify=True)
        assert art.check_files() == []

        def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
            return a.keys() == b.keys() and all(
                a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
            )

        assert same(art.fold(), fold) and same(art.shared(), shared)
        for t in TASKS:
            assert same(art.task_terms(t), tasks[t])
        if group is not None:
            assert same(art.group_terms("a")[0], group) and art.group_terms("b") == []
        assert set(art.manifest["files"]) == {
            str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"
        }
        priced = price_files({"shared": path / "shared.safetensors"})
        assert sum(s.numel for s in priced) == sum(v.numel() for v in shared.values())
