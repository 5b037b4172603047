"""Static merges (one model, all tasks): weight averaging, Task Arithmetic, TIES, TSV-M (docs/method.md §5).

Each writes the merged delta as `fold` terms (folded into the stored base, ratio 1.0). The tensor-level
kernels live in `didi.merges`, where DiDi's shared part (`--decompose.shared_merge ties`) finds them too.
"""

from __future__ import annotations

from dataclasses import dataclass

from didi.backbones.base import Zoo
from didi.merges import check_lambda, check_topk, ties_merge, tsv_m_merge
from didi.methods.common import DeltaReader, Terms
from didi.methods.registry import register_method


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
