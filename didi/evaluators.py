"""The evaluators every evaluation runs: classification heads, sentence features (routed or per-task
encoders), and the Lightning module that counts correct predictions per task with torchmetrics, so that DDP
(disjoint shares per process) gives exactly the one-process numbers. It also keeps whether each example was
right, by its index in the data (`ExampleOutcomes`), so that two evaluations of the same data can be paired
(`didi compare --reference`: a McNemar test on the examples where they differ).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import lightning as L
import torch
from safetensors.torch import load_file
from torch import nn
from torchmetrics import Metric, SumMetric

from didi.errors import DidiError
from didi.routing import SHARED, Mixture, OracleRouter, RoutedModel, Router
from didi.trainer import TrainerConfig, Trainers


# ----------------------------------------------------------------------------------------------- heads
def load_head(path: str | Path) -> nn.Linear:
    """A classification head: safetensors with "weight" (classes × hidden) and optional "bias"; a directory
    (a fine-tune's) is read at its head.safetensors."""
    p = Path(path)
    if p.is_dir():
        p = p / "head.safetensors"
    if not p.exists():
        raise DidiError(f"{p}: no such head file (expected head.safetensors with 'weight' and 'bias')")
    try:
        sd = load_file(str(p))
    except Exception as e:  # safetensors raises its own error types (and OSError) for a file it cannot read
        raise DidiError(f"{p}: not a readable safetensors head ({e})") from e
    if "weight" not in sd or sd["weight"].dim() != 2:
        raise DidiError(f"{p}: a head needs a 2-D 'weight' (classes × hidden); found {sorted(sd)}")
    C, H = sd["weight"].shape
    head = nn.Linear(H, C, bias="bias" in sd)
    head.load_state_dict(sd)
    return head.requires_grad_(False)


def default_head_path(task_source: str | Path) -> Path:
    p = Path(task_source)
    return p / "head.safetensors" if p.is_dir() else p.with_name(f"{p.name.split('.')[0]}.head.safetensors")


# -------------------------------------------------------------------------------------------- featurizers
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states under the attention mask (sentence-transformers' pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


_ENCODER_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class RoutedTextFeatures(nn.Module):
    """Sentence features from a routed encoder: example i runs through θ0 + shared + expert of its task."""

    def __init__(self, routed: RoutedModel) -> None:
        super().__init__()
        self.routed = routed

    def forward(self, batch: Mapping[str, torch.Tensor], task_ids: torch.Tensor) -> torch.Tensor:
        inputs = {k: batch[k] for k in _ENCODER_KEYS if k in batch}
        out = self.routed(**inputs, task_ids=task_ids)
        return mean_pool(out.last_hidden_state, batch["attention_mask"])


class PerTaskTextFeatures(nn.Module):
    """Sentence features from unmerged encoders: one per task (individual fine-tunes) or one for all (θ0)."""

    def __init__(self, encoders: dict[str, nn.Module], tasks: list[str]) -> None:
        super().__init__()
        self.tasks = tasks
        self.encoders = nn.ModuleDict(encoders)

    def forward(self, batch: Mapping[str, torch.Tensor], task_ids: torch.Tensor) -> torch.Tensor:
        out = None
        for t in torch.unique(task_ids).tolist():
            rows = (task_ids == t).nonzero().squeeze(1)
            name = self.tasks[t]
            enc = self.encoders[name] if name in self.encoders else self.encoders["*"]
            inputs = {k: batch[k][rows] for k in _ENCODER_KEYS if k in batch}
            f = mean_pool(enc(**inputs).last_hidden_state, inputs["attention_mask"])
            if out is None:
                out = f.new_empty((task_ids.numel(), f.shape[1]))
            out[rows] = f
        return out


# ------------------------------------------------------------------------------------- per-example outcomes
class ExampleOutcomes(Metric):
    """Per example of the data (by its global index, `batch["index"]`): times counted, times right, and its
    task id + 1, summed across processes. Each example is seen once in a complete evaluation (DDP shares are
    disjoint), so after the sync `right` is 0/1 and `task` - 1 is the example's task id."""

    full_state_update = False

    def __init__(self, n: int) -> None:
        super().__init__()
        for name in ("seen", "right", "task"):
            self.add_state(name, torch.zeros(n, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, index: torch.Tensor, right: torch.Tensor, task: torch.Tensor) -> None:
        index = index.to(self.seen.device)
        self.seen.index_add_(0, index, torch.ones_like(index))
        self.right.index_add_(0, index, right.to(index.device, torch.int64))
        self.task.index_add_(0, index, task.to(index.device, torch.int64) + 1)

    def compute(self) -> torch.Tensor:
        return torch.stack([self.seen, self.right, self.task])


def pack_correct(right: Sequence[bool] | torch.Tensor) -> str:
    """Per-example correctness as hex, 4 examples a digit, the first example the highest bit of the first
    digit (zero bits pad the last digit): "1011 0100" -> "b4". `unpack_correct` reverses it."""
    bits = "".join("1" if bool(b) else "0" for b in (right.tolist() if torch.is_tensor(right) else right))
    bits += "0" * (-len(bits) % 4)
    return "".join(f"{int(bits[i : i + 4], 2):x}" for i in range(0, len(bits), 4))


def unpack_correct(packed: str, n: int) -> list[bool]:
    """The n booleans `pack_correct` wrote."""
    if len(packed) != (n + 3) // 4:
        raise DidiError(f"per-example correctness: {len(packed)} hex digits cannot hold {n} examples")
    bits = "".join(f"{int(c, 16):04b}" for c in packed)
    return [b == "1" for b in bits[:n]]


# ---------------------------------------------------------------------------------------------- evaluator
class Evaluator(L.LightningModule):
    """Accuracy per task: features (routed or not) → the task's head → torchmetrics, synced across processes.

    The task each example came from (its `task_id`) picks its head and labels; `router` (default: that same
    task id, the oracle) picks the experts its features run through. With another router (a learned one)
    the routing is counted too: examples sent to their own task (top-1) and to the shared model.

    Logs "eval/<task>/acc", "eval/<task>/n" and "eval/<task>/correct" (and "eval/<task>/routed",
    "eval/<task>/fallback" with a router); `results` holds {task: {"accuracy", "n"}} after a test run. With
    `n_examples` (the data's size) it also keeps each example's outcome (`ExampleOutcomes`) and leaves the
    synced 3 × n tensor in `trainer.callback_metrics[EXAMPLES_KEY]`: logged values are scalars, and the
    callback metrics are what Lightning hands back to the main process from spawned workers (ddp_spawn).
    """

    def __init__(
        self,
        features: nn.Module,
        heads: dict[str, nn.Linear],
        tasks: list[str],
        router: Router | None = None,
        n_examples: int | None = None,
    ) -> None:
        super().__init__()
        self.features = features
        self.tasks = list(tasks)
        self.oracle = OracleRouter(self.tasks)
        self.router = router if router is not None else self.oracle
        self.heads = nn.ModuleDict(heads)
        # correct and total counts (torchmetrics sums them across processes); accuracy = correct / n in
        # float64
        self.correct = nn.ModuleDict({t: SumMetric() for t in heads})
        self.count = nn.ModuleDict({t: SumMetric() for t in heads})
        self.learned = router is not None and not isinstance(router, OracleRouter)
        if self.learned:
            self.routed = nn.ModuleDict({t: SumMetric() for t in heads})
            self.fallback = nn.ModuleDict({t: SumMetric() for t in heads})
        self.outcomes = ExampleOutcomes(n_examples) if n_examples is not None else None
        self.results: dict[str, dict] = {}

    def _sums(self) -> list[Metric]:
        extra = (*self.routed.values(), *self.fallback.values()) if self.learned else ()
        outcomes = (self.outcomes,) if self.outcomes is not None else ()
        return [*self.correct.values(), *self.count.values(), *extra, *outcomes]

    def on_test_epoch_start(self) -> None:
        # fresh, process-local states: ddp_spawn hands the module to its workers through shared memory, and
        # in-place updates of a shared state tensor would add every process's counts into one tensor
        for m in self._sums():
            m.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        ids = self.oracle(batch).to(self.device)  # the task each example came from: its head and labels
        route = ids if self.router is self.oracle else self.router(batch).to(self.device)
        feats = self.features(batch, route)
        chosen = (route.top1() if isinstance(route, Mixture) else route) if self.learned else None
        for t in torch.unique(ids).tolist():
            name = self.tasks[t]
            if name not in self.heads:
                raise DidiError(f"evaluation: no head for task {name!r}")
            rows = (ids == t).nonzero().squeeze(1)
            logits = self.heads[name](feats[rows])
            labels = batch["labels"][rows]
            right = logits.argmax(-1) == labels
            self.correct[name].update(right.sum().double())
            if self.outcomes is not None:
                self.outcomes.update(batch["index"][rows], right, ids[rows])
            self.count[name].update(
                torch.tensor(float(rows.numel()), dtype=torch.float64, device=self.device)
            )
            if chosen is not None:
                self.routed[name].update((chosen[rows] == t).sum().double())
                self.fallback[name].update((chosen[rows] == SHARED).sum().double())

    def on_test_epoch_end(self) -> None:
        res = {}
        for name in self.heads:
            n, c = int(self.count[name].compute().round()), int(self.correct[name].compute().round())
            res[name] = {"accuracy": c / n if n else float("nan"), "n": n, "correct": c}
            if self.learned:
                res[name]["routed"] = int(self.routed[name].compute().round())
                res[name]["fallback"] = int(self.fallback[name].compute().round())
        if self.outcomes is not None:
            self.trainer.callback_metrics[EXAMPLES_KEY] = self.outcomes.compute().cpu()
        for m in self._sums():
            m.reset()
        self.results = res
        extra = {}
        if self.learned:
            extra = {f"eval/{t}/{k}": float(v[k]) for t, v in res.items() for k in ("routed", "fallback")}
        self.log_dict(
            {f"eval/{t}/acc": v["accuracy"] for t, v in res.items()}
            | {f"eval/{t}/n": float(v["n"]) for t, v in res.items()}
            | {f"eval/{t}/correct": float(v["correct"]) for t, v in res.items()}
            | extra,
            rank_zero_only=True,
        )


#: where the Evaluator leaves the per-example outcomes among the trainer's callback metrics
EXAMPLES_KEY = "eval/examples"


def run_evaluation(
    features: nn.Module,
    heads: dict[str, nn.Linear],
    tasks: list[str],
    dm,
    trainer: TrainerConfig = TrainerConfig(),
    router: Router | None = None,
) -> dict[str, dict]:
    """Run the Evaluator under a Trainer; returns {task: {"accuracy", "n", "correct"}} and checks the counts:
    "correct" is each example's correctness in the task's data order, packed by `pack_correct`. With a
    `router` (not the oracle) each task also gets "routing_accuracy" (share of its examples whose top-1 task
    is their own) and "fallback" (share served by the shared model alone)."""
    expected = dm.counts()
    model = Evaluator(features, heads, tasks, router, n_examples=sum(expected.values()))
    tr = Trainers(trainer).test()
    out = tr.test(model, datamodule=dm, verbose=False)
    metrics = out[0] if out else {}
    outcomes = tr.callback_metrics.get(EXAMPLES_KEY)
    if outcomes is None:
        raise DidiError("evaluation: the per-example outcomes did not come back from the evaluation")
    seen, right, task = torch.as_tensor(outcomes).long()
    if not bool((seen == 1).all()):
        raise DidiError(
            f"evaluation: {int((seen == 0).sum())} examples not evaluated and {int((seen > 1).sum())} "
            f"evaluated more than once"
        )
    res = {}
    for t in heads:
        if f"eval/{t}/n" not in metrics:
            raise DidiError(f"evaluation: no result for task {t!r}")
        n, c = int(round(float(metrics[f"eval/{t}/n"]))), int(round(float(metrics[f"eval/{t}/correct"])))
        res[t] = {"accuracy": c / n if n else float("nan"), "n": n}
        mine = right[task == tasks.index(t) + 1]  # in index order: the task's data order
        if mine.numel() != n or int(mine.sum()) != c:
            raise DidiError(
                f"evaluation: task {t!r}: the per-example outcomes ({int(mine.sum())}/{mine.numel()}) "
                f"disagree with the counts ({c}/{n})"
            )
        res[t]["correct"] = pack_correct(mine.bool())
        if model.learned:
            for key, out in (("routed", "routing_accuracy"), ("fallback", "fallback")):
                k = int(round(float(metrics[f"eval/{t}/{key}"])))
                res[t][out] = k / n if n else float("nan")
        if res[t]["n"] != expected[t]:
            raise DidiError(
                f"evaluation: task {t!r} counted {res[t]['n']} examples, the data has {expected[t]} "
                f"(examples dropped or counted twice)"
            )
    return res
