"""Static merges (one model serves every task): weight averaging, Task Arithmetic, TIES, TSV-M (method.md §5).

Each writes the merged delta as `fold` terms (folded into the stored base, ratio 1.0). The tensor-level
functions (`ties_merge`, `tsv_m_merge`) are also DiDi's optional shared-part merges
(`--decompose.shared_merge ties`).

Choices where the original code differs: TIES trims the top-k % per tensor (mergekit's choice; the TIES code
trims over the whole flattened model, which needs every task vector in memory at once). TSV-M keeps
⌊k/T⌋ triplets per task; a matrix with min(m, n) < T (no triplet to keep) is averaged instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from didi.backbones.base import Zoo
from didi.errors import DidiError
from didi.linalg import svd
from didi.methods.common import DeltaReader, Terms
from didi.methods.registry import register_method


def check_lambda(lam: float, option: str = "lam") -> None:
    if not lam >= 0:
        raise DidiError(f"{option}: the scaling coefficient λ must be ≥ 0, found {lam}")


def check_topk(k: float, option: str = "k") -> None:
    if not 0 < k <= 100:
        raise DidiError(f"{option}: top-k is the percentage of entries kept per task, expected 0 < k ≤ 100, "
                        f"found {k}")


# ---------------------------------------------------------------------------------------- tensor functions
def ties_merge(taus: torch.Tensor, k: float = 20.0, lam: float = 1.0) -> torch.Tensor:
    """TIES of task vectors [T, ...]: trim each to its top-k % |entries|, elect sign = sign(Σ trimmed)
    (zeros take the majority sign), disjoint mean of the entries agreeing with it, times λ."""
    T = taus.shape[0]
    flat = taus.reshape(T, -1)
    d = flat.shape[1]
    if d == 0:
        return torch.zeros(taus.shape[1:], dtype=taus.dtype)
    keep = max(1, int(d * k / 100.0))
    kth = flat.abs().kthvalue(d - keep + 1, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
    return (lam * merged).reshape(taus.shape[1:])


def tsv_m_merge(taus: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """TSV-M of matrices [T, m, n]: top ⌊k/T⌋ singular triplets per task, concatenated U and V blocks each
    replaced by their nearest orthogonal matrix (polar factor P Qᵀ of their SVD), rebuilt with the σ's."""
    T, m, n = taus.shape
    s = min(m, n) // T
    if s == 0:
        return taus.mean(0)
    U, S, Vh = svd(taus)
    Uc = U[..., :s].permute(1, 0, 2).reshape(m, T * s)  # [U_1 | U_2 | ...]
    Vc = Vh[:, :s, :].reshape(T * s, n)  # [V_1ᵀ; V_2ᵀ; ...]
    Sc = S[:, :s].reshape(T * s)
    Pu, _, Qu = svd(Uc)
    Pv, _, Qv = svd(Vc)
    return alpha * (Pu @ Qu) @ torch.diag(Sc) @ (Pv @ Qv)


def _ties_shared(taus: torch.Tensor) -> torch.Tensor:
    return ties_merge(taus, 20.0, 1.0)


def _tsv_m_shared(taus: torch.Tensor) -> torch.Tensor:
    return tsv_m_merge(taus, 1.0)


#: matrix-level merges [T,m,n] -> M_s that `didi.methods` adds to `didi.decompose.SHARED_MERGES`
#: (TIES at k = 20 %, λ = 1: the disjoint mean is already on the task vectors' scale; TSV-M at α = 1)
SHARED_MERGE_FUNCTIONS = {"ties": _ties_shared, "tsv_m": _tsv_m_shared}


# ------------------------------------------------------------------------------------------------ methods
@dataclass
class AveragingOptions:
    """Weight averaging has no options."""


@dataclass
class TaskArithmeticOptions:
    """Task Arithmetic.

    Args:
        lam: scaling coefficient λ of the summed task vectors (θ0 + λ Σ τ_t).
    """

    lam: float = 0.3

    def validate(self) -> None:
        check_lambda(self.lam)


@dataclass
class TiesOptions:
    """TIES-Merging.

    Args:
        k: percentage of each task vector's entries kept (largest magnitudes, per tensor), 0 < k ≤ 100.
        lam: scaling coefficient λ of the disjoint mean.
    """

    k: float = 20.0
    lam: float = 0.3

    def validate(self) -> None:
        check_topk(self.k)
        check_lambda(self.lam)


@dataclass
class TsvMOptions:
    """TSV-M (Task Singular Vectors, merge).

    Args:
        alpha: scaling of the merged matrices (the paper's α = 1).
    """

    alpha: float = 1.0

    def validate(self) -> None:
        check_lambda(self.alpha, "alpha")


def _static(reader: DeltaReader, zoo: Zoo, merge) -> Terms:
    terms = Terms(zoo.task_names)
    for d in reader:
        if not d.zero:
            terms.fold[d.plan.name] = merge(d)
    return terms


@register_method("averaging", options=AveragingOptions)
def averaging(zoo: Zoo, opts: AveragingOptions, reader: DeltaReader) -> Terms:
    """Weight averaging: θ0 + mean_t τ_t, one model for every task."""
    return _static(reader, zoo, lambda d: d.taus.mean(0))


@register_method("task_arithmetic", options=TaskArithmeticOptions)
def task_arithmetic(zoo: Zoo, opts: TaskArithmeticOptions, reader: DeltaReader) -> Terms:
    """Task Arithmetic: θ0 + λ Σ_t τ_t."""
    return _static(reader, zoo, lambda d: opts.lam * d.taus.sum(0))


@register_method("ties", options=TiesOptions)
def ties(zoo: Zoo, opts: TiesOptions, reader: DeltaReader) -> Terms:
    """TIES-Merging: trim to top-k %, elect signs, disjoint mean, times λ."""
    return _static(reader, zoo, lambda d: ties_merge(d.taus, opts.k, opts.lam))


@register_method("tsv_m", options=TsvMOptions)
def tsv_m(zoo: Zoo, opts: TsvMOptions, reader: DeltaReader) -> Terms:
    """TSV-M: per matrix, orthogonalised top-⌊k/T⌋ singular vectors of every task; other tensors averaged."""
    def merge(d):
        if d.is_matrix:
            return tsv_m_merge(d.matrices(), opts.alpha).reshape(d.plan.shape)
        return opts.alpha * d.taus.mean(0)

    return _static(reader, zoo, merge)
