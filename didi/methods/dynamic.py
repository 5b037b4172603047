"""Dynamic baselines (each task served by its own reconstruction, oracle router): TSV-C, EMR-Merging,
TALL-masks, Twin-Merging (docs/method.md §5), written in the artifact vocabulary so `didi evaluate` runs them
as they are.

    TSV-C   per-task "::lora_A/B" (top ⌊k/T⌋ triplets of τ_t) for decomposed matrices, per-task "::dense" else
    EMR     shared "::ref" = τ_uni, per task "::mask" (bool) + "::scale" (λ_t: one per model, repeated
            per tensor)
    TALL    shared "::ref" = τ_MTL, per task "::mask" + "::scale" = 1
    Twin    fold = Task Arithmetic merge, per task "::lora_A/B" of v_t = τ_t − λΣτ at 10 % of min(m, n)
            (non-decomposed tensors: exact per-task "::dense" of v_t)

TALL-masks' λ is data-free (0.6) by default; with `validation` data it is chosen per task from `lam_grid` by
the accuracy of the routed artifact on each task's validation split, as the original does.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from didi.backbones.base import Zoo
from didi.errors import DidiError
from didi.evaluate import evaluate_artifact
from didi.merges import check_lambda, check_topk, ties_merge
from didi.methods.common import DeltaReader, Terms, lora_from_svd, write_method_artifact
from didi.methods.registry import register_method
from didi.trainer import TrainerConfig


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
#: the keyword arguments of `didi.evaluate.evaluate_artifact` that TALL's λ selection passes through
TALL_EVAL_KEYS = ("heads", "base", "tokenizer", "batch_size", "max_length", "limit_per_task")


@dataclass
class TallOptions:
    """TALL-masks: data-free λ, or λ chosen per task on validation data.

    Args:
        lam: mask threshold λ: mask_t = |τ_t| > λ·|τ_MTL − τ_t| (0.6 is the original's data-free default;
            with `validation`, the λ of tasks that have no validation data).
        mtl: multi-task vector τ_MTL: `sum` (Task Arithmetic, Σ_t τ_t) or `ties` (TALL-Mask+TIES).
        mtl_lam: scaling of τ_MTL (λ of the TA or TIES merge; 1.0 for the plain sum).
        ties_k: top-k % of the TIES merge when mtl = ties.
        validation: {task: validation data} in `didi evaluate --data` form; each such task gets the λ of
            `lam_grid` with the best accuracy on it (ties: the larger λ, the sparser mask).
        lam_grid: the λ values tried (the original's 0.2–0.6).
        evaluation: keyword arguments for the validation runs (heads, base, tokenizer, batch_size,
            max_length, limit_per_task), as for `didi evaluate`.
    """

    lam: float = 0.6
    mtl: Literal["sum", "ties"] = "sum"
    mtl_lam: float = 1.0
    ties_k: float = 20.0
    validation: Optional[dict[str, str]] = None
    lam_grid: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5, 0.6])
    evaluation: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        check_lambda(self.lam)
        check_lambda(self.mtl_lam, "mtl_lam")
        check_topk(self.ties_k, "ties_k")
        if self.mtl not in ("sum", "ties"):
            raise DidiError(f"mtl: expected 'sum' or 'ties', found {self.mtl!r}")
        if not self.lam_grid:
            raise DidiError("lam_grid: give at least one λ")
        for x in self.lam_grid:
            check_lambda(x, "lam_grid")
        bad = sorted(set(self.evaluation) - set(TALL_EVAL_KEYS))
        if bad:
            raise DidiError(f"evaluation: unknown option {bad[0]!r}; expected some of {list(TALL_EVAL_KEYS)}")


def _tall_terms(opts: TallOptions, reader: DeltaReader, tasks: list[str], lam_of: dict[str, float]) -> Terms:
    """One pass over the task vectors: shared τ_MTL and task t's mask at its own λ."""
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
        terms.shared[f"{name}::ref"] = tau_mtl
        for j, t in enumerate(tasks):
            terms.per_task[t][f"{name}::mask"] = tall_masks(d.taus[j : j + 1], tau_mtl, lam_of[t])[0]
            terms.per_task[t][f"{name}::scale"] = one.clone()
    terms.metrics["mask_density"] = _densities(terms, tasks)
    terms.metrics["lam_per_task"] = dict(lam_of)
    return terms


@register_method("tall_masks", options=TallOptions, kind="dynamic")
def tall(zoo: Zoo, opts: TallOptions, reader: DeltaReader) -> Terms:
    """TALL-masks: task t uses θ0 + mask_t ⊙ τ_MTL with mask_t = |τ_t| > λ|τ_MTL − τ_t|."""
    tasks = zoo.task_names
    if not opts.validation:
        return _tall_terms(opts, reader, tasks, {t: opts.lam for t in tasks})
    unknown = sorted(set(opts.validation) - set(tasks))
    if unknown:
        raise DidiError(f"validation: task {unknown[0]!r} is not in the zoo (tasks: {tasks})")
    scores: dict[float, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="didi_tall_") as tmp:
        for lam in opts.lam_grid:  # one candidate artifact at a time, scored on the validation splits
            path = write_method_artifact(
                Path(tmp) / f"lam_{lam:g}",
                zoo,
                reader,
                "tall_masks",
                opts,
                _tall_terms(opts, reader, tasks, {t: lam for t in tasks}),
            )
            rep = evaluate_artifact(
                path, data=opts.validation, trainer=TrainerConfig(logger="none"), **opts.evaluation
            )
            scores[lam] = {t: rep["tasks"][t]["accuracy"] for t in opts.validation}
            shutil.rmtree(path)
    chosen = {
        t: max(opts.lam_grid, key=lambda x: (scores[x][t], x)) if t in opts.validation else opts.lam
        for t in tasks
    }
    terms = _tall_terms(opts, reader, tasks, chosen)
    terms.metrics["validation_accuracy"] = {f"{lam:g}": v for lam, v in scores.items()}
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
