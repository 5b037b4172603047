"""The DiDi pipeline: decompose → rank search → budget → LoRA refinement → artifact.

This module only orchestrates: each stage lives in its own module (`decompose`, `allocation`, `refine`,
`didi_artifact`), and `didi merge`, `didi search`, `didi refine`, the registry's DiDi variants and the
benchmarks all run them through the three functions here, with one options object (`MergeOptions`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

from didi import jsonio
from didi.accounting import Storage
from didi.allocation import (
    Allocation,
    Ranks,
    SharedPart,
    allocate,
    at_width,
    check_decompose_inputs,
    precheck_budget,
    resolve_width,
    widen,
    zoo_pricing,
)
from didi.backbones.base import Zoo
from didi.budget import parse_budget
from didi.calibration import WhitenedZoo, check_options, whiten_zoo
from didi.decompose import DecomposeConfig, FactorStore
from didi.didi_artifact import write_didi_artifact
from didi.errors import DidiError
from didi.quantize import ExpertDtype, check_expert_dtype
from didi.refine import RefineConfig, refine_matrices
from didi.search import SearchConfig
from didi.shards import factor_store
from didi.trainer import TrainerConfig, Trainers, is_global_zero


@dataclass
class MergeOptions:
    """How a DiDi merge is run: the one set of options of `didi merge`, `didi search`, `didi refine`,
    `run_merge` and the registry's DiDi variants (each takes the fields it needs).

    Args:
        budget: storage ratio: S (1.24), M (1.4), L (2.0) or any float > 1.
        decompose: decomposition settings (shared_merge: mean, ties, tsv_m; max_rank; dtype; device;
            cache_dir).
        search: stage-1 settings.
        refine: stage-2 settings.
        trainer: Lightning Trainer settings (accelerator, devices, strategy, num_nodes, logger).
        allocation: `search` (DiDi's differentiable search), or the ablations `greedy` / `uniform`.
        shared: `low_rank` (the paper: a shared LoRA module, paid for) or `folded` (the dense shared part is
            added to the stored base, which costs nothing; the whole budget goes to the experts, allocated by
            the exact greedy, and the refinement updates the dense shared part and the experts).
        storage: what the budget counts: `elements` (the paper's: stored numbers over |θ0|) or `bytes`
            (stored bytes over θ0's bytes in its own dtypes; factors priced in their stored dtype, scales
            included), so narrower experts buy more rank.
        expert_dtype: how the experts' factors are stored: null (float32, the factors' dtype), `bfloat16`,
            `int8` (per-column / per-row scales) or `nf4` (4-bit NormalFloat, two codes per byte). The search
            prices their ranks in it and the refinement fits the quantized factors (docs/method.md §9).
        resume: continue an interrupted run with the same output from its work directory (search checkpoint).
        calibration: {task: validation path} (as `didi router train --data` takes it; a directory is read at
            validation.jsonl, val.jsonl or train.jsonl, never test): minimise each linear layer's output error
            on these unlabelled inputs instead of the weight error (docs/method.md §8; `didi merge` only).
            None (default): data-free.
        calibration_mode: `pooled` (one input metric per matrix from every task's inputs; both layouts) or
            `per_task` (each task's own; only with --shared folded and --refine.optimizer none).
        calibration_eps: ε of C = chol(XXᵀ/N + ε·mean(diag)·I), relative to the second moment's mean diagonal.
        calibration_scale: `output` (C as above: the mean squared output error per input row, so layers with
            larger inputs weigh more in the budget) or `unit` (each C divided by √mean(diag): the metric's
            shape per matrix changes, its overall weight is the data-free one's).
        calibration_examples: validation inputs read per task.
        calibration_max_length: tokens per calibration input (text).
    """

    budget: Union[float, str] = "S"
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    allocation: Allocation = "search"
    shared: SharedPart = "low_rank"
    storage: Storage = "elements"
    expert_dtype: Optional[ExpertDtype] = None
    resume: bool = False
    calibration: Optional[dict[str, str]] = None
    calibration_mode: Literal["pooled", "per_task"] = "pooled"
    calibration_eps: float = 0.01
    calibration_scale: Literal["output", "unit"] = "output"
    calibration_examples: int = 256
    calibration_max_length: int = 128

    def validate(self) -> None:
        self.budget = parse_budget(self.budget)
        if self.storage not in ("elements", "bytes"):
            raise DidiError(f"storage: expected elements or bytes, found {self.storage!r}")
        check_expert_dtype(self.expert_dtype, self.refine_device())
        if self.calibration is not None and self.expert_dtype not in (None, "float32"):
            raise DidiError(
                f"expert_dtype {self.expert_dtype}: not with --calibration (the calibrated factors are "
                f"mapped back to the weights' metric after the refinement, which would undo the "
                f"quantization); use one or the other"
            )
        check_options(
            self.calibration, self.calibration_mode, self.calibration_eps, self.calibration_examples,
            self.calibration_max_length, self.shared, self.refine.optimizer, self.calibration_scale,
        )  # fmt: skip

    def refine_device(self) -> str:
        """Where the refinement runs: cuda when the trainer asks for a GPU (or `auto` finds one), else cpu."""
        import torch

        acc = str(self.trainer.accelerator)
        gpu = acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())
        return "cuda" if gpu else "cpu"

    def hyper_parameters(self) -> dict:
        """What the manifest records (the trainer settings change no result)."""
        return {
            "budget": parse_budget(self.budget),
            "allocation": self.allocation,
            "shared": self.shared,
            "storage": self.storage,
            "expert_dtype": self.expert_dtype,
            "decompose": asdict(self.decompose),
            "search": asdict(self.search),
            "refine": asdict(self.refine),
            **({"calibration": self.calibration_settings()} if self.calibration is not None else {}),
        }

    def calibration_settings(self) -> dict:
        return {
            "data": {t: str(p) for t, p in self.calibration.items()},
            "mode": self.calibration_mode,
            "eps": self.calibration_eps,
            "scale": self.calibration_scale,
            "examples": self.calibration_examples,
            "max_length": self.calibration_max_length,
        }


def work_dir_for(output: str | Path) -> Path:
    """The scratch directory of a run writing `output`: `.NAME.work` beside it."""
    o = Path(output)
    return o.with_name(f".{o.name}.work")


#: Work directories this process has created or spoken about: a merge enters its work directory twice (search,
#: refinement) and says what it found there once.
_ANNOUNCED: set[Path] = set()
#: work directories whose lock this process holds: path → (open lock file, nesting depth)
_LOCKS: dict[Path, tuple[int, int]] = {}


@contextmanager
def _exclusive(work: Path) -> Iterator[None]:
    """One run per output at a time. Two merges writing one output share its work directory: without a lock
    the second could refine at its own ranks into the first's files, and the winner's artifact then carried
    factors of the other run's ranks (a fault drill showed it). The lock is taken by rank 0 of a launch only
    (the other processes of a DDP run share rank 0's run) and re-entered by the stages of one run."""
    import fcntl

    if not is_global_zero():
        yield
        return
    key = work.resolve()
    if key in _LOCKS:
        fd, depth = _LOCKS[key]
        _LOCKS[key] = (fd, depth + 1)
    else:
        fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DidiError(
                f"{work}: another didi run is writing this output (its work directory is locked); wait for "
                f"it to finish, or choose another output"
            ) from None
        _LOCKS[key] = (fd, 1)
    try:
        yield
    finally:
        fd, depth = _LOCKS[key]
        if depth > 1:
            _LOCKS[key] = (fd, depth - 1)
        else:
            del _LOCKS[key]
            os.close(fd)  # releases the lock


def _describe(work: Path) -> str:
    """What an interrupted run left in `work`, in words."""
    parts = []
    if (work / "search" / "last.ckpt").exists():
        parts.append("a search checkpoint")
    n = len(list((work / "refine").glob("*.safetensors"))) if (work / "refine").is_dir() else 0
    if n:
        parts.append(f"{n} refined matrices")
    return " and ".join(parts) or "nothing saved yet"


def _announce(work: Path, existed: bool, resume: bool | None) -> None:
    """Say once, on stderr, that a run continues from an earlier run's work directory, or could."""
    if resume and existed:
        msg = f"didi: resuming from {work} ({_describe(work)})"
    elif resume:
        msg = f"didi: --resume true, but there is no work directory {work} to resume from; starting afresh"
    elif existed:
        msg = (
            f"didi: {work} holds an interrupted run of this output ({_describe(work)}). This run does not "
            f"resume its search; `--resume true` continues from it, and deleting the directory starts "
            f"afresh (matrices it refined at the ranks this run arrives at are reused either way)."
        )
    else:
        return
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def _work_dir(work: Path, resume: bool | None = None) -> Iterator[Path]:
    """The run's scratch directory (search checkpoints, refined matrices). Removed when the input is bad;
    kept after a crash or an interrupt so that `--resume true` / a re-run continues from it. A re-run is told
    (once) that the directory exists, what it holds, and how to resume from it or start afresh: without that
    it restarted the search silently. `resume`: the run's `--resume` (None: not known, nothing said)."""
    key = work.resolve()
    existed = work.exists()
    if key not in _ANNOUNCED and resume is not None and is_global_zero():
        _announce(work, existed, resume)
    _ANNOUNCED.add(key)
    work.mkdir(parents=True, exist_ok=True)
    try:
        with _exclusive(work):
            yield work
    except BaseException as e:
        _ANNOUNCED.discard(key)  # a later run in this process finds the directory and is told about it
        if isinstance(e, DidiError) and not existed:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _check_new(output: str | Path) -> None:
    if Path(output).exists():
        raise DidiError(f"{output}: output directory already exists; choose another path or delete it")


def run_search(
    zoo: Zoo, output: str | Path, opts: MergeOptions, progress: bool = True, trainers: Trainers | None = None
) -> tuple[Ranks, FactorStore]:
    """Decompose, search and budget: the integer ranks (what `didi search` writes to `output`) and the factor
    store they index."""
    target = parse_budget(opts.budget)
    if opts.calibration is not None and not isinstance(zoo, WhitenedZoo):
        raise DidiError("calibration: only `didi merge` (run_merge) calibrates; didi search / refine do not")
    check_expert_dtype(opts.expert_dtype, opts.refine_device())
    pricing = zoo_pricing(zoo, opts.storage, opts.expert_dtype)
    precheck_budget(zoo, target, pricing)
    dcfg = resolve_width(zoo, opts.decompose, target, pricing)
    check_decompose_inputs(zoo, dcfg, target, pricing)
    trainers = trainers or Trainers(opts.trainer)
    auto, first = opts.decompose.max_rank == "auto", dcfg.max_rank
    with _work_dir(work_dir_for(output), opts.resume) as work:
        while True:
            store = factor_store(zoo, dcfg, trainers, progress)
            ranks = allocate(
                store,
                target,
                opts.search,
                trainers,
                zoo.adapter.policy_of,
                opts.allocation,
                # a wider round searches afresh in its own checkpoint directory (a resumed run finds each)
                work if dcfg.max_rank == first else work / f"width_{dcfg.max_rank or 'full'}",
                opts.resume,
                opts.shared,
                pricing,
            )
            n = at_width(store, ranks)
            if not n or not auto:
                break
            # `auto` is an estimate: modules that reached it wanted more rank, so widen and search again
            wider = widen(zoo, dcfg.max_rank)
            if is_global_zero():
                print(
                    f"didi: {n} module(s) got the factor store's whole width K = {dcfg.max_rank} (decompose."
                    f"max_rank auto); widening to K = {wider or 'full'} and searching again",
                    file=sys.stderr,
                    flush=True,
                )
            dcfg = replace(dcfg, max_rank=wider)
            check_decompose_inputs(zoo, dcfg, target, pricing)
    ranks.info["width"] = dcfg.max_rank
    ranks.info["at_width"] = n
    if n and is_global_zero():
        print(
            f"didi: {n} module(s) got the factor store's whole width K = {dcfg.max_rank} (decompose.max_rank "
            f"{opts.decompose.max_rank!r}): the budget may have given them more; --decompose.max_rank "
            f"{2 * dcfg.max_rank} widens the store",
            file=sys.stderr,
            flush=True,
        )
    return ranks, store


def run_refine(
    zoo: Zoo,
    output: str | Path,
    ranks: Ranks | str | Path,
    opts: MergeOptions,
    progress: bool = True,
    method: str = "didi",
    trainers: Trainers | None = None,
    store: FactorStore | None = None,
) -> Path | None:
    """Refine at `ranks` (a `Ranks` or a ranks file of `didi search`) and write the artifact; returns its path
    (None on non-zero DDP ranks). Matrices finished by an interrupted run are not redone. `store`: the factor
    store the ranks index, when the caller has it open (`run_merge`); else it is looked up (and, if missing,
    computed) by `decompose`."""
    _check_new(output)
    trainers = trainers or Trainers(opts.trainer)
    hyper = opts.hyper_parameters()
    ranks_json = None
    if not isinstance(ranks, Ranks):
        try:
            ranks_file, ranks_json = Path(ranks), json.loads(Path(ranks).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DidiError(f"{ranks}: not a ranks file written by `didi search` ({e})") from e
    if store is None:
        dcfg = opts.decompose
        if dcfg.max_rank == "auto":  # the width the search used (recorded in its ranks), else the budget's
            info = ranks.info if ranks_json is None else ranks_json.get("info", {})
            dcfg = (
                replace(dcfg, max_rank=info["width"])
                if "width" in info
                else resolve_width(zoo, dcfg, parse_budget(info.get("target_ratio", opts.budget)))
            )
        store = factor_store(zoo, dcfg, trainers, progress)
    if ranks_json is not None:
        try:
            ranks = Ranks.from_json(ranks_json, store)
        except KeyError as e:
            raise DidiError(f"{ranks_file}: not a ranks file written by `didi search` ({e})") from e
        hyper.update(
            budget=ranks.info.get("target_ratio"),
            allocation=ranks.info.get("allocation"),
            shared=ranks.info.get("shared", "low_rank"),
            storage=ranks.info.get("storage", "elements"),
            expert_dtype=ranks.info.get("expert_dtype"),
            ranks_file=str(ranks_file.resolve()),
        )
        del hyper["search"]
    check_expert_dtype(ranks.info.get("expert_dtype"), opts.refine_device())  # e.g. bf16 on an old GPU
    work = work_dir_for(output)
    with _work_dir(work, opts.resume):
        shared_terms, tasks, metrics = refine_matrices(zoo, store, ranks, opts.refine, trainers, work)
    metrics["decompose"] = {"max_rank": store.meta["config"]["max_rank"], "svd": store.meta["config"]["svd"]}
    metrics["decompose"].update(store.shares or {})
    if not is_global_zero():
        return None
    if isinstance(zoo, WhitenedZoo):  # calibrated: the factors back in the weights' metric (method.md §8)
        zoo, store, shared_terms, tasks = zoo.unwhiten(store, shared_terms, tasks, metrics)
    path = write_didi_artifact(output, zoo, store, ranks, shared_terms, tasks, hyper, metrics, method)
    trainers.log_image("rank_heatmap", path / "rank_heatmap.png")
    shutil.rmtree(work, ignore_errors=True)
    return path


def run_merge(
    zoo: Zoo,
    output: str | Path,
    opts: MergeOptions | None = None,
    progress: bool = True,
    method: str = "didi",
) -> Path | None:
    """The whole `didi merge`; returns the artifact path (None on non-zero DDP ranks). `method` is the
    registry name recorded in the manifest (didi, didi_greedy, ...)."""
    opts = opts or MergeOptions()
    _check_new(output)
    if opts.calibration is not None and opts.expert_dtype not in (None, "float32"):
        opts.validate()  # refuses quantized experts with calibration before any input is read
    if opts.calibration is not None:  # the zoo read in the inputs' metric (didi.calibration; writes nothing)
        zoo, opts = whiten_zoo(zoo, opts, progress)
    trainers = Trainers(opts.trainer)  # one W&B run for both stages
    with _work_dir(work_dir_for(output), opts.resume):  # one lock over both stages
        ranks, store = run_search(zoo, output, opts, progress, trainers)
        return run_refine(zoo, output, ranks, opts, progress, method, trainers, store)


def write_json_atomic(path: str | Path, obj: dict) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(jsonio.dumps(obj, indent=1))
    os.replace(tmp, p)
