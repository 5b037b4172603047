"""The adapter base class: how didi reads one model family tensor by tensor and which tensors it decomposes.

An `Adapter` is configuration only (name patterns, the non-matrix policy, reshape rules). `Zoo` binds an
adapter to θ0 and the task checkpoints, checks they fit together before any heavy compute, and plans what
happens to every tensor. A new family subclasses `Adapter` and overrides the few hooks it needs (see README).
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import torch

from didi.errors import DidiError
from didi.sources import TensorSource, require_path

NonMatrixPolicy = Literal["shared", "per_task"]


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one tensor: decomposed as an m×n matrix, or handled by the non-matrix policy."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    matrix_shape: tuple[int, int] | None  # None: not decomposed
    layer: int  # block index for plots (-1: outside the blocks)
    kind: str  # matrix kind for plots ("attn.in_proj_weight", "mlp.c_fc.weight", ...)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers?|blocks?|resblocks|h|encoder\.layer)\.(\d+)\.")


class Adapter:
    """Generic state-dict adapter; families override `scope`, `is_decomposed`, reshape rules, `build_model`.

    Args:
        include: fnmatch patterns; when given, only matching tensors are decomposed (others follow the
            non-matrix policy).
        exclude: fnmatch patterns of tensors never decomposed.
        nonmatrix_policy: `shared` folds the mean delta of non-matrix tensors into the stored base (cost 0);
            `per_task` keeps each task's exact delta (counted in the budget).
    """

    registry_name: str = "state_dict"
    #: tensor ranks decomposed as matrices: 2-D weights; families with conv kernels add 4 (reshaped to
    #: (out, in·kh·kw) by `matrix_shape`)
    matrix_ndims: tuple[int, ...] = (2,)

    def __init__(
        self,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        nonmatrix_policy: NonMatrixPolicy = "shared",
    ) -> None:
        if nonmatrix_policy not in ("shared", "per_task"):
            raise DidiError(f"nonmatrix_policy: expected 'shared' or 'per_task', found {nonmatrix_policy!r}")
        self.include = list(include) if include else None
        self.exclude = list(exclude or [])
        self.nonmatrix_policy = nonmatrix_policy

    # ------------------------------------------------------------------------------------- family hooks
    def open_source(self, path: str | Path, allow_pickle: bool = False) -> TensorSource:
        """Open one checkpoint; families with other layouts override this."""
        return TensorSource(path, allow_pickle=allow_pickle)

    def in_scope(self, name: str) -> bool:
        """Whether a tensor belongs to the merged model (and to |θ0|). Default: every tensor."""
        return True

    def is_decomposed(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Default: each floating tensor of `matrix_ndims` dimensions, subject to include/exclude patterns."""
        if not dtype.is_floating_point or len(shape) not in self.matrix_ndims or min(shape) < 1:
            return False
        return self._pattern_ok(name)

    def _pattern_ok(self, name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        return self.include is None or any(fnmatch.fnmatchcase(name, p) for p in self.include)

    def matrix_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
        """Reshape rule: (out, in, kh, kw) → (out, in·kh·kw); 2-D stays as it is."""
        return (shape[0], math.prod(shape[1:]))

    def layer_of(self, name: str) -> tuple[int, str]:
        """(block index, matrix kind) for rank plots; -1 for tensors outside numbered blocks."""
        m = _LAYER_RE.search(name)
        if not m:
            return -1, name
        return int(m.group(1)), name[m.end() :]

    def kind_label(self, kind: str) -> str | None:
        """Short column label of a matrix kind in the rank heatmap; None: the generic shortener of
        `didi.callbacks.kind_labels` ("attention.self.query.weight" → "q"). Families with opaque names
        override it."""
        return None

    def policy_of(self, name: str) -> NonMatrixPolicy:
        """Non-matrix policy of one tensor that is not decomposed; families override it per tensor (e.g. Llama
        embeddings per task while norms are shared)."""
        return self.nonmatrix_policy

    def locate(self, name: str) -> tuple[str, str]:
        """(module path, parameter name) of tensor `name` inside `build_model()`'s module (routed wrapping).

        Default: state-dict names are module paths, so "blocks.0.mlp.fc.weight"
        → ("blocks.0.mlp.fc", "weight").
        """
        module, _, param = name.rpartition(".")
        return module, param

    def build_model(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A runnable model from a state dict; the generic adapter has no architecture to build."""
        raise NotImplementedError(f"adapter '{self.registry_name}' cannot build a runnable model")

    # ------------------------------------------------------------------------------------ components
    #: how `component_of` groups tensors, in words (`didi backbones --components` prints it when the adapter
    #: cannot list its tensors without a checkpoint)
    component_rule: str = (
        "per layer: layer.{i} (one component per numbered block); else the name's first segment"
    )

    #: inside a numbered block, the name prefixes (after the block's own prefix, as `layer_of` returns them)
    #: of the attention and of the MLP component; norms and biases are listed with the component they belong
    #: to. Empty: a block is one component.
    attn_parts: tuple[str, ...] = ()
    mlp_parts: tuple[str, ...] = ()

    def component_of(self, name: str) -> str:
        """The component tensor `name` belongs to: `layer.{i}.attn` / `layer.{i}.mlp` inside numbered blocks
        (by `attn_parts` / `mlp_parts`; `layer.{i}` for the rest of a block, or for the whole block when the
        family declares no parts), else `outside_component`."""
        layer, part = self.layer_of(name)
        if layer < 0:
            return self.outside_component(name)
        if part.startswith(self.attn_parts):
            return f"layer.{layer}.attn"
        if part.startswith(self.mlp_parts):
            return f"layer.{layer}.mlp"
        return f"layer.{layer}"

    def outside_component(self, name: str) -> str:
        """The component of a tensor outside the numbered blocks; generic: its name's first path segment.
        Families name `embed` and `head` here."""
        return name.split(".", 1)[0]

    def components(self, names: Iterable[str]) -> dict[str, list[str]]:
        """{component: tensor names}: components in the order of their first tensor, names in their order."""
        out: dict[str, list[str]] = {}
        for n in names:
            out.setdefault(self.component_of(n), []).append(n)
        return out

    def listing_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """In-scope tensor names and shapes of the adapter's default (or preset) architecture, without any
        checkpoint, for `didi backbones --components`; None when the architecture needs a checkpoint."""
        return None

    def settings(self) -> dict:
        """What the manifest records so that a later load can rebuild the same adapter."""
        return {"include": self.include, "exclude": self.exclude, "nonmatrix_policy": self.nonmatrix_policy}


@dataclass
class Zoo:
    """θ0 plus named task checkpoints, bound to an adapter and checked for compatibility (no SVD yet)."""

    adapter: Adapter
    base: str
    tasks: dict[str, str]
    allow_pickle: bool = False
    plan: list[TensorPlan] = field(init=False)
    base_params: int = field(init=False)

    def __post_init__(self) -> None:
        self.tasks = parse_tasks(self.tasks)
        require_path(self.base, "base (θ0)")
        for t, p in self.tasks.items():
            require_path(p, f"task '{t}'")
        self.base_source = self.adapter.open_source(self.base, self.allow_pickle)
        self.task_sources = {t: self.adapter.open_source(p, self.allow_pickle) for t, p in self.tasks.items()}
        self._check_and_plan()

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def matrices(self) -> list[TensorPlan]:
        return [p for p in self.plan if p.matrix_shape is not None]

    @property
    def nonmatrices(self) -> list[TensorPlan]:
        return [p for p in self.plan if p.matrix_shape is None]

    def _check_and_plan(self) -> None:
        a, src = self.adapter, self.base_source
        names = [n for n in src.keys() if a.in_scope(n)]
        if not names:
            raise DidiError(f"{self.base}: no tensors in the scope of adapter '{a.registry_name}'")
        base_set = set(names)
        for t, ts in self.task_sources.items():
            tnames = {n for n in ts.keys() if a.in_scope(n)}
            missing, extra = sorted(base_set - tnames), sorted(tnames - base_set)
            if missing:
                raise DidiError(
                    f"task '{t}' ({self.tasks[t]}): tensor '{missing[0]}' of the base model is missing"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            if extra:
                raise DidiError(
                    f"task '{t}' ({self.tasks[t]}): tensor '{extra[0]}' is not in the base model "
                    f"{self.base}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                )
            for n in names:
                if ts.shape(n) != src.shape(n):
                    raise DidiError(
                        f"task '{t}': tensor '{n}' has shape {list(ts.shape(n))}, "
                        f"the base model has {list(src.shape(n))}"
                    )
        plan = []
        for n in names:
            shape, dtype = src.shape(n), src.dtype(n)
            ms = a.matrix_shape(n, shape) if a.is_decomposed(n, shape, dtype) else None
            layer, kind = a.layer_of(n)
            plan.append(TensorPlan(n, tuple(shape), dtype, ms, layer, kind))
        self.plan = plan
        self.base_params = sum(p.numel for p in plan if p.dtype.is_floating_point)

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """θ0's tensor and every task's, cast to `dtype`; NaN/Inf anywhere is an error naming the source."""
        out = [
            _finite(label, s, name, s.get(name, dtype) if isinstance(s, TensorSource) else s.get(name), dtype)
            for label, s in [("base", self.base_source), *self.task_sources.items()]
        ]
        return out[0], out[1:]

    def read_rows(
        self, name: str, start: int, stop: int, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Rows [start:stop) along dim 0 of θ0's tensor and of every task's, checked and cast as `read` does.

        Why: didi.streamed decomposes and refines a matrix too large for T+1 copies in memory a row block at a
        time; only the bytes of those rows are read from each checkpoint.
        """
        out = [
            _finite(label, s, name, s.get_rows(name, start, stop, dtype), dtype)  # a TensorSource
            for label, s in [("base", self.base_source), *self.task_sources.items()]
        ]
        return out[0], out[1:]


def _finite(label: str, source: TensorSource, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating tensor (or rows of one) cast to `dtype` (a `TensorSource` casts as it copies out of the map;
    an adapter's own source view may return any dtype); NaN/Inf is an error naming the source, so that a
    broken checkpoint is named instead of poisoning every SVD."""
    if t.dtype.is_floating_point:
        t = t.to(dtype)
        # a NaN or Inf anywhere makes the sum non-finite: the element-wise test (10× slower) runs only then
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            where = "the base model" if label == "base" else f"task '{label}'"
            raise DidiError(f"{where} ({source.path}): tensor '{name}' contains NaN or Inf")
    return t


def parse_tasks(tasks: dict[str, str] | Sequence[str]) -> dict[str, str]:
    """Tasks as {name: path}, or a list of `name=path` / plain paths (name = file or directory stem)."""
    if isinstance(tasks, dict):
        items = [(str(k), str(v)) for k, v in tasks.items()]
    else:
        items = []
        for spec in tasks:
            spec = str(spec)
            if "=" in spec and not Path(spec).exists():
                k, v = spec.split("=", 1)
            else:
                k, v = Path(spec).name.split(".")[0], spec
            items.append((k, v))
    names = [k for k, _ in items]
    dup = sorted({k for k in names if names.count(k) > 1})
    if dup:
        raise DidiError(f"tasks: duplicate task name(s) {dup}; give each task a unique name (name=path)")
    if len(items) == 0:
        raise DidiError("tasks: no tasks given; pass at least two fine-tuned models")
    if len(items) == 1:
        raise DidiError(f"tasks: only one task ({names[0]}); merging needs at least two fine-tuned models")
    for k, _ in items:
        if not k or "/" in k or k.startswith("."):
            raise DidiError(f"tasks: invalid task name {k!r} (it names a file in the artifact)")
    by_file: dict[Path, list[str]] = {}
    for k, v in items:
        by_file.setdefault(Path(v).expanduser().resolve(), []).append(k)
    for f, ks in by_file.items():
        if len(ks) > 1:
            warnings.warn(
                f"tasks: {f} is given under {len(ks)} names ({', '.join(ks)}); they are merged as "
                f"separate tasks with identical weights",
                UserWarning,
                stacklevel=2,
            )
    return dict(items)
