"""What a user sees while a merge runs: one bar per stage, named by the stage and counting what the stage does
("decompose 12/36 tensors", "search step 120/200", "refine 5/36 matrices"), with its metrics under labels
that say what they are, printed in the format of the end summary.

Lightning's own bar counts epochs ("Epoch 199/-2" for a fit bounded by steps), shows the logger's `v_num` and
cuts long metric names; didi's fits are one epoch of layer batches or a number of optimiser steps, so the bar
here counts those instead.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Sequence

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

#: How metric values are printed: as `didi merge` prints its summary (4 significant digits).
METRIC_FORMAT = "{:.4g}"

#: Seconds between two redraws of a bar whose output is not a terminal (a log file, a batch job's
#: stderr): every redraw there is kept, and a fit redrawn ten times a second fills a log with bars.
LOG_INTERVAL = 30.0


def redraw_interval(stream: Any = None) -> float:
    """tqdm's `mininterval` for `stream` (stderr by default): its own 0.1 s on a terminal, `LOG_INTERVAL`
    elsewhere."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return 0.1 if callable(isatty) and isatty() else LOG_INTERVAL


def stage_bar(
    desc: str,
    total: int | float | None,
    unit: str = "",
    initial: int = 0,
    disable: bool = False,
    iterable: Iterable | None = None,
) -> tqdm:
    """A tqdm bar (over `iterable`, if given) that reads `desc n/total unit |████| elapsed<remaining,
    label=value, ...`: the count first, where a user looks, and no rate (a few slow steps make it
    meaningless). Redrawn at most every `LOG_INTERVAL` seconds when stderr is not a terminal."""
    suffix = f" {unit}" if unit else ""
    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        disable=disable,
        leave=True,
        dynamic_ncols=True,
        mininterval=redraw_interval(),
        bar_format="{desc} {n_fmt}/{total_fmt}" + suffix + " |{bar:20}| {elapsed}<{remaining}{postfix}",
    )


class StageProgressBar(ProgressBar):
    """The one bar of a fit stage, replacing Lightning's epoch bar (installed by `Trainers.fit`).

    Args:
        stage: the stage name the bar starts with (`search`, `refine`, `finetune_<task>`).
        unit: what is counted, printed after the count (`matrices`); empty when counting optimiser steps.
        batch_units: units each training batch completes (the refinement: matrices per layer batch, skipped
            ones included, so that a resumed run counts from where it stopped). None: count optimiser steps
            out of the Trainer's total (`max_steps`), the bar reading `<stage> step n/total`.

    The metrics shown are those the module logs with `prog_bar=True`, under the module's `progress_labels`
    ({logged key: label}, only those keys) or else under the logged key less its `stage/` prefix; `v_num` is
    not shown.
    """

    def __init__(self, stage: str, unit: str = "", batch_units: Sequence[int] | None = None) -> None:
        super().__init__()
        self.stage, self.unit = stage, unit
        self.batch_units = None if batch_units is None else [int(n) for n in batch_units]
        self._enabled = True
        self._bar = None
        self._shown = False  # a bar of this fit was started

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def __getstate__(self) -> dict:  # ddp_spawn pickles the callbacks; a live tqdm bar does not pickle
        return {**self.__dict__, "_bar": None}

    def _done(self, trainer: L.Trainer, batch_idx: int | None) -> int:
        if self.batch_units is None:
            return int(trainer.global_step)
        return sum(self.batch_units[: 0 if batch_idx is None else batch_idx + 1])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.batch_units is None:
            desc, total = f"{self.stage} step", trainer.estimated_stepping_batches
        else:
            desc, total = self.stage, sum(self.batch_units)
        self._shown = True
        self._bar = stage_bar(
            desc,
            total,
            self.unit,
            initial=self._done(trainer, None),
            disable=not self._enabled,
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix_str(self._postfix(trainer, pl_module), refresh=False)
        self._bar.update(self._done(trainer, batch_idx) - self._bar.n)

    def advance(self, n: int = 1) -> None:
        """Count `n` units done inside a training step (a stage whose one step does many units)."""
        if self._bar is not None:
            self._bar.update(n)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix_str(self._postfix(trainer, pl_module), refresh=False)
        self._bar.close()  # prints the final state (count, metrics) once
        self._bar = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A fit with nothing left to do (a search resumed from its finished checkpoint) runs no training
        hook: its bar is still shown once, full, so that the stage is not missing from the output."""
        if self._shown or not self._enabled or self.batch_units is not None:
            return
        done = self._done(trainer, None)
        bar = stage_bar(f"{self.stage} step", trainer.estimated_stepping_batches, self.unit, initial=done)
        bar.set_postfix_str("finished by an earlier run", refresh=False)
        bar.close()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str]:
        """{label: value as the summary prints it}: no `v_num`, no truncated names."""
        logged = trainer.progress_bar_metrics
        labels = getattr(pl_module, "progress_labels", None)
        if labels is None:
            labels = {k: k.removeprefix(f"{self.stage}/") for k in logged}
        return {label: _fmt(logged[k]) for k, label in labels.items() if k in logged}

    def _postfix(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.get_metrics(trainer, pl_module).items())


def _fmt(v: Any) -> str:
    try:
        return METRIC_FORMAT.format(float(v))
    except (TypeError, ValueError):
        return str(v)
