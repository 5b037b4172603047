"""Per-task accuracy of a merged artifact (any method) or of plain models, under the Lightning Trainer.

Python entry point (what `didi evaluate` and `didi compare` call):

    evaluate_artifact(artifact, data, heads=None, base=None, tokenizer=None, individual=None,
                      batch_size=32, max_length=128, limit_per_task=None, trainer=TrainerConfig(),
                      output=None, router="oracle", top_k=None, threshold=None,
                      compare_oracle=True) -> dict

    artifact    path of an artifact directory (DiDi or baseline; nothing is special-cased).
    data        {task: .jsonl file or directory with test.jsonl}; a subset of the artifact's tasks is fine.
    heads       {task: head file}; default `<task source>/head.safetensors` (beside each fine-tune).
    base        θ0 path, default the one recorded in the manifest; tokenizer defaults to θ0's directory.
    individual  {task: accuracy} of the individual fine-tunes, or a report.json path: adds normalised
                accuracy.
    output      directory for report.json and report.md (optional).
    router      `oracle` (each example's own task id, the default), `learned` (the router saved in
                `<artifact>/router/` by `didi router train`) or a router directory; top_k and threshold
                override the saved router's. With a learned router every task also reports its routing
                accuracy (top-1 = its own task), its fallback share (served by the shared model) and, with
                compare_oracle, its accuracy under oracle routing.

It returns the report: {"tasks": {name: {"accuracy", "n", ["normalized_accuracy"]}}, "average",
["average_normalized"], "storage_ratio", "method", "artifact", ["examples"]}. `evaluate_models({task: encoder
path}, ...)` does the same for unmerged models (the individual fine-tunes, or θ0 for every task).

"examples" (classification: text and images) keeps whether each test example was right, so that two reports
of the same data pair up example by example (`didi compare --reference`, a McNemar test):
{"encoding": EXAMPLES_ENCODING, "tasks": {name: {"n", "sha256", "correct"}}}, where "correct" is
`didi.evaluators.pack_correct` of the task's examples in the data's order (4 a hex digit) and "sha256"
identifies the data (`data_digest`: the .jsonl file read; for an image folder, its files' names and bytes).

Heads (and the text tower of CLIP-style models) sit outside the storage budget, as in the paper. Under DDP
each process evaluates a disjoint share (datamodules.text.ShardSampler, no padding); torchmetrics sums the
counts, and the per-task example counts are checked against the data so no example is counted twice or
dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from didi import jsonio
from didi.artifact import load_artifact
from didi.backbones.registry import build_adapter
from didi.datamodules.text import TextClassificationDataModule
from didi.errors import DidiError
from didi.eval_causal_lm import evaluate_causal_lm
from didi.eval_image import evaluate_images
from didi.evaluators import (
    PerTaskTextFeatures,
    RoutedTextFeatures,
    default_head_path,
    load_head,
    run_evaluation,
)
from didi.router import ROUTER_DIR, LearnedRouter, load_router
from didi.routing import RoutedModel
from didi.sources import file_sha256, require_path
from didi.trainer import TrainerConfig


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


def make_report(
    results: dict[str, dict], storage_ratio: float, individual: dict[str, float] | None = None, **info: Any
) -> dict:
    tasks = {t: dict(v) for t, v in results.items()}
    rep: dict[str, Any] = {
        "tasks": tasks,
        "average": sum(v["accuracy"] for v in tasks.values()) / len(tasks),
        "storage_ratio": float(storage_ratio),
    }
    if individual:
        missing = [t for t in tasks if t not in individual]
        if missing:
            raise DidiError(f"individual results: no accuracy for task {missing[0]!r}")
        for t, v in tasks.items():
            v["normalized_accuracy"] = v["accuracy"] / individual[t] if individual[t] > 0 else float("nan")
        rep["average_normalized"] = sum(v["normalized_accuracy"] for v in tasks.values()) / len(tasks)
    rep.update(info)
    return rep


#: how "examples" encodes per-example correctness (`didi.evaluators.pack_correct`)
EXAMPLES_ENCODING = "hex, 4 examples a digit, first example = highest bit"


def data_digest(path: str | Path, kind: str = "text") -> str:
    """sha256 identifying one task's test data: the .jsonl file read (a directory's test.jsonl), or, for an
    image folder (its test/ sub-folder if any), every file's relative name and sha256 in sorted order."""
    p = Path(path)
    if kind == "text":
        return file_sha256(p / "test.jsonl" if p.is_dir() else p)
    import hashlib

    from didi.datamodules.image import task_folder

    root, h = task_folder(p, "test"), hashlib.sha256()
    for f in sorted(x for x in root.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def split_examples(res: dict[str, dict], data: dict[str, str], kind: str) -> dict:
    """Move each task's packed "correct" out of the per-task results into the report's "examples" section,
    with the count and the digest of the data it refers to."""
    tasks = {}
    for t, v in res.items():
        tasks[t] = {"n": v["n"], "sha256": data_digest(data[t], kind), "correct": v.pop("correct")}
    return {"encoding": EXAMPLES_ENCODING, "tasks": tasks}


#: the columns a learned router adds to a report (per-task key, header)
ROUTER_COLUMNS = (
    ("routing_accuracy", "routed to own task"),
    ("fallback", "shared only"),
    ("oracle_accuracy", "oracle accuracy"),
)


def report_markdown(rep: dict, title: str = "Evaluation") -> str:
    norm = "average_normalized" in rep
    ppl = any("perplexity" in v for v in rep["tasks"].values())  # causal LM: next-token accuracy + perplexity
    cols = [(k, h) for k, h in ROUTER_COLUMNS if any(k in v for v in rep["tasks"].values())]
    lines = [f"# {title}", "", f"storage ratio: {rep['storage_ratio']:.4g}×", ""]
    if "router" in rep:
        r = rep["router"]
        lines += [
            f"router: {r['kind']} ({r['path']}), top-{r['top_k']}, threshold {r['threshold']:.4g}; "
            f"accuracy with the router, routing in % of each task's examples",
            "",
        ]
    lines += [
        "| task | n | accuracy |"
        + (" normalised |" if norm else "")
        + (" perplexity |" if ppl else "")
        + "".join(f" {h} |" for _, h in cols),
        "|---|---:|---:|" + ("---:|" if norm else "") + ("---:|" if ppl else "") + "---:|" * len(cols),
    ]
    for t, v in rep["tasks"].items():
        lines.append(
            f"| {t} | {v['n']} | {100 * v['accuracy']:.2f} |"
            + (f" {100 * v['normalized_accuracy']:.2f} |" if norm else "")
            + ((f" {v['perplexity']:.4g} |" if "perplexity" in v else " |") if ppl else "")
            + "".join(f" {100 * v[k]:.2f} |" if k in v else " |" for k, _ in cols)
        )
    averages = {
        "routing_accuracy": "routing_accuracy",
        "fallback": "fallback",
        "oracle_accuracy": "average_oracle",
    }
    lines.append(
        f"| **average** | {sum(v['n'] for v in rep['tasks'].values())} | {100 * rep['average']:.2f} |"
        + (f" {100 * rep['average_normalized']:.2f} |" if norm else "")
        + (" |" if ppl else "")
        + "".join(f" {100 * rep[averages[k]]:.2f} |" if averages[k] in rep else " |" for k, _ in cols)
    )
    return "\n".join(lines) + "\n"


def write_report(rep: dict, output: str | Path, title: str = "Evaluation") -> Path:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("report.json", jsonio.dumps(rep, indent=1)),
        ("report.md", report_markdown(rep, title)),
    ):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return out


