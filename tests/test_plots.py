"""The plots must read: no tick label overlaps another or leaves the figure, matrix kinds get short unique
names (the old `k[-24:]` cut BERT's attention output and MLP output to the same-looking stubs), and every
method of a Pareto plot stays visible even where two methods score the same."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.text import Text

from didi.backbones.base import Adapter
from didi.callbacks import kind_labels, rank_heatmap_figure, rank_heatmap_png
from didi.compare import pareto_figure, pareto_png
from didi.decompose import MatrixEntry

# kinds as the adapters' `layer_of` returns them (hf_encoder: the base adapter's block pattern)
BERT = [
    "attention.self.query.weight",
    "attention.self.key.weight",
    "attention.self.value.weight",
    "attention.output.dense.weight",
    "intermediate.dense.weight",
    "output.dense.weight",
]
OPEN_CLIP = ["attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
OPEN_CLIP_OUTSIDE = ["conv1.weight", "positional_embedding", "proj"]
LLAMA = [f"self_attn.{x}_proj.weight" for x in "qkvo"] + [
    f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")
]
LLAMA_OUTSIDE = ["model.embed_tokens.weight", "lm_head.weight"]
HF_CLIP = [f"self_attn.{x}_proj.weight" for x in ("q", "k", "v", "out")] + [
    "mlp.fc1.weight",
    "mlp.fc2.weight",
]
HF_CLIP_OUTSIDE = [
    "embeddings.patch_embedding.weight",
    "embeddings.position_embedding.weight",
    "visual_projection.weight",
]


def _entries(n_layers: int, kinds: list[str], outside: list[str] = (), n_tasks: int = 3):
    """Synthetic index rows shaped like an adapter's plan, with random ranks (up to 3 digits)."""
    cells = [(-1, k) for k in outside] + [(layer, k) for layer in range(n_layers) for k in kinds]
    entries = [
        MatrixEntry(i, f"blocks.{layer}.{k}", (512, 512), 512, 512, 512, 512, (512,) * n_tasks, layer, k)
        for i, (layer, k) in enumerate(cells)
    ]
    g = torch.Generator().manual_seed(0)
    return (
        entries,
        torch.randint(0, 512, (len(cells),), generator=g),
        torch.randint(0, 512, (len(cells), n_tasks)),
    )


def _overlaps(boxes) -> list[tuple[int, int]]:
    return [(i, j) for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2) if a.overlaps(b)]


