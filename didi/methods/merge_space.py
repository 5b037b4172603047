"""MERGE's configuration space (issue 13, item 2): per component, a partition of the T tasks into groups.

A *component* is what the adapter declares (`Adapter.component_of`: per layer `attn` and `mlp`, with their
norms and biases, plus `embed`, a head, ...); only tensors that some task changed count. A *configuration*
gives every component a partition of the tasks; each group of a partition stores one static merge of its
tasks' component deltas (Task Arithmetic, TIES or averaging, the same kernels as the registry's static
methods), and a singleton group stores its task's exact delta. Task t is served with θ0 + Σ_c module(c, group
of t in c).

**The genome** is one integer per component, k_c ∈ 1..T: the number of groups. The groups themselves come
from agglomerative clustering of the tasks' component deltas by cosine similarity (the linkage of FlexMerge,
docs/method.md §5.3: minimum pairwise similarity by default), computed once per component and deterministic
(ties go to the earlier pair), so k_c = T keeps every task exact, k_c = 1 is one static merge of all tasks,
and the partitions for k and k − 1 differ by one merge of the two most alike groups. Why this genome and not
the partitions themselves:
  - size: a component has Bell(T) partitions (4,140 at T = 8), so the raw space is Bell(T)^C; the genome's is
    T^C, and every point of it is a partition a merge would plausibly choose (tasks whose deltas point the
    same way share a module; tasks in conflict keep their own);
  - order: storage grows by exactly one module per unit of k_c, and nested partitions make neighbouring
    genomes neighbouring models, which is what crossover, mutation and a surrogate model on the genome need;
  - it is FlexMerge's per-block decision (merge the two most similar clusters, or not) reduced to one integer
    per component, searched instead of taken greedily.

**Storage** is priced by the one accounting function (`didi.accounting.storage_report`): per component, the
largest group's module is folded into the stored base (cost 0, as FlexMerge and every static merge do; ties:
the group listed first) and every other group stores its module minus the folded one once, densely, whatever
number of tasks it serves. So ratio = 1 + Σ_c (k_c − 1)·numel_c / |θ0|, from 1.0 (one static merge) to the
individual fine-tunes. `configuration_terms` writes exactly those terms in the artifact vocabulary (fold,
per-task dense terms for singletons, `groups/` terms for multi-task groups), which is what an extracted front
point stores and what the search evaluates.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import torch

from didi.accounting import Stored, storage_report
from didi.backbones.base import Zoo
from didi.errors import DidiError
from didi.merges import ties_merge
from didi.methods.common import DeltaReader, Terms
from didi.methods.flexmerge import cosine_from_gram, linkage_similarity

StaticMerge = Literal["task_arithmetic", "ties", "averaging"]
Genome = tuple[int, ...]
Group = tuple[int, ...]
Partition = list[Group]


def static_merge(taus: torch.Tensor, members: Sequence[int], how: StaticMerge, lam: float, k: float):
    """One group's module: a singleton's exact delta, else the static merge `how` of its members' deltas."""
    sub = taus[list(members)]
    if len(members) == 1:
        return sub[0]
    if how == "task_arithmetic":
        return lam * sub.sum(0)
    if how == "averaging":
        return sub.mean(0)
    if how == "ties":
        return ties_merge(sub, k, lam)
    raise DidiError(f"static_merge: expected task_arithmetic, ties or averaging, found {how!r}")


def dendrogram(gram: torch.Tensor, linkage: str = "min") -> list[Partition]:
    """Agglomerative clustering of T tasks from the Gram matrix of their deltas: `out[k - 1]` is the
    partition into k groups (k = 1..T). Cluster similarity: `linkage` (min, max or mean) of the pairwise
    cosines; the most similar pair merges first, ties to the earlier pair. Groups are sorted tuples, listed by
    their first task."""
    T = gram.shape[0]
    cos = cosine_from_gram(gram.double())
    clusters: Partition = [(t,) for t in range(T)]
    out: dict[int, Partition] = {T: list(clusters)}
    while len(clusters) > 1:
        best = None
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                s = linkage_similarity(cos, list(clusters[i]), list(clusters[j]), linkage)
                if best is None or s > best[0]:
                    best = (s, i, j)
        _, i, j = best  # type: ignore[misc]
        merged = tuple(sorted(clusters[i] + clusters[j]))
        clusters = sorted([c for n, c in enumerate(clusters) if n not in (i, j)] + [merged])
        out[len(clusters)] = list(clusters)
    return [out[k] for k in range(1, T + 1)]


