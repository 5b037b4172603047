"""DiDi itself and its ablations in the registry, so `didi compare` runs them like any other method.

    didi            differentiable rank search + exact budget + LoRA refinement (`didi merge`)
    didi_uniform    the same rank at every module, then refinement   (allocation = uniform)
    didi_greedy     greedy marginal-gain allocation, then refinement (allocation = greedy)
    didi_norefine   the search's ranks with the truncated SVD factors (refine.optimizer = none)
    didi_folded     the shared part folded densely into the stored base (free), the budget spent on experts

They call `didi.pipeline.run_merge`, which writes the artifact; the registry name is added to the manifest's
method entry (`method.registry_name`) so a comparison can label the point.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Union

from didi.backbones.base import Zoo
from didi.budget import parse_budget
from didi.decompose import DecomposeConfig
from didi.methods.registry import register_method
from didi.pipeline import TrainerConfig
from didi.refine import RefineConfig
from didi.search import SearchConfig


def _quiet_trainer() -> TrainerConfig:
    return TrainerConfig(logger="none", progress_bar=False)


@dataclass
class DidiOptions:
    """DiDi-Merging (and its ablations).

    Args:
        budget: storage ratio: S (1.24), M (1.4), L (2.0) or any float > 1.
        shared: `low_rank` (the paper's shared LoRA module) or `folded` (dense in the stored base, free;
            `didi_folded` forces it).
        decompose: decomposition settings (shared_merge: mean, ties, tsv_m; max_rank; dtype; device;
            cache_dir).
        search: stage-1 settings.
        refine: stage-2 settings (`didi_norefine` forces optimizer = none).
        trainer: Lightning Trainer settings (default here: no logger, no progress bar).
    """

    budget: Union[float, str] = "S"
    shared: Literal["low_rank", "folded"] = "low_rank"
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    trainer: TrainerConfig = field(default_factory=_quiet_trainer)

    def validate(self) -> None:
        self.budget = parse_budget(self.budget)


def _run(zoo: Zoo, opts: DidiOptions, output: Path, registry_name: str, allocation: str,
         refine: RefineConfig, shared: str | None = None) -> Path:
    from didi.pipeline import run_merge

    path = run_merge(zoo, output, opts.budget, opts.decompose, opts.search, refine, opts.trainer,
                     allocation, progress=False, shared=shared or opts.shared)  # type: ignore[arg-type]
    if path is not None:
        mf = Path(path) / "manifest.json"
        manifest = json.loads(mf.read_text())
        manifest["method"]["registry_name"] = registry_name
        tmp = mf.with_name(f".manifest.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, mf)
    return path


@register_method("didi", options=DidiOptions, kind="didi", writes_artifact=True)
def didi(zoo: Zoo, opts: DidiOptions, output: Path) -> Path:
    """DiDi-Merging: searched ranks at an exact storage budget, refined shared + per-task LoRA experts."""
    return _run(zoo, opts, output, "didi", "search", opts.refine)


@register_method("didi_uniform", options=DidiOptions, kind="didi", writes_artifact=True)
def didi_uniform(zoo: Zoo, opts: DidiOptions, output: Path) -> Path:
    """DiDi ablation: uniform ranks (no search) at the budget, then refinement."""
    return _run(zoo, opts, output, "didi_uniform", "uniform", opts.refine)


@register_method("didi_greedy", options=DidiOptions, kind="didi", writes_artifact=True)
def didi_greedy(zoo: Zoo, opts: DidiOptions, output: Path) -> Path:
    """DiDi ablation: greedy marginal-gain rank allocation instead of the search, then refinement."""
    return _run(zoo, opts, output, "didi_greedy", "greedy", opts.refine)


@register_method("didi_norefine", options=DidiOptions, kind="didi", writes_artifact=True)
def didi_norefine(zoo: Zoo, opts: DidiOptions, output: Path) -> Path:
    """DiDi ablation: the searched ranks with truncated-SVD factors, no LoRA refinement."""
    return _run(zoo, opts, output, "didi_norefine", "search", replace(opts.refine, optimizer="none"))


@register_method("didi_folded", options=DidiOptions, kind="didi", writes_artifact=True)
def didi_folded(zoo: Zoo, opts: DidiOptions, output: Path) -> Path:
    """DiDi with the shared part folded into the stored base (free): the budget goes to the experts."""
    return _run(zoo, opts, output, "didi_folded", "search", opts.refine, shared="folded")