# ------------------------------------------------------------------------------------------ entry points
def _heads_for(
    tasks: list[str], heads: dict[str, str] | None, sources: dict[str, str]
) -> dict[str, nn.Linear]:
    out = {}
    for t in tasks:
        path = (heads or {}).get(t) or (default_head_path(sources[t]) if t in sources else None)
        if path is None:
            raise DidiError(f"task {t!r}: no head given and no task source to look beside")
        out[t] = load_head(path)
    return out


def _text_data(
    data: dict[str, str],
    tokenizer: str,
    tasks: list[str],
    heads: dict[str, nn.Linear],
    batch_size: int,
    max_length: int,
    limit_per_task: int | None,
):
    dm = TextClassificationDataModule(
        data,
        tokenizer,
        task_order=tasks,
        num_classes={t: h.out_features for t, h in heads.items()},
        batch_size=batch_size,
        max_length=max_length,
        limit_per_task=limit_per_task,
    )
    dm.setup("test")  # bad data fails here, before any process is spawned
    return dm


def _learned_router(
    art,
    router: str,
    adapter,
    base: str | None,
    top_k: int | None,
    threshold: float | str | None,
    mixing: str | None = None,
) -> LearnedRouter | None:
    """None for the oracle; else the learned router (`learned`: the artifact's own, or a directory)."""
    if router == "oracle":
        if top_k is not None or threshold is not None or mixing is not None:
            raise DidiError(
                "top_k / threshold / mixing: they set a learned router; the oracle router has none of them"
            )
        return None
    if adapter.registry_name == "hf_llama":
        raise DidiError(
            "router: learned routing of causal LMs is not available yet (evaluate them with --router oracle)"
        )
    path = art.path / ROUTER_DIR if router == "learned" else Path(router)
    if router == "learned" and not path.exists():
        raise DidiError(
            f"router learned: {art.path} has no router ({path} is missing); train one with "
            f"`didi router train {art.path} --data ...`, or pass --router oracle"
        )
    return load_router(path, art, base, top_k, threshold, mixing)


def _check_text_adapter(adapter) -> None:
    from didi.backbones.hf_encoder import HFEncoderAdapter

    if not isinstance(adapter, HFEncoderAdapter):
        raise DidiError(
            f"evaluate: adapter '{adapter.registry_name}' has no evaluation data module yet "
            f"(text classification needs 'hf_encoder', images 'open_clip', causal LM 'hf_llama')"
        )


