"""Routed evaluation of open_clip artifacts on image classification (what `didi evaluate` runs for images).

Heads: a zero-shot head per task from the open_clip text tower of θ0 (class names × prompt templates, the
normalised mean text embedding per class, times CLIP's logit scale) — the text tower is not merged and sits
outside the storage budget, as in the paper — or given head weights (`didi.evaluators.load_head`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from didi.datamodules.image import ImageClassificationDataModule, classnames_of, open_clip_transform
from didi.errors import DidiError
from didi.evaluators import load_head, run_evaluation
from didi.routing import RoutedModel

DEFAULT_TEMPLATES = ("a photo of a {}.",)


# ------------------------------------------------------------------------------------ open_clip helpers
def open_clip_tokenizer(adapter) -> Callable:
    """open_clip's tokenizer of the adapter's architecture (bundled BPE vocabulary: nothing is downloaded)."""
    import open_clip

    if adapter.model_config:
        ctx = adapter.model_config.get("text_cfg", {}).get("context_length", 77)
        return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
    return open_clip.get_tokenizer(adapter.model_name)


class ImageFeatures(nn.Module):
    """L2-normalised image embeddings of an open_clip model (what `RoutedModel` wraps, prefix "clip")."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(pixel_values), dim=-1)


class RoutedImageFeatures(nn.Module):
    """Evaluator features: example i runs through θ0 + shared + expert of its task (a RoutedModel over
    `ImageFeatures`)."""

    def __init__(self, routed: nn.Module) -> None:
        super().__init__()
        self.routed = routed

    def forward(self, batch: dict, task_ids: torch.Tensor) -> torch.Tensor:
        return self.routed(batch["pixel_values"], task_ids=task_ids)


def routed_image_features(clip: nn.Module, artifact, adapter) -> RoutedImageFeatures:
    return RoutedImageFeatures(RoutedModel(ImageFeatures(clip), artifact, adapter=adapter, prefix="clip"))


@torch.no_grad()
def zero_shot_head(
    clip: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> nn.Linear:
    """Linear head (classes × embed, no bias):
    logit_scale · normalise(mean_t normalise(text(template_t(c))))."""
    if not classnames:
        raise DidiError("zero-shot head: no class names")
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise DidiError(
            f"zero-shot head: every prompt template needs a '{{}}' for the class name; found {bad or []}"
        )
    rows = []
    for c in classnames:
        emb = clip.encode_text(tokenizer([t.format(c) for t in templates]))
        rows.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
    W = torch.stack(rows) * clip.logit_scale.exp()
    head = nn.Linear(W.shape[1], W.shape[0], bias=False)
    head.weight.data.copy_(W)
    return head.requires_grad_(False)


# ------------------------------------------------------------------------------------------------ data


def evaluate_images(
    art,
    adapter,
    data: dict[str, str],
    heads: dict[str, str] | None,
    base: str | None,
    batch_size: int,
    limit_per_task: int | None,
    trainer,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    router=None,
) -> dict[str, dict]:
    """Routed per-task accuracy of an open_clip artifact (what `didi evaluate` runs for image models): the
    given head file of a task, or else its zero-shot head from θ0's text tower and the folder's class
    names. `router`: a learned router (`didi.router.LearnedRouter`); default the oracle."""
    src = base or art.manifest["sources"]["base"]["path"]
    base_sd = dict(
        adapter.open_source(src, art.manifest["sources"]["base"].get("allow_pickle", False)).items()
    )
    clip = adapter.build_model(base_sd)
    tokenizer = open_clip_tokenizer(adapter)
    hds = {
        t: load_head(heads[t])
        if heads and t in heads
        else zero_shot_head(clip, tokenizer, classnames_of(d), templates)
        for t, d in data.items()
    }
    dm = ImageClassificationDataModule(
        data,
        open_clip_transform(clip),
        task_order=art.tasks,
        batch_size=batch_size,
        num_classes={t: h.out_features for t, h in hds.items()},
        limit_per_task=limit_per_task,
    )
    dm.setup("test")  # bad data fails here, before any process is spawned
    return run_evaluation(
        routed_image_features(adapter.build_model(base_sd), art, adapter), hds, art.tasks, dm, trainer, router
    )
