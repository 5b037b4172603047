"""Side effects of the search: rank-evolution metrics per step and the final rank heatmap."""

from __future__ import annotations

import io
from collections import defaultdict
from typing import TYPE_CHECKING, Callable, Sequence

import lightning as L
import torch

from didi.decompose import MatrixEntry

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


#: Well-known module names → short labels, matched against the trailing dotted tokens of a kind (longest match
#: first), so "attention.output.dense" (BERT's attention output) is not confused with "output.dense" (its MLP
#: down-projection).
_KNOWN_KINDS: dict[str, str] = {
    # BERT-style encoders (hf_encoder)
    "query": "q",
    "key": "k",
    "value": "v",
    "attention.output.dense": "o",
    "intermediate.dense": "up",
    "output.dense": "down",
    # DistilBERT
    "q_lin": "q",
    "k_lin": "k",
    "v_lin": "v",
    "out_lin": "o",
    "ffn.lin1": "up",
    "ffn.lin2": "down",
    # Llama, HF CLIP
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "qkv_proj": "qkv",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    # embeddings and projections outside the blocks
    "word_embeddings": "embed",
    "embed_tokens": "embed",
    "wte": "embed",
    "position_embeddings": "pos_embed",
    "position_embedding": "pos_embed",
    "positional_embedding": "pos_embed",
    "wpe": "pos_embed",
    "token_type_embeddings": "type_embed",
    "patch_embedding": "patch_embed",
    "visual_projection": "proj",
}
#: Column order of the heatmap for the labels above (data flow through a block); other kinds follow in the
#: order they first appear.
_KIND_ORDER = "q k v qkv in_proj o out_proj gate up fc1 c_fc down fc2 c_proj".split()


def _kind_tokens(kind: str) -> list[str]:
    """Dotted tokens of a kind without the parameter suffix (".weight", open_clip's "in_proj_weight")."""
    tokens = kind.split(".")
    if len(tokens) > 1 and tokens[-1] == "weight":
        tokens = tokens[:-1]
    if tokens[-1].endswith("_weight") and len(tokens[-1]) > len("_weight"):
        tokens[-1] = tokens[-1][: -len("_weight")]
    return tokens


def _label_candidates(kind: str) -> list[str]:
    """Labels of one kind, shortest first: the well-known alias, ever longer dotted tails, the kind."""
    tokens = _kind_tokens(kind)
    out = []
    for n in range(len(tokens), 0, -1):  # longest known tail first
        alias = _KNOWN_KINDS.get(".".join(tokens[-n:]))
        if alias:
            out.append(alias)
            break
    out += [".".join(tokens[-n:]) for n in range(1, len(tokens) + 1)] + [kind]
    return list(dict.fromkeys(out))


def kind_labels(
    kinds: Sequence[str], kind_label: Callable[[str], str | None] | None = None
) -> dict[str, str]:
    """Short unique column labels for matrix kinds ("attention.self.query.weight" → "q").

    `kind_label` is the adapter's hook (`Adapter.kind_label`); where it returns None, or where two labels
    collide, the generic shortener's next longer candidate is used until every label is unique.
    """
    cands = {}
    for k in kinds:
        c = _label_candidates(k)
        own = kind_label(k) if kind_label is not None else None
        cands[k] = list(dict.fromkeys([own, *c])) if own else c
    pos = dict.fromkeys(kinds, 0)
    while True:
        users: dict[str, list[str]] = defaultdict(list)
        for k in kinds:
            users[cands[k][pos[k]]].append(k)
        clashes = [ks for ks in users.values() if len(ks) > 1]
        if not clashes:
            return {k: cands[k][pos[k]] for k in kinds}
        moved = False
        for ks in clashes:
            for k in ks:
                if pos[k] + 1 < len(cands[k]):
                    pos[k] += 1
                    moved = True
        if not moved:  # unreachable for distinct kinds (the last candidate is the kind itself)
            raise ValueError(f"matrix kinds without unique labels: {clashes}")


def _column_order(entries: Sequence[MatrixEntry], labels: dict[str, str]) -> list[str]:
    """Block kinds first (in `_KIND_ORDER`, then as they appear), then the kinds only outside blocks."""
    first: dict[str, int] = {}
    in_block: set[str] = set()
    for i, e in enumerate(entries):
        first.setdefault(e.kind, i)
        if e.layer >= 0:
            in_block.add(e.kind)
    role = {lab: i for i, lab in enumerate(_KIND_ORDER)}
    return sorted(first, key=lambda k: (k not in in_block, role.get(labels[k], len(role)), first[k]))


