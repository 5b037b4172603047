"""A learned router: which expert(s) an input gets when it carries no task id (docs/routing.md).

The router is a small network (linear, or a 2-layer MLP) on features of the frozen θ0: the output of one of
its layers (the embedding layer, a block, the final layer), pooled to one vector per input (mean over the
tokens, the first token, or CLIP's image embedding). It is trained, as a Lightning fit, on unlabelled
validation inputs of each task: the task an input came from is its only label. The features are computed once
per input set; the fit then runs on those vectors alone.

    train_router(artifact, data, ...) -> Path      `didi router train`: features, fit, calibration, save
    fit_router({task: features}, options, trainer) -> FittedRouter    the fit on feature vectors alone
    load_router(path, artifact) -> LearnedRouter   a `didi.routing.Router` for `RoutedModel` / evaluation

Routing: probabilities p = softmax(logits / temperature) (the temperature fitted on held-out inputs); an
input whose confidence (its top probability; for a top-k mixture the top-k mass) is below the threshold gets
the shared model only (`SHARED`: θ0 + fold + shared terms, the part every task of the artifact has);
otherwise its top-k tasks, weights renormalised over the top-k, are mixed by the routed layers
(`didi.routing.Mixture`); top-1 is hard routing. With `confused: calibrate`, tasks the router confuses on
held-out inputs (groups such as two tasks that share their inputs) have their within-group probabilities
flattened by a factor fitted on those inputs: where the router is no better than chance there, the group's
experts are mixed evenly instead of by its noise. With `confused: task_id` the router decides only whether an
input belongs to such a group; which of the group's tasks serves it is the input's task id (the question its
caller asks, which also picks the head), so a batch must carry `task_id` for those inputs.

Saved as `<artifact>/router/` (or anywhere): `router.safetensors` (the network and its feature
standardisation) and `router.json` (tasks, adapter and θ0 identity, features, network, temperature,
threshold, top-k, training record, sha256 of the weights). It is read with safetensors only, and it fits any
artifact of the same tasks and θ0 (a DiDi and a TALL artifact of one zoo share their router).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from didi import jsonio
from didi.artifact import atomic_dir, load_artifact, temp_sibling, versions
from didi.errors import DidiError
from didi.evaluators import mean_pool
from didi.routing import SHARED, Mixture, Router
from didi.sources import file_sha256
from didi.trainer import TrainerConfig, Trainers, is_global_zero

ROUTER_DIR = "router"
ROUTER_FORMAT = "didi-router"
ROUTER_VERSION = 1
WEIGHTS_FILE = "router.safetensors"
CONFIG_FILE = "router.json"
#: where a task's validation inputs are looked for, in order (a directory); the test split never is
VALIDATION_SPLITS = ("validation", "val", "train")
MIXINGS = ("sum", "max")
#: how a group of tasks the router confuses is served (RouterOptions.confused)
CONFUSED = ("keep", "calibrate", "task_id")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_ENCODER_KEYS = ("input_ids", "attention_mask", "token_type_ids")
#: two tasks whose held-out inputs the router tells apart no better than this (chance: 0.5) are reported as
#: confused: an input router cannot separate tasks that share their inputs (docs/routing.md)
CONFUSED_PAIR_ACCURACY = 0.75


# ------------------------------------------------------------------------------------------------ options
@dataclass
class RouterOptions:
    """What the router reads, its network, and how it routes.

    Args:
        layer: θ0's features the router reads: `final` (the last block for text, the image embedding for
            CLIP), `embedding` (the embedding layer's output: the cheapest), or a block index `i` (the output
            of block i, 0-based; negative counts from the end). The forward of θ0 stops at that layer.
        pooling: tokens to one vector: `mean` (over the attention mask), `cls` (the first token), or `auto`
            (text: mean; images: the image embedding at `final`, the mean at `embedding` — the class token
            is the same for every image there —, the class token after a block).
        hidden: 0 for a linear router, else the width of a 2-layer MLP (GELU).
        top_k: experts mixed per input (1: hard routing).
        mixing: how the top-k probabilities weight the experts' deltas: `sum` (renormalised to sum to 1: an
            input split between two experts gets half of each) or `max` (divided by the top one: the most
            probable expert at full strength, each other at its probability relative to it, so an input the
            router cannot place between two look-alike tasks gets both experts whole).
        confused: how the router serves tasks it confuses (pair accuracy ≤ 75 % on held-out inputs; pairs that
            share a task form one group): `calibrate` fits, per group on the held-out inputs, a factor s in
            [0, 1] on its log-probabilities within the group (least NLL of which of the group's tasks an input
            came from): 1 keeps its preference, 0 (a router no better than chance) spreads the group's
            probability evenly, so a top-k ≥ 2 mixture serves its experts in equal parts; `keep` (default)
            leaves the probabilities as they are; `task_id` gives a group's whole probability to the task
            id the input carries, when that task is in the group (the router still decides whether the
            input belongs to the group; a batch must then carry `task_id`, -1 for an input without one).
            On the 8-task zoo `calibrate` gains 1.6-3.4 points on two tasks that share their inputs and
            loses 0.2-0.6 on the others (docs/routing.md).
        threshold: `auto` (chosen on the held-out inputs, see fallback_value), `none` (never fall back), or a
            confidence in [0, 1]: an input whose top probability is below it gets the shared model only (1:
            every input does).
        fallback_value: for `auto`: what serving an input with the shared model is worth, between a wrong
            expert (0) and the right one (1); the threshold maximises the held-out mean of that value.
        calibration_fraction: share of each task's inputs held out to fit the temperature and the threshold
            (and to report the held-out routing accuracy).
        steps: optimiser steps (Adam).
        lr: learning rate.
        weight_decay: Adam's weight decay.
        batch_size: feature vectors per optimiser step.
        balanced: weight every task equally in the loss and the threshold's proxy, whatever its input count.
        seed: seed of the held-out split, the initialisation and the batch order.
    """

    layer: str = "final"
    pooling: Literal["auto", "mean", "cls"] = "auto"
    hidden: int = 0
    top_k: int = 1
    mixing: Literal["sum", "max"] = "sum"
    confused: Literal["calibrate", "keep", "task_id"] = "keep"
    threshold: Union[float, Literal["auto", "none"]] = "auto"
    fallback_value: float = 0.5
    calibration_fraction: float = 0.2
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 256
    balanced: bool = True
    seed: int = 0

    def validate(self, n_tasks: int | None = None) -> None:
        """Bad values stop here, naming the option, before any feature is computed."""
        if self.layer not in ("final", "embedding"):
            try:
                int(self.layer)
            except ValueError:
                raise DidiError(
                    f"router.layer: expected final, embedding or a block index, found {self.layer!r}"
                ) from None
        if self.pooling not in ("auto", "mean", "cls"):
            raise DidiError(f"router.pooling: expected auto, mean or cls, found {self.pooling!r}")
        if self.hidden < 0:
            raise DidiError(f"router.hidden: expected 0 (linear) or a positive width, found {self.hidden}")
        if self.top_k < 1 or (n_tasks is not None and self.top_k > n_tasks):
            raise DidiError(f"router.top_k: expected 1..{n_tasks or 'T'} (the tasks), found {self.top_k}")
        check_mixing(self.mixing, "router.mixing")
        if self.confused not in CONFUSED:
            raise DidiError(
                f"router.confused: expected one of {', '.join(CONFUSED)}, found {self.confused!r}"
            )
        check_threshold(self.threshold, "router.threshold")
        if not 0.0 <= self.fallback_value <= 1.0:
            raise DidiError(f"router.fallback_value: expected a value in [0, 1], found {self.fallback_value}")
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise DidiError(
                f"router.calibration_fraction: expected a value in [0, 1), found {self.calibration_fraction}"
            )
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise DidiError(f"router.{name}: expected a positive integer, found {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise DidiError("router.lr / weight_decay: expected lr > 0 and weight_decay ≥ 0")


def check_threshold(value: Any, where: str) -> None:
    if value in ("auto", "none"):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise DidiError(f"{where}: expected auto, none or a confidence in [0, 1], found {value!r}")


def check_mixing(value: Any, where: str) -> None:
    if value not in MIXINGS:
        raise DidiError(f"{where}: expected one of {', '.join(MIXINGS)}, found {value!r}")


# ---------------------------------------------------------------------------------------------- the network
class RouterNet(nn.Module):
    """Standardised features → task logits: one linear layer, or Linear → GELU → Linear (`hidden` > 0)."""

    def __init__(self, dim: int, n_tasks: int, hidden: int = 0) -> None:
        super().__init__()
        self.dim, self.n_tasks, self.hidden = dim, n_tasks, hidden
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.net = (
            nn.Linear(dim, n_tasks)
            if hidden == 0
            else nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_tasks))
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features.to(self.mean.dtype) - self.mean) / self.std)


# --------------------------------------------------------------------------------------------- θ0 features
class _Stop(Exception):
    """Raised by the feature hook: θ0's forward ends at the layer the router reads."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value


