"""Task vectors of a zoo, one tensor at a time: what both DiDi's decomposition and every baseline read.

Reading records every tensor's sha256 (for the manifest) and refuses integer tensors that a task changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from didi.backbones.base import TensorPlan, Zoo
from didi.errors import DidiError
from didi.sources import tensor_sha256


@dataclass
class Delta:
    """One tensor of the zoo: its plan, θ0's value and the task vectors [T, *shape] in the reader's dtype."""

    plan: TensorPlan
    base: torch.Tensor
    taus: torch.Tensor

    @property
    def zero(self) -> bool:
        return not bool(self.taus.any())  # no |τ| temporary (the reader has refused NaN and Inf)

    @property
    def is_matrix(self) -> bool:
        return self.plan.matrix_shape is not None

    def matrices(self) -> torch.Tensor:
        """Task vectors as [T, m, n] by the adapter's reshape rule (only for decomposed tensors)."""
        m, n = self.plan.matrix_shape  # type: ignore[misc]
        return self.taus.reshape(self.taus.shape[0], m, n)


def stack_taus(base: torch.Tensor, xs: list) -> torch.Tensor:
    """τ_t = θ_t − θ0 of every task as one [T, *shape] tensor, each written straight into its slot, and each
    θ_t dropped from `xs` once subtracted. Why: `torch.stack(xs).sub_(base)` copies every θ_t and then passes
    over the stack again; on 4 tasks of a Llama-1B-shaped layer those two passes were 9 % of its
    decomposition (profiled), and the θ_t stayed alive beside the stack."""
    taus = base.new_empty((len(xs), *base.shape))
    for j in range(len(xs)):
        torch.sub(xs[j], base, out=taus[j])
        xs[j] = None
    return taus


class DeltaReader:
    """Iterates a zoo's floating tensors as task vectors, recording every tensor's sha256 for the manifest."""

    def __init__(self, zoo: Zoo, dtype: torch.dtype = torch.float32) -> None:
        self.zoo, self.dtype = zoo, dtype
        self.sha256: dict[str, dict[str, str]] = {"base": {}, **{t: {} for t in zoo.task_names}}

    def __len__(self) -> int:
        return len(self.zoo.plan)

    def __iter__(self) -> Iterator[Delta]:
        for plan in self.zoo.plan:
            d = self.read(plan)
            if d is not None:
                yield d

    def read(self, plan: TensorPlan) -> Delta | None:
        """One tensor's task vectors (None for an integer tensor no task changed; one that a task changed is
        an error). A sharded decomposition reads only its own tensors this way."""
        tasks = self.zoo.task_names
        base, xs = self.zoo.read(plan.name, dtype=self.dtype)
        self.sha256["base"][plan.name] = tensor_sha256(base)
        for j, t in enumerate(tasks):
            self.sha256[t][plan.name] = tensor_sha256(xs[j])
        if not plan.dtype.is_floating_point:
            for t, x in zip(tasks, xs):
                if not torch.equal(x, base):
                    raise DidiError(
                        f"task '{t}': non-floating tensor '{plan.name}' ({plan.dtype}) "
                        f"differs from the base model; didi cannot merge integer tensors"
                    )
            return None
        return Delta(plan, base, stack_taus(base, xs))
