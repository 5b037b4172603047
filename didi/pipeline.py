"""The DiDi pipeline: decompose → rank search → budget → LoRA refinement → artifact.

Each stage is a function so that `didi merge`, `didi search` and `didi refine` (and the benchmarks) share it.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Union

import lightning as L
import torch

from didi.backbones.base import Zoo
from didi.budget import (Allocator, RankProblem, folded_error, folded_ranks, parse_budget, rescale_to_budget,
                         uniform_ranks)
from didi.callbacks import RankEvolution, rank_heatmap_png
from didi.closed_form import GroupTerms
from didi.datamodules.layers import LayerBatchDataModule
from didi.decompose import DecomposeConfig, FactorStore, decompose, terms_from_factors
from didi.errors import DidiError
from didi.refine import LoRARefine, RefineConfig
from didi.search import RankSearch, SearchConfig
from didi.tensorfile import LazyTensor, lazy_tensors

Allocation = Literal["search", "greedy", "uniform"]
#: `low_rank`: the paper's shared LoRA module, paid for by the budget. `folded`: the shared part M_s is added
#: densely to the stored base (θ0 + M_s replaces θ0, so it costs nothing under method.md §4's accounting) and
#: the whole budget goes to the experts of τ_t − M_s.
SharedPart = Literal["low_rank", "folded"]


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by both stages (any cluster launch goes through these).

    Args:
        accelerator: `auto`, `cpu`, `gpu`, ...
        devices: devices per node (`2`, `auto`, ...).
        strategy: `auto`, `ddp`, `ddp_spawn`, ...
        num_nodes: nodes (SLURM / torchrun set the rest from the environment).
        logger: `csv` (default), `wandb` (honours WANDB_MODE=offline), or `none`.
        log_dir: where CSV logs (and W&B offline runs) go.
        wandb_project: W&B project name.
        log_every_n_steps: logging period.
        progress_bar: show Lightning progress bars.
    """

    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    logger: Literal["csv", "wandb", "none"] = "csv"
    log_dir: str = "didi_runs"
    wandb_project: str = "didi"
    log_every_n_steps: int = 10
    progress_bar: bool = True


@dataclass
class Ranks:
    """Integer ranks per matrix (shared [L], experts [L,T]) with the continuous ranks they came from."""

    r_s: torch.Tensor
    r_t: torch.Tensor
    info: dict = field(default_factory=dict)

    def to_json(self, store: FactorStore) -> dict:
        return {
            "tasks": store.tasks, "info": self.info,
            "ranks": {e.name: {"shared": int(self.r_s[e.idx]), **{t: int(self.r_t[e.idx, j])
                                                               for j, t in enumerate(store.tasks)}}
                      for e in store.matrices},
        }

    @classmethod
    def from_json(cls, d: dict, store: FactorStore) -> "Ranks":
        if d["tasks"] != store.tasks:
            raise DidiError(f"ranks file: tasks {d['tasks']} differ from the zoo's tasks {store.tasks}")
        missing = [e.name for e in store.matrices if e.name not in d["ranks"]]
        if missing:
            raise DidiError(f"ranks file: no ranks for matrix '{missing[0]}'")
        r_s = torch.tensor([d["ranks"][e.name]["shared"] for e in store.matrices])
        r_t = torch.tensor([[d["ranks"][e.name][t] for t in store.tasks] for e in store.matrices])
        return cls(r_s, r_t, d.get("info", {}))


_LOGGERS: dict[int, object] = {}


