"""FlexMerge (arXiv 2505.23209): greedy merging of per-block task clusters down to a target size. Data-free.

The model is cut into blocks: per numbered layer, one block per module directly under the layer (attention,
MLP, each norm: "attn", "mlp", "ln_1", "ln_2" for open_clip; "self_attn", "mlp", "input_layernorm", ... for
Llama), found with the adapter's `layer_of()`; outside numbered layers, one block per owning module
(embeddings, head, final norm, ...). Every block holds a partition of the T tasks, all singletons at first
(size T×). Repeatedly, over all blocks, the two clusters with the highest similarity are merged, until the
size is at most the target. Cluster similarity: the minimum pairwise cosine similarity of the member tasks'
vectors in that block (the linkage docs/method.md §5.3 calls "single linkage = minimum pairwise similarity";
in distance terms this is complete linkage; `linkage` offers `max` and `mean` too). Blocks whose tensors no
task changed hold nothing and are never merged. A cosine with a zero task vector is 0 (1 if both are zero).

A cluster's weights are its merge (Task Arithmetic by default, averaging or TIES) of its tasks' vectors; a
singleton keeps its task's exact vector. Storage, in the artifact: per block, the largest cluster's delta is
folded into the stored base (cost 0) and every other cluster stores its delta minus that one once — a
multi-task cluster in `groups/<gid>.safetensors` (one group per distinct member set; format in
`didi.artifact`), a singleton in its task's file. So ratio = 1 + Σ_blocks (clusters − 1)·numel / |θ0|,
which is exactly FlexMerge's size Σ_blocks clusters·numel / |θ| when the blocks cover the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from didi.backbones.base import Adapter, Zoo
from didi.errors import DidiError
from didi.merges import check_lambda, check_topk, ties_merge
from didi.methods.common import DeltaReader, Terms
from didi.methods.registry import register_method


def block_of(adapter: Adapter, name: str) -> str:
    """Block key of tensor `name`: "<layer>.<first module under the layer>" or "-1.<owning module>"."""
    layer, kind = adapter.layer_of(name)
    if layer >= 0:
        return f"{layer}.{kind.split('.')[0]}"
    module = name.rpartition(".")[0]
    return f"-1.{module or name}"


def linkage_similarity(cos: torch.Tensor, a: list[int], b: list[int], linkage: str = "min") -> float:
    """Similarity of clusters a, b from the tasks' pairwise cosine matrix."""
    vals = cos[a][:, b]
    if linkage == "min":
        return float(vals.min())
    if linkage == "max":
        return float(vals.max())
    return float(vals.mean())


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities from a Gram matrix G = τ τᵀ; 0 against a zero vector, 1 between two."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    zero = norms == 0
    cos[zero[:, None] & zero[None, :]] = 1.0
    return cos


@dataclass
class MergeStep:
    block: str
    a: list[int]
    b: list[int]
    similarity: float
    size_after: float


def greedy_clusters(
    grams: dict[str, torch.Tensor],
    numels: dict[str, int],
    base_params: int,
    target: float,
    linkage: str = "min",
) -> tuple[dict[str, list[list[int]]], list[MergeStep], float]:
    """FlexMerge's greedy loop. Returns (clusters per block, merge sequence, reached size ratio).

    size = 1 + Σ_b (clusters_b − 1)·numel_b / base_params; ties in similarity go to the earlier block/cluster.
    """
    blocks = list(grams)
    T = next(iter(grams.values())).shape[0] if grams else 0
    cos = {b: cosine_from_gram(grams[b].double()) for b in blocks}
    clusters = {b: [[t] for t in range(T)] for b in blocks}
    size = 1.0 + sum((T - 1) * numels[b] for b in blocks) / base_params
    steps: list[MergeStep] = []
    while size > target * (1 + 1e-12) and any(len(c) > 1 for c in clusters.values()):
        best = None
        for b in blocks:
            cs = clusters[b]
            for i in range(len(cs)):
                for j in range(i + 1, len(cs)):
                    s = linkage_similarity(cos[b], cs[i], cs[j], linkage)
                    if best is None or s > best[0]:
                        best = (s, b, i, j)
        s, b, i, j = best  # type: ignore[misc]
        a, c = clusters[b][i], clusters[b][j]
        clusters[b] = [x for k, x in enumerate(clusters[b]) if k not in (i, j)]
        clusters[b].insert(i, sorted(a + c))
        size -= numels[b] / base_params
        steps.append(MergeStep(b, a, c, s, size))
    return clusters, steps, size


