"""Calibrated decomposition (opt-in, `didi merge --calibration DATA`; docs/method.md §8).

With a few hundred unlabelled inputs per task, DiDi can minimise each linear layer's output error on those
inputs, ‖(M̃ − τ)X‖, instead of the weight error ‖M̃ − τ‖. Forward hooks on θ0 collect the second moment
XXᵀ/N of every hookable matrix's input (one batch at a time: only n×n sums are kept, never the activations),
C = chol(XXᵀ/N + ε·mean(diag)·I), and the whole pipeline then runs on the whitened task vectors τC through a
`WhitenedZoo` (a zoo whose task vectors are τC): the SVDs, the closed form, the allocators and the refinement
act on τC exactly as on τ, so they are exact in the whitened metric ‖(M̃ − τ)C‖. The factors are mapped back
(B ← B C⁻¹, a folded shared part M ← M C⁻¹) before the artifact is written; the storage is unchanged.

    whiten_zoo(zoo, opts) -> (WhitenedZoo, opts)     run_merge's hook: moments, whiteners, the store's cache
    second_moments(zoo, data, ...) -> Moments       θ0's forward hooks over each task's validation inputs
    whiteners(moments, mode, eps) -> {name: C}      Cholesky factors (C [n,n], or [T,n,n] per task)
    WhitenedZoo.unwhiten(store, shared, tasks)      the factors back in the weights' coordinates

Modes: `pooled` (one C per matrix from the mean of the tasks' second moments; both layouts) and `per_task`
(C_t per task; only exact where each task's part is solved alone: `--shared folded` with the shared part
fixed, `--refine.optimizer none`). Which matrices: a 2-D weight of an `nn.Linear` called by θ0's forward
(`weight`), or the `in_proj_weight` of a self-attention `nn.MultiheadAttention`; embeddings, conv kernels,
matrices whose module the forward does not call with its input (open_clip's attention `out_proj`, which
`nn.MultiheadAttention` applies functionally) stay data-free (C = I: not whitened).
"""

from __future__ import annotations

import copy
import hashlib
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from didi.backbones.base import Zoo
from didi.errors import DidiError
from didi.merges import SHARED_MERGES, shared_merge_fn
from didi.sources import tensor_sha256
from didi.task_vectors import stack_taus
from didi.tensorfile import LazyTensor

MODES = ("pooled", "per_task")
SCALES = ("output", "unit")
#: the store's shared merge in per-task mode: the whitened experts are (τ_t − M_s)C_t already, the shared part
#: M_s (the data-free merge of τ) is added back when the artifact is written
ZERO_MERGE = "calibration_per_task"


@SHARED_MERGES.register(ZERO_MERGE)
def _zero_merge(taus: torch.Tensor) -> torch.Tensor:
    """No shared part (the per-task calibrated store: its task vectors are already the experts' targets)."""
    return torch.zeros_like(taus[0])


