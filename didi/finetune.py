"""Fine-tune an encoder with a classification head per task, so users (and the demo) can build a zoo.

Each task is fine-tuned from θ0 on its own; the result is written in the adapter's format (config.json +
model.safetensors with exactly θ0's tensor names, plus θ0's tokenizer files) with the task's head beside it
(head.safetensors: "weight" classes × hidden, "bias"; head.json). Heads are outside the storage budget.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from didi.errors import DidiError
from didi.evaluators import mean_pool
from didi.trainer import TrainerConfig, Trainers

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
)


@dataclass
class FinetuneConfig:
    """Fine-tuning hyper-parameters.

    Args:
        steps: optimiser steps per task.
        lr: AdamW learning rate of the encoder.
        head_lr: learning rate of the (freshly initialised) head.
        weight_decay: AdamW weight decay.
        batch_size: examples per step.
        max_length: tokens per example.
        train_embeddings: also update the embeddings (word embeddings are half of MiniLM; off by default).
        warmup_steps: linear warm-up of the learning rate.
        seed: initialisation of the head and data order.
    """

    steps: int = 100
    lr: float = 5e-5
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    batch_size: int = 16
    max_length: int = 128
    train_embeddings: bool = False
    warmup_steps: int = 10
    seed: int = 0


class ClassifierFineTune(L.LightningModule):
    """Encoder → mean pooling → linear head; cross-entropy on one task's labels."""

    def __init__(self, encoder: nn.Module, num_classes: int, cfg: FinetuneConfig) -> None:
        super().__init__()
        self.encoder, self.cfg = (
            encoder.train(),
            cfg,
        )  # build_model returns eval mode; fine-tuning uses dropout
        hidden = encoder.config.hidden_size
        g = torch.Generator().manual_seed(cfg.seed)
        self.head = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(0.02 * torch.randn(num_classes, hidden, generator=g))
            self.head.bias.zero_()
        for name, p in self.encoder.named_parameters():
            p.requires_grad_(cfg.train_embeddings or not name.startswith("embeddings."))

    def forward(self, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return self.head(mean_pool(self.encoder(**inputs).last_hidden_state, batch["attention_mask"]))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log_dict(
            {"finetune/loss": loss, "finetune/acc": acc}, prog_bar=True, on_step=True, on_epoch=False
        )
        return loss

    def configure_optimizers(self):
        enc = [p for p in self.encoder.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            [{"params": enc, "lr": self.cfg.lr}, {"params": self.head.parameters(), "lr": self.cfg.head_lr}],
            weight_decay=self.cfg.weight_decay,
        )
        warm = max(1, self.cfg.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _num_classes(data: str) -> int:
    from didi.datamodules.text import read_jsonl

    labels = [e["label"] for e in read_jsonl(data, "train")]
    if not labels:
        raise DidiError(f"{data}: the train data is empty")
    if min(labels) < 0:
        raise DidiError(f"{data}: negative label {min(labels)}")
    if max(labels) < 1:
        raise DidiError(
            f"{data}: all training labels are {labels[0]}; a classifier needs two classes or more"
        )
    return max(labels) + 1


def finetune_task(
    base: str | Path,
    data: str | Path,
    output: str | Path,
    task: str | None = None,
    cfg: FinetuneConfig = FinetuneConfig(),
    trainer: TrainerConfig = TrainerConfig(),
    backbone: str = "hf_encoder",
    num_classes: int | None = None,
) -> Path:
    """Fine-tune θ0 (`base`) on one task's `data` (directory with train.jsonl); write the model + head."""
    from didi.artifact import atomic_dir
    from didi.backbones import build_adapter
    from didi.backbones.hf_encoder import resolve_model_dir
    from didi.datamodules.text import TextClassificationDataModule

    task = task or Path(output).name
    C = num_classes or _num_classes(str(data))  # bad data fails before any model is loaded
    adapter = build_adapter(backbone)
    src = adapter.open_source(base)
    base_sd = dict(src.items())
    encoder = adapter.build_model(base_sd)
    L.seed_everything(cfg.seed, verbose=False)
    module = ClassifierFineTune(encoder, C, cfg)
    dm = TextClassificationDataModule(
        {task: str(data)},
        str(base),
        split="train",
        num_classes={task: C},
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        seed=cfg.seed,
    )
    tr = Trainers(trainer).fit(f"finetune_{task}", max_steps=cfg.steps)
    tr.fit(module, datamodule=dm)
    if not tr.is_global_zero:
        return Path(output)
    own = {k: v.detach().cpu() for k, v in module.encoder.state_dict().items()}
    model_dir = resolve_model_dir(base)
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
        train_acc = tr.callback_metrics.get("finetune/acc")
        (tmp / "head.json").write_text(
            json.dumps(
                {
                    "task": task,
                    "num_classes": C,
                    "base": str(Path(base).resolve()),
                    "data": str(Path(data).resolve()),
                    "finetune": asdict(cfg),
                    "last_train_acc": None if train_acc is None else float(train_acc),
                },
                indent=1,
            )
        )
    return Path(output)


def finetune_zoo(
    base: str,
    tasks: dict[str, str],
    output: str,
    cfg: FinetuneConfig = FinetuneConfig(),
    trainer: TrainerConfig = TrainerConfig(),
    backbone: str = "hf_encoder",
    skip_existing: bool = True,
) -> dict[str, str]:
    """Fine-tune every task; returns {task: model directory}. Finished tasks are kept (a cached zoo)."""
    out = {}
    for task, data in tasks.items():
        d = Path(output) / task
        if not (skip_existing and (d / "head.safetensors").exists()):
            if d.exists():
                shutil.rmtree(d)
            finetune_task(base, data, d, task, cfg, trainer, backbone)
        out[task] = str(d)
    return out
