"""Dynamic baselines (each task served by its own reconstruction, oracle router): TSV-C, EMR-Merging,
TALL-masks, Twin-Merging (method.md §5), written in the artifact vocabulary so `didi evaluate` runs them as
they are.

    TSV-C   per-task "::lora_A/B" (top ⌊k/T⌋ triplets of τ_t) for decomposed matrices, per-task "::dense" else
    EMR     shared "::ref" = τ_uni, per task "::mask" (bool) + "::scale" (λ_t: one per model, repeated
            per tensor)
    TALL    shared "::ref" = τ_MTL, per task "::mask" + "::scale" = 1
    Twin    fold = Task Arithmetic merge, per task "::lora_A/B" of v_t = τ_t − λΣτ at 10 % of min(m, n)
            (non-decomposed tensors: exact per-task "::dense" of v_t)

TALL-masks' λ is data-free here (0.6 by default); choosing λ per task on a validation split, as the original
does, is not implemented yet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from didi.backbones.base import Zoo
from didi.errors import DidiError
from didi.methods.common import DeltaReader, Terms, lora_from_svd
from didi.methods.registry import register_method
from didi.methods.static import check_lambda, check_topk, ties_merge


# ---------------------------------------------------------------------------------------- tensor functions
def emr_unify(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EMR: elected sign = sign(Σ τ_t); τ_uni = sign · max |τ_t| over the tasks agreeing with it;
    mask_t = (τ_t ⊙ τ_uni > 0). Returns (τ_uni [...], masks [T, ...] bool)."""
    sign = torch.sign(taus.sum(0))
    agree = taus * sign > 0
    tau_uni = sign * (taus.abs() * agree).amax(0)
    return tau_uni, taus * tau_uni > 0


def tall_masks(taus: torch.Tensor, tau_mtl: torch.Tensor, lam: float) -> torch.Tensor:
    """TALL-masks: mask_t = |θ0 − θ_t| > λ·|θ_MTL − θ_t|, i.e. |τ_t| > λ·|τ_MTL − τ_t|  ([T, ...] bool)."""
    return taus.abs() > lam * (tau_mtl - taus).abs()


# ---------------------------------------------------------------------------------------------------- TSV-C
@dataclass
class TsvCOptions:
    """TSV-C (Task Singular Vectors, compression) has no options: each task keeps ⌊min(m, n)/T⌋ triplets
    (at least one) of every decomposed matrix; other tensors are stored exactly per task."""


@register_method("tsv_c", options=TsvCOptions, kind="dynamic")
def tsv_c(zoo: Zoo, opts: TsvCOptions, reader: DeltaReader) -> Terms:
    """TSV-C: per task and matrix, the top ⌊k/T⌋ singular triplets of τ_t as LoRA factors; oracle routing."""
    tasks = zoo.task_names
    terms = Terms(tasks)
    for d in reader:
        if d.zero:
            continue
        name = d.plan.name
        if d.is_matrix:
            mats = d.matrices()
            r = max(1, min(mats.shape[1:]) // len(tasks))
            terms.ranks[name] = {"shared": 0}
            for t, M in zip(tasks, mats):
                terms.add_lora(terms.per_task[t], name, *lora_from_svd(M, r))
                terms.ranks[name][t] = r
        else:
            for t, tau in zip(tasks, d.taus):
                terms.per_task[t][f"{name}::dense"] = tau
    return terms


# ------------------------------------------------------------------------------------------------------ EMR
@dataclass
class EmrOptions:
    """EMR-Merging has no options (elect, mask, rescale are all data-free and tuning-free)."""


@register_method("emr", options=EmrOptions, kind="dynamic")
def emr(zoo: Zoo, opts: EmrOptions, reader: DeltaReader) -> Terms:
    """EMR-Merging: unified task vector τ_uni, per-task masks, one rescaler per task (whole model)."""
    tasks = zoo.task_names
    terms = Terms(tasks)
    num = torch.zeros(len(tasks), dtype=torch.float64)
    den = torch.zeros(len(tasks), dtype=torch.float64)
    names = []
    for d in reader:
        if d.zero:
            continue
        name = d.plan.name
        tau_uni, masks = emr_unify(d.taus)
        num += d.taus.abs().reshape(len(tasks), -1).sum(1, dtype=torch.float64)
        den += (masks * tau_uni).abs().reshape(len(tasks), -1).sum(1, dtype=torch.float64)
        terms.shared[f"{name}::ref"] = tau_uni
        for t, m in zip(tasks, masks):
            terms.per_task[t][f"{name}::mask"] = m
        names.append(name)
    scales = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num)).float()
    for name in names:
        for t, s in zip(tasks, scales):
            terms.per_task[t][f"{name}::scale"] = s.clone()
    terms.metrics["rescalers"] = {t: float(s) for t, s in zip(tasks, scales)}
    terms.metrics["mask_density"] = _densities(terms, tasks)
    return terms