# -------------------------------------------------------------------------------------------- options
def check_options(
    data: Mapping[str, str] | None, mode: str, eps: float, examples: int, max_length: int, shared: str,
    refine_optimizer: str, scale: str = "output",
) -> None:  # fmt: skip
    """Refuse bad calibration settings before anything is read (the tasks are checked by `check_tasks`)."""
    if data is None:
        return
    if not isinstance(data, Mapping):
        raise DidiError(f"calibration: expected a mapping {{task: validation path}}, found {data!r}")
    if not data:
        raise DidiError("calibration: no calibration data given (one {task: path} entry per task of the zoo)")
    if mode not in MODES:
        raise DidiError(f"calibration_mode: expected pooled or per_task, found {mode!r}")
    if scale not in SCALES:
        raise DidiError(f"calibration_scale: expected output or unit, found {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise DidiError(
            f"calibration_eps: expected a finite number ≥ 0 (relative to the mean diagonal), found {eps!r}"
        )
    for name, v in (("calibration_examples", examples), ("calibration_max_length", max_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DidiError(f"{name}: expected a positive integer, found {v!r}")
    if mode == "per_task" and (shared != "folded" or refine_optimizer != "none"):
        raise DidiError(
            f"calibration_mode per_task: needs --shared folded and --refine.optimizer none, found shared "
            f"{shared!r}, refine.optimizer {refine_optimizer!r}. A per-task metric C_t is exact only where "
            f"each task's part is solved alone: the folded experts against a fixed shared part. A low-rank "
            f"shared module, or the refinement's update of the folded shared part, is one matrix for every "
            f"task and would be fitted in T different metrics at once; use --calibration_mode pooled there"
        )


def check_tasks(data: Mapping[str, str], tasks: Sequence[str]) -> None:
    """The calibration data must name exactly the zoo's tasks."""
    unknown = [t for t in data if t not in tasks]
    missing = [t for t in tasks if t not in data]
    if unknown or missing:
        raise DidiError(
            f"calibration: the data's tasks {list(data)} differ from the zoo's {list(tasks)}"
            + (f"; not in the zoo: {unknown}" if unknown else "")
            + (f"; no data for: {missing}" if missing else "")
            + " (give one {task: validation path} entry per task of the zoo)"
        )


# ------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """A decomposed matrix whose input θ0's forward shows to a hook: its module and how the input is read."""

    name: str
    module: str
    how: str  # "linear" (args[0] of an nn.Linear) or "mha" (the query of a self-attention MultiheadAttention)
    width: int  # n: the matrix is m×n and acts as y = W x on inputs of width n


def targets(zoo: Zoo, model: nn.Module) -> dict[str, Target]:
    """The zoo's decomposed matrices that can be calibrated, by name (the others stay data-free)."""
    out = {}
    for p in zoo.matrices:
        if len(p.shape) != 2:
            continue  # conv kernels: their input is an unfolded patch, not hooked
        module, param = zoo.adapter.locate(p.name)
        try:
            mod = model.get_submodule(module)
        except AttributeError:
            continue
        if isinstance(mod, nn.Linear) and param == "weight" and tuple(mod.weight.shape) == p.shape:
            out[p.name] = Target(p.name, module, "linear", p.shape[1])
        elif (
            isinstance(mod, nn.MultiheadAttention)
            and param == "in_proj_weight"
            and getattr(mod, "in_proj_weight", None) is not None
            and tuple(mod.in_proj_weight.shape) == p.shape
        ):
            out[p.name] = Target(p.name, module, "mha", p.shape[1])
    return out


# --------------------------------------------------------------------------------------- second moments
@dataclass
class Moments:
    """Per task and calibrated matrix: Σ x xᵀ over the input rows (tokens) the matrix saw, and their count.

    `sums[name][t]` is [n, n] (accumulated in float64, kept in float32 once the task is read); `rows[name][t]`
    the number of rows; `examples[t]` the inputs read."""

    tasks: list[str]
    targets: dict[str, Target]
    sums: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    rows: dict[str, list[int]] = field(default_factory=dict)
    examples: list[int] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it stays data-free


class _Collector:
    """Forward pre-hooks adding x xᵀ of each target's input rows into the current task's sums. The batch's
    token mask (padding excluded) is set before each forward."""

    def __init__(self, model: nn.Module, moments: Moments) -> None:
        self.m, self.task, self.mask, self.batch = moments, 0, None, 0
        self.handles = []
        for name, tg in moments.targets.items():
            hook = self._hook(name, tg)
            self.handles.append(
                model.get_submodule(tg.module).register_forward_pre_hook(hook, with_kwargs=True)
            )

    def _hook(self, name: str, tg: Target):
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in self.m.skipped:
                return
            if tg.how == "mha":
                q = args[0] if args else kwargs.get("query")
                k = args[1] if len(args) > 1 else kwargs.get("key")
                v = args[2] if len(args) > 2 else kwargs.get("value")
                if k is not q or v is not q:
                    self.m.skipped[name] = "cross-attention (key/value differ from the query)"
                    return
                x = q
            else:
                x = args[0] if args else kwargs.get("input")
            rows = self._rows(x, getattr(mod, "batch_first", True) if tg.how == "mha" else True)
            if rows is None or rows.shape[-1] != tg.width:
                self.m.skipped[name] = f"input of shape {tuple(x.shape)} does not fit width {tg.width}"
                return
            r = rows.float()
            s = (r.T @ r).double().cpu()
            acc = self.m.sums[name]
            acc[self.task] = s if acc[self.task] is None else acc[self.task].add_(s)
            self.m.rows[name][self.task] += int(r.shape[0])

        return pre

    def _rows(self, x: Any, batch_first: bool) -> torch.Tensor | None:
        """The input's rows [N, n]: every token of the batch's real inputs (padding dropped by the mask)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return None
        B = self.batch
        if x.dim() == 2:
            return x if x.shape[0] == B else None
        if x.shape[1] == B and (not batch_first or x.shape[0] != B):  # sequence first: [S, B, ..., n]
            x = x.transpose(0, 1)
        if x.shape[0] != B:
            return None
        x = x.reshape(B, -1, x.shape[-1])
        if self.mask is not None and tuple(self.mask.shape) == tuple(x.shape[:2]):
            return x[self.mask.to(x.device).bool()]
        return x.reshape(-1, x.shape[-1])

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _collate(zoo: Zoo, model: nn.Module, kind: str, max_length: int):
    """The batch builder of the router's readers: tokeniser (θ0's, from its directory) or image transform."""
    if kind == "text":
        from didi.datamodules.text import TextCollate, load_tokenizer

        return TextCollate(load_tokenizer(zoo.base), max_length)
    from didi.datamodules.image import collate_images, open_clip_transform

    return collate_images, open_clip_transform(model)


def _loader(kind: str, collate, inputs: list, task: int, batch_size: int):
    from torch.utils.data import DataLoader

    items = [(x, 0, task) for x in inputs]
    if kind == "text":
        from didi.datamodules.text import TaggedExamples

        return DataLoader(TaggedExamples(items), batch_size=batch_size, collate_fn=collate)
    from didi.datamodules.image import TaggedImages

    fn, transform = collate
    return DataLoader(TaggedImages(items, transform), batch_size=batch_size, collate_fn=fn)


def run_model(model: nn.Module, kind: str, batch: Mapping[str, torch.Tensor]) -> None:
    """θ0's forward on one batch (its output is not used: the hooks read the inputs)."""
    if kind == "text":
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch})
    else:
        model.encode_image(batch["pixel_values"])


