"""Lightning Trainers and loggers, built in one place for every fit and test didi runs (the merge stages,
evaluation, fine-tuning), so that a setting such as `logger: wandb` or the spawned-process fix cannot be
honoured by one of them and forgotten by another.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import lightning as L
import torch

from didi.errors import DidiError
from didi.progress import StageProgressBar


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by every stage (any cluster launch goes through these).

    Args:
        accelerator: `auto`, `cpu`, `gpu`, ...
        devices: devices per node (`2`, `auto`, ...).
        strategy: `auto`, `ddp`, `ddp_spawn`, ...
        num_nodes: nodes (SLURM / torchrun set the rest from the environment).
        logger: `csv` (default), `wandb` (honours WANDB_MODE=offline), or `none`.
        log_dir: where CSV logs (and W&B offline runs) go.
        wandb_project: W&B project name.
        log_every_n_steps: logging period.
        progress_bar: show one progress bar per stage ("search step 120/200", "refine 5/36 matrices").
        verbose: also show Lightning's device and stop lines ("GPU available: ...", "TPU available: ...",
            "LOCAL_RANK: ...", "`Trainer.fit` stopped: ..."), each distinct line once per run; off, they are
            not shown (they repeat for every stage and say nothing about the merge). Warnings and errors are
            shown either way.
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
    verbose: bool = False


#: Lightning messages that say nothing to a didi user, each with the reason it is filtered (narrowly, by
#: message).
_QUIET_WARNINGS = (
    ".*IterableDataset.*has `__len__` defined.*",  # layer batches are an IterableDataset with a known length
    ".*returned `None`, this fit will run with no optimizer.*",  # refinement optimises in closed form (ALS)
    ".*smaller than the logging interval.*",  # short fits (tests, small zoos) log at their last step anyway
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",  # raised inside Lightning against newer torch
    ".*does not have many workers.*",  # the batches are in-memory tensors; workers would only copy them
)


#: Lightning's INFO lines about devices and stopping: printed by every Trainer (eight times in a merge), they
#: say nothing about the merge. Shown only with `TrainerConfig.verbose`, each distinct line once per run.
_BANNER = re.compile(
    r"(GPU available|TPU available|HPU available|IPU available|LOCAL_RANK: |Initializing distributed: "
    r"|`Trainer\.(fit|test|validate|predict)` stopped|-+\ndistributed_backend=)"
)
#: Loggers that print them: Lightning's rank-zero INFO logger, the CUDA accelerator (LOCAL_RANK) and the
#: distributed set-up (Initializing distributed).
_BANNER_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.utilities.distributed",
)


class _LightningChatter(logging.Filter):
    """Drops Lightning's advertising tip always, and its device/stop banner unless verbose (then each distinct
    line once per run). Only INFO and below: warnings and errors always pass."""

    def __init__(self) -> None:
        super().__init__()
        self.verbose = False
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        msg = record.getMessage()
        if "litlogger" in msg:
            return False
        if not _BANNER.match(msg):
            return True
        if not self.verbose or msg in self.seen:
            return False
        self.seen.add(msg)
        return True


_CHATTER = _LightningChatter()


def quiet_lightning(verbose: bool = False, new_run: bool = False) -> None:
    """Install the filters above in this process (idempotent; a callback also calls it in spawned workers).

    `verbose`: show the device/stop banner (each line once per run); `new_run`: forget the lines already shown
    (a new command, or a new `Trainers`)."""
    for msg in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=msg)
    _CHATTER.verbose = verbose
    if new_run:
        _CHATTER.seen.clear()
    for name in _BANNER_LOGGERS:
        log = logging.getLogger(name)
        if _CHATTER not in log.filters:
            log.addFilter(_CHATTER)


class ProcessHygiene(L.Callback):
    """Runs in every process of a fit (spawned workers included): installs the warning filters at setup, and
    destroys the process group at teardown in processes that Lightning spawned (ddp_spawn, ddp_fork):
    Lightning leaves it alive, and gloo's threads then race the interpreter's exit — a worker died with
    SIGABRT ("terminate called without an active exception") in about one 2-process test run in eight.
    Processes launched by torchrun or the `ddp` strategy go on to the next stage and keep theirs."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        quiet_lightning(self.verbose)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        spawned = getattr(trainer.strategy, "_start_method", "popen") != "popen"
        if spawned and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Trainers:
    """The Trainers of one run (a merge's search and refinement, a fine-tune, an evaluation).

    One object per run instead of module-level state: a W&B run is created on first use and shared by every
    stage of this run (the rank heatmap lands in the same run as the search curves), and dies with the run.
    """

    def __init__(self, cfg: TrainerConfig) -> None:
        self.cfg = cfg
        self._wandb = None
        quiet_lightning(cfg.verbose, new_run=True)

    def fit(
        self,
        stage: str,
        callbacks: Sequence[L.Callback] = (),
        max_steps: int = -1,
        max_epochs: int = -1,
        progress: StageProgressBar | None = None,
    ) -> L.Trainer:
        """A Trainer for a fit: the search runs `max_steps` optimiser steps; the refinement one epoch (its
        manual optimisation advances no global step); a fine-tune `max_steps`.

        `progress`: the stage's bar (the refinement counts matrices); default: `<stage> step n/max_steps`.
        Lightning's epoch bar is never used."""
        c = self.cfg
        quiet_lightning(c.verbose)
        callbacks = list(callbacks)
        if c.progress_bar:
            callbacks.append(progress or StageProgressBar(stage))
        return L.Trainer(
            **self._placement(),
            max_steps=max_steps,
            max_epochs=max_epochs,
            logger=self.logger(stage),
            log_every_n_steps=c.log_every_n_steps,
            callbacks=[*callbacks, ProcessHygiene(c.verbose)],
            enable_checkpointing=any(isinstance(cb, L.pytorch.callbacks.ModelCheckpoint) for cb in callbacks),
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )

    def _placement(self) -> dict:
        """What every Trainer of the run shares: where it runs, where it writes, and its bar setting."""
        c = self.cfg
        return dict(
            accelerator=c.accelerator,
            devices=c.devices,
            strategy=c.strategy,
            num_nodes=c.num_nodes,
            default_root_dir=c.log_dir,
            enable_progress_bar=c.progress_bar,
            enable_model_summary=False,
        )

    def test(self) -> L.Trainer:
        """The Trainer of an evaluation (`trainer.test`): the run's devices and strategy, no logger or
        checkpoints."""
        c = self.cfg
        quiet_lightning(c.verbose)
        return L.Trainer(
            **self._placement(),
            logger=False,
            enable_checkpointing=False,
            callbacks=[ProcessHygiene(c.verbose)],
        )

    def logger(self, stage: str):
        c = self.cfg
        if c.logger == "none":
            return False
        if c.logger == "wandb":
            if self._wandb is None:
                from lightning.pytorch.loggers import WandbLogger

                Path(c.log_dir).mkdir(parents=True, exist_ok=True)
                self._wandb = WandbLogger(project=c.wandb_project, save_dir=c.log_dir)
            return self._wandb
        if c.logger == "csv":
            from lightning.pytorch.loggers import CSVLogger

            return CSVLogger(c.log_dir, name=stage)
        raise DidiError(f"trainer.logger: expected csv, wandb or none, found {c.logger!r}")

    def log_image(self, key: str, path: str | Path) -> None:
        """Send an image (the artifact's rank heatmap) to this run's W&B run, when W&B is the logger."""
        if self._wandb is not None and Path(path).exists():
            self._wandb.log_image(key=key, images=[str(path)])


def is_global_zero() -> bool:
    """Rank 0 of the launch (torchrun/`fabric run` environment, or an initialised process group)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and (
        not (torch.distributed.is_available() and torch.distributed.is_initialized())
        or torch.distributed.get_rank() == 0
    )


def barrier() -> None:
    """Wait for every process of an initialised process group (a no-op in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