def _densities(terms: Terms, tasks: list[str]) -> dict[str, float]:
    out = {}
    for t in tasks:
        on = tot = 0
        for k, v in terms.per_task[t].items():
            if k.endswith("::mask"):
                on, tot = on + int(v.sum()), tot + v.numel()
        out[t] = on / tot if tot else 0.0
    return out


# ----------------------------------------------------------------------------------------------------- TALL
@dataclass
class TallOptions:
    """TALL-masks (data-free λ).

    Args:
        lam: mask threshold λ: mask_t = |τ_t| > λ·|τ_MTL − τ_t| (the original picks λ in 0.2–0.6 per task on
            validation data; 0.6 is its data-free default).
        mtl: multi-task vector τ_MTL: `sum` (Task Arithmetic, Σ_t τ_t) or `ties` (TALL-Mask+TIES).
        mtl_lam: scaling of τ_MTL (λ of the TA or TIES merge; 1.0 for the plain sum).
        ties_k: top-k % of the TIES merge when mtl = ties.
    """

    lam: float = 0.6
    mtl: Literal["sum", "ties"] = "sum"
    mtl_lam: float = 1.0
    ties_k: float = 20.0

    def validate(self) -> None:
        check_lambda(self.lam)
        check_lambda(self.mtl_lam, "mtl_lam")
        check_topk(self.ties_k, "ties_k")
        if self.mtl not in ("sum", "ties"):
            raise DidiError(f"mtl: expected 'sum' or 'ties', found {self.mtl!r}")


@register_method("tall_masks", options=TallOptions, kind="dynamic")
def tall(zoo: Zoo, opts: TallOptions, reader: DeltaReader) -> Terms:
    """TALL-masks: task t uses θ0 + mask_t ⊙ τ_MTL with mask_t = |τ_t| > λ|τ_MTL − τ_t|."""
    tasks = zoo.task_names
    terms = Terms(tasks)
    one = torch.tensor(1.0)
    for d in reader:
        if d.zero:
            continue
        name = d.plan.name
        if opts.mtl == "ties":
            tau_mtl = ties_merge(d.taus, opts.ties_k, opts.mtl_lam)
        else:
            tau_mtl = opts.mtl_lam * d.taus.sum(0)
        masks = tall_masks(d.taus, tau_mtl, opts.lam)
        terms.shared[f"{name}::ref"] = tau_mtl
        for t, m in zip(tasks, masks):
            terms.per_task[t][f"{name}::mask"] = m
            terms.per_task[t][f"{name}::scale"] = one.clone()
    terms.metrics["mask_density"] = _densities(terms, tasks)
    return terms


# ----------------------------------------------------------------------------------------------------- Twin
@dataclass
class TwinOptions:
    """Twin-Merging with the oracle router.

    Args:
        lam: λ of the Task Arithmetic merge θ* = θ0 + λ Σ τ_t that every task shares.
        rank_fraction: rank of each exclusive vector v_t = θ_t − θ*, as a fraction of min(m, n) (10 % in the
            paper; at least 1).
    """

    lam: float = 0.3
    rank_fraction: float = 0.1

    def validate(self) -> None:
        check_lambda(self.lam)
        if not 0 < self.rank_fraction <= 1:
            raise DidiError(f"rank_fraction: expected 0 < rank_fraction ≤ 1, found {self.rank_fraction}")


@register_method("twin", options=TwinOptions, kind="dynamic")
def twin(zoo: Zoo, opts: TwinOptions, reader: DeltaReader) -> Terms:
    """Twin-Merging: shared Task Arithmetic merge + per-task exclusive vectors compressed by truncated SVD."""
    tasks = zoo.task_names
    terms = Terms(tasks)
    for d in reader:
        if d.zero:
            continue
        name = d.plan.name
        shared = opts.lam * d.taus.sum(0)
        terms.fold[name] = shared
        excl = d.taus - shared
        if d.is_matrix:
            m, n = d.plan.matrix_shape
            r = max(1, math.floor(opts.rank_fraction * min(m, n)))
            terms.ranks[name] = {"shared": 0}
            for t, v in zip(tasks, excl.reshape(len(tasks), m, n)):
                terms.add_lora(terms.per_task[t], name, *lora_from_svd(v, r))
                terms.ranks[name][t] = r
        else:
            for t, v in zip(tasks, excl):
                terms.per_task[t][f"{name}::dense"] = v
    return terms
