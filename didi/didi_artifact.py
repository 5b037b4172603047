"""DiDi's results in the artifact format: refined factors, folded shared parts and non-matrix deltas as the
terms `didi.artifact.write_artifact` stores, with the manifest of a DiDi merge (ranks, allocation and
refinement metrics, the registry name of the variant) and the rank heatmap.
"""

from __future__ import annotations

from pathlib import Path

import torch

from didi import jsonio
from didi.allocation import Policy, Ranks, policy_fn
from didi.artifact import write_artifact, zoo_manifest
from didi.backbones.base import Zoo
from didi.callbacks import rank_heatmap_png
from didi.decompose import FactorStore
from didi.tensorfile import LazyTensor, lazy_tensors


def nonmatrix_terms(store: FactorStore, policy: Policy) -> tuple[dict, dict]:
    """Non-matrix deltas: mean folded into the base (`shared`) or exact per task (`per_task`), as
    LazyTensors read from the factor store when the artifact is written (a per-task Llama embedding is
    0.5 G elements per task)."""
    fold, tasks = {}, {t: {} for t in store.tasks}
    for name, meta in store.nonmatrix.items():
        if meta["zero"]:
            continue
        if policy_fn(policy)(name) == "shared":
            fold[name] = LazyTensor(
                tuple(meta["shape"]),
                torch.float32,
                lambda name=name: torch.stack(list(store.nonmatrix_deltas(name).values())).mean(0),
            )
        else:
            per_task = lazy_tensors(store.nonmatrix_path(name))
            for t in store.tasks:
                tasks[t][f"{name}::dense"] = per_task[t]
    return fold, tasks


def _in_source_dtype(t: LazyTensor, dtype: torch.dtype) -> LazyTensor:
    """A folded shared matrix in its checkpoint's dtype when that is narrower than fp32: the fold replaces the
    base tensor, so a bf16 Llama-3.1-8B's fold is 16 GB, not 32 GB; rounding the delta to bf16 costs far less
    than the bf16 rounding of θ0 + delta that serving does anyway."""
    if not dtype.is_floating_point or torch.finfo(dtype).bits >= 32:
        return t
    return LazyTensor(t.shape, dtype, lambda: t.load().to(dtype))


def write_didi_artifact(
    output: str | Path,
    zoo: Zoo,
    store: FactorStore,
    ranks: Ranks,
    shared: dict,
    tasks: dict,
    hyper: dict,
    metrics: dict,
    method: str = "didi",
) -> Path:
    """Write a DiDi merge atomically; `method` is the registry name of the variant (didi, didi_greedy, ...),
    recorded in the manifest before the rename (nothing is rewritten afterwards)."""
    fold, nm_tasks = nonmatrix_terms(store, zoo.adapter.policy_of)
    for t in tasks:
        tasks[t].update(nm_tasks[t])
    folded = [k for k in shared if k.endswith("::fold")]
    dtypes = {p.name: p.dtype for p in zoo.matrices}
    for k in folded:
        name = k[: -len("::fold")]
        fold[name] = _in_source_dtype(shared[k], dtypes.get(name, torch.float32))
    shared = {k: v for k, v in shared.items() if k not in folded}
    manifest = {
        "method": {"name": "didi", "registry_name": method, "hyper_parameters": hyper},
        **zoo_manifest(zoo, store.sha256),
        **ranks.to_json(store),
        "storage": {
            "target_ratio": ranks.info.get("target_ratio"),
            **(
                {"priced_in": ranks.info["storage"], "expert_dtype": ranks.info["expert_dtype"]}
                if "storage" in ranks.info
                else {}
            ),
        },
        "metrics": {"allocation": ranks.info, "refine": metrics},
    }
    png = rank_heatmap_png(
        store.matrices,
        ranks.r_s,
        ranks.r_t,
        title=f"DiDi ranks at {ranks.info.get('ratio', 0):.4g}x"
        + (" (shared part folded into the base)" if folded else ""),
        kind_label=zoo.adapter.kind_label,
    )
    ranks_json = jsonio.dumps(ranks.to_json(store), indent=1).encode()
    return write_artifact(
        output, manifest, fold, shared, tasks, extra_files={"rank_heatmap.png": png, "ranks.json": ranks_json}
    )