def folded_index(partition: Partition) -> int:
    """The group whose module is folded into the stored base: the largest, the first listed on a tie."""
    return max(range(len(partition)), key=lambda i: (len(partition[i]), -i))


@dataclass
class Component:
    """One component of the zoo: its changed tensors (zoo order), their element count, its partitions."""

    name: str
    tensors: list[str]
    numel: int
    partitions: list[Partition]

    def partition(self, k: int) -> Partition:
        return self.partitions[k - 1]


def configuration_terms(
    tasks: Sequence[str],
    components: Sequence[tuple[str, Sequence[str]]],
    partitions: Mapping[str, Partition],
    module: Callable[[str, Group], Mapping[str, torch.Tensor]],
) -> Terms:
    """The artifact terms of a configuration: per component (name, tensors), its partition, and `module(c,
    group)` = {tensor: the group's module}. The largest group's module is folded; every other group stores its
    module minus the folded one (a singleton in its task's file, a multi-task group in `groups/`). Group ids
    g0, g1, ... follow the first appearance of each member set in component order. The search evaluates these
    terms and an extracted front point writes them, so both are the same model."""
    terms = Terms(list(tasks))
    gids: dict[Group, str] = {}
    for c, names in components:
        part = partitions[c]
        f = folded_index(part)
        folded = module(c, part[f])
        mods = [None if i == f else module(c, g) for i, g in enumerate(part)]
        for name in names:
            fold = folded[name]
            terms.fold[name] = fold
            for i, g in enumerate(part):
                if i == f:
                    continue
                delta = mods[i][name] - fold  # type: ignore[index]
                if len(g) == 1:
                    terms.per_task[tasks[g[0]]][f"{name}::dense"] = delta
                else:
                    if g not in gids:
                        gids[g] = f"g{len(gids)}"
                        terms.groups[gids[g]] = ([tasks[t] for t in g], {})
                    terms.groups[gids[g]][1][f"{name}::dense"] = delta
    return terms


def genome_text(genome: Sequence[int]) -> str:
    """A genome as one token ("3-1-4-2"), for CSV files and logs."""
    return "-".join(str(int(k)) for k in genome)


