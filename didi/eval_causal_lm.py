"""Routed evaluation of causal LMs (what `didi evaluate` runs for hf_llama): per-task perplexity and
next-token accuracy on text, multiple-choice accuracy by log-likelihood (data: `didi.datamodules.causal_lm`).
NLL, token and correct counts are summed per task with torchmetrics, so DDP gives the one-process numbers.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import SumMetric

from didi.datamodules.causal_lm import CHOICE, TEXT, CausalLMDataModule
from didi.errors import DidiError
from didi.routing import OracleRouter, RoutedModel
from didi.trainer import Trainers


def row_scores(
    logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: Σ log p(scored tokens), number of scored tokens, top-1 hits (fp64 sums)."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt, m = input_ids[:, 1:], target_mask[:, 1:]
    tok = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    hits = (lp.argmax(-1) == tgt) & m
    return (tok.double() * m).sum(1), m.sum(1).double(), hits.sum(1).double()


class CausalLMEvaluator(L.LightningModule):
    """Per-task perplexity / next-token accuracy (text) and multiple-choice accuracy of a (routed) causal LM.

    `model(input_ids=..., attention_mask=..., task_ids=...)` must return logits (a RoutedModel over an HF
    causal LM does); `results` holds the per-task numbers after a test run."""

    STATS = {TEXT: ("nll", "tokens", "hits"), CHOICE: ("correct", "questions")}

    def __init__(self, model: nn.Module, tasks: list[str], kinds: dict[str, int]) -> None:
        super().__init__()
        self.model = model
        self.tasks, self.kinds = list(tasks), dict(kinds)
        self.router = OracleRouter(self.tasks)
        self.sums = nn.ModuleDict(
            {f"{t}__{s}": SumMetric() for t, k in self.kinds.items() for s in self.STATS[k]}
        )
        self.results: dict[str, dict] = {}

    def on_test_epoch_start(self) -> None:
        for m in self.sums.values():
            m.reset()

    def _add(self, task: str, stat: str, value: torch.Tensor) -> None:
        self.sums[f"{task}__{stat}"].update(value.double().to(self.device))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        ids = self.router(batch).to(self.device)
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            task_ids=ids,
            use_cache=False,
        )
        logits = out.logits if hasattr(out, "logits") else out
        ll, n, hits = row_scores(logits, batch["input_ids"], batch["target_mask"])
        for j in range(batch["labels"].numel()):
            name = self.tasks[int(batch["example_task"][j])]
            if name not in self.kinds:
                raise DidiError(f"evaluation: no data kind for task {name!r}")
            rows = (batch["row_example"] == j).nonzero().squeeze(1)
            if int(batch["example_kind"][j]) == TEXT:
                self._add(name, "nll", -ll[rows].sum())
                self._add(name, "tokens", n[rows].sum())
                self._add(name, "hits", hits[rows].sum())
            else:
                pred = int(ll[rows].argmax())
                self._add(name, "correct", torch.tensor(float(pred == int(batch["labels"][j]))))
                self._add(name, "questions", torch.tensor(1.0))

    def on_test_epoch_end(self) -> None:
        stats = {
            t: {s: float(self.sums[f"{t}__{s}"].compute()) for s in self.STATS[k]}
            for t, k in self.kinds.items()
        }
        self.results = summarise(stats, self.kinds)
        self.log_dict(
            {f"eval/{t}/{s}": v for t, d in stats.items() for s, v in d.items()}, rank_zero_only=True
        )


def summarise(stats: dict[str, dict[str, float]], kinds: dict[str, int]) -> dict[str, dict]:
    out = {}
    for t, s in stats.items():
        if kinds[t] == TEXT:
            tokens = int(round(s["tokens"]))
            nll = s["nll"] / tokens if tokens else float("nan")
            out[t] = {
                "accuracy": s["hits"] / tokens if tokens else float("nan"),
                "n": tokens,
                "perplexity": math.exp(nll),
                "nll": nll,
                "metric": "next_token",
            }
        else:
            q = int(round(s["questions"]))
            out[t] = {
                "accuracy": s["correct"] / q if q else float("nan"),
                "n": q,
                "metric": "multiple_choice",
            }
    return out


def run_causal_lm_evaluation(model: nn.Module, tasks: list[str], dm: CausalLMDataModule, trainer) -> dict:
    """Run `CausalLMEvaluator` under a Trainer; checks every task's count against the data."""
    dm.setup("test")
    expected = dm.counts()
    ev = CausalLMEvaluator(model, tasks, dm.kinds)
    tr = Trainers(trainer).test()
    out = tr.test(ev, datamodule=dm, verbose=False)
    metrics = out[0] if out else {}
    stats = {}
    for t in dm.kinds:
        names = CausalLMEvaluator.STATS[dm.kinds[t]]
        if any(f"eval/{t}/{s}" not in metrics for s in names):
            raise DidiError(f"evaluation: no result for task {t!r}")
        stats[t] = {s: float(metrics[f"eval/{t}/{s}"]) for s in names}
    res = summarise(stats, dm.kinds)
    for t, v in res.items():
        if v["n"] != expected[t]:
            unit = "tokens" if dm.kinds[t] == TEXT else "questions"
            raise DidiError(
                f"evaluation: task {t!r} counted {v['n']} {unit}, the data has {expected[t]} "
                f"(examples dropped or counted twice)"
            )
    return res


def evaluate_causal_lm(
    art,
    adapter,
    data: dict[str, str],
    base: str | None,
    tokenizer: str | None,
    batch_size: int,
    max_length: int,
    limit_per_task: int | None,
    trainer,
) -> dict:
    """Routed per-task evaluation of an hf_llama artifact (what `didi evaluate` runs for causal LMs)."""
    src = base or art.manifest["sources"]["base"]["path"]
    dm = CausalLMDataModule(
        data,
        tokenizer or str(src),
        task_order=art.tasks,
        batch_size=batch_size,
        max_length=max_length,
        limit_per_task=limit_per_task,
    )
    dm.setup("test")  # bad data fails here, before any process is spawned
    model = adapter.build_model(dict(adapter.open_source(src).items()))
    return run_causal_lm_evaluation(RoutedModel(model, art, adapter=adapter), art.tasks, dm, trainer)
