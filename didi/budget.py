"""Budgets: presets, feasibility and turning continuous searched ranks into integer ranks at the exact target.

After the search: round, multiply every rank by one global factor found by bisection, then spend what is left
on the single rank units with the largest exact error decrease per stored element (closed form), so the final
ratio is as close to the target as possible without exceeding it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from didi.accounting import lora_elements
from didi.closed_form import GroupTerms, error_from_masks, hard_mask
from didi.errors import DidiError

PRESETS = {"S": 1.24, "M": 1.4, "L": 2.0}


def parse_budget(budget: float | str) -> float:
    """`S`/`M`/`L` (1.24/1.4/2.0, the paper's sizes) or any ratio > 1 such as 1.05 or "1.05"."""
    if isinstance(budget, str):
        if budget.upper() in PRESETS:
            return PRESETS[budget.upper()]
        try:
            budget = float(budget)
        except ValueError:
            raise DidiError(
                f"budget: expected S, M, L or a storage ratio such as 1.24, found {budget!r}"
            ) from None
    if not budget > 1.0:
        raise DidiError(f"budget: a storage ratio must be > 1 (the backbone alone is 1.0), found {budget}")
    return float(budget)


@dataclass
class RankProblem:
    """Everything the budget needs: matrix sizes, rank bounds, θ0's size, what is stored whatever the ranks.

    Costs are in the budget's unit (docs/method.md §4): elements by default, or bytes (`storage: bytes`). A
    rank unit of the shared module costs `unit_s`, one of an expert `unit_t` (per matrix): m + n elements
    unless `cost_s` / `cost_t` say otherwise (the shared module and the experts may be stored in different
    dtypes, e.g. float32 shared and int8 experts). `base_params` is θ0 in that unit (|θ0|, or its bytes) and
    `fixed_elements` what is stored whatever the ranks, in that unit too."""

    m: torch.Tensor  # [L] int64
    n: torch.Tensor  # [L]
    bound_s: torch.Tensor  # [L] int64, ≤ search width K of the matrix
    bound_t: torch.Tensor  # [L,T]
    base_params: int
    fixed_elements: float  # e.g. per-task dense non-matrix deltas
    cost_s: torch.Tensor | None = None  # [L] int64: one shared rank unit; None: m + n
    cost_t: torch.Tensor | None = None  # [L] int64: one expert rank unit; None: m + n
    unit_name: str = "elements"

    @property
    def unit_s(self) -> torch.Tensor:
        """Cost of one rank unit of each matrix's shared module [L]."""
        return lora_elements(self.m, self.n, 1) if self.cost_s is None else self.cost_s

    @property
    def unit_t(self) -> torch.Tensor:
        """Cost of one rank unit of each matrix's experts [L]."""
        return lora_elements(self.m, self.n, 1) if self.cost_t is None else self.cost_t

    @property
    def unit(self) -> torch.Tensor:
        """Cost of one expert rank unit of each matrix (m + n elements by default; see `unit_s`)."""
        return self.unit_t

    def cheapest_unit(self) -> int:
        """The cheapest single rank unit any module can take (an expert's, or a shared one where allowed)."""
        c = int(self.unit_t.min())
        if bool((self.bound_s > 0).any()):
            c = min(c, int(self.unit_s[self.bound_s > 0].min()))
        return c

    def elements(self, r_s: torch.Tensor, r_t: torch.Tensor) -> torch.Tensor:
        if self.cost_s is None and self.cost_t is None:  # the original expression: default runs unchanged
            return (
                lora_elements(self.m, self.n, r_s)
                + lora_elements(self.m[:, None], self.n[:, None], r_t).sum(-1)
            ).sum() + self.fixed_elements
        return (self.unit_s * r_s + (self.unit_t[:, None] * r_t).sum(-1)).sum() + self.fixed_elements

    def ratio(self, r_s: torch.Tensor, r_t: torch.Tensor) -> float:
        return 1.0 + float(self.elements(r_s.double(), r_t.double())) / self.base_params

    def min_ratio(self) -> float:
        return 1.0 + self.fixed_elements / self.base_params

    def max_ratio(self) -> float:
        return self.ratio(self.bound_s, self.bound_t)

    def max_elements(self, target: float) -> int:
        return int((target - 1.0) * self.base_params + 1e-6) - int(round(self.fixed_elements))

    def check(self, target: float) -> None:
        """Refuse an unreachable budget before any heavy compute."""
        lo, hi = self.min_ratio(), self.max_ratio()
        cheapest = self.cheapest_unit()
        if target < lo + cheapest / self.base_params:
            raise DidiError(
                f"budget {target:g}: below what must be stored anyway (ratio {lo:.6g} for the per-task "
                f"non-matrix deltas, plus {cheapest} {self.unit_name} for a single rank unit: the minimum is "
                f"ratio {lo + cheapest / self.base_params:.6g}, {int(round(self.fixed_elements)) + cheapest} "
                f"{self.unit_name} on top of θ0's {self.base_params}); ask for more, or use "
                f"nonmatrix_policy=shared"
            )
        if target > hi + 1e-12:
            raise DidiError(
                f"budget {target:g}: above full rank (every module at its full numerical rank costs "
                f"ratio {hi:.6g}); ask for at most {hi:.6g}"
            )


class Allocator:
    """Exact errors and marginal gains of integer ranks over matrix groups (closed form, hard masks)."""

    def __init__(self, groups: list[tuple[torch.Tensor, GroupTerms]], problem: RankProblem) -> None:
        self.groups = [(idx, terms.to(dtype=torch.float64)) for idx, terms in groups]
        self.problem = problem
        self.T = problem.bound_t.shape[1]
        self.tau_total = float(sum(t.tau_sq.sum() for _, t in self.groups))
        self.last_gain = 0.0  # gain per element of the last unit greedy_fill added (the budget's multiplier)

    def error(self, r_s: torch.Tensor, r_t: torch.Tensor) -> float:
        """Σ_t Σ_l ‖E_t,l‖² / Σ_t Σ_l ‖τ_t,l‖² at integer ranks (relative squared error)."""
        return float(self.matrix_errors(r_s, r_t).sum()) / self.tau_total

    def matrix_errors(
        self, r_s: torch.Tensor, r_t: torch.Tensor, only: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Σ_t ‖E_t,l‖² per matrix [L] (absolute); with `only` (a bool mask [L]) just those matrices,
        0 elsewhere."""
        out = torch.zeros(len(r_s), dtype=torch.float64)
        for idx, terms in self.groups:
            pos = torch.arange(len(idx)) if only is None else torch.nonzero(only[idx]).flatten()
            if len(pos) == 0:
                continue
            sub = GroupTerms(*(getattr(terms, f)[pos] for f in GroupTerms.__dataclass_fields__))
            ids = idx[pos]
            g_s, g_t = hard_mask(r_s[ids], terms.K), hard_mask(r_t[ids], terms.K)
            out[ids] = error_from_masks(sub, g_s.double(), g_t.double()).sum(-1)
        return out

    def _gains(self, idx: torch.Tensor, terms: GroupTerms, r_s: torch.Tensor, r_t: torch.Tensor):
        """Exact error decrease of adding one rank unit to the shared module / each expert, [L] and [L,T].

        Removing component j = r+1 from the dropped mass sets d_j from σ_j to 0, so the decrease is
        σ_j² + 2σ_j (cross and tail terms at j): one row or column of each C_t, O(T·K) per matrix.
        """
        K = terms.K
        rs, rt = r_s[idx], r_t[idx]
        d_s = (1 - hard_mask(rs, K).double()) * terms.sigma_s
        d_t = (1 - hard_mask(rt, K).double()) * terms.sigma_t
        L, T = rt.shape
        # expert t, component j = rt (0-based): σ² + 2σ[(Cᵀ d_s)_j + q_j]; only column j of C is read
        j_t = rt.clamp(max=K - 1)
        C_col = terms.C.gather(-1, j_t[..., None, None].expand(L, T, K, 1))[..., 0]  # C[l,t,:,j_t]
        sig_t = terms.sigma_t.gather(-1, j_t[..., None])[..., 0]
        lin_t = (C_col * d_s[:, None, :]).sum(-1) + terms.q.gather(-1, j_t[..., None])[..., 0]
        gain_t = sig_t * sig_t + 2 * sig_t * lin_t
        gain_t = torch.where(rt < K, gain_t, torch.full_like(gain_t, -float("inf")))
        # shared, component j = rs: Σ_t σ² + 2σ[(C d_t)_j + p_j]; only row j of every C_t is read
        j_s = rs.clamp(max=K - 1)
        C_row = terms.C.gather(-2, j_s[:, None, None, None].expand(L, T, 1, K))[..., 0, :]  # C[l,t,j_s,:]
        sig_s = terms.sigma_s.gather(-1, j_s[:, None])[:, 0]
        lin_s = ((C_row * d_t).sum(-1) + terms.p.gather(-1, j_s[:, None, None].expand(L, T, 1))[..., 0]).sum(
            -1
        )
        gain_s = self.T * sig_s * sig_s + 2 * sig_s * lin_s
        gain_s = torch.where(rs < K, gain_s, torch.full_like(gain_s, -float("inf")))
        return gain_s, gain_t

    def greedy_fill(
        self, r_s: torch.Tensor, r_t: torch.Tensor, max_elements: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add single rank units by largest gain per element while they fit; returns new integer ranks.

        A heap of candidates (gain per element, matrix, module); accepting a unit changes every candidate of
        its matrix (cross terms), so the matrix's version is bumped, its older entries are skipped when they
        come up, and its new candidates are pushed. Why versions, and Python lists beside the tensors: the
        filtered re-heapify and the per-element tensor reads of an earlier form made this loop half of a
        Llama-1B-shaped search (profiled)."""
        p = self.problem
        r_s, r_t = r_s.clone().long(), r_t.clone().long()
        left = max_elements - int(p.elements(r_s, r_t) - p.fixed_elements)
        unit_s, unit_t = p.unit_s.tolist(), p.unit_t.tolist()
        bound_s, bound_t = p.bound_s.tolist(), p.bound_t.tolist()
        rank_s, rank_t = r_s.tolist(), r_t.tolist()  # the ranks as Python ints, kept equal to r_s, r_t
        version = [0] * len(rank_s)
        heap: list = []
        where = {}  # global matrix -> (group, position)
        for g, (idx, _) in enumerate(self.groups):
            for pos, l in enumerate(idx.tolist()):
                where[l] = (g, pos)

        def candidates(ls: list[int], gs: torch.Tensor, gt: torch.Tensor) -> list:
            out = []
            for l, g_s, g_t in zip(ls, gs.tolist(), gt.tolist()):
                v = version[l]
                if rank_s[l] < bound_s[l] and g_s > 0:
                    out.append((-g_s / unit_s[l], l, -1, v))
                for t, g in enumerate(g_t):
                    if rank_t[l][t] < bound_t[l][t] and g > 0:
                        out.append((-g / unit_t[l], l, t, v))
            return out

        for idx, terms in self.groups:  # all matrices at once, then one matrix per accepted unit
            heap += candidates(idx.tolist(), *self._gains(idx, terms, r_s, r_t))
        heapq.heapify(heap)
        while heap:
            neg_gain, l, t, v = heapq.heappop(heap)
            if v != version[l]:
                continue  # stale entry (the matrix changed since)
            u = int(unit_s[l] if t < 0 else unit_t[l])
            if u > left:
                continue
            if t < 0:
                r_s[l] += 1
                rank_s[l] += 1
            else:
                r_t[l, t] += 1
                rank_t[l][t] += 1
            left -= u
            self.last_gain = -neg_gain
            version[l] += 1
            g, pos = where[l]
            idx, terms = self.groups[g]
            one = GroupTerms(*(getattr(terms, f)[pos : pos + 1] for f in GroupTerms.__dataclass_fields__))
            for entry in candidates([l], *self._gains(idx[pos : pos + 1], one, r_s, r_t)):
                heapq.heappush(heap, entry)
        return r_s, r_t

    def removal_losses(self, r_s: torch.Tensor, r_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact error increase of removing the last rank unit of each module ([L], [L,T]; inf at rank 0)."""
        L_ = len(r_s)
        loss_s = torch.full((L_,), float("inf"), dtype=torch.float64)
        loss_t = torch.full((L_, self.T), float("inf"), dtype=torch.float64)
        for idx, terms in self.groups:
            gs, _ = self._gains(idx, terms, (r_s - 1).clamp_min(0), r_t)
            _, gt = self._gains(idx, terms, r_s, (r_t - 1).clamp_min(0))
            loss_s[idx] = torch.where(r_s[idx] > 0, gs, loss_s[idx])
            loss_t[idx] = torch.where(r_t[idx] > 0, gt, loss_t[idx])
        return loss_s, loss_t

    def polish(
        self,
        r_s: torch.Tensor,
        r_t: torch.Tensor,
        max_elements: int,
        max_iters: int = 500,
        max_removed: int = 8,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exchange moves: while the best unit that does not fit is worth more per element than the cheapest
        units held, free those (fewest first, at most `max_removed`), refill greedily, keep if the exact error
        drops. Never increases the error; stops at a local optimum of the discrete problem."""
        r_s, r_t = r_s.clone().long(), r_t.clone().long()
        errs = self.matrix_errors(r_s, r_t)  # per matrix: a move only re-evaluates the matrices it touched
        p = self.problem
        unit_s, unit_t = p.unit_s.double(), p.unit_t.double()
        for _ in range(max_iters):
            add_s = torch.zeros(len(r_s), dtype=torch.float64)
            add_t = torch.zeros_like(r_t, dtype=torch.float64)
            for idx, terms in self.groups:
                gs, gt = self._gains(idx, terms, r_s, r_t)
                add_s[idx], add_t[idx] = gs, gt
            add_s = torch.where(r_s < p.bound_s, add_s, torch.full_like(add_s, -float("inf")))
            add_t = torch.where(r_t < p.bound_t, add_t, torch.full_like(add_t, -float("inf")))
            best_add = float(torch.cat([add_s / unit_s, (add_t / unit_t[:, None]).reshape(-1)]).max())
            a_s, a_t = r_s.clone(), r_t.clone()
            moved = False
            for _k in range(max_removed):
                ls, lt = self.removal_losses(a_s, a_t)
                score = torch.cat([ls / unit_s, (lt / unit_t[:, None]).reshape(-1)])
                c = int(torch.argmin(score))
                if not score[c] < best_add:
                    break
                if c < len(a_s):
                    a_s[c] -= 1
                else:
                    a_t.view(-1)[c - len(a_s)] -= 1
                b_s, b_t = self.greedy_fill(a_s, a_t, max_elements)
                touched = (b_s != r_s) | (b_t != r_t).any(-1)
                new = self.matrix_errors(b_s, b_t, only=touched)
                if float(new[touched].sum()) < float(errs[touched].sum()) - 1e-12 * float(errs.sum()):
                    errs = torch.where(touched, new, errs)
                    r_s, r_t, moved = b_s, b_t, True
                    break
            if not moved:
                break
        return r_s, r_t


def rescale_to_budget(
    r_s: torch.Tensor, r_t: torch.Tensor, problem: RankProblem, max_elements: int, iters: int = 60
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round, then one global factor c by bisection: ranks = min(bound, floor(c·round(r))) within budget."""
    rs, rt = r_s.double().clamp_min(0).round(), r_t.double().clamp_min(0).round()

    def at(c: float):
        return (
            torch.minimum((c * rs).floor(), problem.bound_s.double()).long(),
            torch.minimum((c * rt).floor(), problem.bound_t.double()).long(),
        )

    def fits(c: float) -> bool:
        a, b = at(c)
        return int(problem.elements(a, b) - problem.fixed_elements) <= max_elements

    lo, hi = 0.0, 1.0
    while fits(hi) and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return at(lo)


def uniform_ranks(problem: RankProblem, max_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rank r for every module (clipped at its bound), the largest r that fits."""

    def at(r: int):
        return (torch.clamp(problem.bound_s, max=r), torch.clamp(problem.bound_t, max=r))

    lo, hi = 0, int(max(problem.bound_s.max(), problem.bound_t.max()))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        a, b = at(mid)
        if int(problem.elements(a, b) - problem.fixed_elements) <= max_elements:
            lo = mid
        else:
            hi = mid - 1
    return at(lo)


def folded_ranks(
    sigma_t: list[torch.Tensor], bound_t: torch.Tensor, unit: torch.Tensor, max_elements: int
) -> torch.Tensor:
    """Expert ranks [L,T] when the shared part is folded into the stored base (dense, free).

    Then task t's error in matrix l is ‖M_t‖² − Σ_{j≤r} σ_j², separable across modules and concave in each
    rank, so taking rank units by σ_j²/(m + n), largest first, is optimal up to the last unit that does not
    fit (the bound of the relaxed knapsack): the differentiable search has nothing left to find.
    `sigma_t[l]` is matrix l's expert spectra [T,K] (descending).
    """
    L, T = bound_t.shape
    vals, mods = [], []
    for l, S in enumerate(sigma_t):
        ok = torch.arange(S.shape[1])[None, :] < bound_t[l][:, None]
        t_idx, j_idx = torch.nonzero(ok, as_tuple=True)  # row-major: a module's units in rank order
        vals.append(S.double()[t_idx, j_idx] ** 2 / float(unit[l]))
        mods.append(l * T + t_idx)
    val, mod = torch.cat(vals), torch.cat(mods)
    order = torch.sort(val, descending=True, stable=True).indices  # stable: ties keep rank order
    mod = mod[order]
    cost = unit.repeat_interleave(T)[mod]
    n = int((torch.cumsum(cost, 0) <= max_elements).sum())
    r_t = torch.bincount(mod[:n], minlength=L * T)
    left = max_elements - int(cost[:n].sum())
    closed: set[int] = set()  # a unit that does not fit closes its module: later units are worth less
    smallest = int(unit.min())
    for k, c in zip(mod[n:].tolist(), cost[n:].tolist()):
        if left < smallest:
            break
        if k in closed:
            continue
        if c > left:
            closed.add(k)
            continue
        r_t[k] += 1
        left -= c
    return r_t.reshape(L, T)


def folded_error(sigma_t: list[torch.Tensor], mt_sq: torch.Tensor, r_t: torch.Tensor) -> torch.Tensor:
    """Σ_t ‖M_t − trunc_r(M_t)‖² per matrix [L] (absolute) for a folded shared part and truncated experts."""
    out = torch.empty(len(sigma_t), dtype=torch.float64)
    for l, S in enumerate(sigma_t):
        kept = torch.arange(S.shape[1])[None, :] < r_t[l][:, None]
        out[l] = (mt_sq[l].double() - (S.double() ** 2 * kept).sum(-1)).clamp_min(0).sum()
    return out
