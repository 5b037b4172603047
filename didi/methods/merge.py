"""MERGE (Qiu, Wu, Feng, Tan, "Fine-Grained Model Merging via Modular Expert Recombination", arXiv
2602.06552), as didi builds it (docs/merge.md): component-wise merge configurations
(`didi.methods.merge_space`), a bi-objective search of them — mean normalised validation accuracy of the
routed model against storage — by NSGA-II with a surrogate (`didi.methods.merge_search`), and the modular
expert library of the front (`didi.methods.merge_library`).

    didi merge BASE TASKS OUT --method merge --options '{validation: {a: data/a, b: data/b}, evaluations: 60}'
    didi apply merge BASE TASKS OUT --options '{...}'              (the same)
    didi export OUT art/ --format artifact --point 3              (or --budget 1.5): one front point

A real evaluation serves each task's validation examples with the configuration's routed model (its task's
modules; `RoutedModel` with the oracle router, or a learned router of the same tasks and θ0) through didi's
evaluator (`didi.evaluators.run_evaluation`), and scores it by the mean over tasks of accuracy / the
fine-tune's accuracy on the same data. The fine-tune's accuracy is itself a real evaluation: the
configuration with every component at k = T (each task its exact delta) is the first genome of every
search. Text classification (`hf_encoder`) is evaluated in memory (the configuration's terms, decoded by the
artifact's one decoder, never written); other adapters through a temporary artifact and
`didi.evaluate.evaluate_artifact`.

The test split is never read: a directory gives validation.jsonl, val.jsonl or train.jsonl (images: the
validation/, val/ or train/ folder), in that order, as the learned router reads it; a train split is used only
when there is no validation split, and the run says so.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from didi.artifact import Artifact, write_artifact, zoo_manifest
from didi.backbones.base import Zoo
from didi.errors import DidiError
from didi.merges import check_lambda, check_topk
from didi.methods.common import DeltaReader, Terms
from didi.methods.merge_library import write_library
from didi.methods.merge_search import (
    FRONT_COLUMNS,
    EvaluationCache,
    SearchResult,
    SearchSettings,
    SurrogateKind,
    front_png,
    front_rows,
    require_search_packages,
    search_front,
)
from didi.methods.merge_space import MergeSpace, StaticMerge, genome_text
from didi.methods.registry import register_method
from didi.sources import file_sha256
from didi.trainer import TrainerConfig, Trainers

#: where the search keeps its state beside OUTPUT (the cache of real evaluations, the fronts so far)
WORK_SUFFIX = ".work"


@dataclass
class MergeSearchOptions:
    """MERGE: component-wise bi-objective merge search, written as a modular expert library + front.

    Args:
        validation: {task: validation data} for every task of the zoo, as `didi evaluate --data` takes it (a
            directory is read at validation.jsonl, val.jsonl or train.jsonl — images: validation/, val/,
            train/ —, a file as it is; never a test split). Required.
        evaluations: the budget of real evaluations of the search (at least `population`).
        population: NSGA-II's population size (the first generation evaluates this many genomes).
        offspring: real evaluations per later generation (default: half the population, at least 2).
        candidates: offspring proposed per real evaluation and pre-screened by the surrogate.
        surrogate: model of the accuracy from the genome that pre-screens offspring: `random_forest`,
            `gaussian_process`, or `none` (no pre-screening).
        seed: seed of the search (initial population, NSGA-II, surrogate).
        static_merge: how a group of tasks is merged: `task_arithmetic` (λ Σ τ), `ties` or `averaging`.
        lam: λ of Task Arithmetic and TIES.
        k: top-k % of TIES.
        linkage: cluster similarity of the task clustering: `min` (as FlexMerge), `max` or `mean` of the
            pairwise cosines.
        split: `auto` (validation, then val, then train) or the split to read in each directory.
        heads: {task: head file}; default: head.safetensors beside each fine-tune.
        tokenizer: tokenizer directory (default: θ0's).
        batch_size: validation examples per batch.
        max_length: tokens per example (text).
        limit_per_task: score on the first examples of each task only.
        router: `oracle` (each example's own task) or a router directory (`didi router train`, same tasks
            and θ0): which modules an example gets during the search.
        trainer: where evaluations run (accelerator) and where the fronts are logged (logger csv or wandb,
            log_dir); progress_bar shows one bar per generation.
        resume: continue an interrupted search from OUTPUT's work directory (its cache of evaluations).
    """

    validation: Optional[dict[str, str]] = None
    evaluations: int = 60
    population: int = 12
    offspring: Optional[int] = None
    candidates: int = 4
    surrogate: SurrogateKind = "random_forest"
    seed: int = 0
    static_merge: StaticMerge = "task_arithmetic"
    lam: float = 0.3
    k: float = 20.0
    linkage: Literal["min", "max", "mean"] = "min"
    split: str = "auto"
    heads: Optional[dict[str, str]] = None
    tokenizer: Optional[str] = None
    batch_size: int = 32
    max_length: int = 128
    limit_per_task: Optional[int] = None
    router: str = "oracle"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resume: bool = False

    def settings(self) -> SearchSettings:
        return SearchSettings(
            self.evaluations, self.population, self.offspring, self.candidates, self.surrogate, self.seed
        )

    def validate(self) -> None:
        self.settings().validate()
        check_lambda(self.lam)
        check_topk(self.k)
        if self.static_merge not in ("task_arithmetic", "ties", "averaging"):
            raise DidiError(
                f"static_merge: expected task_arithmetic, ties or averaging, found {self.static_merge!r}"
            )
        if self.linkage not in ("min", "max", "mean"):
            raise DidiError(f"linkage: expected min, max or mean, found {self.linkage!r}")
        if self.split == "test":
            raise DidiError("split: MERGE never scores on the test split (use validation, val, train, auto)")
        if self.limit_per_task is not None and self.limit_per_task < 1:
            raise DidiError(f"limit_per_task: expected a positive integer, found {self.limit_per_task}")

    def hyper_parameters(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("trainer", "resume")}


# --------------------------------------------------------------------------------------- validation data
def validation_files(validation: dict[str, str] | None, tasks: list[str], kind: str, split: str) -> dict:
    """{task: the file (text) or folder (images) of its validation data}, every task of the zoo; refuses no
    data, a task without data, a task the zoo does not have and any test split (`didi.router`'s rule)."""
    from didi.router import task_source

    if not validation:
        raise DidiError(
            f"validation: no validation data given; MERGE scores every configuration on each task's "
            f"validation split: give {{task: path}} for every task of the zoo {tasks}"
        )
    unknown = [t for t in validation if t not in tasks]
    if unknown:
        raise DidiError(
            f"validation: task {unknown[0]!r} is not in the zoo (its tasks: {tasks}); the validation task "
            f"names must be the zoo's"
        )
    missing = [t for t in tasks if t not in validation]
    if missing:
        raise DidiError(
            f"validation: no validation data for task {missing[0]!r} (MERGE needs every task of the zoo: "
            f"{tasks})"
        )
    out = {}
    for t in tasks:
        try:
            out[t] = task_source(t, validation[t], kind, split)
        except DidiError as e:
            raise DidiError(f"validation: {e}") from None
        if out[t].name in ("train.jsonl", "train"):
            print(
                f"didi: merge: task {t!r} has no validation split in {validation[t]}; its train split is "
                f"used (the fine-tune saw those examples, so its validation accuracies are optimistic)",
                file=sys.stderr,
                flush=True,
            )
    return out


class MemoryArtifact(Artifact):
    """A configuration's terms as an `Artifact` that was never written: the artifact's own decoding
    (`terms`, `common_deltas`, `expert_terms`, ...) reads these tensors instead of files, so `RoutedModel`
    serves exactly what `write_artifact` would store."""

    def __init__(self, terms: Terms, manifest: dict) -> None:  # no file to read or verify
        self.path = Path("<MERGE configuration>")
        self.manifest = {**manifest, "tasks": list(terms.tasks)}
        if terms.groups:
            self.manifest["groups"] = {gid: list(m) for gid, (m, _) in terms.groups.items()}
        self._files = {"fold.safetensors": terms.fold, "shared.safetensors": terms.shared}
        self._files.update({f"tasks/{t}.safetensors": v for t, v in terms.per_task.items()})
        self._files.update({f"groups/{g}.safetensors": v for g, (_, v) in terms.groups.items()})

    def _load(self, rel: str) -> dict:
        return dict(self._files.get(rel, {}))


class ValidationEvaluator:
    """One real evaluation per call: a genome's configuration served as a routed model on every task's
    validation data; returns {"tasks": {task: {"accuracy", "n"}}, "average"}."""

    def __init__(
        self,
        zoo: Zoo,
        space: MergeSpace,
        manifest: dict,
        files: dict[str, Path],
        opts: MergeSearchOptions,
        in_memory: bool | None = None,
    ) -> None:
        from didi.evaluators import default_head_path, load_head

        self.zoo, self.space, self.manifest, self.files, self.opts = zoo, space, manifest, files, opts
        self.adapter = zoo.adapter
        from didi.router import input_kind

        self.kind = input_kind(self.adapter, "merge")
        self.in_memory = self.kind == "text" if in_memory is None else in_memory
        self.trainer = TrainerConfig(
            accelerator=opts.trainer.accelerator, devices=1, logger="none", progress_bar=False
        )
        tasks = space.tasks
        self.head_paths = {
            t: str((opts.heads or {}).get(t) or default_head_path(zoo.tasks[t])) for t in tasks
        }
        self.heads = {t: load_head(p) for t, p in self.head_paths.items()} if self.kind == "text" else None
        self.learned = None
        if self.in_memory:
            from didi.datamodules.text import TextClassificationDataModule

            self.dm = TextClassificationDataModule(
                {t: str(f) for t, f in files.items()},
                opts.tokenizer or str(zoo.base),
                task_order=tasks,
                num_classes={t: h.out_features for t, h in self.heads.items()},
                batch_size=opts.batch_size,
                max_length=opts.max_length,
                limit_per_task=opts.limit_per_task,
            )
            self.dm.setup("test")
            self.model0 = self.adapter.build_model(
                dict(self.adapter.open_source(zoo.base, zoo.allow_pickle).items())
            )
            if opts.router != "oracle":
                from didi.router import load_router

                view = MemoryArtifact(space.terms((1,) * len(space.components)), manifest)
                self.learned = load_router(opts.router, view, str(zoo.base))

    def __call__(self, genome) -> dict:
        terms = self.space.terms(genome)
        if self.in_memory:
            from didi.evaluators import RoutedTextFeatures, run_evaluation
            from didi.routing import RoutedModel

            view = MemoryArtifact(terms, self.manifest)
            routed = RoutedModel(copy.deepcopy(self.model0), view, adapter=self.adapter)
            res = run_evaluation(
                RoutedTextFeatures(routed), self.heads, self.space.tasks, self.dm, self.trainer, self.learned
            )
        else:
            from didi.evaluate import evaluate_artifact

            with tempfile.TemporaryDirectory(prefix="didi_merge_") as tmp:
                path = write_artifact(
                    Path(tmp) / "configuration",
                    {**self.manifest, "ranks": {}, "storage": {}, "metrics": terms.metrics},
                    terms.fold,
                    terms.shared,
                    terms.per_task,
                    groups=terms.groups or None,
                )
                rep = evaluate_artifact(
                    path,
                    {t: str(f) for t, f in self.files.items()},
                    heads=self.head_paths,
                    tokenizer=self.opts.tokenizer,
                    batch_size=self.opts.batch_size,
                    max_length=self.opts.max_length,
                    limit_per_task=self.opts.limit_per_task,
                    trainer=self.trainer,
                    router="oracle" if self.opts.router == "oracle" else self.opts.router,
                    compare_oracle=False,
                )
                res = rep["tasks"]
        tasks = {t: {"accuracy": float(v["accuracy"]), "n": int(v["n"])} for t, v in res.items()}
        return {"tasks": tasks, "average": sum(v["accuracy"] for v in tasks.values()) / len(tasks)}

    def header(self) -> dict:
        """What every evaluation depends on (the cache's first line): a cache with another is refused."""
        o = self.opts
        router = None
        if o.router != "oracle":
            cfg = Path(o.router) / "router.json"
            digest = file_sha256(cfg) if cfg.exists() else None
            router = {"path": str(Path(o.router).resolve()), "sha256": digest}
        return {
            "zoo_digest": self.space.digest,
            "tasks": self.space.tasks,
            "components": [c.name for c in self.space.components],
            "static_merge": {"how": o.static_merge, "lam": o.lam, "k": o.k, "linkage": o.linkage},
            "validation": {
                t: {"path": str(f.resolve()), "sha256": file_sha256(f) if f.is_file() else None}
                for t, f in self.files.items()
            },
            "heads": {t: file_sha256(p) if Path(p).is_file() else p for t, p in self.head_paths.items()},
            "evaluation": {
                "batch_size": o.batch_size,
                "max_length": o.max_length,
                "limit_per_task": o.limit_per_task,
                "tokenizer": o.tokenizer,
                "router": router,
                "in_memory": self.in_memory,
            },
        }


# ------------------------------------------------------------------------------------------ the work dir
def work_dir_for(output: str | Path) -> Path:
    o = Path(output)
    return o.with_name(f".{o.name}{WORK_SUFFIX}")


class _Lock:
    """One search per output: an exclusive lock on the work directory for the run's duration."""

    def __init__(self, work: Path) -> None:
        self.fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise DidiError(
                f"{work}: another didi run is searching for this output (its work directory is locked)"
            ) from None

    def release(self) -> None:
        os.close(self.fd)


class FrontLog:
    """After every generation: the fronts so far to `fronts.csv` and `front.png` in the work directory, and
    the front's size, best accuracy and smallest storage to the trainer's logger (CSV or W&B; W&B also gets
    the front as a table and the figure)."""

    def __init__(self, work: Path, trainer: TrainerConfig) -> None:
        self.work = work
        self.logger = Trainers(trainer).logger("merge_search") if trainer.logger != "none" else None

    def __call__(self, gen: int, res: SearchResult) -> None:
        rows = [r for g in range(len(res.history)) for r in front_rows(res, g, genome_text)]
        csv = ",".join(FRONT_COLUMNS) + "\n" + "".join(",".join(str(x) for x in r) + "\n" for r in rows)
        _write(self.work / "fronts.csv", csv.encode())
        _write(self.work / "front.png", front_png(res, f"MERGE front after generation {gen}"))
        if self.logger:
            h = res.history[-1]
            self.logger.log_metrics(
                {
                    "merge/evaluations": float(h["evaluations"]),
                    "merge/front_size": float(h["front_size"]),
                    "merge/best_accuracy": h["best_score"],
                    "merge/min_storage": h["min_storage"],
                },
                step=gen,
            )
            if hasattr(self.logger, "log_table"):  # W&B
                last = front_rows(res, len(res.history) - 1, genome_text)
                self.logger.log_table(key="merge/front", columns=list(FRONT_COLUMNS), data=last, step=gen)
                self.logger.log_image(key="merge/front_png", images=[str(self.work / "front.png")], step=gen)
            else:
                self.logger.save()

    def close(self) -> None:
        if self.logger:
            self.logger.finalize("success")


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- the method
@register_method("merge", options=MergeSearchOptions, kind="dynamic", writes_artifact=True)
def merge(zoo: Zoo, opts: MergeSearchOptions, output: Path, in_memory: bool | None = None) -> Path:
    """MERGE: NSGA-II + surrogate over per-component task groupings; writes a modular expert library."""
    output = Path(output)
    if output.exists():
        raise DidiError(f"{output}: output directory already exists; choose another path or delete it")
    require_search_packages(opts.surrogate)
    from didi.router import input_kind

    kind = input_kind(zoo.adapter, "merge")
    files = validation_files(opts.validation, zoo.task_names, kind, opts.split)
    reader = DeltaReader(zoo)
    space = MergeSpace.from_zoo(zoo, opts.static_merge, opts.lam, opts.k, opts.linkage, reader)
    settings = opts.settings()
    settings.validate(space.size)
    manifest = {
        "method": {"name": "merge", "hyper_parameters": opts.hyper_parameters()},
        **zoo_manifest(zoo, reader.sha256),
    }
    evaluator = ValidationEvaluator(zoo, space, manifest, files, opts, in_memory)
    work = work_dir_for(output)
    existed = work.exists()
    if existed and not opts.resume and (work / "evaluations.jsonl").exists():
        print(
            f"didi: {work} holds the evaluations of an interrupted search of this output; without --resume "
            f"true this run starts afresh",
            file=sys.stderr,
            flush=True,
        )
    elif opts.resume and not existed:
        print(f"didi: --resume true, but there is no {work} to resume from; starting afresh", file=sys.stderr)
    work.mkdir(parents=True, exist_ok=True)
    lock = _Lock(work)
    cache = None
    try:
        cache = EvaluationCache(work / "evaluations.jsonl", evaluator.header(), opts.resume)
        T, C = len(space.tasks), len(space.components)
        exact, static = (T,) * C, (1,) * C
        ref = cache.get(exact)
        ref_fresh = ref is None
        if ref_fresh:  # the fine-tunes' validation accuracy: the reference of every normalised score
            t0 = time.perf_counter()
            ref = evaluator(exact)
            cache.put(exact, ref, time.perf_counter() - t0)
        reference = {t: v["accuracy"] for t, v in ref["tasks"].items()}
        zero = [t for t, a in reference.items() if not a > 0]
        if zero:
            raise DidiError(
                f"validation: the fine-tune of task {zero[0]!r} scores 0 on its validation data "
                f"({files[zero[0]]}), so its normalised accuracy is undefined"
            )

        def score(rec: dict) -> float:
            return sum(rec["tasks"][t]["accuracy"] / reference[t] for t in space.tasks) / T

        log = FrontLog(work, opts.trainer)
        res = search_front(
            C,
            T,
            space.storage_ratio,
            evaluator,
            score,
            settings,
            cache,
            first=[exact, static],
            on_generation=log,
            progress=opts.trainer.progress_bar,
        )
        log.close()
        search = {
            "settings": dataclasses.asdict(settings),
            "evaluations": len(res.points),
            "evaluated_by_this_run": res.fresh + ref_fresh,
            "from_cache": res.cached - ref_fresh,
            "generations": len(res.fronts),
            "stopped": res.stopped,
            "wall_s": res.wall_s,
            "history": res.history,
            "space_size": space.size,
        }
        path = write_library(
            output,
            zoo,
            reader.sha256,
            space,
            res.front,
            opts.hyper_parameters(),
            {"tasks": ref["tasks"], "average": ref["average"]},
            search,
            {n: (work / n).read_bytes() for n in ("fronts.csv", "front.png", "evaluations.jsonl")},
        )
    except BaseException as e:
        lock.release()
        if isinstance(e, DidiError) and not existed and (cache is None or not cache.records):
            shutil.rmtree(work, ignore_errors=True)
        raise
    lock.release()
    shutil.rmtree(work, ignore_errors=True)
    return path


def library_summary(path: str | Path) -> str:
    """A few lines on a library: tasks, modules, the front (storage, normalised validation accuracy)."""
    from didi.methods.merge_library import read_library

    manifest, front = read_library(path, verify=False)
    s = manifest["search"]
    lines = [
        f"MERGE library: {path}",
        f"  tasks: {', '.join(manifest['tasks'])}; {len(manifest['components'])} components; "
        f"{len(manifest['modules'])} modules ({manifest['storage']['ratio']:.4g}× with all of them)",
        f"  search: {s['evaluations']} real evaluations ({s['evaluated_by_this_run']} by this run), "
        f"{s['generations']} generations, {s['wall_s']:.1f} s; {s['stopped']}",
        "  front (index: storage ratio, mean normalised validation accuracy):",
    ]
    for p in front["points"]:
        lines.append(f"    {p['index']}: {p['storage_ratio']:.4g}×  {100 * p['accuracy']:.2f} %")
    return "\n".join(lines)