class _QuietLightning(logging.Filter):
    """Drops Lightning's advertising tip; everything else it says is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_QuietLightning())
for _msg in (".*IterableDataset.*has `__len__` defined.*", ".*returned `None`, this fit will run with no optimizer.*",
             ".*smaller than the logging interval.*", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
             ".*does not have many workers.*"):
    warnings.filterwarnings("ignore", message=_msg)


class EndSpawnedProcessGroup(L.Callback):
    """Destroys the process group at the end of a run in processes that Lightning spawned (ddp_spawn,
    ddp_fork): Lightning leaves it alive, and gloo's threads then race the interpreter's exit — a worker died
    with SIGABRT ("terminate called without an active exception") in about one 2-process test run in eight.
    Processes launched by torchrun or the `ddp` strategy go on to the next stage and keep theirs."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        spawned = getattr(trainer.strategy, "_start_method", "popen") != "popen"
        if spawned and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def make_trainer(tcfg: TrainerConfig, callbacks: list, stage: str, max_steps: int = -1,
                 max_epochs: int = -1) -> L.Trainer:
    """One Trainer per stage: the search runs `max_steps` optimiser steps; the refinement one epoch (its
    manual optimisation advances no global step)."""
    logger = _logger(tcfg, stage)
    return L.Trainer(
        accelerator=tcfg.accelerator, devices=tcfg.devices, strategy=tcfg.strategy, num_nodes=tcfg.num_nodes,
        max_steps=max_steps, max_epochs=max_epochs, logger=logger, log_every_n_steps=tcfg.log_every_n_steps,
        enable_progress_bar=tcfg.progress_bar, enable_model_summary=False,
        callbacks=[*callbacks, EndSpawnedProcessGroup()],
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
        default_root_dir=tcfg.log_dir, num_sanity_val_steps=0, limit_val_batches=0,
    )


def eval_trainer(tcfg: TrainerConfig) -> L.Trainer:
    """The Trainer of an evaluation (`trainer.test`): the run's devices and strategy, no logger or checkpoints."""
    return L.Trainer(accelerator=tcfg.accelerator, devices=tcfg.devices, strategy=tcfg.strategy,
                     num_nodes=tcfg.num_nodes, logger=False, enable_progress_bar=tcfg.progress_bar,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=tcfg.log_dir,
                     callbacks=[EndSpawnedProcessGroup()])


def _logger(tcfg: TrainerConfig, stage: str):
    if tcfg.logger == "none":
        return False
    if tcfg.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        key = id(tcfg)  # one W&B run for both stages of one merge
        if key not in _LOGGERS:
            Path(tcfg.log_dir).mkdir(parents=True, exist_ok=True)
            _LOGGERS[key] = WandbLogger(project=tcfg.wandb_project, save_dir=tcfg.log_dir)
        return _LOGGERS[key]
    if tcfg.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(tcfg.log_dir, name=stage)
    raise DidiError(f"trainer.logger: expected csv, wandb or none, found {tcfg.logger!r}")


# ---------------------------------------------------------------------------------------------- problem
Policy = Union[str, Callable[[str], str]]


def policy_fn(policy: Policy) -> Callable[[str], str]:
    """A non-matrix policy for every tensor (`shared`/`per_task`) or per tensor (an adapter's `policy_of`)."""
    return policy if callable(policy) else (lambda name: policy)


def rank_problem(store: FactorStore, widths: list[int], policy: Policy) -> RankProblem:
    """Bounds are min(numerical rank, search width K); fixed cost = per-task non-matrix deltas if counted."""
    T = len(store.tasks)
    fixed = 0.0
    pol = policy_fn(policy)
    for name, meta in store.nonmatrix.items():
        if not meta["zero"] and pol(name) == "per_task":
            fixed += T * float(torch.Size(meta["shape"]).numel())
    ents = store.matrices
    return RankProblem(
        m=torch.tensor([e.m for e in ents]), n=torch.tensor([e.n for e in ents]),
        bound_s=torch.tensor([min(e.bound_s, k) for e, k in zip(ents, widths)]),
        bound_t=torch.tensor([[min(b, k) for b in e.bound_t] for e, k in zip(ents, widths)]),
        base_params=store.base_params, fixed_elements=fixed,
    )


