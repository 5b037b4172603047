"""Routed-expert inference: serve every task of an artifact from one model, mixed-task batches included.

`RoutedModel` takes the adapter's runnable model built from θ0 and an artifact. The terms every task shares
(fold, A_sB_s, shared dense) are added to the base weights once. Per task, a decomposed weight W gets its
expert: the artifact stores A_t (m×r) and B_t (r×n), W_t = W + A_sB_s + A_tB_t, so a row x of task t computes

    y = x Wᵀ + (x B_tᵀ) A_tᵀ                         (never forming the m×n product)

Rows of a mixed batch are grouped per task, as PEFT's `_mixed_batch_forward` does. A batch of one task takes
the fast path: W_t is materialised once and kept while the same task comes back.

Per-task terms that are not low rank ("::dense", "::mask"·"::scale"·shared "::ref", as baselines store them)
are materialised per task (cached): on a routed layer they become a dense delta of that layer; on a parameter
that no wrapper handles (an embedding, a LayerNorm subclass) the batch is split per task and each part runs
with that task's parameters swapped in. nn.MultiheadAttention (open_clip's attention) has its own wrapper that
routes its packed in-projection and its out_proj; nn.LayerNorm one that adds each row's weighted γ and β
deltas. Every method's artifact therefore runs through the same code; evaluation never special-cases one.

Experts are buffers of their routed layer (`Expert` modules: in `state_dict()`, moved and cast by `.to()`).
The routing of a batch is not stored on modules: `RoutedModel.forward` sets it in a ContextVar for the
duration of the call (`routing`, `current_routing`), so a forward is re-entrant across threads. Artifact terms
are read by `didi.artifact`'s one decoder (`Artifact.expert_terms`).

Soft routing and the shared model: `task_ids` may also be a `Mixture` (per example, the top-k tasks and their
weights, as a learned router gives them): a routed layer then adds Σ_k w_k·expert_k(x) to the shared output
of each row, still one forward for the whole batch (`didi.router` and docs/routing.md). The task id `SHARED`
(-1), or a row whose weights are all zero, gets no expert: the shared model θ0 + fold + shared terms. A
mixture whose rows each have one task of weight exactly 1 runs the hard path, bit for bit.

Extending: `register_wrapper(module_type)(factory)`, factory(module, parent, params) → a `RoutedLayer` or
None when it cannot wrap that module (e.g. nn.Linear inside an unwrapped nn.MultiheadAttention, whose
forward reads `out_proj.weight` without calling `out_proj`). A layer reads its rows with
`groups.weighted(device)`: (task, rows, weights or None for weight 1).
"""

from __future__ import annotations

import math
import threading
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from didi.artifact import LoRA, Term
from didi.errors import DidiError
from didi.registry import Registry

# ------------------------------------------------------------------------------------------------ routers
#: The task id of "no expert": the row runs through the shared model only (θ0 + fold + shared terms).
SHARED = -1


class Mixture:
    """Soft routing of a batch: row i adds Σ_k weights[i, k] · expert(ids[i, k]) to the shared model.

    `ids` (B×k, long): task indices in the artifact's order, `SHARED` (-1) for an unused slot; `weights` (B×k,
    float, ≥ 0): a slot of weight 0 adds nothing, so a row of zeros is served by the shared model alone. A
    task appears at most once per row (a router's top-k are distinct)."""

    __slots__ = ("ids", "weights")

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        ids, weights = torch.as_tensor(ids).long(), torch.as_tensor(weights)
        if ids.dim() == 1:
            ids, weights = ids[:, None], weights[:, None]
        if ids.dim() != 2 or ids.shape != weights.shape:
            raise DidiError(
                f"mixture: ids {list(ids.shape)} and weights {list(weights.shape)} must both be B×k"
            )
        if not weights.dtype.is_floating_point:
            weights = weights.float()
        if weights.numel() and not (bool(torch.isfinite(weights).all()) and float(weights.min()) >= 0):
            raise DidiError("mixture: weights must be finite and ≥ 0")
        self.ids, self.weights = ids, weights

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device: torch.device | str) -> "Mixture":
        return Mixture(self.ids.to(device), self.weights.to(device))

    def top1(self) -> torch.Tensor:
        """The task of each row's largest weight, `SHARED` for a row without any weight."""
        w, j = self.weights.max(1)
        top = self.ids.gather(1, j[:, None]).squeeze(1)
        return torch.where(w > 0, top, torch.full_like(top, SHARED))

    def hard(self) -> torch.Tensor | None:
        """Plain task ids when every row has at most one task and its weight is exactly 1 (None otherwise)."""
        used = (self.weights > 0) & (self.ids != SHARED)
        if bool((used.sum(1) > 1).any()) or bool((self.weights[used] != 1).any()):
            return None
        return self.top1()

    def signatures(self) -> list[tuple[tuple[tuple[int, float], ...], torch.Tensor]]:
        """[((task, weight) pairs of a row, the rows with exactly those pairs)]: the parameter sets a model
        with per-task swapped parameters materialises."""
        out: dict[tuple, list[int]] = {}
        for i, (row_ids, row_w) in enumerate(zip(self.ids.cpu().tolist(), self.weights.cpu().tolist())):
            key = tuple(sorted((t, w) for t, w in zip(row_ids, row_w) if w > 0 and t != SHARED))
            out.setdefault(key, []).append(i)
        return [(k, torch.tensor(v)) for k, v in out.items()]