def _check_text(fig) -> None:
    """No two tick labels of one axis overlap; no text (ticks, axis labels, titles) is cut by the figure."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    box = fig.bbox
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            eps = 1e-9 * max(1.0, hi - lo)
            drawn = [  # matplotlib keeps (and returns) the labels of ticks outside the view, but draws none
                t.label1
                for t, loc in zip(axis.get_major_ticks(), axis.get_majorticklocs())
                if lo - eps <= loc <= hi + eps
            ]
            labels = [t for t in drawn if t.get_visible() and t.get_text()]
            boxes = [t.get_window_extent(r) for t in labels]
            bad = _overlaps(boxes)
            assert not bad, [(labels[i].get_text(), labels[j].get_text()) for i, j in bad]
            for t in labels:
                _inside(t, r, box)
        for t in (ax.xaxis.label, ax.yaxis.label, ax.title):
            if t.get_visible() and t.get_text():
                _inside(t, r, box)
    if fig._suptitle is not None:
        _inside(fig._suptitle, r, box)


def _inside(t, renderer, box) -> None:
    e = t.get_window_extent(renderer)
    assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1, t.get_text()


@pytest.mark.parametrize(
    "n_layers,kinds,outside",
    [
        (6, BERT, []),
        (12, OPEN_CLIP, OPEN_CLIP_OUTSIDE),
        (32, LLAMA, LLAMA_OUTSIDE),
        (12, HF_CLIP, HF_CLIP_OUTSIDE),
        (80, LLAMA, LLAMA_OUTSIDE),
    ],
    ids=["bert6", "vit12_open_clip", "llama32", "vit12_hf_clip", "llama80_thinned"],
)
def test_heatmap_labels_neither_overlap_nor_leave_the_figure(n_layers, kinds, outside):
    entries, r_s, r_t = _entries(n_layers, kinds, outside)
    fig = rank_heatmap_figure(
        entries, r_s, r_t, title="DiDi ranks at 1.1x (shared part folded into the base)"
    )
    try:
        _check_text(fig)
        heat = [ax for ax in fig.axes if ax.get_images()]
        assert len(heat) == 2
        for ax in heat:
            assert ax.get_xlabel() == "matrix kind" and ax.get_ylabel() == "layer" and ax.get_title()
        bars = [ax for ax in fig.axes if not ax.get_images()]
        assert len(bars) == 2 and all(ax.get_ylabel() == "rank" for ax in bars)
        rows = [t.get_text() for t in heat[0].get_yticklabels()]
        assert ("other" in rows) == bool(outside)
        if n_layers <= 40:  # every layer named
            assert rows[-n_layers:] == [str(i) for i in range(n_layers)]
        else:  # deep models: every k-th layer
            assert 10 <= len(rows) <= 41 and set(rows) < {"other", *map(str, range(n_layers))}
    finally:
        plt.close(fig)


def test_bert_labels_are_unique_and_whole():
    entries, r_s, r_t = _entries(6, BERT)
    fig = rank_heatmap_figure(entries, r_s, r_t)
    try:
        cols = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    finally:
        plt.close(fig)
    assert cols == ["q", "k", "v", "o", "up", "down"]  # in the order data flows through a block
    assert not any("tion." in c or c.endswith(".weight") for c in cols)


@pytest.mark.parametrize(
    "kinds,expected",
    [
        (
            OPEN_CLIP + OPEN_CLIP_OUTSIDE,
            ["in_proj", "out_proj", "c_fc", "c_proj", "conv1", "pos_embed", "proj"],
        ),
        (LLAMA + LLAMA_OUTSIDE, ["q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head"]),
        (
            HF_CLIP + HF_CLIP_OUTSIDE,
            ["q", "k", "v", "out_proj", "fc1", "fc2", "patch_embed", "pos_embed", "proj"],
        ),
    ],
)
def test_kind_labels_of_the_adapters(kinds, expected):
    assert list(kind_labels(kinds).values()) == expected


def test_kind_labels_fall_back_to_longer_names_and_take_the_adapter_hook():
    labels = kind_labels(["encoder.fc.weight", "decoder.fc.weight", "head.weight"])
    assert labels == {
        "encoder.fc.weight": "encoder.fc",
        "decoder.fc.weight": "decoder.fc",
        "head.weight": "head",
    }

    class Named(Adapter):
        def kind_label(self, kind: str) -> str | None:
            return "ffn_in" if kind == "intermediate.dense.weight" else None

    assert Adapter().kind_label("attention.self.query.weight") is None  # default: the generic shortener
    labels = kind_labels(BERT, Named().kind_label)
    assert labels["intermediate.dense.weight"] == "ffn_in" and labels["output.dense.weight"] == "down"
    # a hook label that collides falls back to the generic ones
    assert len(set(kind_labels(BERT, lambda k: "x").values())) == len(BERT)
    entries, r_s, r_t = _entries(2, BERT)
    assert rank_heatmap_png(entries, r_s, r_t, kind_label=Named().kind_label)[:4] == b"\x89PNG"


def _rows() -> list[dict]:
    """A compare run where didi and didi_greedy score the same at every budget, three baselines tie at 1.0×
    and one method has a long name."""
    rows = []
    for m in ("didi", "didi_greedy", "didi_uniform", "flexmerge"):
        for b, err in ((1.02, 0.66), (1.05, 0.54), (1.1, 0.43), (1.24, 0.28), (1.4, 0.19), (2.0, 0.067)):
            shift = {"didi_uniform": 1.04, "flexmerge": 1.6}.get(m, 1.0)
            rows.append(
                {"label": f"{m}@{b:g}", "method": m, "budget": b, "storage_ratio": b, "average": err * shift}
            )
    for m in ("averaging", "task_arithmetic", "ties_with_a_rather_long_method_name"):
        rows.append({"label": m, "method": m, "budget": None, "storage_ratio": 1.0, "average": 0.75})
    rows.append({"label": "twin", "method": "twin", "budget": None, "storage_ratio": 1.28, "average": 0.24})
    return rows


@pytest.mark.parametrize("higher", [False, True], ids=["error", "accuracy"])
def test_pareto_every_method_visible_and_no_label_overlaps(higher):
    rows = _rows()
    if higher:
        rows = [{**r, "average": 1 - r["average"]} for r in rows]
    fig = pareto_figure(rows, "average", "metric", higher, "metric vs storage")
    try:
        _check_text(fig)
        r = fig.canvas.get_renderer()
        (ax,) = fig.axes
        assert ax.get_xlabel().startswith("storage ratio") and ax.get_ylabel() == "metric"
        (legend,) = fig.legends
        names = [t.get_text() for t in legend.get_texts()]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        assert all(m in names for m in methods)
        # labels: none over another, over the legend, or outside the axes
        boxes = []
        for t in ax.texts:  # the text of each label, without its leader line
            t.update_positions(r)
            boxes.append(Text.get_window_extent(t, r))
        assert boxes and not _overlaps(boxes), [t.get_text() for t in ax.texts]
        leg, inside = legend.get_window_extent(r), ax.get_window_extent(r)
        for b in boxes:
            assert not b.overlaps(leg)
            assert inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1
        # coincident points (didi and didi_greedy at each budget; the three baselines) are drawn apart
        shown = [ax.transData.transform(c.get_offsets()) for c in ax.collections]  # one per method, in order
        width = 6 / 72 * fig.dpi
        didi, greedy = shown[methods.index("didi")], shown[methods.index("didi_greedy")]
        assert (abs(didi[:, 0] - greedy[:, 0]) >= width).all()
        base = [shown[methods.index(m)][0] for m in methods if m.startswith(("averaging", "task", "ties"))]
        assert all(abs(a[0] - b[0]) >= width for a, b in itertools.combinations(base, 2))
        # coincident front points share one label, naming both methods
        assert any("didi / didi_greedy" in t.get_text() for t in ax.texts)
    finally:
        plt.close(fig)
    assert pareto_png(rows, "average", "metric", higher, "t")[:4] == b"\x89PNG"


def test_the_kinds_above_are_those_the_adapters_give():
    """The synthetic kinds are the real ones (`Adapter.layer_of` of each family), so the label tests mean
    what they say."""
    from didi.backbones.hf_clip import HFClipAdapter
    from didi.backbones.hf_encoder import HFEncoderAdapter
    from didi.backbones.hf_llama import HFLlamaAdapter
    from didi.backbones.open_clip import OpenClipAdapter

    cases = [
        (HFEncoderAdapter(), "bert.encoder.layer.3.", BERT, "", []),
        (OpenClipAdapter(), "visual.transformer.resblocks.3.", OPEN_CLIP, "visual.", OPEN_CLIP_OUTSIDE),
        (HFLlamaAdapter(), "model.layers.3.", LLAMA, "", LLAMA_OUTSIDE),
        (HFClipAdapter(), "vision_model.encoder.layers.3.", HF_CLIP, "", []),
    ]
    for adapter, block, kinds, outside_prefix, outside in cases:
        assert [adapter.layer_of(block + k) for k in kinds] == [(3, k) for k in kinds]
        assert [adapter.layer_of(outside_prefix + k) for k in outside] == [(-1, k) for k in outside]
    clip = HFClipAdapter()
    assert [clip.layer_of(n) for n in ("vision_model." + HF_CLIP_OUTSIDE[0], HF_CLIP_OUTSIDE[2])] == [
        (-1, HF_CLIP_OUTSIDE[0]),
        (-1, HF_CLIP_OUTSIDE[2]),
    ]
