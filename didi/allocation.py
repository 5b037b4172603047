"""Stage 1 and the budget: how much rank every module gets (docs/method.md §2–§4).

The rank problem (bounds, unit costs, fixed costs) of a factor store, the closed-form terms the search and the
exact allocator read, and the three allocations: the differentiable search (a Lightning fit) followed by
round → global factor → greedy fill, the greedy marginal-gain allocation, and the folded layout's exact
greedy.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Union

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from didi.accounting import Pricing, base_bytes_of
from didi.backbones.base import Zoo
from didi.budget import Allocator, RankProblem, folded_error, folded_ranks, rescale_to_budget, uniform_ranks
from didi.callbacks import RankEvolution
from didi.closed_form import GroupTerms
from didi.datamodules.layers import LayerBatchDataModule
from didi.decompose import DecomposeConfig, FactorStore, terms_from_factors
from didi.errors import DidiError
from didi.search import RankSearch, SearchConfig
from didi.trainer import TrainerConfig, Trainers

Allocation = Literal["search", "greedy", "uniform"]
#: `low_rank`: the paper's shared LoRA module, paid for by the budget. `folded`: the shared part M_s is added
#: densely to the stored base (θ0 + M_s replaces θ0, so it costs nothing under docs/method.md §4's accounting)
#: and the whole budget goes to the experts of τ_t − M_s.
SharedPart = Literal["low_rank", "folded"]


@dataclass
class Ranks:
    """Integer ranks per matrix (shared [L], experts [L,T]) with the continuous ranks they came from."""

    r_s: torch.Tensor
    r_t: torch.Tensor
    info: dict = field(default_factory=dict)

    def to_json(self, store: FactorStore) -> dict:
        return {
            "tasks": store.tasks,
            "info": self.info,
            "ranks": {
                e.name: {
                    "shared": int(self.r_s[e.idx]),
                    **{t: int(self.r_t[e.idx, j]) for j, t in enumerate(store.tasks)},
                }
                for e in store.matrices
            },
        }

    @classmethod
    def from_json(cls, d: dict, store: FactorStore) -> "Ranks":
        if d["tasks"] != store.tasks:
            raise DidiError(f"ranks file: tasks {d['tasks']} differ from the zoo's tasks {store.tasks}")
        missing = [e.name for e in store.matrices if e.name not in d["ranks"]]
        if missing:
            raise DidiError(f"ranks file: no ranks for matrix '{missing[0]}'")
        r_s = torch.tensor([d["ranks"][e.name]["shared"] for e in store.matrices])
        r_t = torch.tensor([[d["ranks"][e.name][t] for t in store.tasks] for e in store.matrices])
        return cls(r_s, r_t, d.get("info", {}))


Policy = Union[str, Callable[[str], str]]


def policy_fn(policy: Policy) -> Callable[[str], str]:
    """A non-matrix policy for every tensor (`shared`/`per_task`) or per tensor (an adapter's `policy_of`)."""
    return policy if callable(policy) else (lambda name: policy)


def rank_problem(
    store: FactorStore, widths: list[int], policy: Policy, pricing: Pricing | None = None
) -> RankProblem:
    """Bounds are min(numerical rank, search width K); fixed cost = per-task non-matrix deltas if counted.
    `pricing`: the budget's unit and the factors' dtypes (default: elements, float32 factors)."""
    T = len(store.tasks)
    fixed = 0.0
    pol = policy_fn(policy)
    for name, meta in store.nonmatrix.items():
        if not meta["zero"] and pol(name) == "per_task":
            fixed += T * float(torch.Size(meta["shape"]).numel())
    ents = store.matrices
    m, n = torch.tensor([e.m for e in ents]), torch.tensor([e.n for e in ents])
    extra: dict = {}
    base = store.base_params
    if pricing is not None and not pricing.is_default:
        cost_s, cost_t = pricing.units(m, n)
        extra = {"cost_s": cost_s, "cost_t": cost_t, "unit_name": pricing.unit_name}
        base, fixed = pricing.base(store.base_params), pricing.dense(fixed)
    return RankProblem(
        m=m,
        n=n,
        bound_s=torch.tensor([min(e.bound_s, k) for e, k in zip(ents, widths)]),
        bound_t=torch.tensor([[min(b, k) for b in e.bound_t] for e, k in zip(ents, widths)]),
        base_params=base,
        fixed_elements=fixed,
        **extra,
    )


class TermsCache:
    """Closed-form terms of every matrix at its search width, grouped by K and memoised per requested batch.

    Memory is what the search needs and no more: the float64 stack of every matrix (the exact allocator's)
    and the float32 stacks of the layer batches, cut from it once it exists; a matrix's terms are not kept a
    second time on their own (they were: 2.5× instead of 1.5× of the search terms, the one part of a merge
    that grows with depth).
    """

    def __init__(self, store: FactorStore, widths: list[int]) -> None:
        self.store, self.widths = store, widths
        self._groups: dict[tuple, list] = {}
        self._all = tuple(range(len(widths)))

    def get(self, i: int) -> GroupTerms:
        return terms_from_factors(self.store.load(i), self.widths[i], dtype=torch.float64)

    def groups(self, indices: list[int], dtype=torch.float32) -> list[tuple[torch.Tensor, GroupTerms]]:
        """Terms of `indices`, stacked per search width; memoised: every epoch asks for the same batches."""
        key = (tuple(indices), dtype)
        if key not in self._groups:
            full = self._groups.get((self._all, torch.float64))
            self._groups[key] = self._stack(indices, dtype) if full is None else _select(full, indices, dtype)
        return self._groups[key]

    def _stack(self, indices: list[int], dtype) -> list[tuple[torch.Tensor, GroupTerms]]:
        by_k: dict[int, list[int]] = {}
        for i in indices:
            by_k.setdefault(self.widths[i], []).append(i)
        out = []
        for _, idx in sorted(by_k.items()):
            ts = [self.get(i).to(dtype=dtype) for i in idx]
            stacked = GroupTerms(
                *(torch.cat([getattr(t, f) for t in ts]) for f in GroupTerms.__dataclass_fields__)
            )
            out.append((torch.tensor(idx), stacked))
        return out

    def tau_total(self) -> float:
        full = self._groups.get((self._all, torch.float64))
        if full is not None:
            return float(sum(g.tau_sq.sum() for _, g in full))
        return self.store.tau_total()


def _select(
    full: list[tuple[torch.Tensor, GroupTerms]], indices: list[int], dtype
) -> list[tuple[torch.Tensor, GroupTerms]]:
    """The rows of `indices` from stacked groups (same K grouping, same order as `TermsCache._stack`)."""
    pos = {i: n for n, i in enumerate(indices)}
    out = []
    for idx, g in full:
        rows = sorted((pos[i], j) for j, i in enumerate(idx.tolist()) if i in pos)
        if rows:
            r = torch.tensor([j for _, j in rows])
            out.append(
                (
                    idx[r],
                    GroupTerms(*(getattr(g, f)[r] for f in GroupTerms.__dataclass_fields__)).to(dtype=dtype),
                )
            )
    return out


def _widths(store: FactorStore, cap: int) -> list[int]:
    return [min(e.K, cap) for e in store.matrices]


def greedy_ranks(
    store: FactorStore,
    target: float,
    policy: Policy,
    cap: int | None = None,
    pricing: Pricing | None = None,
    caches: dict | None = None,
):
    """Greedy marginal-gain allocation from zero at width `cap` (grown until no module is cut by it).
    `caches`: receives the TermsCache of the last widths, for the caller to reuse (the search usually runs
    at the greedy's last widths: computing the closed-form terms again was a tenth of a Llama-1B-shaped
    search)."""
    K_max = max(e.K for e in store.matrices)
    cap = min(K_max, cap or 128)
    caches = {} if caches is None else caches
    while True:
        widths = _widths(store, cap)
        problem = rank_problem(store, widths, policy, pricing)
        cache = caches.get(tuple(widths)) or TermsCache(store, widths)
        caches.clear()  # only the last widths' terms are kept: an earlier width's are never asked for again
        caches[tuple(widths)] = cache
        alloc = Allocator(cache.groups(list(range(len(widths))), torch.float64), problem)
        budget = problem.max_elements(target)
        L_, T = problem.bound_t.shape
        r_s, r_t = alloc.greedy_fill(
            torch.zeros(L_, dtype=torch.long), torch.zeros(L_, T, dtype=torch.long), budget
        )
        cut = [
            (r_s[i] >= widths[i] and store.matrices[i].bound_s > widths[i])
            or any(r_t[i, t] >= widths[i] and store.matrices[i].bound_t[t] > widths[i] for t in range(T))
            for i in range(L_)
        ]
        if not any(cut) or cap >= K_max:
            return r_s, r_t, cap, alloc.last_gain
        cap = min(K_max, cap * 2)


# ----------------------------------------------------------------------------------------------- stage 1
def _search(
    store: FactorStore,
    cache: TermsCache,
    problem: RankProblem,
    alloc: Allocator,
    target: float,
    budget: int,
    lam: float,
    scfg: SearchConfig,
    trainers: Trainers,
    work_dir: Path | None,
    resume: bool,
    info: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The differentiable search (Lightning fit), then round → global factor → greedy fill
    (docs/method.md §2.3)."""
    tau_total = cache.tau_total()
    gamma = scfg.gamma
    if gamma == "auto":  # exact-penalty threshold: marginal error decrease per element, in loss units
        gamma = scfg.gamma_scale * lam * problem.base_params / tau_total
    info["gamma"] = float(gamma)
    if scfg.init == "uniform":
        init_s, init_t = uniform_ranks(problem, budget)
    else:
        init_s, init_t = problem.bound_s, problem.bound_t
    dm = LayerBatchDataModule(len(cache.widths), cache.groups, scfg.layer_batch_size)
    module = RankSearch(scfg, problem, target, tau_total, float(gamma), init_s, init_t, dm.num_batches)
    callbacks: list = [RankEvolution(store.matrices, every_n_steps=trainers.cfg.log_every_n_steps)]
    ckpt = None
    if work_dir is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=work_dir / "search", save_last=True, every_n_train_steps=50, save_top_k=0)
        )
        last = work_dir / "search" / "last.ckpt"
        ckpt = str(last) if resume and last.exists() else None
    trainer = trainers.fit("search", callbacks, max_steps=scfg.steps)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    rf_s, rf_t = module.r_s.detach().cpu(), module.r_t.detach().cpu()
    info["search_ratio"] = problem.ratio(rf_s.double(), rf_t.double())
    soft = trainer.callback_metrics.get("search/rec_err")
    info["search_rec_err_soft"] = None if soft is None else float(soft)
    if soft is None:  # a resumed search whose checkpoint had already run every step logs no step
        info["search_rec_err_soft_reason"] = (
            "no search step ran in this process (resumed from a finished search)"
        )
    info["continuous_ranks"] = {"shared": rf_s.tolist(), "experts": rf_t.tolist()}
    r_s, r_t = rescale_to_budget(rf_s, rf_t, problem, budget)
    info["rescaled_rec_err"] = alloc.error(r_s, r_t)
    return alloc.greedy_fill(r_s, r_t, budget)


def allocate(
    store: FactorStore,
    target: float,
    scfg: SearchConfig,
    trainers: Trainers | TrainerConfig,
    policy: Policy,
    allocation: Allocation = "search",
    work_dir: Path | None = None,
    resume: bool = False,
    shared: SharedPart = "low_rank",
    pricing: Pricing | None = None,
) -> Ranks:
    """Stage 1 and the budget: integer ranks at the exact target (ratio ≤ target, short by < one unit).

    `trainers`: the run's Trainers (a merge shares one W&B run between its stages), or settings to build
    them. `pricing`: the budget's unit and the factors' dtypes (default: elements, float32)."""
    if isinstance(trainers, TrainerConfig):
        trainers = Trainers(trainers)
    if shared == "folded":
        return allocate_folded(store, target, policy, allocation, pricing)
    if shared != "low_rank":
        raise DidiError(f"shared: expected 'low_rank' or 'folded', found {shared!r}")
    K_max = max(e.K for e in store.matrices)
    problem_full = rank_problem(store, [e.K for e in store.matrices], policy, pricing)
    problem_full.check(target)
    caches: dict = {}
    g_s, g_t, g_cap, lam = greedy_ranks(store, target, policy, pricing=pricing, caches=caches)
    cap = min(K_max, scfg.rank_cap or max(32, 2 * int(max(g_s.max(), g_t.max()))))
    widths = _widths(store, cap)
    problem = rank_problem(store, widths, policy, pricing)
    # the greedy ranks can stop short of the budget (no positive gain left, e.g. with a TSV-M shared part);
    # widen the search until the budget is reachable inside it (up to full rank, checked above)
    while problem.max_ratio() < target and cap < K_max and not scfg.rank_cap:
        cap = min(K_max, 2 * cap)
        widths = _widths(store, cap)
        problem = rank_problem(store, widths, policy, pricing)
    problem.check(target)
    cache = caches.get(tuple(widths)) or TermsCache(store, widths)
    everything = list(range(len(widths)))
    alloc = Allocator(cache.groups(everything, torch.float64), problem)
    budget = problem.max_elements(target)
    info: dict = {"allocation": allocation, "target_ratio": target, "search_width": cap}
    info.update(_pricing_info(pricing))
    zeros_s, zeros_t = torch.zeros_like(g_s), torch.zeros_like(g_t)
    if allocation == "greedy":
        r_s, r_t = alloc.greedy_fill(zeros_s, zeros_t, budget)
    elif allocation == "uniform":
        r_s, r_t = uniform_ranks(problem, budget)
    elif allocation == "search":
        r_s, r_t = _search(
            store, cache, problem, alloc, target, budget, lam, scfg, trainers, work_dir, resume, info
        )
        if scfg.polish:
            r_s, r_t = alloc.polish(r_s, r_t, budget)
        info["search_rec_err"] = alloc.error(r_s, r_t)
        if scfg.guard:  # keep the best of the searched, greedy and uniform allocations (exact error)
            cands = {
                "search": (r_s, r_t),
                "greedy": alloc.greedy_fill(zeros_s, zeros_t, budget),
                "uniform": uniform_ranks(problem, budget),
            }
            if scfg.polish:
                cands["greedy"] = alloc.polish(*cands["greedy"], budget)
            errs = {k: alloc.error(*v) for k, v in cands.items()}
            info.update({f"{k}_rec_err": v for k, v in errs.items()})
            info["chosen"] = min(errs, key=errs.get)
            r_s, r_t = cands[info["chosen"]]
    else:
        raise DidiError(f"allocation: expected search, greedy or uniform, found {allocation!r}")
    info["rec_err"] = alloc.error(r_s, r_t)
    info["ratio"] = problem.ratio(r_s, r_t)
    return Ranks(r_s, r_t, info)


def _pricing_info(pricing: Pricing | None) -> dict:
    """What a ranks file records of a non-default pricing (the refinement and the artifact follow it)."""
    if pricing is None or pricing.is_default:
        return {}
    return {
        "storage": pricing.storage,
        "expert_dtype": pricing.expert_dtype,
        "base_bytes": pricing.base_bytes,
    }


def allocate_folded(
    store: FactorStore,
    target: float,
    policy: Policy,
    allocation: Allocation = "search",
    pricing: Pricing | None = None,
) -> Ranks:
    """Expert ranks for a shared part folded into the base: no shared ranks; `search` and `greedy` both take
    the exact greedy of `folded_ranks` (optimal to one rank unit: the search has nothing to find), `uniform`
    the same rank everywhere (the ablation)."""
    if allocation not in ("search", "greedy", "uniform"):
        raise DidiError(f"allocation: expected search, greedy or uniform, found {allocation!r}")
    problem = rank_problem(store, [e.K for e in store.matrices], policy, pricing)
    problem = replace(problem, bound_s=torch.zeros_like(problem.bound_s))
    problem.check(target)
    budget = problem.max_elements(target)
    spectra = [store.spectra(e.idx) for e in store.matrices]
    sigma_t = [s for s, _ in spectra]
    mt_sq = torch.stack([m for _, m in spectra])
    r_s = torch.zeros(len(sigma_t), dtype=torch.long)
    if allocation == "uniform":
        _, r_t = uniform_ranks(problem, budget)
    else:
        r_t = folded_ranks(sigma_t, problem.bound_t, problem.unit_t, budget)
    info = {
        "allocation": "uniform" if allocation == "uniform" else "greedy",
        "shared": "folded",
        "target_ratio": target,
        "rec_err": float(folded_error(sigma_t, mt_sq, r_t).sum()) / store.tau_total(),
        "ratio": problem.ratio(r_s, r_t),
        **_pricing_info(pricing),
    }
    return Ranks(r_s, r_t, info)


def per_task_elements(zoo: Zoo, T: int) -> int:
    """What the per-task non-matrix deltas cost before any rank is given, from the zoo's plans (no task vector
    read): T copies of every floating tensor the adapter keeps `per_task`."""
    return T * sum(
        p.numel
        for p in zoo.nonmatrices
        if p.dtype.is_floating_point and zoo.adapter.policy_of(p.name) == "per_task"
    )


def zoo_pricing(zoo: Zoo, storage: str = "elements", expert_dtype: str | None = None) -> Pricing:
    """The pricing of a merge of `zoo`: `storage` units, experts in `expert_dtype` (None: float32, the
    factors' dtype), the shared factors in float32, θ0's bytes from its own dtypes."""
    return Pricing(storage, expert_dtype or "float32", "float32", base_bytes_of(zoo.plan))


def _zoo_units(zoo: Zoo, pricing: Pricing) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared, expert) rank-unit costs of the zoo's matrices [L] in the budget's unit."""
    m = torch.tensor([p.matrix_shape[0] for p in zoo.matrices])
    n = torch.tensor([p.matrix_shape[1] for p in zoo.matrices])
    return pricing.units(m, n)


def precheck_budget(zoo: Zoo, target: float, pricing: Pricing | None = None) -> None:
    """Cheap refusal before any SVD: below one rank unit, or above full rank of every module."""
    T = len(zoo.tasks)
    units = [sum(p.matrix_shape) for p in zoo.matrices]
    if not units:
        raise DidiError(
            f"{zoo.base}: adapter '{zoo.adapter.registry_name}' decomposes no tensor of this model"
        )
    if pricing is not None and not pricing.is_default:
        u_s, u_t = _zoo_units(zoo, pricing)
        k = torch.tensor([min(p.matrix_shape) for p in zoo.matrices])
        base, fixed = pricing.base(zoo.base_params), pricing.dense(per_task_elements(zoo, T))
        hi = 1 + (float((k * (u_s + T * u_t)).sum()) + fixed) / base
        need = fixed + int(min(u_s.min(), u_t.min()))
        if target < 1 + need / base:
            raise DidiError(
                f"budget {target:g}: below what must be stored anyway in {pricing.storage}: "
                f"{need:,.0f} {pricing.storage} (per-task non-matrix deltas {fixed:,.0f}, one rank unit "
                f"{need - fixed:,.0f} with experts in {pricing.expert_dtype}) on top of θ0's {base:,}; the "
                f"minimum is ratio {1 + need / base:.6g}"
            )
        if target > hi:
            raise DidiError(
                f"budget {target:g}: above full rank (every module at full rank costs ratio {hi:.6g} in "
                f"{pricing.storage} at most); ask for less"
            )
        return
    full = sum((T + 1) * min(p.matrix_shape) * sum(p.matrix_shape) for p in zoo.matrices)
    fixed = per_task_elements(zoo, T)
    hi = 1 + (full + fixed) / zoo.base_params
    lo = 1 + min(units) / zoo.base_params
    if target > hi:
        raise DidiError(
            f"budget {target:g}: above full rank (every module at full rank costs ratio {hi:.6g} at "
            f"most); ask for less"
        )
    if target < lo:
        raise DidiError(f"budget {target:g}: below the cost of a single rank unit (ratio {lo:.6g})")


def budget_width(zoo: Zoo, target: float, T: int | None = None, pricing: Pricing | None = None) -> int:
    """An upper bound on the rank any one module can get at budget `target`, from the zoo's plans alone
    (no SVD, no task vector read): the budget in elements, (target − 1)·|θ0| minus the per-task non-matrix
    deltas (`per_task_elements`, as `precheck_budget` counts them), divided by the smallest unit cost m + n
    among the matrices, and capped at the largest min(m, n). With a `pricing`, the same in its unit (bytes:
    the cheapest rank unit in the experts' or the shared factors' dtype).

    It is a bound, not an estimate: a module at rank r costs r·(m + n) ≥ r·min(m + n), so even a module given
    the whole budget cannot pass it; real allocations spread the budget over T + 1 modules per matrix and are
    usually far below it. `T`: the number of tasks (default: the zoo's). 0 when the budget cannot pay the
    fixed costs.
    """
    T = len(zoo.tasks) if T is None else T
    shapes = [p.matrix_shape for p in zoo.matrices]
    if not shapes:
        return 0
    fixed = per_task_elements(zoo, T)
    if pricing is not None and not pricing.is_default:
        u_s, u_t = _zoo_units(zoo, pricing)
        budget = int((target - 1.0) * pricing.base(zoo.base_params) + 1e-6) - int(pricing.dense(fixed))
        if budget <= 0:
            return 0
        return min(budget // int(min(u_s.min(), u_t.min())), max(min(s) for s in shapes))
    budget = int((target - 1.0) * zoo.base_params + 1e-6) - fixed
    if budget <= 0:
        return 0
    return min(budget // min(sum(s) for s in shapes), max(min(s) for s in shapes))


#: the factor store's automatic width is this many times the rank an even spread of the budget gives
WIDTH_MARGIN = 2


def auto_width(zoo: Zoo, target: float, pricing: Pricing | None = None) -> int | None:
    """The decomposition width K of `max_rank: auto`: WIDTH_MARGIN × the rank every expert would get if the
    budget were spread evenly over the T experts of every matrix (budget in elements / (T·Σ(m + n))), rounded
    up to a multiple of 32; None (every component) when that reaches the largest min(m, n) anyway.

    An estimate, not a bound (`budget_width` is the bound, and it is useless: one module could take the whole
    budget): the allocation concentrates rank where the spectra are slowest, so `pipeline.run_search` widens
    the store (`widen`) and searches again while a module reaches K.
    With a `pricing`, the same in its unit: the budget in bytes over the experts' rank-unit costs in their
    dtype, so int8 experts get a store about 4× as wide as float32 ones.
    """
    shapes = [p.matrix_shape for p in zoo.matrices]
    T = len(zoo.tasks)
    if not shapes or not T:
        return None
    if pricing is not None and not pricing.is_default:
        budget = (target - 1.0) * pricing.base(zoo.base_params) - pricing.dense(per_task_elements(zoo, T))
        even = max(budget, 0.0) / (T * float(_zoo_units(zoo, pricing)[1].sum()))
    else:
        budget = (target - 1.0) * zoo.base_params - per_task_elements(zoo, T)
        even = max(budget, 0.0) / (T * sum(m + n for m, n in shapes))
    K = 32 * max(1, math.ceil(WIDTH_MARGIN * even / 32))
    return None if K >= max(min(s) for s in shapes) else K


def widen(zoo: Zoo, K: int | None) -> int | None:
    """The next width after K when `auto` fell short: 2K, or None (every component) once that reaches the
    largest min(m, n); a round at None always ends the search's widening (nothing can be at width then)."""
    if K is None:
        return None
    top = max(min(p.matrix_shape) for p in zoo.matrices)
    return None if 2 * K >= top else 2 * K


def at_width(store: FactorStore, ranks: Ranks) -> int:
    """How many modules (shared or expert) the allocation gave the store's whole width K where K was cut below
    min(m, n): their rank may have been limited by the decomposition, not by the budget."""
    n = 0
    for e in store.matrices:
        if e.K < min(e.m, e.n):
            n += int(ranks.r_s[e.idx] >= e.K) + int((ranks.r_t[e.idx] >= e.K).sum())
    return n


def resolve_width(
    zoo: Zoo, cfg: DecomposeConfig, target: float, pricing: Pricing | None = None
) -> DecomposeConfig:
    """`cfg` with `max_rank: auto` replaced by `auto_width` (other settings unchanged)."""
    return replace(cfg, max_rank=auto_width(zoo, target, pricing)) if cfg.max_rank == "auto" else cfg


#: (base, max_rank, bound) this process has already warned about
_WIDTH_WARNED: set[tuple] = set()


def check_decompose_inputs(
    zoo: Zoo, cfg: DecomposeConfig, target: float, pricing: Pricing | None = None
) -> None:
    """The decomposition settings against the zoo, before any SVD (issue 11): `cfg.validate()`, then refuse a
    max_rank above every matrix's full rank min(m, n) (the truncation would do nothing; above SOME matrices'
    rank is normal, those are kept whole), and say once on stderr when max_rank is above `budget_width`, the
    largest rank this budget can give any module (SVD work that no allocation can use; not an error)."""
    cfg.validate()
    if cfg.max_rank in (None, "auto") or not zoo.matrices:
        return
    full = max(min(p.matrix_shape) for p in zoo.matrices)
    if cfg.max_rank > full:
        raise DidiError(
            f"decompose.max_rank: expected at most {full}, the largest full rank min(m, n) of the zoo's "
            f"matrices, found {cfg.max_rank}: above every matrix's rank the truncation does nothing; give "
            f"--decompose.max_rank {full} or less, or leave it unset to keep every component"
        )
    bound = budget_width(zoo, target, pricing=pricing)
    key = (str(zoo.base), cfg.max_rank, bound)
    if cfg.max_rank > bound and key not in _WIDTH_WARNED:
        _WIDTH_WARNED.add(key)
        print(
            f"didi: decompose.max_rank {cfg.max_rank} is above the largest rank this budget ({target:g}) "
            f"can give any module ({bound}); components beyond {bound} are computed but never used",
            file=sys.stderr,
            flush=True,
        )