def second_moments(
    zoo: Zoo,
    data: Mapping[str, str],
    examples: int = 256,
    max_length: int = 128,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Moments:
    """Σ x xᵀ of every calibrated matrix's input over each task's first `examples` validation inputs (the
    router's reader: a directory is read at validation.jsonl / val.jsonl / train.jsonl, never test), θ0's
    forward run task by task with hooks; nothing but the n×n sums is kept."""
    from didi.router import input_kind, validation_inputs

    check_tasks(data, zoo.task_names)
    kind = input_kind(zoo.adapter, "calibration", "merge without --calibration")
    inputs = validation_inputs(data, zoo.task_names, kind, "auto", examples)
    model = zoo.adapter.build_model(dict(zoo.base_source.items())).eval().requires_grad_(False).to(device)
    tg = targets(zoo, model)
    if not tg:
        raise DidiError(
            f"calibration: none of the zoo's decomposed matrices is a linear layer of θ0 that a hook can see "
            f"(adapter '{zoo.adapter.registry_name}'); nothing to calibrate"
        )
    T = len(zoo.task_names)
    mom = Moments(zoo.task_names, tg, {n: [None] * T for n in tg}, {n: [0] * T for n in tg}, [0] * T)
    col = _Collector(model, mom)
    collate = _collate(zoo, model, kind, max_length)
    try:
        with torch.no_grad():
            for j, t in enumerate(zoo.task_names):
                where, items = inputs[t]
                if progress:
                    print(
                        f"didi: calibration: {len(items)} inputs of task {t!r} from {where}", file=sys.stderr
                    )
                for batch in _loader(kind, collate, items, j, batch_size):
                    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    col.task, col.mask = j, batch.get("attention_mask")
                    col.batch = int(batch["task_id"].shape[0])
                    run_model(model, kind, batch)
                mom.examples[j] = len(items)
                for sums in mom.sums.values():  # a finished task's sums kept in float32: half the memory
                    if sums[j] is not None:
                        sums[j] = sums[j].float()
    finally:
        col.close()
    for name in list(tg):
        if name not in mom.skipped and not any(mom.rows[name]):
            mom.skipped[name] = "its module was not called by θ0's forward"
    for name in mom.skipped:
        tg.pop(name, None)
        mom.sums.pop(name, None)
        mom.rows.pop(name, None)
    return mom


# ------------------------------------------------------------------------------------------ whiteners
def cholesky_factor(second: torch.Tensor, eps: float, name: str = "", unit: bool = False) -> torch.Tensor:
    """C = chol(S + ε·d·I), lower triangular, float64 (S = XXᵀ/N, n×n, d = mean(diag S)); `unit`: divided
    by √d, so that mean(diag CCᵀ) = 1 + ε whatever the inputs' scale."""
    S = second.double()
    d = float(torch.diagonal(S).mean())
    if not d > 0:
        raise DidiError(f"calibration: matrix '{name}': its inputs are all zero on the calibration data")
    S = S + eps * d * torch.eye(S.shape[0], dtype=S.dtype)
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0:
        raise DidiError(
            f"calibration: matrix '{name}': the second moment of its inputs is singular (Cholesky failed at "
            f"column {int(info)}) with calibration_eps {eps}; give calibration_eps > 0 or more varied inputs"
        )
    return L / d**0.5 if unit else L


def whiteners(mom: Moments, mode: str, eps: float, scale: str = "output") -> dict[str, torch.Tensor]:
    """{name: C}: [n, n] (pooled: from the mean over the tasks of each task's XXᵀ/N_t, every task weighted
    equally) or [T, n, n] (per task); `scale` `unit` divides each C by √(mean diagonal) (docs/method.md §8).
    A second moment of rank < n is refused, whatever ε: it needs at least n input rows (tokens for
    token-level layers, inputs for one row per input), pooled over the tasks or, per task, in each task; the
    message says how many examples that takes."""
    out = {}
    for name, tg in mom.targets.items():
        rows, n = mom.rows[name], tg.width
        have = sum(rows) if mode == "pooled" else min(rows)
        if have < n:
            t = int(torch.tensor(rows).argmin())
            per_ex = max(rows[t], 1) / max(mom.examples[t], 1)  # rows per input, in the poorest task
            need = math.ceil(n / per_ex / (len(rows) if mode == "pooled" else 1))
            where = "over all tasks" if mode == "pooled" else f"for task {mom.tasks[t]!r}"
            raise DidiError(
                f"calibration: matrix '{name}' (input width {n}) saw {have} input rows {where} "
                f"({rows[t]} from {mom.examples[t]} examples of task {mom.tasks[t]!r}): its second moment "
                f"has rank < {n}, and the whitened metric would ignore the directions the data never shows "
                f"(ε only hides that). It needs ≥ {n} rows (tokens for token-level layers): about {need} "
                f"examples per task (--calibration_examples, and as many validation inputs)"
            )
        if mode == "pooled":
            S = sum(s / r for s, r in zip(mom.sums[name], rows)) / len(rows)
            out[name] = cholesky_factor(S, eps, name, scale == "unit")
        else:
            out[name] = torch.stack(
                [cholesky_factor(s / r, eps, name, scale == "unit") for s, r in zip(mom.sums[name], rows)]
            )
    return out


def whiteners_digest(W: Mapping[str, torch.Tensor], mode: str) -> str:
    """A key of the whitening (mode, names, factors' bytes): the factor store of a calibrated merge is cached
    under it."""
    h = hashlib.sha256(mode.encode())
    for name in sorted(W):
        h.update(name.encode())
        h.update(W[name].contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def uncolor(B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """B C⁻¹ (C lower triangular): a right factor or dense matrix of the whitened problem, mapped back."""
    out = torch.linalg.solve_triangular(C.double(), B.double(), upper=False, left=False)
    return out.to(B.dtype)


# ------------------------------------------------------------------------------------------ the zoo
class WhitenedZoo(Zoo):
    """The zoo seen in the whitened metric. Pooled: a calibrated matrix's θ0 tensor reads as zeros and task
    t's as τ_t C. Per task: every decomposed matrix's task t reads as (τ_t − M_s)C_t, M_s the data-free shared
    merge of τ (C_t = I for a matrix that is not calibrated), and the store takes no shared part of its own.
    τ is formed in float64 from the checkpoints first, so every stage computes on the whitened task vectors
    exactly; every other tensor reads as in `original`. Built by `wrap`, never from paths."""

    original: Zoo
    whitening: dict[str, torch.Tensor]
    mode: str
    shared_merge: str
    info: dict

    @classmethod
    def wrap(cls, zoo: Zoo, whitening: dict[str, torch.Tensor], mode: str, shared_merge: str, info: dict):
        z = cls.__new__(cls)
        z.__dict__.update(zoo.__dict__)
        z.original, z.whitening, z.mode, z.shared_merge, z.info = zoo, whitening, mode, shared_merge, info
        return z

    def covers(self, name: str) -> bool:
        """Whether `name` reads differently from the checkpoints (its factors are mapped back)."""
        if self.mode == "per_task":
            return any(p.name == name for p in self.original.matrices)
        return name in self.whitening

    def _whiten(self, name: str, base: torch.Tensor, xs: list[torch.Tensor], dtype: torch.dtype):
        shape = base.shape
        taus = torch.stack(xs).double().sub_(base.double())
        C = self.whitening.get(name)
        if self.mode == "per_task":
            plan = next(p for p in self.original.matrices if p.name == name)
            taus = taus.reshape(len(xs), *plan.matrix_shape)
            taus = taus - shared_merge_fn(self.shared_merge)(taus)
            w = [tau if C is None else tau @ C[t] for t, tau in enumerate(taus)]
        else:
            w = [tau @ C for tau in taus]
        return torch.zeros(shape, dtype=dtype), [x.reshape(shape).to(dtype) for x in w]

    def read(self, name: str, dtype: torch.dtype = torch.float32):
        if not self.covers(name):
            return self.original.read(name, dtype)
        base, xs = self.original.read(name, torch.float64)
        return self._whiten(name, base, xs, dtype)

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype = torch.float32):
        if not self.covers(name):
            return self.original.read_rows(name, start, stop, dtype)
        if self.mode == "per_task":  # the shared merge needs whole matrices: per-task stores never stream
            raise DidiError(f"calibration: '{name}' cannot be read by rows in per_task mode")
        base, xs = self.original.read_rows(name, start, stop, torch.float64)
        return self._whiten(name, base, xs, dtype)

    def source_sha256(self, sha: dict[str, dict[str, str]], dtype: torch.dtype) -> dict[str, dict[str, str]]:
        """The store's per-tensor sha256 with those of the tensors read whitened replaced by the checkpoints'
        own (as the data-free reader records them, in `dtype`), one source tensor in memory at a time: the
        manifest names the sources, not their whitened reading."""
        out = {k: dict(v) for k, v in sha.items()}
        sources = [("base", self.original.base_source), *self.original.task_sources.items()]
        for p in self.original.matrices:
            if not self.covers(p.name):
                continue
            for label, src in sources:
                if p.name in out.get(label, {}):
                    out[label][p.name] = tensor_sha256(src.get(p.name).to(dtype))
        return out

    def unwhiten(self, store, shared: dict, tasks: dict, metrics: dict):
        """(original zoo, store with the sources' sha256, shared terms, task terms): every right factor of a
        calibrated matrix times C⁻¹ (C_t⁻¹ for task t's expert), a folded shared part times C⁻¹, or, per task,
        the data-free shared merge of τ itself. The ranks, shapes and storage are unchanged."""
        dims = {e.name: (e.m, e.n) for e in store.matrices}
        shared = dict(shared)
        for key, t in list(shared.items()):
            name, _, kind = key.rpartition("::")
            if not self.covers(name):
                continue
            if self.mode == "per_task" and kind == "fold":
                shared[key] = LazyTensor(tuple(t.shape), t.dtype, _SharedMerge(self, name, tuple(t.shape)))
            elif kind in ("lora_B", "fold"):
                shared[key] = _uncolored(t, self.whitening[name], dims[name])
        tasks = {t: dict(terms) for t, terms in tasks.items()}
        for j, t in enumerate(store.tasks):
            for key, x in list(tasks[t].items()):
                name, _, kind = key.rpartition("::")
                if kind == "lora_B" and name in self.whitening:
                    C = self.whitening[name]
                    tasks[t][key] = _uncolored(x, C[j] if self.mode == "per_task" else C, dims[name])
        fixed = copy.copy(store)
        fixed.sha256 = self.source_sha256(store.sha256, getattr(torch, store.meta["config"]["dtype"]))
        metrics["calibration"] = self.info
        return self.original, fixed, shared, tasks


def _uncolored(t: Any, C: torch.Tensor, mn: tuple[int, int]) -> LazyTensor:
    """A LazyTensor of t·C⁻¹: t a right factor (r×n) or a folded shared part (the m×n matrix in its tensor's
    shape), read and mapped back when the artifact is written."""

    def load() -> torch.Tensor:
        x = t.load() if isinstance(t, LazyTensor) else t
        rows = x.reshape(-1, mn[1])
        return uncolor(rows, C).reshape(x.shape)

    return LazyTensor(tuple(t.shape), t.dtype, load)


class _SharedMerge:
    """The data-free shared merge of one matrix's task vectors in its tensor's shape, read when the artifact
    is written (per-task mode's fold: the experts were fitted against it)."""

    def __init__(self, zoo: WhitenedZoo, name: str, shape: tuple[int, ...]) -> None:
        self.zoo, self.name, self.shape = zoo, name, shape

    def __call__(self) -> torch.Tensor:
        base, xs = self.zoo.original.read(self.name, torch.float64)
        plan = next(p for p in self.zoo.original.matrices if p.name == self.name)
        taus = stack_taus(base, xs).reshape(len(xs), *plan.matrix_shape)
        return shared_merge_fn(self.zoo.shared_merge)(taus).float().reshape(self.shape)


# ---------------------------------------------------------------------------------------- the hook
def whiten_zoo(zoo: Zoo, opts, progress: bool = True):
    """`run_merge`'s hook for `--calibration`: second moments of θ0's inputs, whiteners, and (WhitenedZoo,
    opts whose factor store is cached under the whitening's digest and, per task, defined with no shared
    part). Nothing is written."""
    check_options(
        opts.calibration, opts.calibration_mode, opts.calibration_eps, opts.calibration_examples,
        opts.calibration_max_length, opts.shared, opts.refine.optimizer, opts.calibration_scale,
    )  # fmt: skip
    device = opts.decompose.torch_device()
    mom = second_moments(
        zoo, opts.calibration, opts.calibration_examples, opts.calibration_max_length, device=device,
        progress=progress,
    )  # fmt: skip
    W = whiteners(mom, opts.calibration_mode, float(opts.calibration_eps), opts.calibration_scale)
    digest = whiteners_digest(W, opts.calibration_mode)
    info = {
        "data": {t: str(Path(p)) for t, p in opts.calibration.items()},
        "mode": opts.calibration_mode,
        "shared_merge": opts.decompose.shared_merge,
        "eps": float(opts.calibration_eps),
        "scale": opts.calibration_scale,
        "examples": dict(zip(mom.tasks, mom.examples)),
        "max_length": opts.calibration_max_length,
        "calibrated": len(W),
        "data_free": sorted({p.name for p in zoo.matrices} - set(W)),
        "skipped": mom.skipped,
        "digest": digest,
        "metric": "rec_err is relative in the whitened metric: Σ‖(M̃ − τ)C‖² / Σ‖τC‖² (per_task: "
        "Σ‖(M̃_t − (τ_t − M_s))C_t‖² / Σ‖(τ_t − M_s)C_t‖²)",
    }
    if progress:
        print(
            f"didi: calibration ({opts.calibration_mode}, ε = {opts.calibration_eps}): {len(W)} matrices "
            f"whitened, {len(info['data_free'])} data-free",
            file=sys.stderr,
        )
    dcfg = opts.decompose
    shared_merge = dcfg.shared_merge
    cache = Path(dcfg.cache_dir).expanduser() / "calibrated" / digest
    dcfg = replace(dcfg, cache_dir=str(cache))
    if opts.calibration_mode == "per_task":
        shared_merge_fn(shared_merge)  # a bad name is named as the option
        dcfg = replace(dcfg, shared_merge=ZERO_MERGE)
    return WhitenedZoo.wrap(zoo, W, opts.calibration_mode, shared_merge, info), replace(opts, decompose=dcfg)