@dataclass
class FlexMergeOptions:
    """FlexMerge.

    Args:
        target: size to reach, relative to one model: 1 (everything merged) to T (every fine-tune kept).
        merger: static merge of a multi-task cluster's task vectors: `ta` (λ Σ τ), `average` or `ties`.
        lam: λ of the TA or TIES merger.
        k: top-k % of the TIES merger.
        linkage: cluster similarity from pairwise cosines: `min` (docs/method.md §5.3), `max` or `mean`.
    """

    target: float = 2.0
    merger: Literal["ta", "average", "ties"] = "ta"
    lam: float = 0.3
    k: float = 20.0
    linkage: Literal["min", "max", "mean"] = "min"

    def validate(self) -> None:
        check_lambda(self.lam)
        check_topk(self.k)
        if self.merger not in ("ta", "average", "ties"):
            raise DidiError(f"merger: expected ta, average or ties, found {self.merger!r}")
        if self.linkage not in ("min", "max", "mean"):
            raise DidiError(f"linkage: expected min, max or mean, found {self.linkage!r}")
        if not self.target >= 1.0:
            raise DidiError(
                f"target: FlexMerge's size is relative to one model and cannot be below 1×, "
                f"found {self.target}"
            )


def merge_cluster(taus: torch.Tensor, members: list[int], opts: FlexMergeOptions) -> torch.Tensor:
    sub = taus[members]
    if len(members) == 1:
        return sub[0]
    if opts.merger == "ta":
        return opts.lam * sub.sum(0)
    if opts.merger == "average":
        return sub.mean(0)
    return ties_merge(sub, opts.k, opts.lam)


@register_method("flexmerge", options=FlexMergeOptions, kind="dynamic")
def flexmerge(zoo: Zoo, opts: FlexMergeOptions, reader: DeltaReader) -> Terms:
    """FlexMerge: greedily merge the most similar task clusters per block until the target size is reached."""
    tasks = zoo.task_names
    T = len(tasks)
    if opts.target > T:
        raise DidiError(
            f"target: FlexMerge's size cannot exceed T× = {T} (every fine-tune kept), found {opts.target}"
        )
    # pass 1: Gram matrix of the task vectors per block
    grams: dict[str, torch.Tensor] = {}
    numels: dict[str, int] = {}
    for d in reader:
        if d.zero:
            continue
        b = block_of(zoo.adapter, d.plan.name)
        flat = d.taus.reshape(T, -1).double()
        grams[b] = grams.get(b, torch.zeros(T, T, dtype=torch.float64)) + flat @ flat.T
        numels[b] = numels.get(b, 0) + d.plan.numel
    clusters, steps, size = greedy_clusters(grams, numels, zoo.base_params, opts.target, opts.linkage)
    # pass 2: cluster merges per tensor; the largest cluster of each block is folded into the base
    terms = Terms(tasks, target_ratio=opts.target)
    group_ids: dict[tuple[int, ...], str] = {}
    for d in reader:
        if d.zero:
            continue
        name = d.plan.name
        cs = clusters[block_of(zoo.adapter, name)]
        folded = max(cs, key=len)
        fold = merge_cluster(d.taus, folded, opts)
        terms.fold[name] = fold
        for c in cs:
            if c is folded:
                continue
            delta = merge_cluster(d.taus, c, opts) - fold
            if len(c) == 1:
                terms.per_task[tasks[c[0]]][f"{name}::dense"] = delta
            else:
                key = tuple(c)
                if key not in group_ids:
                    group_ids[key] = f"g{len(group_ids)}"
                    terms.groups[group_ids[key]] = ([tasks[i] for i in c], {})
                terms.groups[group_ids[key]][1][f"{name}::dense"] = delta
    terms.metrics["flexmerge"] = {
        "reached_size": size,
        "target": opts.target,
        "clusters": {b: [[tasks[i] for i in c] for c in cs] for b, cs in clusters.items()},
        "merges": [
            {
                "block": s.block,
                "a": [tasks[i] for i in s.a],
                "b": [tasks[i] for i in s.b],
                "similarity": s.similarity,
                "size_after": s.size_after,
            }
            for s in steps
        ],
    }
    return terms