class Router(ABC):
    """Maps a batch to one task index per example (0..T-1, in the artifact's task order; a learned router may
    also answer `SHARED` or a `Mixture`)."""

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)

    @abstractmethod
    def __call__(self, batch: Mapping[str, Any]) -> torch.Tensor: ...

    def check(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids).long().reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.tasks)):
            bad = int(ids.max()) if int(ids.max()) >= len(self.tasks) else int(ids.min())
            raise DidiError(
                f"router: task id {bad} is outside the artifact's {len(self.tasks)} tasks {self.tasks}"
            )
        return ids


class OracleRouter(Router):
    """The task id (or task name) each example carries under `key`: the paper's oracle routing."""

    def __init__(self, tasks: Sequence[str], key: str = "task_id") -> None:
        super().__init__(tasks)
        self.key = key

    def __call__(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.key not in batch:
            raise DidiError(f"oracle router: the batch has no '{self.key}' field (keys: {sorted(batch)})")
        ids = batch[self.key]
        if isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], str):
            unknown = sorted({t for t in ids if t not in self.tasks})
            if unknown:
                raise DidiError(f"oracle router: unknown task {unknown[0]!r}; the artifact has {self.tasks}")
            ids = [self.tasks.index(t) for t in ids]
        return self.check(torch.as_tensor(ids))


# ------------------------------------------------------------------------------------------- artifact terms
@dataclass
class TaskTerms:
    """One task's own terms for one tensor, as a routed layer applies them: its low-rank pairs joined into one
    pair (A, B), and every other term (dense, masked) summed into one dense delta (the tensor's shape)."""

    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @classmethod
    def of(cls, terms: Sequence[Term], shape: Sequence[int]) -> "TaskTerms":
        """Combine decoded artifact terms (`didi.artifact.decode_terms`) of one tensor."""
        tt = cls()
        for term in terms:
            if isinstance(term, LoRA):
                if tt.A is None:
                    tt.A, tt.B = term.A, term.B
                else:  # two low-rank pairs = one pair of the summed rank: [A1 A2] [B1; B2]
                    tt.A, tt.B = torch.cat([tt.A, term.A], 1), torch.cat([tt.B, term.B], 0)
            else:
                d = term.delta(shape)
                tt.dense = d if tt.dense is None else tt.dense + d
        return tt

    def delta(self, shape: Sequence[int]) -> torch.Tensor:
        d = None
        if self.A is not None:
            d = (self.A.float() @ self.B.float()).reshape(shape)
        if self.dense is not None:
            d = self.dense.float().reshape(shape) if d is None else d + self.dense.float().reshape(shape)
        return d


def artifact_terms(artifact) -> tuple[dict[str, torch.Tensor], list[dict[str, TaskTerms]]]:
    """(common delta per tensor — fold + shared low rank + shared dense —, per task {tensor: TaskTerms}).
    Group terms (task subsets) count as each member's own."""
    common = artifact.common_deltas()
    per_task = [
        {
            name: TaskTerms.of(terms, artifact.shape_of(name))
            for name, terms in artifact.expert_terms(t).items()
        }
        for t in artifact.tasks
    ]
    return common, per_task


# ------------------------------------------------------------------------------------------------ routing
class Routing:
    """Which task each row of the batch in flight belongs to: `single` (every row, the materialised fast
    path; `SHARED`: no expert) or `groups` (a mixed batch, weighted rows for soft routing). Set per forward
    call by `RoutedModel` in a ContextVar, so a forward is re-entrant: two batches in flight in two threads
    (or async tasks) each see their own routing."""

    __slots__ = ("single", "groups")

    def __init__(self, single: int | None = None, groups: "TaskGroups | None" = None) -> None:
        self.single, self.groups = single, groups


_ROUTING: ContextVar[Routing | None] = ContextVar("didi_routing", default=None)


@contextmanager
def routing(r: Routing) -> Iterator[Routing]:
    """Routed layers called inside this block route rows by `r` (restored on exit, also on error)."""
    token = _ROUTING.set(r)
    try:
        yield r
    finally:
        _ROUTING.reset(token)


def current_routing() -> Routing:
    r = _ROUTING.get()
    if r is None:
        raise DidiError("routed layer called without routing (call RoutedModel with task_ids)")
    return r


