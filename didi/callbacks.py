"""Side effects of the search: rank-evolution metrics per step and the final rank heatmap."""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Sequence

import lightning as L
import torch

from didi.decompose import MatrixEntry


def _groups(entries: Sequence[MatrixEntry], key) -> dict[str, torch.Tensor]:
    out: dict[str, list[int]] = defaultdict(list)
    for e in entries:
        out[str(key(e))].append(e.idx)
    return {k: torch.tensor(v) for k, v in out.items()}


class RankEvolution(L.Callback):
    """Logs, every `every_n_steps`, the mean shared and expert rank per matrix kind and per layer."""

    def __init__(
        self, entries: Sequence[MatrixEntry], every_n_steps: int = 10, per_layer: bool = True
    ) -> None:
        self.by_kind = _groups(entries, lambda e: e.kind)
        self.by_layer = _groups(entries, lambda e: e.layer) if per_layer else {}
        self.every = max(1, every_n_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every and trainer.global_step != trainer.max_steps:
            return
        r_s, r_t = pl_module.r_s.detach().cpu(), pl_module.r_t.detach().cpu()
        metrics = {}
        for label, groups in (("kind", self.by_kind), ("layer", self.by_layer)):
            for k, idx in groups.items():
                metrics[f"rank/shared/{label}={k}"] = float(r_s[idx].mean())
                metrics[f"rank/expert/{label}={k}"] = float(r_t[idx].mean())
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)


def rank_heatmap_png(
    entries: Sequence[MatrixEntry], r_s: torch.Tensor, r_t: torch.Tensor, title: str = ""
) -> bytes:
    """PNG bytes: two heatmaps (shared rank, mean expert rank), rows = layers, columns = matrix kinds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({e.layer for e in entries})
    kinds = sorted({e.kind for e in entries})
    grid = torch.full((2, len(layers), len(kinds)), float("nan"))
    for e in entries:
        i, j = layers.index(e.layer), kinds.index(e.kind)
        grid[0, i, j] = float(r_s[e.idx])
        grid[1, i, j] = float(r_t[e.idx].float().mean())
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(kinds) * 2 + 2), max(3, 0.35 * len(layers) + 2)))
    for ax, g, name in zip(axes, grid, ("shared rank", "mean expert rank")):
        im = ax.imshow(g.numpy(), aspect="auto", cmap="viridis")
        ax.set_title(name)
        ax.set_xticks(range(len(kinds)), [k[-24:] for k in kinds], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), [str(x) if x >= 0 else "other" for x in layers], fontsize=7)
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
