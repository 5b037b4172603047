"""Image classification evaluation data (one ImageFolder per task), open_clip preprocessing, zero-shot heads.

A task's data is a directory in `torchvision.datasets.ImageFolder` layout (`<class>/<image>`), or a directory
holding `<split>/` in that layout. Batches hold `pixel_values` (the adapter's eval transform), `labels`,
`task_id` (position in `task_order`, the artifact's task order) and `index`. Under DDP each process reads a
disjoint share (`ShardSampler`, no padding), as for text.

The evaluation itself (zero-shot heads, routed image features) is `didi.eval_image`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from didi.datamodules.text import ShardedEvalDataModule, task_order_of
from didi.errors import DidiError


# ------------------------------------------------------------------------------------ open_clip helpers
def open_clip_transform(model: nn.Module) -> Callable:
    """open_clip's eval transform for `model` (size, resize mode, mean/std from its preprocess config)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    visual = getattr(model, "visual", model)
    cfg = getattr(visual, "preprocess_cfg", None)
    if not cfg:  # a model built from a config dict: open_clip's defaults (OpenAI mean/std) at its image size
        size = getattr(visual, "image_size", None)
        if size is None:
            raise DidiError(f"{type(model).__name__}: no open_clip preprocess config and no image size")
        cfg = {"size": size}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def task_folder(path: str | Path, split: str = "test") -> Path:
    p = Path(path)
    if not p.is_dir():
        raise DidiError(f"{p}: no such directory (expected an ImageFolder layout: <class>/<image>)")
    return p / split if (p / split).is_dir() else p


def classnames_of(path: str | Path, split: str = "test") -> list[str]:
    """Class names of an ImageFolder directory: sorted sub-folder names, '_' read as a space."""
    from torchvision.datasets.folder import find_classes

    try:
        classes, _ = find_classes(str(task_folder(path, split)))
    except FileNotFoundError as e:
        raise DidiError(f"{path}: {e}") from e
    return [c.replace("_", " ") for c in classes]


class TaggedImages(Dataset):
    """(image file, label, task id) of several tasks in task order; images are read and transformed lazily."""

    def __init__(self, items: list[tuple[str, int, int]], transform: Callable) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from torchvision.datasets.folder import default_loader

        path, label, task = self.items[i]
        return {
            "pixel_values": self.transform(default_loader(path)),
            "label": label,
            "task_id": task,
            "index": i,
        }


def collate_images(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["label"] for e in examples]),
        "task_id": torch.tensor([e["task_id"] for e in examples]),
        "index": torch.tensor([e["index"] for e in examples]),
    }


class ImageClassificationDataModule(ShardedEvalDataModule):
    """Per-task image classification data (ImageFolder layout) for evaluation.

    Args:
        tasks: {task name: ImageFolder directory, or a directory holding `<split>/`}.
        transform: image → tensor (e.g. `open_clip_transform(model)`).
        task_order: task names in the order their ids are numbered (the artifact's); default: `tasks`' order.
        split: sub-directory used when present.
        num_classes: {task: classes of its head}; a folder with more classes is an error.
        batch_size: examples per batch (per process).
        limit_per_task: keep only the first examples of each task (quick runs).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        tasks: dict[str, str],
        transform: Callable,
        task_order: Sequence[str] | None = None,
        split: str = "test",
        num_classes: dict[str, int] | None = None,
        batch_size: int = 32,
        limit_per_task: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.task_order = task_order_of(self.tasks, task_order)
        self.transform, self.split, self.num_classes = transform, split, dict(num_classes or {})
        self.batch_size, self.limit, self.num_workers = batch_size, limit_per_task, num_workers
        self.dataset: TaggedImages | None = None

    def load(self) -> TaggedImages:
        from torchvision.datasets import ImageFolder

        items = []
        for name, path in self.tasks.items():
            root = task_folder(path, self.split)
            try:
                folder = ImageFolder(str(root))
            except (FileNotFoundError, RuntimeError) as e:
                raise DidiError(f"task {name!r} ({root}): not an ImageFolder directory ({e})") from e
            samples = folder.samples[: self.limit] if self.limit is not None else folder.samples
            if not samples:
                raise DidiError(f"task {name!r}: no images in {root}")
            C = self.num_classes.get(name)
            if C is not None and len(folder.classes) > C:
                raise DidiError(
                    f"task {name!r} ({root}): {len(folder.classes)} class folders, the head has {C} "
                    f"classes (labels outside the head)"
                )
            tid = self.task_order.index(name)
            items += [(p, label, tid) for p, label in samples]
        return TaggedImages(items, self.transform)

    def counts(self) -> dict[str, int]:
        ds = self.dataset or self.load()
        out = {t: 0 for t in self.tasks}
        for _, _, tid in ds.items:
            out[self.task_order[tid]] += 1
        return out

    def collate(self):
        return collate_images
