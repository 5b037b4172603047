"""Static merge kernels: tensor functions that turn T task vectors into one (docs/method.md §5).

The ground layer under both `didi.decompose` (a static merge defines DiDi's shared part M_s) and the method
registry (weight averaging, Task Arithmetic, TIES, TSV-M wrap these). Nothing here reads files or knows a zoo.

Choices where the original code differs: TIES trims the top-k % per tensor (mergekit's choice; the TIES code
trims over the whole flattened model, which needs every task vector in memory at once). TSV-M keeps
⌊k/T⌋ triplets per task; a matrix with min(m, n) < T (no triplet to keep) is averaged instead.
"""

from __future__ import annotations

from typing import Callable

import torch

from didi.errors import DidiError
from didi.linalg import svd
from didi.registry import Registry


def check_lambda(lam: float, option: str = "lam") -> None:
    if not lam >= 0:
        raise DidiError(f"{option}: the scaling coefficient λ must be ≥ 0, found {lam}")


def check_topk(k: float, option: str = "k") -> None:
    if not 0 < k <= 100:
        raise DidiError(
            f"{option}: top-k is the percentage of entries kept per task, expected 0 < k ≤ 100, found {k}"
        )


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


SharedMerge = Callable[[torch.Tensor], torch.Tensor]

#: Matrix-level merges [T, m, n] → M_s that may define DiDi's shared part (`--decompose.shared_merge`).
SHARED_MERGES: Registry[SharedMerge] = Registry("static merge")


@SHARED_MERGES.register("mean")
def mean_merge(taus: torch.Tensor) -> torch.Tensor:
    """The paper's shared part: the mean of the task vectors."""
    return taus.mean(0)


@SHARED_MERGES.register("ties")
def ties_shared(taus: torch.Tensor) -> torch.Tensor:
    """TIES at k = 20 %, λ = 1: the disjoint mean is already on the task vectors' scale."""
    return ties_merge(taus, 20.0, 1.0)


@SHARED_MERGES.register("tsv_m")
def tsv_m_shared(taus: torch.Tensor) -> torch.Tensor:
    """TSV-M at α = 1."""
    return tsv_m_merge(taus, 1.0)


def shared_merge_fn(name: str) -> SharedMerge:
    """The static merge called `name`, with the option named in the error."""
    try:
        return SHARED_MERGES.get(name)
    except DidiError as e:
        raise DidiError(f"decompose.shared_merge: {e}") from None