class MergeSpace:
    """The configuration space of one zoo: its components with their task partitions, the task vectors (kept
    in memory: T × the changed parameters, fp32), and the modules (group merges) computed so far.

    Build it with `MergeSpace.from_zoo(zoo, static_merge, lam, k, linkage)`: one pass over the task vectors,
    which also records every tensor's sha256 (`reader.sha256`, for the manifest) and the zoo's digest."""

    def __init__(
        self,
        tasks: list[str],
        base_params: int,
        components: list[Component],
        taus: dict[str, torch.Tensor],
        how: StaticMerge = "task_arithmetic",
        lam: float = 0.3,
        k: float = 20.0,
        digest: str = "",
    ) -> None:
        self.tasks, self.base_params, self.components = tasks, base_params, components
        self.taus, self.how, self.lam, self.k, self.digest = taus, how, lam, k, digest
        self.by_name = {c.name: c for c in components}
        self._modules: dict[tuple[str, Group], dict[str, torch.Tensor]] = {}

    @classmethod
    def from_zoo(
        cls,
        zoo: Zoo,
        how: StaticMerge = "task_arithmetic",
        lam: float = 0.3,
        k: float = 20.0,
        linkage: str = "min",
        reader: DeltaReader | None = None,
    ) -> "MergeSpace":
        reader = reader or DeltaReader(zoo)
        T = len(zoo.task_names)
        taus: dict[str, torch.Tensor] = {}
        grams: dict[str, torch.Tensor] = {}
        tensors: dict[str, list[str]] = {}
        numel: dict[str, int] = {}
        for d in reader:
            if d.zero:
                continue
            c = zoo.adapter.component_of(d.plan.name)
            flat = d.taus.reshape(T, -1).double()
            grams[c] = grams.get(c, torch.zeros(T, T, dtype=torch.float64)) + flat @ flat.T
            tensors.setdefault(c, []).append(d.plan.name)
            numel[c] = numel.get(c, 0) + d.plan.numel
            taus[d.plan.name] = d.taus
        if not tensors:
            raise DidiError("merge: no task changed any tensor of the base model; there is nothing to merge")
        comps = [Component(c, tensors[c], numel[c], dendrogram(grams[c], linkage)) for c in tensors]
        return cls(zoo.task_names, zoo.base_params, comps, taus, how, lam, k, zoo_digest(zoo, reader))

    # ------------------------------------------------------------------------------------------- genomes
    @property
    def size(self) -> int:
        """Number of configurations: T^C."""
        return len(self.tasks) ** len(self.components)

    def check(self, genome: Sequence[int], where: str = "genome") -> Genome:
        g = tuple(int(x) for x in genome)
        T = len(self.tasks)
        if len(g) != len(self.components) or any(not 1 <= x <= T for x in g):
            raise DidiError(
                f"{where}: expected {len(self.components)} integers in 1..{T} (one per component: "
                f"{', '.join(c.name for c in self.components)}), found {list(genome)}"
            )
        return g

    def partitions(self, genome: Sequence[int]) -> dict[str, Partition]:
        g = self.check(genome)
        return {c.name: c.partition(k) for c, k in zip(self.components, g)}

    def named_partitions(self, genome: Sequence[int]) -> dict[str, list[list[str]]]:
        return {c: [[self.tasks[t] for t in g] for g in p] for c, p in self.partitions(genome).items()}

    def stored(self, genome: Sequence[int]) -> list[Stored]:
        """What a configuration stores, in the accounting's terms: per component, the folded group (cost 0)
        and one dense module per other group, labelled "<component>:<task+task>"."""
        out = []
        for c, part in self.partitions(genome).items():
            f = folded_index(part)
            for i, g in enumerate(part):
                label = f"{c}:{'+'.join(self.tasks[t] for t in g)}"
                out.append(Stored("fold" if i == f else "dense", self.by_name[c].numel, label))
        return out

    def storage_ratio(self, genome: Sequence[int]) -> float:
        """The configuration's storage ratio, priced by `didi.accounting.storage_report`."""
        return float(storage_report(self.stored(genome), self.base_params)["ratio"])

    # ------------------------------------------------------------------------------------------- modules
    def module(self, component: str, group: Group) -> dict[str, torch.Tensor]:
        """{tensor: the group's module} for one component (kept: a module is computed once per search)."""
        key = (component, tuple(group))
        if key not in self._modules:
            self._modules[key] = {
                n: static_merge(self.taus[n], group, self.how, self.lam, self.k)
                for n in self.by_name[component].tensors
            }
        return self._modules[key]

    def terms(self, genome: Sequence[int]) -> Terms:
        """The artifact terms of a configuration (`configuration_terms`)."""
        comps = [(c.name, c.tensors) for c in self.components]
        t = configuration_terms(self.tasks, comps, self.partitions(genome), self.module)
        t.metrics["merge"] = {
            "genome": {c.name: k for c, k in zip(self.components, self.check(genome))},
            "partitions": self.named_partitions(genome),
        }
        return t


def zoo_digest(zoo: Zoo, reader: DeltaReader) -> str:
    """sha256 of the zoo's identity: tasks in order, |θ0|, the adapter and every tensor's sha256 (recorded by
    a full pass of `reader`). A cache or front of another zoo has another digest."""
    ident = {
        "tasks": zoo.task_names,
        "base_params": zoo.base_params,
        "adapter": {"name": zoo.adapter.registry_name, "settings": zoo.adapter.settings()},
        "sha256": reader.sha256,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
