"""DiDi itself and its ablations in the registry, so `didi compare` runs them like any other method.

    didi            differentiable rank search + exact budget + LoRA refinement (`didi merge`)
    didi_uniform    the same rank at every module, then refinement   (allocation = uniform)
    didi_greedy     greedy marginal-gain allocation, then refinement (allocation = greedy)
    didi_norefine   the search's ranks with the truncated SVD factors (refine.optimizer = none)
    didi_folded     the shared part folded densely into the stored base (free), the budget spent on experts

They call `didi.pipeline.run_merge` with the one options class of a merge (`MergeOptions`), which writes the
artifact with the registry name in the manifest's method entry (`method.registry_name`), so a comparison can
label the point.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from didi.backbones.base import Zoo
from didi.methods.registry import register_method
from didi.pipeline import MergeOptions, run_merge
from didi.trainer import TrainerConfig


def _quiet_trainer() -> TrainerConfig:
    return TrainerConfig(logger="none", progress_bar=False)


@dataclass
class DidiOptions(MergeOptions):
    """DiDi-Merging (and its ablations): `didi merge`'s options; here the trainer logs nothing by default.

    Args:
        budget: storage ratio: S (1.24), M (1.4), L (2.0) or any float > 1.
        allocation: `search`; the ablations `didi_greedy` / `didi_uniform` force theirs.
        shared: `low_rank` (the paper's shared LoRA module) or `folded` (dense in the stored base, free;
            `didi_folded` forces it).
        storage: what the budget counts: `elements` (the paper's) or `bytes` (θ0 in its own dtype, factors
            in their stored dtype, scales included).
        expert_dtype: the experts' stored dtype: null (float32), `bfloat16`, `int8` or `nf4` (quantized,
            per-column / per-row scales; priced by the search, fitted by the refinement).
        decompose: decomposition settings (shared_merge: mean, ties, tsv_m; max_rank; dtype; device;
            cache_dir).
        search: stage-1 settings.
        refine: stage-2 settings (`didi_norefine` forces optimizer = none).
        trainer: Lightning Trainer settings (default here: no logger, no progress bar).
        resume: continue an interrupted run with the same output.
    """

    trainer: TrainerConfig = field(default_factory=_quiet_trainer)


def effective_options(registry_name: str, opts: DidiOptions) -> DidiOptions:
    """The options a DiDi variant really runs with: `opts` with what the variant forces (what its manifest
    records, so `didi compare` can tell whether an artifact of these options is already there)."""
    forced = {
        "didi_uniform": {"allocation": "uniform"},
        "didi_greedy": {"allocation": "greedy"},
        "didi_norefine": {"refine": replace(opts.refine, optimizer="none")},
        "didi_folded": {"shared": "folded"},
    }.get(registry_name, {})
    return replace(opts, **forced)


def _run(zoo: Zoo, opts: DidiOptions, output: Path, name: str) -> Path | None:
    return run_merge(zoo, output, effective_options(name, opts), progress=False, method=name)


@register_method("didi", options=DidiOptions, kind="didi", writes_artifact=True)
def didi(zoo: Zoo, opts: DidiOptions, output: Path) -> Path | None:
    """DiDi-Merging: searched ranks at an exact storage budget, refined shared + per-task LoRA experts."""
    return _run(zoo, opts, output, "didi")


@register_method("didi_uniform", options=DidiOptions, kind="didi", writes_artifact=True)
def didi_uniform(zoo: Zoo, opts: DidiOptions, output: Path) -> Path | None:
    """DiDi ablation: uniform ranks (no search) at the budget, then refinement."""
    return _run(zoo, opts, output, "didi_uniform")


@register_method("didi_greedy", options=DidiOptions, kind="didi", writes_artifact=True)
def didi_greedy(zoo: Zoo, opts: DidiOptions, output: Path) -> Path | None:
    """DiDi ablation: greedy marginal-gain rank allocation instead of the search, then refinement."""
    return _run(zoo, opts, output, "didi_greedy")


@register_method("didi_norefine", options=DidiOptions, kind="didi", writes_artifact=True)
def didi_norefine(zoo: Zoo, opts: DidiOptions, output: Path) -> Path | None:
    """DiDi ablation: the searched ranks with truncated-SVD factors, no LoRA refinement."""
    return _run(zoo, opts, output, "didi_norefine")


@register_method("didi_folded", options=DidiOptions, kind="didi", writes_artifact=True)
def didi_folded(zoo: Zoo, opts: DidiOptions, output: Path) -> Path | None:
    """DiDi with the shared part folded into the stored base (free): the budget goes to the experts."""
    return _run(zoo, opts, output, "didi_folded")