class TermsCache:
    """Closed-form terms of every matrix at its search width, grouped by K and memoised per requested batch.

    Memory is what the search needs and no more: the float64 stack of every matrix (the exact allocator's)
    and the float32 stacks of the layer batches, cut from it once it exists; a matrix's terms are not kept a
    second time on their own (they were: 2.5× instead of 1.5× of the search terms, the one part of a merge
    that grows with depth).
    """

    def __init__(self, store: FactorStore, widths: list[int]) -> None:
        self.store, self.widths = store, widths
        self._groups: dict[tuple, list] = {}
        self._all = tuple(range(len(widths)))

    def get(self, i: int) -> GroupTerms:
        return terms_from_factors(self.store.load(i), self.widths[i], dtype=torch.float64)

    def groups(self, indices: list[int], dtype=torch.float32) -> list[tuple[torch.Tensor, GroupTerms]]:
        """Terms of `indices`, stacked per search width; memoised, since every epoch asks for the same batches."""
        key = (tuple(indices), dtype)
        if key not in self._groups:
            full = self._groups.get((self._all, torch.float64))
            self._groups[key] = self._stack(indices, dtype) if full is None else _select(full, indices, dtype)
        return self._groups[key]

    def _stack(self, indices: list[int], dtype) -> list[tuple[torch.Tensor, GroupTerms]]:
        by_k: dict[int, list[int]] = {}
        for i in indices:
            by_k.setdefault(self.widths[i], []).append(i)
        out = []
        for _, idx in sorted(by_k.items()):
            ts = [self.get(i).to(dtype=dtype) for i in idx]
            stacked = GroupTerms(*(torch.cat([getattr(t, f) for t in ts]) for f in GroupTerms.__dataclass_fields__))
            out.append((torch.tensor(idx), stacked))
        return out

    def tau_total(self) -> float:
        full = self._groups.get((self._all, torch.float64))
        if full is not None:
            return float(sum(g.tau_sq.sum() for _, g in full))
        return self.store.tau_total()


def _select(full: list[tuple[torch.Tensor, GroupTerms]], indices: list[int], dtype) -> list[tuple[torch.Tensor, GroupTerms]]:
    """The rows of `indices` from stacked groups (same K grouping, same order as `TermsCache._stack`)."""
    pos = {i: n for n, i in enumerate(indices)}
    out = []
    for idx, g in full:
        rows = sorted((pos[i], j) for j, i in enumerate(idx.tolist()) if i in pos)
        if rows:
            r = torch.tensor([j for _, j in rows])
            out.append((idx[r], GroupTerms(*(getattr(g, f)[r] for f in GroupTerms.__dataclass_fields__)).to(dtype=dtype)))
    return out


def _widths(store: FactorStore, cap: int) -> list[int]:
    return [min(e.K, cap) for e in store.matrices]


def greedy_ranks(store: FactorStore, target: float, policy: Policy, cap: int | None = None):
    """Greedy marginal-gain allocation from zero at width `cap` (grown until no module is cut by it)."""
    K_max = max(e.K for e in store.matrices)
    cap = min(K_max, cap or 128)
    while True:
        widths = _widths(store, cap)
        problem = rank_problem(store, widths, policy)
        cache = TermsCache(store, widths)
        alloc = Allocator(cache.groups(list(range(len(widths))), torch.float64), problem)
        budget = problem.max_elements(target)
        L_, T = problem.bound_t.shape
        r_s, r_t = alloc.greedy_fill(torch.zeros(L_, dtype=torch.long), torch.zeros(L_, T, dtype=torch.long), budget)
        cut = [(r_s[i] >= widths[i] and store.matrices[i].bound_s > widths[i]) or
               any(r_t[i, t] >= widths[i] and store.matrices[i].bound_t[t] > widths[i] for t in range(T))
               for i in range(L_)]
        if not any(cut) or cap >= K_max:
            return r_s, r_t, cap, alloc.last_gain
        cap = min(K_max, cap * 2)


