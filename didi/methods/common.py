"""What every tensor-streaming method shares: reading task vectors tensor by tensor, and writing the artifact.

Methods read one tensor of θ0 and of every task at a time (`Zoo.read`, fp32), so peak input memory is one
tensor × (T + 1); they return `Terms` in the artifact vocabulary (fold / shared / per-task / group terms) and
`write_method_artifact` writes them with the same manifest keys as `didi merge`, priced by the same
accounting.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from didi.artifact import write_artifact, zoo_manifest
from didi.backbones.base import Zoo
from didi.errors import DidiError
from didi.linalg import svd
from didi.methods.registry import get_method
from didi.task_vectors import Delta, DeltaReader  # noqa: F401  (methods take a DeltaReader)


@dataclass
class Terms:
    """A method's output before writing: terms keyed "<tensor>::<kind>" (fold keyed by tensor name)."""

    tasks: list[str]
    fold: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    per_task: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    groups: dict[str, tuple[list[str], dict[str, torch.Tensor]]] = field(default_factory=dict)
    ranks: dict[str, dict[str, int]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    target_ratio: float | None = None

    def __post_init__(self) -> None:
        for t in self.tasks:
            self.per_task.setdefault(t, {})

    def add_lora(self, owner: dict[str, torch.Tensor], name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        owner[f"{name}::lora_A"], owner[f"{name}::lora_B"] = A.contiguous(), B.contiguous()


def lora_from_svd(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r truncated SVD of M (m×n) as A = U_r√Σ_r (m×r), B = √Σ_r V_rᵀ (r×n)."""
    U, S, Vh = svd(M)
    sq = S[:r].sqrt()
    return U[:, :r] * sq, sq[:, None] * Vh[:r]


def write_method_artifact(
    output: str | Path, zoo: Zoo, reader: DeltaReader, method: str, options: Any, terms: Terms
) -> Path:
    """Write `terms` as a didi artifact (manifest keys as `didi.pipeline.write_didi_artifact`)."""
    manifest = {
        "method": {"name": method, "hyper_parameters": dataclasses.asdict(options)},
        **zoo_manifest(zoo, reader.sha256),
        "ranks": terms.ranks,
        "storage": {"target_ratio": terms.target_ratio},
        "metrics": terms.metrics,
    }
    return write_artifact(
        output, manifest, terms.fold, terms.shared, terms.per_task, groups=terms.groups or None
    )


def apply_method(name: str, zoo: Zoo, output: str | Path, options: Any = None) -> Path:
    """Run registered method `name` on `zoo` with `options` (dataclass, dict or None); write its artifact."""
    spec = get_method(name)
    opts = spec.make_options(options)
    output = Path(output)
    if output.exists():
        raise DidiError(f"{output}: output directory already exists; choose another path or delete it")
    t0 = time.perf_counter()
    if spec.writes_artifact:
        return spec.fn(zoo, opts, output)
    reader = DeltaReader(zoo)
    terms = spec.fn(zoo, opts, reader)
    terms.metrics["wall_time_s"] = time.perf_counter() - t0
    return write_method_artifact(output, zoo, reader, name, opts, terms)