class BaseFeatures(nn.Module):
    """One vector per input from the frozen θ0: the output of module `module` (its forward stops there) pooled
    over the tokens, or, with `module` None, what `run` returns (CLIP's image embedding)."""

    def __init__(self, model: nn.Module, module: str | None, pooling: str, seq_first: bool = False) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.module, self.pooling, self.seq_first = module, pooling, seq_first

    def run(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def mask(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def train(self, mode: bool = True) -> "BaseFeatures":
        super().train(mode)
        self.model.eval()  # θ0 is frozen: no dropout, whatever the enclosing module's mode
        return self

    @torch.no_grad()
    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.module is None:
            return self.run(batch).float()

        def stop(mod: nn.Module, args: Any, out: Any) -> None:
            raise _Stop(out[0] if isinstance(out, (tuple, list)) else out)

        handle = self.model.get_submodule(self.module).register_forward_hook(stop)
        try:
            self.run(batch)
        except _Stop as s:
            tokens = s.value
        else:
            raise DidiError(f"router features: θ0's module '{self.module}' was not called by its forward")
        finally:
            handle.remove()
        if self.seq_first:
            tokens = tokens.transpose(0, 1)
        tokens = tokens.float()
        if self.pooling == "cls":
            return tokens[:, 0]
        m = self.mask(batch)
        return mean_pool(tokens, m) if m is not None else tokens.mean(1)


class BaseTextFeatures(BaseFeatures):
    """A Hugging Face encoder's token states (input_ids, attention_mask, token_type_ids of the batch)."""

    def run(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**{k: batch[k] for k in _ENCODER_KEYS if k in batch})

    def mask(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        return batch.get("attention_mask")


class BaseImageFeatures(BaseFeatures):
    """An open_clip model's image tower (pixel_values of the batch); `run` gives the normalised embedding."""

    def run(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.model.encode_image(batch["pixel_values"]), dim=-1)


def _block_list(model: nn.Module, n_layers: int | None) -> tuple[str, int]:
    """Path and length of the model's list of blocks (the first nn.ModuleList of `n_layers` modules)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and (n_layers is None or len(m) == n_layers):
            return name, len(m)
    raise DidiError(f"router features: no list of {n_layers} blocks in {type(model).__name__}")


def _block(index: str, path: str, n: int) -> str:
    i = int(index)
    if not -n <= i < n:
        raise DidiError(
            f"router.layer: block {i} is outside the model's {n} blocks (0..{n - 1}, or -{n}..-1)"
        )
    return f"{path}.{i % n}"


def base_features(adapter, model: nn.Module, layer: str = "final", pooling: str = "auto") -> BaseFeatures:
    """The router's view of θ0 (`model`, the adapter's runnable model) for the adapter's family."""
    name = adapter.registry_name
    if name == "hf_encoder":
        path, n = _block_list(model, getattr(getattr(model, "config", None), "num_hidden_layers", None))
        if layer == "embedding":
            if not hasattr(model, "embeddings"):
                raise DidiError(f"router features: {type(model).__name__} has no 'embeddings' module")
            module = "embeddings"
        else:
            module = _block("-1" if layer == "final" else layer, path, n)
        return BaseTextFeatures(model, module, "mean" if pooling == "auto" else pooling)
    if name == "open_clip":
        visual = model.visual
        if layer == "final" and pooling == "auto":
            return BaseImageFeatures(model, None, "embedding")
        blocks = visual.transformer.resblocks
        if layer == "embedding":
            module, seq_first = "visual.ln_pre", False
        else:
            module = _block("-1" if layer == "final" else layer, "visual.transformer.resblocks", len(blocks))
            seq_first = not getattr(visual.transformer, "batch_first", True)
        auto = "mean" if layer == "embedding" else "cls"  # before any block the class token is a constant
        return BaseImageFeatures(model, module, auto if pooling == "auto" else pooling, seq_first)
    raise DidiError(
        f"router: adapter '{name}' has no input features for a router yet (text classification needs "
        f"'hf_encoder', images 'open_clip')"
    )


# ------------------------------------------------------------------------------------------ the fit
class RouterFit(L.LightningModule):
    """Cross-entropy of the router's logits against the task each input came from (Adam on the network)."""

    def __init__(self, net: RouterNet, class_weights: torch.Tensor, opts: RouterOptions) -> None:
        super().__init__()
        self.net, self.opts = net, opts
        self.register_buffer("class_weights", class_weights)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        f, y = batch
        logits = self.net(f)
        loss = F.cross_entropy(logits, y, weight=self.class_weights)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log_dict({"router/loss": loss, "router/acc": acc}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.opts.lr, weight_decay=self.opts.weight_decay)


@dataclass
class FittedRouter:
    """A trained router network with its calibration: what `save_router` writes."""

    tasks: list[str]
    net: RouterNet
    temperature: float
    threshold: float
    top_k: int
    mixing: str = "sum"
    record: dict = field(default_factory=dict)
    #: [{"tasks": [...], "scale": s}] (`flatten_groups`), or {"tasks", "scale": 1, "by": "task_id"}
    #: (`pick_by_task_id`)
    groups: list[dict] = field(default_factory=list)


def _split(n: int, fraction: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows) of n inputs: round(n·fraction) held out, at least one kept to train."""
    perm = torch.randperm(n, generator=g)
    k = min(int(round(n * fraction)), n - 1)
    return perm[k:], perm[:k]


def _share(hit: torch.Tensor, y: torch.Tensor, T: int, balanced: bool) -> float:
    """The share of inputs where `hit` holds: the mean of the per-task shares, or over all inputs."""
    if not balanced:
        return float(hit.double().mean())
    return sum(float(hit[y == j].double().mean()) for j in range(T)) / T


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> float:
    """The temperature (a log grid from 0.05 to 20, and 1) of least weighted NLL on the held-out inputs."""
    grid = torch.cat([torch.logspace(math.log10(0.05), math.log10(20.0), 60), torch.ones(1)])
    nll = torch.stack(
        [(F.cross_entropy(logits / t, y, reduction="none") * weights).sum() for t in grid.tolist()]
    )
    return float(grid[int(torch.argmin(nll))])


def choose_threshold(conf: torch.Tensor, correct: torch.Tensor, weights: torch.Tensor, value: float) -> float:
    """The confidence threshold that maximises the weighted mean utility on held-out inputs: 1 for an input
    routed to its own task, 0 for one routed elsewhere, `value` for one below the threshold (the shared
    model). Candidates: 0 and every held-out confidence; ties go to the smallest (route more)."""
    conf, weights = conf.double(), weights.double()
    best, best_u = 0.0, -math.inf
    for th in [0.0, *sorted(set(conf.tolist()))]:
        routed = conf >= th
        u = float((weights * torch.where(routed, correct.double(), torch.full_like(conf, value))).sum())
        if u > best_u + 1e-9:
            best, best_u = th, u
    return best


def confused_pairs(
    top1: torch.Tensor, y: torch.Tensor, tasks: Sequence[str], bound: float = CONFUSED_PAIR_ACCURACY
) -> list[dict]:
    """The task pairs the router cannot tell apart on held-out inputs. For tasks i and j, of their inputs
    whose top-1 is i or j, the share sent to the right one of the two (the pair accuracy; chance 0.5); pairs
    at or below `bound`, worst first, with the share of each task's inputs sent to the other."""
    T = len(tasks)
    counts = torch.zeros(T, T, dtype=torch.float64)  # counts[i, j]: inputs of task i routed to task j
    counts.index_put_((y, top1), torch.ones(len(y), dtype=torch.float64), accumulate=True)
    n = counts.sum(1).clamp_min(1)  # inputs per task
    out = []
    for i in range(T):
        for j in range(i + 1, T):
            within = counts[i, i] + counts[i, j] + counts[j, i] + counts[j, j]
            if within == 0:
                continue
            acc = float((counts[i, i] + counts[j, j]) / within)
            if acc <= bound:
                out.append(
                    {
                        "tasks": [tasks[i], tasks[j]],
                        "pair_accuracy": acc,
                        "sent_to_other": [float(counts[i, j] / n[i]), float(counts[j, i] / n[j])],
                    }
                )
    return sorted(out, key=lambda c: c["pair_accuracy"])


def confused_groups(pairs: Sequence[dict], tasks: Sequence[str]) -> list[list[str]]:
    """The confused pairs joined into groups (connected components), each in the task order `tasks`."""
    parent = {t: t for t in tasks}

    def root(t: str) -> str:
        while parent[t] != t:
            t = parent[t]
        return t

    for c in pairs:
        a, b = (root(t) for t in c["tasks"])
        parent[max(a, b, key=tasks.index)] = min(a, b, key=tasks.index)
    groups: dict[str, list[str]] = {}
    for t in tasks:
        groups.setdefault(root(t), []).append(t)
    return [g for g in groups.values() if len(g) > 1]


def flatten_groups(
    probs: torch.Tensor, groups: Sequence[Sequence[int]], scales: Sequence[float]
) -> torch.Tensor:
    """Within each group of task columns, p_i ← p_G · softmax(s · log p_i) over the group (p_G the group's
    total, kept): s = 1 leaves the row as it is, s = 0 spreads p_G evenly over the group's tasks."""
    out = probs.clone()
    for idx, s in zip(groups, scales):
        if s == 1.0:
            continue
        cols = torch.as_tensor(list(idx), device=probs.device)
        p = probs[:, cols]
        out[:, cols] = p.sum(-1, keepdim=True) * torch.softmax(s * p.clamp_min(1e-30).log(), -1)
    return out


def pick_by_task_id(probs: torch.Tensor, groups: Sequence[Sequence[int]], ids: torch.Tensor) -> torch.Tensor:
    """Within each group of task columns, a row whose task id is in the group gets the group's whole
    probability p_G on that task (the router placed the input in the group; its task id says which of the
    group's tasks it asks); other rows (task outside the group, or -1 for none) are left as they are."""
    out = probs.clone()
    ids = torch.as_tensor(ids, device=probs.device).long().reshape(-1)
    for idx in groups:
        cols = torch.as_tensor(list(idx), device=probs.device)
        rows = torch.isin(ids, cols).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        p_g = probs[rows][:, cols].sum(-1)
        out[rows[:, None], cols[None]] = 0.0
        out[rows, ids[rows]] = p_g
    return out


def fit_group_scale(
    probs: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, group: Sequence[int]
) -> float:
    """The factor s (0, 0.05, …, 1) on the within-group log-probabilities of least weighted NLL of which of
    the group's tasks each held-out input of the group came from; ties keep the larger s (the router's
    own)."""
    cols = torch.as_tensor(list(group))
    rows = torch.isin(y, cols)
    if not bool(rows.any()):
        return 1.0
    logp = probs[rows][:, cols].clamp_min(1e-30).log()
    target = (y[rows, None] == cols[None]).long().argmax(-1)
    w = weights[rows]
    best, best_nll = 1.0, math.inf
    for s in [1.0 - i / 20 for i in range(21)]:
        nll = float((F.cross_entropy(s * logp, target, reduction="none") * w).sum())
        if nll < best_nll - 1e-9:
            best, best_nll = s, nll
    return best


def fit_router(
    features: Mapping[str, torch.Tensor],
    opts: RouterOptions = RouterOptions(),
    trainer: TrainerConfig = TrainerConfig(),
) -> FittedRouter:
    """Train a router on {task: feature vectors (n_t × d)} (the task order is the mapping's): hold out a share
    of each task's vectors, fit the network on the rest (Lightning), then the temperature and threshold on the
    held-out ones."""
    tasks = list(features)
    if len(tasks) < 2:
        raise DidiError(f"router: at least two tasks are needed to route between, found {tasks}")
    opts.validate(len(tasks))
    empty = [t for t, f in features.items() if f.shape[0] == 0]
    if empty:
        raise DidiError(f"router: no validation inputs for task {empty[0]!r}")
    dims = {int(f.shape[1]) for f in features.values()}
    if len(dims) != 1:
        raise DidiError(f"router: feature vectors of different widths {sorted(dims)}")
    dim = dims.pop()
    g = torch.Generator().manual_seed(opts.seed)
    tr_f, tr_y, ca_f, ca_y = [], [], [], []
    for j, t in enumerate(tasks):
        f = features[t].float()
        tr, ca = _split(f.shape[0], opts.calibration_fraction, g)
        tr_f.append(f[tr])
        ca_f.append(f[ca])
        tr_y.append(torch.full((len(tr),), j))
        ca_y.append(torch.full((len(ca),), j))
    xf, xy = torch.cat(tr_f), torch.cat(tr_y)
    held_out = sum(len(c) for c in ca_y) > 0 and all(len(c) for c in ca_y)
    cf, cy = (torch.cat(ca_f), torch.cat(ca_y)) if held_out else (xf, xy)
    counts = torch.bincount(xy, minlength=len(tasks)).float()
    class_w = (counts.sum() / (len(tasks) * counts)) if opts.balanced else torch.ones(len(tasks))

    torch.manual_seed(opts.seed)
    net = RouterNet(dim, len(tasks), opts.hidden)
    net.mean.copy_(xf.mean(0))
    net.std.copy_(xf.std(0, unbiased=False).clamp_min(1e-6) if xf.shape[0] > 1 else torch.ones(dim))
    module = RouterFit(net, class_w, opts)
    bs = min(opts.batch_size, xf.shape[0])
    # one epoch of `steps` batches drawn with replacement: a few hundred vectors would otherwise make every
    # step an epoch of its own, and Lightning's per-epoch work would cost more than the step
    sampler = RandomSampler(
        xf, replacement=True, num_samples=opts.steps * bs, generator=torch.Generator().manual_seed(opts.seed)
    )
    loader = DataLoader(TensorDataset(xf, xy), batch_size=bs, sampler=sampler)
    Trainers(trainer).fit("router", max_steps=opts.steps).fit(module, train_dataloaders=loader)
    net = module.net.cpu().eval()

    with torch.no_grad():
        logits_tr, logits_ca = net(xf), net(cf)
    cnt = torch.bincount(cy, minlength=len(tasks)).float()
    w_ca = (1.0 / (len(tasks) * cnt[cy])) if opts.balanced else torch.full((len(cy),), 1.0 / len(cy))
    temperature = fit_temperature(logits_ca, cy, w_ca)
    probs = torch.softmax(logits_ca / temperature, -1)
    pairs = confused_pairs(logits_ca.argmax(-1), cy, tasks)
    groups, columns = [], []
    if opts.confused != "keep":
        for names in confused_groups(pairs, tasks):
            columns.append([tasks.index(t) for t in names])
            if opts.confused == "calibrate":
                groups.append({"tasks": names, "scale": fit_group_scale(probs, cy, w_ca, columns[-1])})
            else:
                groups.append({"tasks": names, "scale": 1.0, "by": "task_id"})
    top1 = probs.argmax(-1)  # the router's own choice (in a flattened group the top-1 is a tie)
    if opts.confused == "task_id":  # served as it will be: the held-out inputs carry their task ids
        probs = pick_by_task_id(probs, columns, cy)
    else:
        probs = flatten_groups(probs, columns, [g["scale"] for g in groups])
    p_k, ids_k = probs.topk(min(opts.top_k, len(tasks)), -1)
    conf = p_k.sum(-1)  # what the served mixture rests on: the top-k mass (top-1: the top probability)
    correct = top1 == cy
    if opts.threshold == "auto":  # an input is served well when its own task is among the k mixed
        threshold = choose_threshold(conf, (ids_k == cy[:, None]).any(-1), w_ca, opts.fallback_value)
    else:
        threshold = 0.0 if opts.threshold == "none" else float(opts.threshold)
    routed = conf >= threshold
    per_task = {
        t: {
            "inputs": int(features[t].shape[0]),
            "held_out": int((cy == j).sum()) if held_out else 0,
            "routing_accuracy": float((correct & (cy == j)).sum() / (cy == j).sum()),
            "fallback": float((~routed & (cy == j)).sum() / (cy == j).sum()),
        }
        for j, t in enumerate(tasks)
    }
    record = {
        "options": asdict(opts),
        "calibrated_on": "held-out inputs" if held_out else "training inputs (too few to hold out)",
        "train_accuracy": float((logits_tr.argmax(-1) == xy).float().mean()),
        # balanced: the mean over the tasks of each task's share (exactly 1.0 when every input is right)
        "routing_accuracy": _share(correct, cy, len(tasks), opts.balanced),
        "fallback": _share(~routed, cy, len(tasks), opts.balanced),
        "tasks": per_task,
        "confused_pairs": pairs,
    }
    return FittedRouter(tasks, net, temperature, threshold, opts.top_k, opts.mixing, record, groups)


# ----------------------------------------------------------------------------------------------- routing
class LearnedRouter(nn.Module, Router):
    """A `Router` from a trained network: θ0's features of the batch → probabilities over the tasks →
    `SHARED` below the threshold, else the top-1 task (hard) or a `Mixture` of the top-k tasks, weights
    renormalised over them. Its tasks are the artifact's, in the artifact's order (`order`), whatever order
    the network was trained in. `groups` ([{"tasks", "scale"}]): confused tasks whose probabilities are
    flattened (`flatten_groups`) before the top-k is taken; a group with `"by": "task_id"` gives its
    probability to the task id each input of the batch carries (`pick_by_task_id`)."""

    def __init__(
        self,
        tasks: Sequence[str],
        net: RouterNet,
        features: nn.Module,
        temperature: float = 1.0,
        threshold: float = 0.0,
        top_k: int = 1,
        order: Sequence[str] | None = None,
        mixing: str = "sum",
        groups: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        nn.Module.__init__(self)
        Router.__init__(self, order if order is not None else tasks)
        if sorted(self.tasks) != sorted(tasks):
            raise DidiError(f"router: trained for tasks {list(tasks)}, asked to route {self.tasks}")
        if not 1 <= top_k <= len(self.tasks):
            raise DidiError(f"router.top_k: expected 1..{len(self.tasks)} (the tasks), found {top_k}")
        check_threshold(threshold, "router.threshold")
        check_mixing(mixing, "router.mixing")
        self.mixing = mixing
        unknown = sorted({t for g in groups for t in g["tasks"]} - set(self.tasks))
        if unknown:
            raise DidiError(f"router: a confused group names task {unknown[0]!r}, not one of {self.tasks}")
        by = [g.get("by", "router") for g in groups]
        if any(b not in ("router", "task_id") for b in by):
            raise DidiError(f"router: a confused group is served by {by!r}; expected router or task_id")
        index = [[self.tasks.index(t) for t in g["tasks"]] for g in groups]
        self.groups = [c for c, b in zip(index, by) if b == "router"]
        self.group_scales = [float(g["scale"]) for g, b in zip(groups, by) if b == "router"]
        self.asked = [c for c, b in zip(index, by) if b == "task_id"]  # served by each input's task id
        self.net, self.features = net.requires_grad_(False), features  # served, never trained here (DDP)
        self.temperature, self.threshold, self.top_k = float(temperature), float(threshold), int(top_k)
        self.register_buffer(
            "perm", torch.tensor([list(tasks).index(t) for t in self.tasks]), persistent=False
        )

    def probabilities(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """B × T, columns in the artifact's task order."""
        with torch.no_grad():
            logits = self.net(self.features(batch))
        return torch.softmax(logits[:, self.perm] / self.temperature, -1)

    def decide(self, probs: torch.Tensor) -> torch.Tensor | Mixture:
        """Task ids (`SHARED` below the threshold) for top-1, else a Mixture of each row's top-k. The
        confidence held to the threshold is the probability mass of the experts served: the top probability
        for top-1, the top-k mass for a mixture (two look-alike tasks at 0.45 each are a confident mix).
        Confused groups are flattened first (`flatten_groups`)."""
        probs = flatten_groups(probs, self.groups, self.group_scales)
        p, ids = probs.topk(self.top_k, -1)
        conf = p.sum(-1)
        low = conf < self.threshold if self.threshold < 1 else torch.ones_like(conf, dtype=torch.bool)
        if self.top_k == 1:
            return torch.where(low, torch.full_like(ids[:, 0], SHARED), ids[:, 0])
        w = p / (p.sum(-1, keepdim=True) if self.mixing == "sum" else p[:, :1])
        w = torch.where(low[:, None], torch.zeros_like(w), w)
        return Mixture(torch.where(low[:, None], torch.full_like(ids, SHARED), ids), w)

    def task_ids(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The task id each input carries (names or indices; -1 for an input without one), for the groups
        served by task id."""
        if "task_id" not in batch:
            names = "; ".join(", ".join(self.tasks[i] for i in g) for g in self.asked)
            raise DidiError(
                f"router: the confused group(s) {names} are served by each input's task id (router.confused "
                f"task_id), but the batch has no 'task_id' field (keys: {sorted(batch)}); pass each input's "
                f"task (-1 where it has none), or train the router with --router.confused keep"
            )
        ids = batch["task_id"]
        if isinstance(ids, (list, tuple)) and ids and not isinstance(ids[0], (int, torch.Tensor)):
            unknown = sorted({t for t in ids if t is not None and t not in self.tasks})
            if unknown:
                raise DidiError(
                    f"router: unknown task {unknown[0]!r} in 'task_id'; the artifact has {self.tasks}"
                )
            ids = [-1 if t is None else self.tasks.index(t) for t in ids]
        return torch.as_tensor(ids).long().reshape(-1)

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor | Mixture:
        probs = self.probabilities(batch)
        if self.asked:
            probs = pick_by_task_id(probs, self.asked, self.task_ids(batch))
        return self.decide(probs)


# ------------------------------------------------------------------------------------------ identity, I/O
def backbone_identity(art) -> dict:
    """What a router must share with an artifact: the adapter (name, settings) and θ0 (a digest of its
    per-tensor sha256 when the manifest records them, else its path)."""
    base = art.manifest["sources"]["base"]
    sha = base.get("sha256")
    digest = (
        hashlib.sha256(json.dumps(sha, sort_keys=True).encode()).hexdigest()
        if sha
        else f"path:{Path(base['path']).resolve()}"
    )
    a = art.manifest["adapter"]
    return {"adapter": {"name": a["name"], "settings": a.get("settings", {})}, "base": digest}


def save_router(fitted: FittedRouter, path: str | Path, info: dict, overwrite: bool = False) -> Path:
    """Write `router.safetensors` + `router.json` to directory `path` through a temporary sibling renamed into
    place; an existing router is replaced only with `overwrite` (and only once the new one is complete)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DidiError(f"{path}: a router is already there; pass --overwrite true to replace it")
    target = temp_sibling(path, ".new-") if path.exists() else path
    with atomic_dir(target) as tmp:
        net = fitted.net
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        config = {
            "format": ROUTER_FORMAT,
            "format_version": ROUTER_VERSION,
            "tasks": fitted.tasks,
            **info,
            "network": {"kind": "mlp" if net.hidden else "linear", "dim": net.dim, "hidden": net.hidden},
            "temperature": fitted.temperature,
            "threshold": fitted.threshold,
            "top_k": fitted.top_k,
            "mixing": fitted.mixing,
            "confused_groups": fitted.groups,
            "training": fitted.record,
            "files": {WEIGHTS_FILE: file_sha256(tmp / WEIGHTS_FILE)},
            "versions": versions(),
        }
        (tmp / CONFIG_FILE).write_text(jsonio.dumps(config, indent=1))
    if target != path:  # swap the complete new router in, then drop the old one
        old = temp_sibling(path, ".old-")
        os.replace(path, old)
        os.replace(target, path)
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_router_config(path: str | Path) -> dict:
    """The router's JSON, with its weights file checked against the recorded sha256."""
    p = Path(path)
    cfg_file, weights = p / CONFIG_FILE, p / WEIGHTS_FILE
    if not cfg_file.exists() or not weights.exists():
        raise DidiError(
            f"{p}: no router there (expected {CONFIG_FILE} and {WEIGHTS_FILE}); train one with "
            f"`didi router train ARTIFACT --data ...`"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise DidiError(f"{cfg_file}: corrupt router file ({e})") from e
    if not isinstance(cfg, dict) or cfg.get("format") != ROUTER_FORMAT:
        raise DidiError(
            f"{cfg_file}: not a didi router (format {cfg.get('format') if isinstance(cfg, dict) else None!r})"
        )
    if cfg.get("format_version", 0) > ROUTER_VERSION:
        raise DidiError(f"{cfg_file}: router format version {cfg['format_version']} is newer than this didi")
    want = cfg.get("files", {}).get(WEIGHTS_FILE)
    if want is not None and file_sha256(weights) != want:
        raise DidiError(f"{weights}: sha256 does not match {CONFIG_FILE} (corrupt or modified)")
    return cfg


def check_router_fits(cfg: dict, art, where: Path) -> None:
    """A router serves an artifact only when it was trained for the same tasks, adapter and θ0."""
    have, want = list(cfg.get("tasks", [])), art.tasks
    if sorted(have) != sorted(want):
        missing = [t for t in want if t not in have]
        extra = [t for t in have if t not in want]
        raise DidiError(
            f"{where}: router trained for tasks {have}, the artifact {art.path} has {want}"
            + (f" (the router does not know {missing})" if missing else "")
            + (f" (the artifact has no {extra})" if extra else "")
            + "; train one for it with `didi router train`"
        )
    ident = backbone_identity(art)
    if (
        cfg.get("adapter", {}).get("name") != ident["adapter"]["name"]
        or cfg.get("adapter", {}).get("settings") != ident["adapter"]["settings"]
    ):
        raise DidiError(
            f"{where}: router trained on another backbone (adapter {cfg.get('adapter')}), the artifact "
            f"{art.path} has {ident['adapter']}"
        )
    if cfg.get("base") != ident["base"]:
        raise DidiError(
            f"{where}: router trained on another θ0 (base {cfg.get('base')}), the artifact {art.path} was "
            f"merged from base {ident['base']}"
        )


def load_router(
    path: str | Path,
    artifact,
    base: str | None = None,
    top_k: int | None = None,
    threshold: float | str | None = None,
    mixing: str | None = None,
) -> LearnedRouter:
    """The router saved at `path`, for `artifact` (a path or a loaded Artifact): checked against its tasks,
    adapter and θ0, with θ0 (the manifest's, or `base`) loaded for the router's features. `top_k`,
    `threshold` (a confidence, or `none`) and `mixing` override the saved ones."""
    art = load_artifact(artifact) if isinstance(artifact, (str, Path)) else artifact
    p = Path(path)
    cfg = read_router_config(p)
    check_router_fits(cfg, art, p)
    feats = cfg.get("features", {})
    net_cfg = cfg.get("network", {})
    try:
        net = RouterNet(int(net_cfg["dim"]), len(cfg["tasks"]), int(net_cfg.get("hidden", 0)))
        net.load_state_dict(load_file(str(p / WEIGHTS_FILE)))
    except (KeyError, RuntimeError, ValueError) as e:
        raise DidiError(
            f"{p / WEIGHTS_FILE}: does not fit the network {net_cfg} of {CONFIG_FILE} ({e})"
        ) from e
    if threshold is not None:
        check_threshold(threshold, "threshold")
        threshold = 0.0 if threshold == "none" else threshold
    adapter = art.adapter()
    src = art.manifest["sources"]["base"]
    model = adapter.build_model(
        dict(adapter.open_source(base or src["path"], src.get("allow_pickle", False)).items())
    )
    features = base_features(adapter, model, feats.get("layer", "final"), feats.get("pooling", "auto"))
    return LearnedRouter(
        cfg["tasks"],
        net.eval(),
        features,
        cfg.get("temperature", 1.0),
        cfg.get("threshold", 0.0) if threshold is None or threshold == "auto" else float(threshold),
        cfg.get("top_k", 1) if top_k is None else top_k,
        order=art.tasks,
        mixing=cfg.get("mixing", "sum") if mixing is None else mixing,
        groups=cfg.get("confused_groups", []),
    )


# ------------------------------------------------------------------------------------ validation inputs
def task_source(task: str, path: str | Path, kind: str, split: str) -> Path:
    """The file (text) or folder (images) of one task's validation inputs; never a test split."""
    p = Path(path)
    names = VALIDATION_SPLITS if split == "auto" else (split,)
    if not p.exists():
        raise DidiError(f"task {task!r}: {p}: no such file or directory")
    if kind == "text":
        if p.is_file():
            if p.stem == "test":
                raise DidiError(
                    f"task {task!r}: {p} is a test split; the router trains on validation or train "
                    f"inputs only"
                )
            return p
        for s in names:
            if (p / f"{s}.jsonl").exists():
                return p / f"{s}.jsonl"
        raise DidiError(
            f"task {task!r}: {p} has no {', '.join(f'{s}.jsonl' for s in names)} (validation inputs; the "
            f"router never trains on test.jsonl)"
        )
    if not p.is_dir():
        raise DidiError(f"task {task!r}: {p} is not a directory of images")
    for s in names:
        if (p / s).is_dir():
            return p / s
    if p.name == "test" or (p / "test").is_dir():
        raise DidiError(
            f"task {task!r}: {p} holds only a test split; give a folder with "
            f"{', '.join(f'{s}/' for s in names)} or a folder of validation images"
        )
    return p


def read_inputs(task: str, path: Path, kind: str, limit: int | None) -> list[str]:
    """Texts (the "text" of each JSON line; labels, if any, are not read) or image files of one task."""
    out: list[str] = []
    if kind == "text":
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                out.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DidiError(f"{path}:{i + 1}: expected a JSON object with 'text' ({e})") from e
    else:
        out = sorted(str(f) for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    out = out[:limit] if limit is not None else out
    if not out:
        raise DidiError(f"task {task!r}: no validation inputs in {path}")
    return out


def validation_inputs(
    data: Mapping[str, str], tasks: Sequence[str], kind: str, split: str = "auto", limit: int | None = None
) -> dict[str, tuple[Path, list[str]]]:
    """{task: (where, inputs)} for every task of the artifact, in its order; refuses a missing or unknown
    task, an empty task and the test split."""
    if split == "test":
        raise DidiError(
            "split: the router never trains on the test split (use validation, val, train or auto)"
        )
    if not data:
        raise DidiError(f"data: no validation data given (one entry per task of the artifact: {list(tasks)})")
    unknown = [t for t in data if t not in tasks]
    if unknown:
        raise DidiError(f"data: task {unknown[0]!r} is not in the artifact (tasks: {list(tasks)})")
    missing = [t for t in tasks if t not in data]
    if missing:
        raise DidiError(
            f"data: no validation data for task {missing[0]!r} (the router needs inputs of every task of the "
            f"artifact: {list(tasks)})"
        )
    out = {}
    for t in tasks:
        where = task_source(t, data[t], kind, split)
        out[t] = (where, read_inputs(t, where, kind, limit))
    return out


def _device(trainer: TrainerConfig) -> torch.device:
    gpu = trainer.accelerator in ("gpu", "cuda") or (
        trainer.accelerator == "auto" and torch.cuda.is_available()
    )
    return torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")


def compute_features(
    features: nn.Module, loader: DataLoader, device: torch.device, tasks: Sequence[str]
) -> dict[str, torch.Tensor]:
    """θ0's feature vectors of every input, once, grouped by the task it came from (batches carry task_id)."""
    features = features.to(device)
    out: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            f = features(batch).cpu()
            for j in torch.unique(batch["task_id"]).tolist():
                out.setdefault(j, []).append(f[(batch["task_id"] == j).cpu()])
    return {t: torch.cat(out[j]) for j, t in enumerate(tasks)}


def _loader(art, adapter, model, inputs, kind, tokenizer, base_path, batch_size, max_length) -> DataLoader:
    tasks = art.tasks
    if kind == "text":
        from didi.datamodules.text import TaggedExamples, TextCollate, load_tokenizer

        items = [(x, 0, j) for j, t in enumerate(tasks) for x in inputs[t][1]]
        collate = TextCollate(load_tokenizer(tokenizer or base_path), max_length)
        return DataLoader(TaggedExamples(items), batch_size=batch_size, collate_fn=collate)
    from didi.datamodules.image import TaggedImages, collate_images, open_clip_transform

    items = [(x, 0, j) for j, t in enumerate(tasks) for x in inputs[t][1]]
    return DataLoader(
        TaggedImages(items, open_clip_transform(model)), batch_size=batch_size, collate_fn=collate_images
    )


def input_kind(adapter, what: str = "router", advice: str = "") -> str:
    """`text` (hf_encoder) or `image` (open_clip): the input pipelines didi has for data read through θ0
    (the router, MERGE's validation, calibration); `what` and `advice` make the refusal name the caller."""
    name = adapter.registry_name
    if name == "hf_encoder":
        return "text"
    if name == "open_clip":
        return "image"
    raise DidiError(
        f"{what}: adapter '{name}' has no input pipeline yet (text classification needs 'hf_encoder', "
        f"images 'open_clip')" + (f"; {advice}" if advice else "")
    )


def train_router(
    artifact: str | Path,
    data: Mapping[str, str],
    output: str | Path | None = None,
    options: RouterOptions = RouterOptions(),
    split: str = "auto",
    base: str | None = None,
    tokenizer: str | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    limit_per_task: int | None = None,
    trainer: TrainerConfig = TrainerConfig(),
    overwrite: bool = False,
) -> Path:
    """Train a router for `artifact` on each task's validation inputs (`data`: {task: path}, as `didi
    evaluate` takes them; a directory is read at validation.jsonl, val.jsonl or train.jsonl — images: the
    validation/, val/ or train/ folder —, a file as it is; the test split never) and save it to `output`
    (default `<artifact>/router/`). Returns the router's directory."""
    art = load_artifact(artifact)
    options.validate(len(art.tasks))
    adapter = art.adapter()
    kind = input_kind(adapter)
    inputs = validation_inputs(data, art.tasks, kind, split, limit_per_task)
    out = Path(output) if output is not None else art.path / ROUTER_DIR
    if out.exists() and not overwrite:
        raise DidiError(f"{out}: a router is already there; pass --overwrite true to replace it")
    src = art.manifest["sources"]["base"]
    base_path = base or src["path"]
    model = adapter.build_model(dict(adapter.open_source(base_path, src.get("allow_pickle", False)).items()))
    feats = base_features(adapter, model, options.layer, options.pooling)
    loader = _loader(art, adapter, model, inputs, kind, tokenizer, str(base_path), batch_size, max_length)
    vectors = compute_features(feats, loader, _device(trainer), art.tasks)
    fitted = fit_router(vectors, options, trainer)
    fitted.record["data"] = {t: str(where) for t, (where, _) in inputs.items()}
    fitted.record["max_length"] = max_length if kind == "text" else None
    info = {
        **backbone_identity(art),
        "features": {"layer": options.layer, "pooling": options.pooling, "kind": kind},
        "trained_with": str(art.path),
    }
    if not is_global_zero():
        return out
    return save_router(fitted, out, info, overwrite)


def router_summary(path: str | Path) -> str:
    """A few lines on a saved router: tasks, features, network, calibration, held-out routing accuracy."""
    cfg = read_router_config(path)
    tr = cfg.get("training", {})
    lines = [
        f"router: {path}",
        f"  tasks: {', '.join(cfg['tasks'])}",
        f"  features: layer {cfg['features']['layer']}, pooling {cfg['features']['pooling']} "
        f"({cfg['network']['dim']} values); network {cfg['network']['kind']}"
        + (f" (hidden {cfg['network']['hidden']})" if cfg["network"]["hidden"] else ""),
        f"  temperature {cfg['temperature']:.4g}, threshold {cfg['threshold']:.4g}, top-{cfg['top_k']}"
        f" ({cfg.get('mixing', 'sum')} mixing)",
        f"  routing accuracy on {tr.get('calibrated_on', 'held-out inputs')}: "
        f"{100 * tr.get('routing_accuracy', float('nan')):.1f} % "
        f"(fallback {100 * tr.get('fallback', 0):.1f} %)",
    ]
    for t, v in tr.get("tasks", {}).items():
        lines.append(
            f"    {t}: {100 * v['routing_accuracy']:.1f} % routed to itself, {100 * v['fallback']:.1f} % "
            f"to the shared model ({v['inputs']} inputs, {v['held_out']} held out)"
        )
    for g in cfg.get("confused_groups", []):
        how = (
            "given to each input's task id"
            if g.get("by") == "task_id"
            else "spread evenly"
            if g["scale"] == 0
            else f"preference kept at factor {g['scale']:.2f}"
        )
        mixes = "" if g.get("by") == "task_id" else " (top-k ≥ 2 mixes them)"
        lines.append(f"  confused group {', '.join(g['tasks'])}: its probability is {how}{mixes}")
    lines += ["  " + w for w in confusion_warnings(tr)]
    return "\n".join(lines)


def confusion_warnings(training: dict) -> list[str]:
    """One warning per confused task pair of a router's training record (`confused_pairs`), or, for a router
    trained with `confused: task_id`, a note that the pair is served by its inputs' task ids."""
    by_id = training.get("options", {}).get("confused") == "task_id"
    out = []
    for c in training.get("confused_pairs", []):
        (a, b), (ab, ba) = c["tasks"], c["sent_to_other"]
        seen = (
            f"{a} and {b} are confused (pair accuracy {100 * c['pair_accuracy']:.1f} %, chance 50 %; "
            f"{100 * ab:.1f} % of {a}'s inputs go to {b}, {100 * ba:.1f} % the other way)"
        )
        out.append(
            f"note: {seen}: each input of the two is served by its task id (router.confused task_id), "
            "which the batches must carry"
            if by_id
            else f"warning: {seen}: if they share their inputs, no input router can separate them; serve "
            "them with their task ids (train the router with --router.confused task_id) or expect them to "
            "lose accuracy"
        )
    return out