# ----------------------------------------------------------------------------------------------- stages
def _search(store: FactorStore, cache: TermsCache, problem: RankProblem, alloc: Allocator, target: float,
            budget: int, lam: float, scfg: SearchConfig, tcfg: TrainerConfig, work_dir: Path | None, resume: bool,
            info: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The differentiable search (Lightning fit), then round → global factor → greedy fill (method.md §2.3)."""
    tau_total = cache.tau_total()
    gamma = scfg.gamma
    if gamma == "auto":  # exact-penalty threshold: marginal error decrease per element, in loss units
        gamma = scfg.gamma_scale * lam * problem.base_params / tau_total
    info["gamma"] = float(gamma)
    if scfg.init == "uniform":
        init_s, init_t = uniform_ranks(problem, budget)
    else:
        init_s, init_t = problem.bound_s, problem.bound_t
    dm = LayerBatchDataModule(len(cache.widths), cache.groups, scfg.layer_batch_size)
    module = RankSearch(scfg, problem, target, tau_total, float(gamma), init_s, init_t, dm.num_batches)
    callbacks: list = [RankEvolution(store.matrices, every_n_steps=tcfg.log_every_n_steps)]
    ckpt = None
    if work_dir is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=work_dir / "search", save_last=True, every_n_train_steps=50,
                                         save_top_k=0))
        last = work_dir / "search" / "last.ckpt"
        ckpt = str(last) if resume and last.exists() else None
    trainer = make_trainer(tcfg, callbacks, "search", max_steps=scfg.steps)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    rf_s, rf_t = module.r_s.detach().cpu(), module.r_t.detach().cpu()
    info["search_ratio"] = problem.ratio(rf_s.double(), rf_t.double())
    info["search_rec_err_soft"] = float(trainer.callback_metrics.get("search/rec_err", float("nan")))
    info["continuous_ranks"] = {"shared": rf_s.tolist(), "experts": rf_t.tolist()}
    r_s, r_t = rescale_to_budget(rf_s, rf_t, problem, budget)
    info["rescaled_rec_err"] = alloc.error(r_s, r_t)
    return alloc.greedy_fill(r_s, r_t, budget)


def allocate(store: FactorStore, target: float, scfg: SearchConfig, tcfg: TrainerConfig, policy: Policy,
             allocation: Allocation = "search", work_dir: Path | None = None, resume: bool = False,
             shared: SharedPart = "low_rank") -> Ranks:
    """Stage 1 and the budget: integer ranks at the exact target (ratio ≤ target, short by < one unit)."""
    if shared == "folded":
        return allocate_folded(store, target, policy, allocation)
    if shared != "low_rank":
        raise DidiError(f"shared: expected 'low_rank' or 'folded', found {shared!r}")
    K_max = max(e.K for e in store.matrices)
    problem_full = rank_problem(store, [e.K for e in store.matrices], policy)
    problem_full.check(target)
    g_s, g_t, g_cap, lam = greedy_ranks(store, target, policy)
    cap = min(K_max, scfg.rank_cap or max(32, 2 * int(max(g_s.max(), g_t.max()))))
    widths = _widths(store, cap)
    problem = rank_problem(store, widths, policy)
    # the greedy ranks can stop short of the budget (no positive gain left, e.g. with a TSV-M shared part);
    # widen the search until the budget is reachable inside it (up to full rank, checked above)
    while problem.max_ratio() < target and cap < K_max and not scfg.rank_cap:
        cap = min(K_max, 2 * cap)
        widths = _widths(store, cap)
        problem = rank_problem(store, widths, policy)
    problem.check(target)
    cache = TermsCache(store, widths)
    everything = list(range(len(widths)))
    alloc = Allocator(cache.groups(everything, torch.float64), problem)
    budget = problem.max_elements(target)
    info: dict = {"allocation": allocation, "target_ratio": target, "search_width": cap}
    zeros_s, zeros_t = torch.zeros_like(g_s), torch.zeros_like(g_t)
    if allocation == "greedy":
        r_s, r_t = alloc.greedy_fill(zeros_s, zeros_t, budget)
    elif allocation == "uniform":
        r_s, r_t = uniform_ranks(problem, budget)
    elif allocation == "search":
        r_s, r_t = _search(store, cache, problem, alloc, target, budget, lam, scfg, tcfg, work_dir, resume, info)
        if scfg.polish:
            r_s, r_t = alloc.polish(r_s, r_t, budget)
        info["search_rec_err"] = alloc.error(r_s, r_t)
        if scfg.guard:  # keep the best of the searched, greedy and uniform allocations (exact error)
            cands = {"search": (r_s, r_t), "greedy": alloc.greedy_fill(zeros_s, zeros_t, budget),
                     "uniform": uniform_ranks(problem, budget)}
            if scfg.polish:
                cands["greedy"] = alloc.polish(*cands["greedy"], budget)
            errs = {k: alloc.error(*v) for k, v in cands.items()}
            info.update({f"{k}_rec_err": v for k, v in errs.items()})
            info["chosen"] = min(errs, key=errs.get)
            r_s, r_t = cands[info["chosen"]]
    else:
        raise DidiError(f"allocation: expected search, greedy or uniform, found {allocation!r}")
    info["rec_err"] = alloc.error(r_s, r_t)
    info["ratio"] = problem.ratio(r_s, r_t)
    return Ranks(r_s, r_t, info)


def allocate_folded(store: FactorStore, target: float, policy: Policy, allocation: Allocation = "search") -> Ranks:
    """Expert ranks for a shared part folded into the base: no shared ranks; `search` and `greedy` both take the
    exact greedy of `folded_ranks` (optimal to one rank unit: the search has nothing to find), `uniform` the
    same rank everywhere (the ablation)."""
    if allocation not in ("search", "greedy", "uniform"):
        raise DidiError(f"allocation: expected search, greedy or uniform, found {allocation!r}")
    problem = rank_problem(store, [e.K for e in store.matrices], policy)
    problem = replace(problem, bound_s=torch.zeros_like(problem.bound_s))
    problem.check(target)
    budget = problem.max_elements(target)
    spectra = [store.spectra(e.idx) for e in store.matrices]
    sigma_t = [s for s, _ in spectra]
    mt_sq = torch.stack([m for _, m in spectra])
    r_s = torch.zeros(len(sigma_t), dtype=torch.long)
    if allocation == "uniform":
        _, r_t = uniform_ranks(problem, budget)
    else:
        r_t = folded_ranks(sigma_t, problem.bound_t, problem.unit, budget)
    info = {"allocation": "uniform" if allocation == "uniform" else "greedy", "shared": "folded",
            "target_ratio": target, "rec_err": float(folded_error(sigma_t, mt_sq, r_t).sum()) / store.tau_total(),
            "ratio": problem.ratio(r_s, r_t)}
    return Ranks(r_s, r_t, info)


class RefineJobs:
    """Loads the refinement jobs of a layer batch: τ_t read from the checkpoints, factors from the store.

    A class, not a closure, so that `ddp_spawn` can pickle it."""

    def __init__(self, zoo: Zoo, store: FactorStore, ranks: Ranks, done_dir: Path) -> None:
        self.zoo, self.store, self.ranks, self.done_dir = zoo, store, ranks, done_dir

    def __call__(self, indices: list[int]) -> list[dict]:
        jobs = []
        for i in indices:
            if (self.done_dir / f"{i:05d}.safetensors").exists():
                continue  # finished by an earlier (interrupted) run
            e = self.store.matrices[i]
            base, taus = self.zoo.read(e.name)
            taus = torch.stack(taus).sub_(base).reshape(-1, e.m, e.n)
            del base
            # only the leading r columns are used (the initial truncated-SVD factors): a job holds rank-r factors,
            # not the store's width K (for Llama's embeddings, 128256×K per task)
            r_s, r_t = int(self.ranks.r_s[i]), [int(r) for r in self.ranks.r_t[i]]
            job = {"idx": i, "taus": taus, "r_s": r_s, "r_t": r_t, **self.store.factors(i, r_s, max(r_t, default=0))}
            if self.ranks.info.get("shared") == "folded":
                job["M_s"] = self.store.shared_merge(taus)
            jobs.append(job)
        return jobs


def refine(zoo: Zoo, store: FactorStore, ranks: Ranks, rcfg: RefineConfig, tcfg: TrainerConfig,
           work_dir: Path) -> tuple[dict, dict, dict]:
    """Stage 2; returns (shared terms, per-task terms, metrics). A folded shared part comes back as shared
    `NAME::fold` terms, which `write_didi_artifact` adds to the stored base."""
    out = work_dir / "refine"
    out.mkdir(parents=True, exist_ok=True)
    tau_total = store.tau_total()
    dm = LayerBatchDataModule(len(store.matrices), RefineJobs(zoo, store, ranks, out), rcfg.layer_batch_size)
    module = LoRARefine(rcfg, out, tau_total)
    trainer = make_trainer(tcfg, [], "refine", max_epochs=1)
    trainer.fit(module, datamodule=dm)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    # the factors stay in their per-matrix files until the artifact is written (LazyTensor): memory does
    # not grow with the number of matrices
    shared, tasks = {}, {t: {} for t in store.tasks}
    before = after = 0.0
    for e in store.matrices:
        f = lazy_tensors(out / f"{e.idx:05d}.safetensors")
        before, after = before + float(f["err_before"].load()), after + float(f["err_after"].load())
        if "M_s" in f:  # folded: the dense shared part goes into the stored base, in the tensor's own shape
            shared[f"{e.name}::fold"] = LazyTensor(tuple(e.shape), torch.float32,
                                                   lambda x=f["M_s"], shape=tuple(e.shape): x.load().reshape(shape))
        elif f["A_s"].shape[1]:
            shared[f"{e.name}::lora_A"], shared[f"{e.name}::lora_B"] = f["A_s"], f["B_s"]
        for j, t in enumerate(store.tasks):
            if f[f"A_t{j}"].shape[1]:
                tasks[t][f"{e.name}::lora_A"], tasks[t][f"{e.name}::lora_B"] = f[f"A_t{j}"], f[f"B_t{j}"]
    metrics = {"rec_err_before": before / tau_total, "rec_err_after": after / tau_total,
               "optimizer": rcfg.optimizer}
    return shared, tasks, metrics


def nonmatrix_terms(store: FactorStore, policy: Policy) -> tuple[dict, dict]:
    """Non-matrix deltas: mean folded into the base (`shared`) or exact per task (`per_task`), as
    LazyTensors read from the factor store when the artifact is written (a per-task Llama embedding is
    0.5 G elements per task)."""
    fold, tasks = {}, {t: {} for t in store.tasks}
    for name, meta in store.nonmatrix.items():
        if meta["zero"]:
            continue
        if policy_fn(policy)(name) == "shared":
            fold[name] = LazyTensor(tuple(meta["shape"]), torch.float32,
                                    lambda name=name: torch.stack(list(store.nonmatrix_deltas(name).values())).mean(0))
        else:
            per_task = lazy_tensors(store.nonmatrix_path(name))
            for t in store.tasks:
                tasks[t][f"{name}::dense"] = per_task[t]
    return fold, tasks


def work_dir_for(output: str | Path) -> Path:
    o = Path(output)
    return o.with_name(f".{o.name}.work")


@contextmanager
def _work_dir(work: Path):
    """The run's scratch directory (search checkpoints, refined matrices). Removed when the input is bad;
    kept after a crash or an interrupt so that `--resume true` / a re-run continues from it."""
    existed = work.exists()
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except DidiError:
        if not existed:
            shutil.rmtree(work, ignore_errors=True)
        raise


def is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and (
        not (torch.distributed.is_available() and torch.distributed.is_initialized())
        or torch.distributed.get_rank() == 0)


def _in_source_dtype(t: LazyTensor, dtype: torch.dtype) -> LazyTensor:
    """A folded shared matrix in its checkpoint's dtype when that is narrower than fp32: the fold replaces the
    base tensor, so a bf16 Llama-3.1-8B's fold is 16 GB, not 32 GB; rounding the delta to bf16 costs far less
    than the bf16 rounding of θ0 + delta that serving does anyway."""
    if not dtype.is_floating_point or torch.finfo(dtype).bits >= 32:
        return t
    return LazyTensor(t.shape, dtype, lambda: t.load().to(dtype))


def write_didi_artifact(output: str | Path, zoo: Zoo, store: FactorStore, ranks: Ranks, shared: dict, tasks: dict,
                        hyper: dict, metrics: dict) -> Path:
    from didi.artifact import write_artifact, zoo_manifest

    fold, nm_tasks = nonmatrix_terms(store, zoo.adapter.policy_of)
    for t in tasks:
        tasks[t].update(nm_tasks[t])
    folded = [k for k in shared if k.endswith("::fold")]
    dtypes = {p.name: p.dtype for p in zoo.matrices}
    for k in folded:
        name = k[:-len("::fold")]
        fold[name] = _in_source_dtype(shared[k], dtypes.get(name, torch.float32))
    shared = {k: v for k, v in shared.items() if k not in folded}
    manifest = {
        "method": {"name": "didi", "hyper_parameters": hyper}, **zoo_manifest(zoo, store.sha256),
        **ranks.to_json(store), "storage": {"target_ratio": ranks.info.get("target_ratio")},
        "metrics": {"allocation": ranks.info, "refine": metrics},
    }
    png = rank_heatmap_png(store.matrices, ranks.r_s, ranks.r_t,
                           title=f"DiDi ranks at {ranks.info.get('ratio', 0):.4g}x"
                                 + (" (shared part folded into the base)" if folded else ""))
    ranks_json = json.dumps(ranks.to_json(store), indent=1).encode()
    return write_artifact(output, manifest, fold, shared, tasks,
                          extra_files={"rank_heatmap.png": png, "ranks.json": ranks_json})


def run_merge(zoo: Zoo, output: str | Path, budget: float | str, dcfg: DecomposeConfig, scfg: SearchConfig,
              rcfg: RefineConfig, tcfg: TrainerConfig, allocation: Allocation = "search", resume: bool = False,
              progress: bool = True, shared: SharedPart = "low_rank") -> Path | None:
    """The whole `didi merge`; returns the artifact path (None on non-zero DDP ranks)."""
    target = parse_budget(budget)
    output = Path(output)
    if output.exists():
        raise DidiError(f"{output}: output directory already exists; choose another path or delete it")
    precheck_budget(zoo, target)
    work = work_dir_for(output)
    store = decompose(zoo, dcfg, progress=progress)
    with _work_dir(work):
        ranks = allocate(store, target, scfg, tcfg, zoo.adapter.policy_of, allocation, work, resume, shared)
        shared_terms, tasks, metrics = refine(zoo, store, ranks, rcfg, tcfg, work)
    if not is_global_zero():
        return None
    hyper = {"budget": target, "allocation": allocation, "shared": shared, "decompose": asdict(dcfg),
             "search": asdict(scfg), "refine": asdict(rcfg)}
    path = write_didi_artifact(output, zoo, store, ranks, shared_terms, tasks, hyper, metrics)
    log_heatmap(tcfg, path)
    shutil.rmtree(work, ignore_errors=True)
    return path


def log_heatmap(tcfg: TrainerConfig, artifact: Path) -> None:
    """Send the artifact's rank heatmap to the W&B run of this merge (when W&B is the logger)."""
    logger = _LOGGERS.get(id(tcfg))
    if logger is not None and (artifact / "rank_heatmap.png").exists():
        logger.log_image(key="rank_heatmap", images=[str(artifact / "rank_heatmap.png")])


def precheck_budget(zoo: Zoo, target: float) -> None:
    """Cheap refusal before any SVD: below one rank unit, or above full rank of every module."""
    T = len(zoo.tasks)
    units = [sum(p.matrix_shape) for p in zoo.matrices]
    if not units:
        raise DidiError(f"{zoo.base}: adapter '{zoo.adapter.registry_name}' decomposes no tensor of this model")
    full = sum((T + 1) * min(p.matrix_shape) * sum(p.matrix_shape) for p in zoo.matrices)
    fixed = T * sum(p.numel for p in zoo.nonmatrices
                    if p.dtype.is_floating_point and zoo.adapter.policy_of(p.name) == "per_task")
    hi = 1 + (full + fixed) / zoo.base_params
    lo = 1 + min(units) / zoo.base_params
    if target > hi:
        raise DidiError(f"budget {target:g}: above full rank (every module at full rank costs ratio {hi:.6g} at "
                        f"most); ask for less")
    if target < lo:
        raise DidiError(f"budget {target:g}: below the cost of a single rank unit (ratio {lo:.6g})")
