"""Text classification data for evaluation and fine-tuning; every example carries its task id and its index.

A task's data is a JSON-lines file of {"text": str, "label": int}, or a directory holding `<split>.jsonl`.
Batches hold the tokenizer's tensors plus `labels`, `task_id` (position in `task_order`, the artifact's task
order) and `index` (a global example index). Under DDP the evaluation loaders use `ShardSampler`: each process
takes a disjoint share and nothing is padded, so no example is counted twice (Lightning keeps a sampler that
is a `DistributedSampler` instead of substituting its padding one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from didi.errors import DidiError


def read_jsonl(path: str | Path, split: str = "test") -> list[dict]:
    """Examples of one task: `path` is a .jsonl file or a directory with `<split>.jsonl`."""
    p = Path(path)
    if p.is_dir():
        p = p / f"{split}.jsonl"
    if not p.exists():
        raise DidiError(f'{p}: no such data file (expected JSON lines of {{"text": ..., "label": int}})')
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            text, label = ex["text"], ex["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DidiError(f"{p}:{i + 1}: expected a JSON object with 'text' and 'label' ({e})") from e
        if not isinstance(label, int) or isinstance(label, bool):
            raise DidiError(f"{p}:{i + 1}: label {label!r} is not an integer class index")
        out.append({"text": str(text), "label": label})
    return out


def write_jsonl(path: str | Path, examples: Sequence[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(
        "".join(json.dumps({"text": e["text"], "label": int(e["label"])}) + "\n" for e in examples),
        encoding="utf-8",
    )
    tmp.replace(p)


class TaggedExamples(Dataset):
    """(text, label, task id, index) for the examples of several tasks, concatenated in task order."""

    def __init__(self, items: list[tuple[str, int, int]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        text, label, task = self.items[i]
        return {"text": text, "label": label, "task_id": task, "index": i}


class ShardSampler(DistributedSampler):
    """Process `rank` of `world` takes indices rank, rank+world, ...: disjoint, complete, never padded."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class TextCollate:
    """Tokenise a list of examples into one padded batch (a class, so DDP-spawn can pickle it)."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, examples: list[dict]) -> dict:
        enc = self.tokenizer(
            [e["text"] for e in examples],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        batch["labels"] = torch.tensor([e["label"] for e in examples])
        batch["task_id"] = torch.tensor([e["task_id"] for e in examples])
        batch["index"] = torch.tensor([e["index"] for e in examples])
        return batch


def load_tokenizer(path: str | Path):
    """A Hugging Face tokenizer from a local directory (never downloads)."""
    from transformers import AutoTokenizer

    from didi.backbones.hf_encoder import resolve_model_dir

    p = Path(path)
    try:
        d = (
            resolve_model_dir(p)
            if p.is_dir() and not (p / "tokenizer_config.json").exists() and not (p / "vocab.txt").exists()
            else p
        )
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except DidiError:
        raise
    except Exception as e:
        raise DidiError(f"{p}: no usable tokenizer ({e})") from e


def task_order_of(tasks: dict[str, str], task_order: Sequence[str] | None) -> list[str]:
    """The model's task order (task ids index it); every data task must be one of the model's tasks."""
    order = list(task_order) if task_order is not None else list(tasks)
    unknown = [t for t in tasks if t not in order]
    if unknown:
        raise DidiError(f"data: task {unknown[0]!r} is not one of the model's tasks {order}")
    return order


class ShardedEvalDataModule(L.LightningDataModule):
    """Evaluation data loaded once (`load()`), served in order; under DDP each process takes a disjoint share
    (`ShardSampler`, no padding). Subclasses give `load()` and `collate()`."""

    dataset: Dataset | None = None
    batch_size: int = 32
    num_workers: int = 0

    def load(self) -> Dataset:
        raise NotImplementedError

    def collate(self):
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = self.load()

    def test_dataloader(self) -> DataLoader:
        self.setup()
        sampler = None
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            sampler = ShardSampler(self.dataset, trainer.world_size, trainer.global_rank)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            collate_fn=self.collate(),
            num_workers=self.num_workers,
        )

    val_dataloader = test_dataloader


class TextClassificationDataModule(L.LightningDataModule):
    """Per-task text classification data.

    Args:
        tasks: {task name: .jsonl file or directory with `<split>.jsonl`}.
        tokenizer: directory of a Hugging Face tokenizer (usually θ0's).
        task_order: task names in the order their ids are numbered (the artifact's); default: `tasks`' order.
        split: which split directories provide for evaluation (`test`) — training uses `train`.
        num_classes: {task: classes of its head}; labels outside [0, classes) are an error.
        batch_size: examples per batch (per process).
        max_length: tokens per example (longer texts are truncated).
        limit_per_task: keep only the first examples of each task (quick runs).

    No `val_dataloader`: didi fine-tunes without validation, and a data module that defines one makes every
    `Trainer.fit` warn "You passed in a `val_dataloader` but have no `validation_step`"; evaluation reads
    `split` through `test_dataloader`.
    """

    def __init__(
        self,
        tasks: dict[str, str],
        tokenizer: str,
        task_order: Sequence[str] | None = None,
        split: str = "test",
        num_classes: dict[str, int] | None = None,
        batch_size: int = 32,
        max_length: int = 128,
        limit_per_task: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.task_order = task_order_of(self.tasks, task_order)
        self.tokenizer_path, self.split, self.num_classes = tokenizer, split, dict(num_classes or {})
        self.batch_size, self.max_length, self.limit, self.seed = batch_size, max_length, limit_per_task, seed
        self._tokenizer = None
        self.datasets: dict[str, TaggedExamples] = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def load_split(self, split: str) -> TaggedExamples:
        items = []
        for name, path in self.tasks.items():
            exs = read_jsonl(path, split)
            if self.limit is not None:
                exs = exs[: self.limit]
            if not exs:
                raise DidiError(f"task {name!r}: the {split} data ({path}) is empty")
            C = self.num_classes.get(name)
            for e in exs:
                if e["label"] < 0 or (C is not None and e["label"] >= C):
                    raise DidiError(
                        f"task {name!r} ({path}): label {e['label']} is outside the head's classes [0, {C})"
                        if C is not None
                        else f"task {name!r}: negative label {e['label']}"
                    )
            tid = self.task_order.index(name)
            items += [(e["text"], e["label"], tid) for e in exs]
        return TaggedExamples(items)

    def counts(self, split: str | None = None) -> dict[str, int]:
        ds = self.datasets.get(split or self.split) or self.load_split(split or self.split)
        out = {t: 0 for t in self.tasks}
        for _, _, tid in ds.items:
            out[self.task_order[tid]] += 1
        return out

    def setup(self, stage: str | None = None) -> None:
        splits = ["train"] if stage == "fit" else [self.split]
        for s in splits:
            if s not in self.datasets:
                self.datasets[s] = self.load_split(s)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.datasets[split] = self.load_split(split)
        ds = self.datasets[split]
        sampler = None
        trainer = getattr(self, "trainer", None)
        if not shuffle and trainer is not None and trainer.world_size > 1:
            sampler = ShardSampler(ds, trainer.world_size, trainer.global_rank)
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=TextCollate(self.tokenizer, self.max_length),
            num_workers=0,
            generator=g if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.split, shuffle=False)