# ------------------------------------------------------------------------------------------- routed layers
class RoutedLayer(nn.Module):
    """A wrapped module: per row, the task's expert is added. The rows' tasks come from `current_routing()`
    (set by `RoutedModel.forward`), never from state on the module."""

    batch_dim: int = 0

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


class Expert(nn.Module):
    """One task's terms on one layer as buffers, so they are in `state_dict()` and `.to()` moves and casts
    them: "A" (m×r) and "B" (r×n) of the weight, "D" a dense weight delta, "db" a dense bias delta."""

    def terms(self) -> dict[str, torch.Tensor]:
        return self._buffers  # type: ignore[return-value]


def _drop_materialised(module: "RoutedLinear", incompatible_keys: Any) -> None:
    """load_state_dict hook: weights or experts were changed in place; the fast path's W_t is recomputed."""
    module._active = None


def _check_rows(x: torch.Tensor, groups: "TaskGroups", bd: int) -> None:
    if x.shape[bd] != groups.rows:
        raise DidiError(
            f"routed layer: input has {x.shape[bd]} rows along dim {bd}, the router gave "
            f"{groups.rows} task ids"
        )


def _take_rows(x: torch.Tensor, rows: "slice | torch.Tensor", bd: int) -> torch.Tensor:
    """The rows of one task along the batch dim: a view for a slice (contiguous rows), else a gather."""
    return x[(slice(None),) * bd + (rows,)] if isinstance(rows, slice) else x.index_select(bd, rows)


def _add_rows(
    y: torch.Tensor, rows: "slice | torch.Tensor", d: torch.Tensor, w: torch.Tensor | None, bd: int
) -> None:
    """y[rows] += w·d along the batch dim, in place (an out-of-place add copies y per task); `w`: the rows'
    weights under soft routing (None: weight 1)."""
    if w is not None:
        d = d * w.to(d.dtype).view((1,) * bd + (-1,) + (1,) * (d.dim() - bd - 1))
    if isinstance(rows, slice):  # rows of one task are contiguous: a view, added in place
        y[(slice(None),) * bd + (rows,)] += d.to(y.dtype)
    else:
        y.index_add_(bd, rows, d.to(y.dtype))


class ExpertLayer(RoutedLayer):
    """A routed layer around a `base` module that keeps its tasks' terms itself, one `Expert` per task in
    `experts`; `weight` and `bias` are the base's, for code that reads them through the wrapper."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.experts = nn.ModuleDict()  # str(task) -> Expert

    @property
    def weight(self) -> torch.Tensor | None:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def expert_terms(self, task: int) -> dict[str, torch.Tensor]:
        """Task `task`'s expert tensors on this layer ({} when it has none)."""
        e = self.experts._modules.get(str(task))
        return e.terms() if e is not None else {}

    def _expert(self, task: int) -> Expert:
        """Task `task`'s Expert, created empty on first use."""
        if str(task) not in self.experts:
            self.experts[str(task)] = Expert()
        return self.experts[str(task)]