def evaluate_artifact(
    artifact: str | Path,
    data: dict[str, str],
    heads: dict[str, str] | None = None,
    base: str | None = None,
    tokenizer: str | None = None,
    individual: dict[str, float] | str | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    limit_per_task: int | None = None,
    trainer: TrainerConfig = TrainerConfig(),
    output: str | Path | None = None,
    router: str = "oracle",
    top_k: int | None = None,
    threshold: float | str | None = None,
    compare_oracle: bool = True,
    mixing: str | None = None,
) -> dict:
    """Per-task accuracy of an artifact served by routed experts (oracle or learned router); see the module
    docstring."""
    art = load_artifact(artifact)
    data = dict(data)
    unknown = [t for t in data if t not in art.tasks]
    if unknown:
        raise DidiError(f"data: task {unknown[0]!r} is not in the artifact {art.path} (tasks: {art.tasks})")
    if not data:
        raise DidiError("data: no task data given")
    require_path(base or art.manifest["sources"]["base"]["path"], "base (θ0)")
    adapter = art.adapter()
    learned = _learned_router(art, router, adapter, base, top_k, threshold, mixing)
    oracle: dict[str, dict] | None = None
    kind = None  # classification data whose examples the report keeps ("text" or "image")
    if (
        adapter.registry_name == "open_clip"
    ):  # image classification: ImageFolder data, zero-shot or given heads
        res = evaluate_images(
            art, adapter, data, heads, base, batch_size, limit_per_task, trainer, router=learned
        )
        if learned is not None and compare_oracle:
            oracle = evaluate_images(art, adapter, data, heads, base, batch_size, limit_per_task, trainer)
        kind = "image"
    elif adapter.registry_name == "hf_llama":  # causal LM: perplexity (.txt) and multiple choice (.jsonl)
        res = evaluate_causal_lm(
            art, adapter, data, base, tokenizer, batch_size, max_length, limit_per_task, trainer
        )
    else:
        _check_text_adapter(adapter)
        src = base or art.manifest["sources"]["base"]["path"]
        base_sd = dict(adapter.open_source(src).items())
        sources = {t: v["path"] for t, v in art.manifest["sources"].get("tasks", {}).items()}
        hds = _heads_for(list(data), heads, sources)
        dm = _text_data(data, tokenizer or str(src), art.tasks, hds, batch_size, max_length, limit_per_task)
        routed = RoutedModel(adapter.build_model(base_sd), art, adapter=adapter)
        res = run_evaluation(RoutedTextFeatures(routed), hds, art.tasks, dm, trainer, router=learned)
        if learned is not None and compare_oracle:
            oracle = run_evaluation(RoutedTextFeatures(routed), hds, art.tasks, dm, trainer)
        kind = "text"
    info: dict[str, Any] = {}
    if kind is not None:
        info["examples"] = split_examples(res, data, kind)
    if learned is not None:
        if oracle is not None:
            for t, v in res.items():
                v["oracle_accuracy"] = oracle[t]["accuracy"]
        info["router"] = {
            "kind": "learned",
            "path": str(art.path / ROUTER_DIR if router == "learned" else Path(router)),
            "top_k": learned.top_k,
            "mixing": learned.mixing,
            "threshold": learned.threshold,
            "temperature": learned.temperature,
        }
        info["routing_accuracy"] = sum(v["routing_accuracy"] for v in res.values()) / len(res)
        info["fallback"] = sum(v["fallback"] for v in res.values()) / len(res)
        if oracle is not None:
            info["average_oracle"] = sum(v["accuracy"] for v in oracle.values()) / len(oracle)
    rep = make_report(
        res,
        art.storage_ratio,
        load_individual(individual),
        method=art.manifest.get("method", {}).get("name"),
        artifact=str(art.path),
        **info,
    )
    if output is not None:
        write_report(rep, output, f"{rep['method']} artifact {art.path.name}")
    return rep


def evaluate_models(
    models: dict[str, str],
    data: dict[str, str],
    heads: dict[str, str] | None = None,
    tokenizer: str | None = None,
    backbone: str = "hf_encoder",
    individual: dict[str, float] | str | None = None,
    storage_ratio: float | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    limit_per_task: int | None = None,
    trainer: TrainerConfig = TrainerConfig(),
    output: str | Path | None = None,
) -> dict:
    """Per-task accuracy of unmerged encoders: `models` maps each task to its encoder, or "*" to one encoder
    for every task (θ0 + heads). Storage ratio defaults to the number of distinct models (T for
    individual)."""
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
    dm = _text_data(
        data, tokenizer or next(iter(models.values())), tasks, hds, batch_size, max_length, limit_per_task
    )
    res = run_evaluation(PerTaskTextFeatures(encoders, tasks), hds, tasks, dm, trainer)
    examples = split_examples(res, data, "text")
    rep = make_report(
        res,
        storage_ratio if storage_ratio is not None else float(len(by_path)),
        load_individual(individual),
        method="unmerged",
        examples=examples,
    )
    if output is not None:
        write_report(rep, output, "unmerged models")
    return rep