_TICK_PT = 8  # tick-label font size
_CHAR_IN = 0.62 * _TICK_PT / 72  # width of an average character of the tick font, inches
_ROW_IN = 0.19  # height of one labelled heatmap row, inches (a tick label is ~0.12 in tall)
_MAX_ROW_LABELS = 40  # beyond this, every k-th layer is labelled so that labels keep their height


def rank_heatmap_figure(
    entries: Sequence[MatrixEntry],
    r_s: torch.Tensor,
    r_t: torch.Tensor,
    title: str = "",
    kind_label: Callable[[str], str | None] | None = None,
) -> Figure:
    """Figure of two heatmaps (shared rank, mean expert rank): rows = layers, columns = matrix kinds.

    Sized from the number of layers and kinds so that tick labels neither overlap nor leave the figure (the
    layers of deep models are labelled every k-th row); `kind_label` is the adapter's label hook.
    Returned un-encoded so that tests can measure the text; `rank_heatmap_png` encodes it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = kind_labels(list(dict.fromkeys(e.kind for e in entries)), kind_label)
    kinds = _column_order(entries, labels)
    layers = sorted({e.layer for e in entries})
    grid = torch.full((2, len(layers), len(kinds)), float("nan"))
    for e in entries:
        i, j = layers.index(e.layer), kinds.index(e.kind)
        grid[0, i, j] = float(r_s[e.idx])
        grid[1, i, j] = float(r_t[e.idx].float().mean())

    longest = max((len(labels[k]) for k in kinds), default=1)
    col_in = longest * _CHAR_IN + 0.15  # a horizontal label's width plus a gap
    vertical = len(kinds) * col_in > 4.5  # too wide side by side: write the labels upwards
    panel_w = max(2.2, len(kinds) * (0.32 if vertical else col_in))
    need = -(-len(layers) // _MAX_ROW_LABELS)  # ceil: label every step-th row, a round step
    step = next((k for k in (1, 2, 4, 5, 10, 20, 25, 50) if k >= need), need)
    panel_h = max(2.2, len(layers) / step * _ROW_IN)
    xlabel_h = (longest * _CHAR_IN if vertical else 0.15) + 0.45
    fig = plt.figure(
        figsize=(2 * (panel_w + 1.6) + 0.3, panel_h + xlabel_h + (1.2 if title else 0.9)),
        layout="constrained",
    )
    axes = fig.subplots(1, 2)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#e6e6e6")  # grey: kind absent from the row
    row_names = [str(x) if x >= 0 else "other" for x in layers]
    panels = ("shared module rank $r_s$", "expert rank $r_t$ (mean over tasks)")
    for ax, g, name in zip(axes, grid, panels):
        im = ax.imshow(g.numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(
            range(len(kinds)),
            [labels[k] for k in kinds],
            rotation=90 if vertical else 0,
            fontsize=_TICK_PT,
        )
        rows = list(range(len(layers)))
        if step > 1:  # "other" and every step-th block, none within `step` rows of "other"
            gap = step if layers[0] < 0 else 0
            rows = [i for i in rows if layers[i] < 0 or (layers[i] % step == 0 and layers[i] >= gap)]
        ax.set_yticks(rows, [row_names[i] for i in rows], fontsize=_TICK_PT)
        ax.set_xlabel("matrix kind", fontsize=9)
        ax.set_ylabel("layer", fontsize=9)
        cb = fig.colorbar(im, ax=ax, pad=0.03, aspect=max(20.0, panel_h / 0.16))  # as tall as the panel
        cb.set_label("rank", fontsize=9)
        cb.ax.tick_params(labelsize=_TICK_PT)
        cb.locator = MaxNLocator(integer=True)
        cb.update_ticks()
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def rank_heatmap_png(
    entries: Sequence[MatrixEntry],
    r_s: torch.Tensor,
    r_t: torch.Tensor,
    title: str = "",
    kind_label: Callable[[str], str | None] | None = None,
) -> bytes:
    """PNG bytes of `rank_heatmap_figure` (what an artifact stores as rank_heatmap.png)."""
    import matplotlib.pyplot as plt

    fig = rank_heatmap_figure(entries, r_s, r_t, title, kind_label)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