class RoutedLinear(ExpertLayer):
    """nn.Linear with per-task experts (low rank on the weight, dense deltas on the weight and the bias)."""

    def __init__(self, base: nn.Linear, batch_dim: int = 0) -> None:
        super().__init__(base)
        self.batch_dim = batch_dim
        # the fast path's W_t, b_t: (task, weakrefs of the expert tensors it was made from, W_t, b_t). `.to()`
        # replaces those tensors exactly when it moves or casts the weights, which makes the entry stale;
        # load_state_dict changes them in place, so it drops the entry
        self._active: tuple[int, tuple, torch.Tensor, torch.Tensor | None] | None = None
        self.register_load_state_dict_post_hook(_drop_materialised)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_active": None}  # a derived cache, and weakrefs do not pickle

    def add_expert(self, task: int, param: str, terms: TaskTerms) -> None:
        """Attach task `task`'s terms for `param` ("weight" or "bias")."""
        ref = getattr(self.base, param)
        e = self._expert(task)
        if param == "weight" and terms.A is not None:
            e.register_buffer("A", terms.A.to(ref.dtype))
            e.register_buffer("B", terms.B.to(ref.dtype))
        dense = None
        if param == "bias" and terms.A is not None:
            dense = terms.delta(ref.shape)
        elif terms.dense is not None:
            dense = terms.dense.reshape(ref.shape)
        if dense is not None:
            key = "D" if param == "weight" else "db"
            old = e.terms().get(key)
            e.register_buffer(key, dense.to(ref.dtype) if old is None else old + dense.to(ref.dtype))
        self._active = None

    def materialised(self, task: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_t, b_t of one task (kept while the same task comes back)."""
        e = self.expert_terms(task)
        if not e:
            b = self.base.bias
            return self.base.weight.detach(), None if b is None else b.detach()
        made_of = tuple(e.values())
        a = self._active  # one read: another thread may replace it meanwhile
        if (
            a is not None
            and a[0] == task
            and len(a[1]) == len(made_of)
            and all(r() is t for r, t in zip(a[1], made_of))
        ):
            return a[2], a[3]
        W, b = self.base.weight, self.base.bias
        if "A" in e:
            W = W + (e["A"] @ e["B"]).view_as(W)
        if "D" in e:
            W = W + e["D"]
        if "db" in e:
            b = e["db"] if b is None else b + e["db"]
        W, b = W.detach(), None if b is None else b.detach()
        self._active = (task, tuple(weakref.ref(t) for t in made_of), W, b)
        return W, b

    def expert(self, x: torch.Tensor, task: int) -> torch.Tensor | None:
        e = self.expert_terms(task)
        if not e:
            return None
        d = None
        if "A" in e:
            d = self._lowrank(x, e["A"], e["B"])
        if "D" in e:
            dd = self._run(x, e["D"], None)
            d = dd if d is None else d + dd
        if "db" in e:
            d = self._bias(e["db"], x) if d is None else d + self._bias(e["db"], x)
        return d

    # the three operations a layer type defines (nn.Linear here; RoutedConv2d overrides them)
    def _run(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, W, b)

    def _lowrank(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return (x @ B.T) @ A.T  # never the m×n product

    def _bias(self, db: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return db.expand(*x.shape[:-1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = current_routing()
        if r.single is not None:
            W, b = self.materialised(r.single)
            return self._run(x, W, b)
        a = self._active
        if a is not None and a[2].device != x.device:
            self._active = None  # left on another device by a `.to()`: free it
        y = self.base(x)
        bd = self.batch_dim
        _check_rows(x, r.groups, bd)
        for t, rows, w in r.groups.weighted(x.device):
            d = self.expert(_take_rows(x, rows, bd), t)
            if d is not None:
                _add_rows(y, rows, d, w, bd)
        return y


class TaskGroups:
    """The rows of each task in one batch, [(task, rows, weights)]: rows a slice when the task's rows are
    contiguous (sorted batches), else an index tensor; weights None (weight 1, hard routing) or the rows'
    weights for that task (a `Mixture`). Rows routed to `SHARED` belong to no group. Built once per forward
    and shared by every routed layer; index tensors are moved to a device once."""

    def __init__(self, ids: "torch.Tensor | Mixture") -> None:
        self._on: dict[torch.device, list] = {}
        if isinstance(ids, Mixture):
            self.rows = len(ids)
            used = (ids.weights > 0) & (ids.ids != SHARED)
            self._cpu = []
            for t in torch.unique(ids.ids[used]).tolist():
                hit = used & (ids.ids == t)
                rows = hit.any(1).nonzero().squeeze(1)
                self._cpu.append((t, rows, (ids.weights * hit).sum(1)[rows]))
            return
        self.rows = ids.numel()
        uniq, counts = torch.unique_consecutive(ids, return_counts=True)
        if uniq.numel() == torch.unique(ids).numel():  # every task appears in one run
            bounds = [0, *torch.cumsum(counts, 0).tolist()]
            groups = [(t, slice(bounds[i], bounds[i + 1])) for i, t in enumerate(uniq.tolist())]
        else:
            groups = [(t, (ids == t).nonzero().squeeze(1)) for t in torch.unique(ids).tolist()]
        self._cpu = [(t, r, None) for t, r in groups if t != SHARED]

    def weighted(self, device: torch.device) -> list[tuple[int, "slice | torch.Tensor", torch.Tensor | None]]:
        """[(task, rows, weights or None)] with index tensors and weights on `device`."""
        if device not in self._on:
            self._on[device] = [
                (t, r if isinstance(r, slice) else r.to(device), None if w is None else w.to(device))
                for t, r, w in self._cpu
            ]
        return self._on[device]

    def on(self, device: torch.device) -> list[tuple[int, "slice | torch.Tensor"]]:
        """[(task, rows)] of hard routing (a layer that cannot weight its experts calls this one)."""
        if any(w is not None for _, _, w in self._cpu):
            raise DidiError("routed layer: this layer type cannot mix experts (soft routing); use top_k 1")
        return [(t, r) for t, r, _ in self.weighted(device)]


WrapperFactory = Callable[[nn.Module, "nn.Module | None", set], "RoutedLayer | None"]
#: module type → factory(module, parent, params) giving its routed layer (exact type or subclass); a second,
#: different factory for a type is refused by the registry, the same one again (a reload) is a no-op.
WRAPPERS: Registry[WrapperFactory] = Registry("routed-layer wrapper")


def register_wrapper(module_type: type) -> Callable[[WrapperFactory], WrapperFactory]:
    """Decorator: `factory(module, parent, params)` wraps `module_type` modules (exact type or subclass)."""
    return WRAPPERS.register(module_type)


class RoutedConv2d(RoutedLinear):
    """nn.Conv2d (open_clip's patch embedding `conv1`) whose kernel decomposes as an (out, in·kh·kw) matrix.

    A (out×r) B (r×in·kh·kw) reshaped to the kernel is the convolution with B as r filters followed by a 1×1
    convolution with A (convolution is linear in the output channels), so the expert costs r channels, not
    a second full kernel.
    """

    def _run(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return self.base._conv_forward(x, W.view_as(self.base.weight), b)

    def _lowrank(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        c = self.base
        h = F.conv2d(x, B.view(B.shape[0], *c.weight.shape[1:]), None, c.stride, c.padding, c.dilation)
        return F.conv2d(h, A[:, :, None, None])

    def _bias(self, db: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return db[:, None, None]


@register_wrapper(nn.Conv2d)
def _wrap_conv2d(module: nn.Module, parent: nn.Module | None, params: set) -> RoutedLayer | None:
    plain = module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    return RoutedConv2d(module) if plain and params <= {"weight", "bias"} else None


@register_wrapper(nn.Linear)
def _wrap_linear(module: nn.Module, parent: nn.Module | None, params: set) -> RoutedLayer | None:
    if isinstance(parent, nn.MultiheadAttention) or not params <= {"weight", "bias"}:
        return None  # MHA reads out_proj.weight directly; its forward never calls the Linear
    return RoutedLinear(module)


class RoutedLayerNorm(ExpertLayer):
    """nn.LayerNorm with per-task dense deltas on its weight (γ) and bias (β), as TALL-masks, Twin, EMR and
    TSV-C store them.

    LayerNorm's output x̂·γ + β is linear in (γ, β), so a row adds Σ_k w_k·(x̂·δγ_k + δβ_k) to the base output:
    a mixed batch stays one pass, exact. Swapping the parameters instead runs one forward per distinct mixture
    (with soft routing, about one per row). Each task's Expert holds "dw" (δγ) and/or "db" (δβ)."""

    def add_expert(self, task: int, param: str, terms: TaskTerms) -> None:
        ref = getattr(self.base, param)
        e, key = self._expert(task), "dw" if param == "weight" else "db"
        d = terms.delta(ref.shape).to(ref.dtype)
        old = e.terms().get(key)
        e.register_buffer(key, d if old is None else old + d)

    def _affine(self, task: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        t = self.expert_terms(task)
        w, b = self.base.weight, self.base.bias
        return (w + t["dw"] if "dw" in t else w), (b + t["db"] if "db" in t else b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = current_routing()
        ln = self.base
        if r.single is not None:
            w, b = self._affine(r.single)  # SHARED has no expert: the base γ, β
            return F.layer_norm(x, ln.normalized_shape, w, b, ln.eps)
        y = ln(x)
        _check_rows(x, r.groups, 0)
        xhat = None  # x̂, the normalised input, computed once if some row has an expert
        for t, rows, w in r.groups.weighted(x.device):
            terms = self.expert_terms(t)
            if not terms:
                continue
            if xhat is None:
                xhat = F.layer_norm(x, ln.normalized_shape, None, None, ln.eps)
            xr = _take_rows(xhat, rows, 0)
            d = xr * terms["dw"] if "dw" in terms else torch.zeros_like(xr)
            if "db" in terms:
                d = d + terms["db"]
            _add_rows(y, rows, d, w, 0)
        return y


@register_wrapper(nn.LayerNorm)
def _wrap_layer_norm(module: nn.Module, parent: nn.Module | None, params: set) -> RoutedLayer | None:
    # subclasses (open_clip's casting LayerNorm, fp32 variants) compute differently: they keep swapping
    return RoutedLayerNorm(module) if type(module) is nn.LayerNorm and params <= {"weight", "bias"} else None


class RoutedMultiheadAttention(RoutedLayer):
    """nn.MultiheadAttention (open_clip's attention) with per-task experts on its packed in-projection.

    nn.MultiheadAttention hands `in_proj_weight` and `out_proj.weight` to a fused kernel, so neither can be
    routed from outside. This layer computes the same attention itself: the in-projection is a `RoutedLinear`
    over the module's own `in_proj_weight`/`in_proj_bias` Parameters (shared, not copied), attention runs in
    `scaled_dot_product_attention` (explicit softmax when `need_weights`), and `out_proj` stays a submodule
    that `RoutedModel` wraps as a routed nn.Linear. Masks follow nn.MultiheadAttention: a boolean mask marks
    positions that may NOT be attended, a float mask is added to the scores; `attn_mask` is (L, S) or
    (B·H, L, S), `key_padding_mask` is (B, S). Cross-attention (query is not key) projects each input
    separately; kdim/vdim ≠ embed_dim, bias_k/bias_v and add_zero_attn are not wrapped (None from the factory:
    those parameters fall back to per-task swapping).
    """

    _PARAMS = {"in_proj_weight": "weight", "in_proj_bias": "bias"}

    def __init__(self, base: nn.MultiheadAttention) -> None:
        super().__init__()
        self.base = base
        self.batch_dim = 0 if base.batch_first else 1
        packed = nn.Linear(
            base.embed_dim, 3 * base.embed_dim, bias=base.in_proj_bias is not None, device="meta"
        )
        packed.weight = base.in_proj_weight  # the same Parameter objects: folds and .to() reach both
        packed.bias = base.in_proj_bias
        self.in_proj = RoutedLinear(packed)
        self.out_proj = base.out_proj  # RoutedModel replaces it by a RoutedLinear when it has expert terms

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.base.in_proj_weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.base.in_proj_bias

    def add_expert(self, task: int, param: str, terms: TaskTerms) -> None:
        self.in_proj.add_expert(task, self._PARAMS[param], terms)

    def _mask(self, attn_mask, key_padding_mask, is_causal: bool, B: int, L: int, S: int, dtype, device):
        H = self.base.num_heads
        mask = None

        def as_float(m: torch.Tensor) -> torch.Tensor:
            return (
                torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf"))
                if m.dtype == torch.bool
                else m.to(dtype)
            )

        if attn_mask is None and is_causal:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=device).triu(1)
        if attn_mask is not None:
            m = as_float(attn_mask)
            mask = m.view(B, H, L, S) if m.dim() == 3 else m.view(1, 1, L, S)
        if key_padding_mask is not None:
            k = as_float(key_padding_mask).view(B, 1, 1, S)
            mask = k if mask is None else mask + k
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.base
        unbatched = query.dim() == 2
        self_attn = query is key and key is value
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            bd = 1
        else:
            bd = self.batch_dim
        if bd == 1:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        E, H = base.embed_dim, base.num_heads
        if self_attn:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:  # each input through the packed projection, its own third kept
            q = self.in_proj(query)[..., :E]
            k = self.in_proj(key)[..., E : 2 * E]
            v = self.in_proj(value)[..., 2 * E :]
        B, L, S = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (z.reshape(B, -1, H, E // H).transpose(1, 2) for z in (q, k, v))
        mask = self._mask(attn_mask, key_padding_mask, is_causal, B, L, S, q.dtype, q.device)
        p = base.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(E // H)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            o = F.dropout(weights, p) @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        o = self.out_proj(o.transpose(1, 2).reshape(B, L, E))
        if bd == 1:
            o = o.transpose(0, 1)
        if unbatched:
            o = o.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return o, weights


@register_wrapper(nn.MultiheadAttention)
def _wrap_mha(module: nn.Module, parent: nn.Module | None, params: set) -> RoutedLayer | None:
    ok = (
        module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
        and params <= set(RoutedMultiheadAttention._PARAMS)
    )
    return RoutedMultiheadAttention(module) if ok else None


def _find_wrapper(module: nn.Module) -> WrapperFactory | None:
    for cls in type(module).__mro__:
        factory = WRAPPERS.find(cls)
        if factory is not None:
            return factory
    return None


# --------------------------------------------------------------------------------------------- the model
def _slice(obj: Any, rows: torch.Tensor, B: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, rows.to(obj.device)) if obj.dim() and obj.shape[0] == B else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_slice(o, rows, B) for o in obj)
    if isinstance(obj, dict):
        return type(obj)({k: _slice(v, rows, B) for k, v in obj.items()})
    return obj


def _gather(parts: list[tuple[torch.Tensor, Any]], B: int) -> Any:
    """Reassemble per-group outputs into batch order."""
    first = parts[0][1]
    if isinstance(first, torch.Tensor):
        if not first.dim():
            raise DidiError("routed model: per-example outputs are needed to split a batch per task")
        out = first.new_empty((B, *first.shape[1:]))
        for rows, o in parts:
            out[rows.to(o.device)] = o
        return out
    if isinstance(first, (list, tuple)):
        return type(first)(_gather([(r, o[i]) for r, o in parts], B) for i in range(len(first)))
    if isinstance(first, dict):
        vals = {k: _gather([(r, o[k]) for r, o in parts], B) for k in first}
        try:
            return type(first)(**vals)
        except TypeError:
            return type(first)(vals)
    if first is None:
        return None
    raise DidiError(f"routed model: cannot reassemble outputs of type {type(first).__name__}")


#: Held by the forward of a model with per-task swapped parameters (they are shared state, set per task).
_SWAP_LOCK = threading.RLock()


class RoutedModel(nn.Module):
    """θ0 + shared (folded once) + per-example experts chosen by `task_ids` (from a `Router`).

    Args:
        model: the adapter's runnable model built from θ0 (its weights are changed in place).
        artifact: a loaded artifact (any method: DiDi or a baseline).
        adapter: locates each tensor inside `model` (default: the artifact's adapter).
        prefix: module path of the adapter's model inside `model` (e.g. "encoder.").
        router: optional; `route(batch)` uses it.
        cache_tasks: per-task parameter sets kept for unwrapped parameters (None: all).

    `fast_path` (attribute, default True): a one-task batch runs on materialised weights; set it to False to
    route such a batch row by row like a mixed one (tests compare the two).
    """

    fast_path: bool = True

    def __init__(
        self,
        model: nn.Module,
        artifact,
        adapter=None,
        prefix: str = "",
        router: Router | None = None,
        cache_tasks: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tasks = artifact.tasks
        self.router = router
        self.cache_tasks = cache_tasks
        adapter = adapter or artifact.adapter()
        if adapter.registry_name != artifact.manifest["adapter"]["name"]:
            raise DidiError(
                f"{artifact.path}: made with adapter '{artifact.manifest['adapter']['name']}', "
                f"not '{adapter.registry_name}'"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        common, per_task = artifact_terms(artifact)
        locs: dict[str, tuple[str, str]] = {}
        for name in set(common) | {n for terms in per_task for n in terms}:
            mod, pname = adapter.locate(name)
            mod = prefix.rstrip(".") + ("." if prefix and mod else "") + mod if prefix else mod
            locs[name] = (mod, pname)
            param = self._param(mod, pname, name, artifact)
            if name in common:
                with torch.no_grad():
                    param.add_(common[name].reshape(param.shape).to(param.dtype))
        # per-task terms: wrap modules that have a wrapper, swap the rest per task
        by_module: dict[str, set[str]] = {}
        for terms in per_task:
            for name in terms:
                by_module.setdefault(locs[name][0], set()).add(locs[name][1])
        for mod in list(by_module):  # a wrapped MHA is what lets its out_proj be routed: wrap it too
            up = mod.rpartition(".")[0]
            if "." in mod and isinstance(self.model.get_submodule(up), nn.MultiheadAttention):
                by_module.setdefault(up, set())
        self.routed: dict[str, RoutedLayer] = {}
        wrapped: set[str] = set()
        for mod, params in sorted(by_module.items()):
            module = self.model.get_submodule(mod)
            parent = (
                self.model.get_submodule(mod.rpartition(".")[0])
                if "." in mod
                else (self.model if mod else None)
            )
            factory = _find_wrapper(module)
            layer = factory(module, parent, params) if factory else None
            if layer is None:
                continue
            self._replace(mod, layer)
            self.routed[mod] = layer
            wrapped.add(mod)
        self.swapped: dict[str, tuple[str, str]] = {}
        self._swap_terms: list[dict[str, TaskTerms]] = [{} for _ in per_task]
        for j, terms in enumerate(per_task):
            for name, tt in terms.items():
                mod, pname = locs[name]
                if mod in wrapped:
                    self.routed[mod].add_expert(j, pname, tt)
                else:
                    self.swapped[name] = (mod, pname)
                    self._swap_terms[j][name] = tt
        self._base_values = {n: self._get(m, p).detach().clone() for n, (m, p) in self.swapped.items()}
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._current: int | None = None

    # ------------------------------------------------------------------------------------------ helpers
    def _param(self, mod: str, pname: str, name: str, artifact) -> torch.Tensor:
        try:
            module = self.model.get_submodule(mod)
        except AttributeError:
            raise DidiError(
                f"{artifact.path}: tensor '{name}' has no module '{mod}' in the runnable "
                f"{type(self.model).__name__} (artifact and backbone do not match)"
            ) from None
        p = getattr(module, pname, None)
        if not isinstance(p, torch.Tensor):
            raise DidiError(
                f"{artifact.path}: tensor '{name}' is not a parameter of module '{mod}' "
                f"({type(module).__name__}); artifact and backbone do not match"
            )
        shape = tuple(artifact.manifest["tensors"][name]["shape"])
        if tuple(p.shape) != shape:
            raise DidiError(
                f"{artifact.path}: tensor '{name}' has shape {list(shape)} in the artifact, the "
                f"model has {list(p.shape)} (artifact and backbone do not match)"
            )
        return p

    def _get(self, mod: str, pname: str) -> torch.Tensor:
        m = self.model.get_submodule(mod)
        return getattr(m.base if isinstance(m, RoutedLayer) and hasattr(m, "base") else m, pname)

    def _replace(self, path: str, new: nn.Module) -> None:
        parent_path, _, attr = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, attr, new)

    def _task_values(self, task: int) -> dict[str, torch.Tensor]:
        if task == SHARED:
            return self._base_values
        if task in self._cache:
            self._cache.move_to_end(task)
            return self._cache[task]
        vals = {}
        for name, base in self._base_values.items():
            tt = self._swap_terms[task].get(name)
            vals[name] = (
                base if tt is None else (base.float() + tt.delta(base.shape).to(base.device)).to(base.dtype)
            )
        self._cache[task] = vals
        if self.cache_tasks is not None:
            while len(self._cache) > max(1, self.cache_tasks):
                self._cache.popitem(last=False)
        return vals

    def _set_swapped(self, task: int) -> None:
        if self._current == task or not self.swapped:
            return
        vals = self._task_values(task)
        for name, (mod, pname) in self.swapped.items():
            self._get(mod, pname).data = vals[name]
        self._current = task

    def _set_mixed(self, pairs: tuple[tuple[int, float], ...]) -> None:
        """Swapped parameters of soft-routed rows: base + Σ_k w_k·delta_k (not cached: rows rarely repeat)."""
        for name, (mod, pname) in self.swapped.items():
            base = self._base_values[name]
            v = base.float()
            for t, w in pairs:
                tt = self._swap_terms[t].get(name)
                if tt is not None:
                    v = v + w * tt.delta(base.shape).to(base.device)
            self._get(mod, pname).data = v.to(base.dtype)
        self._current = None

    def _apply(
        self, fn, recurse=True
    ):  # the swap path's base values and per-task cache (experts are buffers)
        super()._apply(fn, recurse)
        self._base_values = {k: fn(v) for k, v in self._base_values.items()}
        self._cache.clear()
        self._current = None
        if self.swapped:
            for name, (mod, pname) in self.swapped.items():  # parameters now hold the base values again
                self._get(mod, pname).data = self._base_values[name]
        return self

    # ------------------------------------------------------------------------------------------ forward
    def route(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.router is None:
            raise DidiError("routed model: no router given")
        return self.router(batch)

    def _check_ids(self, task_ids) -> "torch.Tensor | Mixture":
        """Task ids on the CPU (a tensor, or a Mixture whose rows are not all one task at weight 1)."""
        if isinstance(task_ids, str):
            if task_ids not in self.tasks:
                raise DidiError(f"routed model: unknown task {task_ids!r}; tasks: {self.tasks}")
            task_ids = self.tasks.index(task_ids)
        mix = task_ids.to("cpu") if isinstance(task_ids, Mixture) else None
        ids = mix.ids if mix is not None else torch.as_tensor(task_ids).long().reshape(-1).cpu()
        if ids.numel() and (int(ids.min()) < SHARED or int(ids.max()) >= len(self.tasks)):
            bad = int(ids.max()) if int(ids.max()) >= len(self.tasks) else int(ids.min())
            raise DidiError(
                f"routed model: task id {bad} is outside the {len(self.tasks)} tasks {self.tasks} "
                f"({SHARED}: the shared model)"
            )
        if mix is not None:
            hard = mix.hard()
            return hard if hard is not None else mix
        return ids

    def _run_single(self, task: int, args, kwargs) -> Any:
        self._set_swapped(task)
        with routing(Routing(single=task)):
            return self.model(*args, **kwargs)

    def forward(self, *args, task_ids, **kwargs) -> Any:
        """Run `model(*args, **kwargs)`; example i uses task `task_ids[i]` (a tensor, an int or a task name:
        one task for the whole batch; `SHARED` = no expert), or the experts and weights of row i of a
        `Mixture` (soft routing).

        The routing lives in a ContextVar for the duration of the call, so batches may be in flight in several
        threads at once. Parameters swapped per task (no wrapper) are model state: such models serialise their
        forwards on a lock instead."""
        ids = self._check_ids(task_ids)
        if isinstance(ids, Mixture):
            return self._forward_mixed(ids, args, kwargs)
        uniq = torch.unique(ids).tolist()
        if not uniq:
            raise DidiError("routed model: empty batch")
        with _SWAP_LOCK if self.swapped else nullcontext():
            if len(uniq) == 1 and self.fast_path:
                return self._run_single(uniq[0], args, kwargs)
            if not self.swapped:
                with routing(Routing(groups=TaskGroups(ids))):
                    return self.model(*args, **kwargs)
            B = ids.numel()
            parts = []
            for t in uniq:
                rows = (ids == t).nonzero().squeeze(1)
                parts.append((rows, self._run_single(t, _slice(args, rows, B), _slice(kwargs, rows, B))))
            return _gather(parts, B)

    def _forward_mixed(self, mix: Mixture, args, kwargs) -> Any:
        """Soft routing: one pass when every per-task term sits on a routed layer; else the rows are split by
        their (task, weight) pairs, each part run with its mixed swapped parameters."""
        if not len(mix):
            raise DidiError("routed model: empty batch")
        if not self.swapped:
            with routing(Routing(groups=TaskGroups(mix))):
                return self.model(*args, **kwargs)
        B = len(mix)
        parts = []
        with _SWAP_LOCK:
            for pairs, rows in mix.signatures():
                self._set_mixed(pairs)
                sub = Mixture(mix.ids[rows], mix.weights[rows])
                with routing(Routing(groups=TaskGroups(sub))):
                    parts.append((rows, self.model(*_slice(args, rows, B), **_slice(kwargs, rows, B))))
            self._set_swapped(SHARED)  # the parameters hold the shared values again
        return _gather(parts, B)
