"""Per-task accuracy of a merged artifact (any method) or of plain models, under the Lightning Trainer.

Python entry point (what `didi evaluate` and `didi compare` call):

    evaluate_artifact(artifact, data, heads=None, base=None, tokenizer=None, individual=None,
                      batch_size=32, max_length=128, limit_per_task=None, trainer=TrainerConfig(),
                      output=None) -> dict

    artifact    path of an artifact directory (DiDi or baseline; nothing is special-cased).
    data        {task: .jsonl file or directory with test.jsonl}; a subset of the artifact's tasks is fine.
    heads       {task: head file}; default `<task source>/head.safetensors` (beside each fine-tune).
    base        θ0 path, default the one recorded in the manifest; tokenizer defaults to θ0's directory.
    individual  {task: accuracy} of the individual fine-tunes, or a report.json path: adds normalised accuracy.
    output      directory for report.json and report.md (optional).

It returns the report: {"tasks": {name: {"accuracy", "n", ["normalized_accuracy"]}}, "average",
["average_normalized"], "storage_ratio", "method", "artifact"}. `evaluate_models({task: encoder path}, ...)`
does the same for unmerged models (the individual fine-tunes, or θ0 for every task).

Heads (and the text tower of CLIP-style models) sit outside the storage budget, as in the paper. Under DDP each
process evaluates a disjoint share (datamodules.text.ShardSampler, no padding); torchmetrics sums the counts,
and the per-task example counts are checked against the data so no example is counted twice or dropped.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from safetensors.torch import load_file
from torch import nn
from torchmetrics import SumMetric

from didi.errors import DidiError
from didi.pipeline import TrainerConfig, eval_trainer
from didi.routing import OracleRouter, Router, RoutedModel


# ----------------------------------------------------------------------------------------------- heads
def load_head(path: str | Path) -> nn.Linear:
    """A classification head: safetensors with "weight" (classes × hidden) and optional "bias"."""
    p = Path(path)
    if not p.exists():
        raise DidiError(f"{p}: no such head file (expected head.safetensors with 'weight' and 'bias')")
    sd = load_file(str(p))
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


# ---------------------------------------------------------------------------------------------- evaluator
class Evaluator(L.LightningModule):
    """Accuracy per task: features (routed or not) → the task's head → torchmetrics, synced across processes.

    Logs "eval/<task>/acc", "eval/<task>/n" and "eval/<task>/correct"; `results` holds {task: {"accuracy", "n"}} after a test run.
    """

    def __init__(self, features: nn.Module, heads: dict[str, nn.Linear], tasks: list[str],
                 router: Router | None = None) -> None:
        super().__init__()
        self.features = features
        self.tasks = list(tasks)
        self.router = router or OracleRouter(self.tasks)
        self.heads = nn.ModuleDict(heads)
        # correct and total counts (torchmetrics sums them across processes); accuracy = correct / n in float64
        self.correct = nn.ModuleDict({t: SumMetric() for t in heads})
        self.count = nn.ModuleDict({t: SumMetric() for t in heads})
        self.results: dict[str, dict] = {}

    def on_test_epoch_start(self) -> None:
        # fresh, process-local states: ddp_spawn hands the module to its workers through shared memory, and
        # in-place updates of a shared state tensor would add every process's counts into one tensor
        for m in (*self.correct.values(), *self.count.values()):
            m.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        ids = self.router(batch).to(self.device)
        feats = self.features(batch, ids)
        for t in torch.unique(ids).tolist():
            name = self.tasks[t]
            if name not in self.heads:
                raise DidiError(f"evaluation: no head for task {name!r}")
            rows = (ids == t).nonzero().squeeze(1)
            logits = self.heads[name](feats[rows])
            labels = batch["labels"][rows]
            self.correct[name].update((logits.argmax(-1) == labels).sum().double())
            self.count[name].update(torch.tensor(float(rows.numel()), dtype=torch.float64, device=self.device))

    def on_test_epoch_end(self) -> None:
        res = {}
        for name in self.heads:
            n, c = int(self.count[name].compute().round()), int(self.correct[name].compute().round())
            res[name] = {"accuracy": c / n if n else float("nan"), "n": n, "correct": c}
            self.correct[name].reset()
            self.count[name].reset()
        self.results = res
        self.log_dict({f"eval/{t}/acc": v["accuracy"] for t, v in res.items()}
                      | {f"eval/{t}/n": float(v["n"]) for t, v in res.items()}
                      | {f"eval/{t}/correct": float(v["correct"]) for t, v in res.items()}, rank_zero_only=True)


def run_evaluation(features: nn.Module, heads: dict[str, nn.Linear], tasks: list[str], dm,
                   trainer: TrainerConfig = TrainerConfig()) -> dict[str, dict]:
    """Run the Evaluator under a Trainer; returns {task: {"accuracy", "n"}} and checks the counts."""
    expected = dm.counts()
    model = Evaluator(features, heads, tasks)
    tr = eval_trainer(trainer)
    out = tr.test(model, datamodule=dm, verbose=False)
    metrics = out[0] if out else {}
    res = {}
    for t in heads:
        if f"eval/{t}/n" not in metrics:
            raise DidiError(f"evaluation: no result for task {t!r}")
        n, c = int(round(float(metrics[f"eval/{t}/n"]))), int(round(float(metrics[f"eval/{t}/correct"])))
        res[t] = {"accuracy": c / n if n else float("nan"), "n": n}
        if res[t]["n"] != expected[t]:
            raise DidiError(f"evaluation: task {t!r} counted {res[t]['n']} examples, the data has {expected[t]} "
                            f"(examples dropped or counted twice)")
    return res


# ----------------------------------------------------------------------------------------------- reports
def load_individual(individual: dict[str, float] | str | None) -> dict[str, float] | None:
    if individual is None or isinstance(individual, dict):
        return individual
    p = Path(individual)
    try:
        rep = json.loads(p.read_text())
        return {t: float(v["accuracy"]) for t, v in rep["tasks"].items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DidiError(f"{p}: not a report.json with per-task accuracies ({e})") from e


def make_report(results: dict[str, dict], storage_ratio: float, individual: dict[str, float] | None = None,
                **info: Any) -> dict:
    tasks = {t: dict(v) for t, v in results.items()}
    rep: dict[str, Any] = {"tasks": tasks, "average": sum(v["accuracy"] for v in tasks.values()) / len(tasks),
                           "storage_ratio": float(storage_ratio)}
    if individual:
        missing = [t for t in tasks if t not in individual]
        if missing:
            raise DidiError(f"individual results: no accuracy for task {missing[0]!r}")
        for t, v in tasks.items():
            v["normalized_accuracy"] = v["accuracy"] / individual[t] if individual[t] > 0 else float("nan")
        rep["average_normalized"] = sum(v["normalized_accuracy"] for v in tasks.values()) / len(tasks)
    rep.update(info)
    return rep


def report_markdown(rep: dict, title: str = "Evaluation") -> str:
    norm = "average_normalized" in rep
    ppl = any("perplexity" in v for v in rep["tasks"].values())  # causal LM: next-token accuracy + perplexity
    lines = [f"# {title}", "", f"storage ratio: {rep['storage_ratio']:.4g}×", "",
             "| task | n | accuracy |" + (" normalised |" if norm else "") + (" perplexity |" if ppl else ""),
             "|---|---:|---:|" + ("---:|" if norm else "") + ("---:|" if ppl else "")]
    for t, v in rep["tasks"].items():
        lines.append(f"| {t} | {v['n']} | {100 * v['accuracy']:.2f} |"
                     + (f" {100 * v['normalized_accuracy']:.2f} |" if norm else "")
                     + ((f" {v['perplexity']:.4g} |" if "perplexity" in v else " |") if ppl else ""))
    lines.append(f"| **average** | {sum(v['n'] for v in rep['tasks'].values())} | {100 * rep['average']:.2f} |"
                 + (f" {100 * rep['average_normalized']:.2f} |" if norm else "") + (" |" if ppl else ""))
    return "\n".join(lines) + "\n"


def write_report(rep: dict, output: str | Path, title: str = "Evaluation") -> Path:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(rep, indent=1)), ("report.md", report_markdown(rep, title))):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return out


# ------------------------------------------------------------------------------------------ entry points
def _heads_for(tasks: list[str], heads: dict[str, str] | None, sources: dict[str, str]) -> dict[str, nn.Linear]:
    out = {}
    for t in tasks:
        path = (heads or {}).get(t) or (default_head_path(sources[t]) if t in sources else None)
        if path is None:
            raise DidiError(f"task {t!r}: no head given and no task source to look beside")
        out[t] = load_head(path)
    return out


def _text_data(data: dict[str, str], tokenizer: str, tasks: list[str], heads: dict[str, nn.Linear],
               batch_size: int, max_length: int, limit_per_task: int | None):
    from didi.datamodules.text import TextClassificationDataModule

    dm = TextClassificationDataModule(data, tokenizer, task_order=tasks,
                                      num_classes={t: h.out_features for t, h in heads.items()},
                                      batch_size=batch_size, max_length=max_length, limit_per_task=limit_per_task)
    dm.setup("test")  # bad data fails here, before any process is spawned
    return dm


def _check_text_adapter(adapter) -> None:
    from didi.backbones.hf_encoder import HFEncoderAdapter

    if not isinstance(adapter, HFEncoderAdapter):
        raise DidiError(f"evaluate: adapter '{adapter.registry_name}' has no evaluation data module yet "
                        f"(text classification needs 'hf_encoder', images 'open_clip', causal LM 'hf_llama')")


def evaluate_artifact(artifact: str | Path, data: dict[str, str], heads: dict[str, str] | None = None,
                      base: str | None = None, tokenizer: str | None = None,
                      individual: dict[str, float] | str | None = None, batch_size: int = 32,
                      max_length: int = 128, limit_per_task: int | None = None,
                      trainer: TrainerConfig = TrainerConfig(), output: str | Path | None = None) -> dict:
    """Per-task accuracy of an artifact served with routed experts (oracle router); see the module docstring."""
    from didi.artifact import load_artifact

    art = load_artifact(artifact)
    data = dict(data)
    unknown = [t for t in data if t not in art.tasks]
    if unknown:
        raise DidiError(f"data: task {unknown[0]!r} is not in the artifact {art.path} (tasks: {art.tasks})")
    if not data:
        raise DidiError("data: no task data given")
    adapter = art.adapter()
    if adapter.registry_name == "open_clip":  # image classification: ImageFolder data, zero-shot or given heads
        from didi.datamodules.image import evaluate_images

        res = evaluate_images(art, adapter, data, heads, base, batch_size, limit_per_task, trainer)
    elif adapter.registry_name == "hf_llama":  # causal LM: perplexity (.txt) and multiple choice (.jsonl)
        from didi.datamodules.causal_lm import evaluate_causal_lm

        res = evaluate_causal_lm(art, adapter, data, base, tokenizer, batch_size, max_length, limit_per_task,
                                 trainer)
    else:
        _check_text_adapter(adapter)
        src = base or art.manifest["sources"]["base"]["path"]
        base_sd = dict(adapter.open_source(src).items())
        sources = {t: v["path"] for t, v in art.manifest["sources"].get("tasks", {}).items()}
        hds = _heads_for(list(data), heads, sources)
        dm = _text_data(data, tokenizer or str(src), art.tasks, hds, batch_size, max_length, limit_per_task)
        routed = RoutedModel(adapter.build_model(base_sd), art, adapter=adapter)
        res = run_evaluation(RoutedTextFeatures(routed), hds, art.tasks, dm, trainer)
    rep = make_report(res, art.storage_ratio, load_individual(individual),
                      method=art.manifest.get("method", {}).get("name"), artifact=str(art.path))
    if output is not None:
        write_report(rep, output, f"{rep['method']} artifact {art.path.name}")
    return rep


def evaluate_models(models: dict[str, str], data: dict[str, str], heads: dict[str, str] | None = None,
                    tokenizer: str | None = None, backbone: str = "hf_encoder",
                    individual: dict[str, float] | str | None = None, storage_ratio: float | None = None,
                    batch_size: int = 32, max_length: int = 128, limit_per_task: int | None = None,
                    trainer: TrainerConfig = TrainerConfig(), output: str | Path | None = None) -> dict:
    """Per-task accuracy of unmerged encoders: `models` maps each task to its encoder, or "*" to one encoder
    for every task (θ0 + heads). Storage ratio defaults to the number of distinct models (T for individual)."""
    from didi.backbones import build_adapter

    adapter = build_adapter(backbone)
    _check_text_adapter(adapter)
    tasks = list(data)
    encoders, by_path = {}, {}
    for t, p in models.items():
        if p not in by_path:
            by_path[p] = adapter.build_model(dict(adapter.open_source(p).items()))
        encoders[t] = by_path[p]
    missing = [t for t in tasks if t not in encoders and "*" not in encoders]
    if missing:
        raise DidiError(f"models: no encoder for task {missing[0]!r}")
    hds = _heads_for(tasks, heads, {t: p for t, p in models.items() if t != "*"})
    dm = _text_data(data, tokenizer or next(iter(models.values())), tasks, hds, batch_size, max_length,
                    limit_per_task)
    res = run_evaluation(PerTaskTextFeatures(encoders, tasks), hds, tasks, dm, trainer)
    rep = make_report(res, storage_ratio if storage_ratio is not None else float(len(by_path)),
                      load_individual(individual), method="unmerged")
    if output is not None:
        write_report(rep, output, "unmerged models")
    return rep
