"""`didi compare`: run methods × budgets on one zoo, score every artifact the same way, write a table and a
Pareto plot (metric vs storage ratio), so a user can answer "which method, at which budget?".

Methods that take a size (an options field named `budget`, like DiDi and its ablations, or `target`, like
FlexMerge) run once per budget; the others run once. Artifacts go to `<output>/artifacts/<label>/` and are
reused when a later run asks for the same label with the same hyper-parameters (DiDi's factor cache is shared
through `decompose.cache_dir` as usual). Each accuracy evaluation is kept in
`<output>/evaluations/<label>.json` and reused while the artifact (its manifest), the test data (sha256)
and the evaluation settings are the same (the trainer's aside), so adding a method or a budget only
computes and evaluates what is new.

MERGE (`merge`, docs/merge.md) writes a library + front rather than one artifact: its search runs once, to
`<output>/libraries/merge/` (its wall time is every MERGE row's), and for each budget the front point
`didi export --budget` picks (the most accurate within the budget; on a front, the largest ratio not above
it) is extracted to `<output>/artifacts/merge@<budget>/` and scored like any artifact, at its own ratio.
Its validation data is compare's `validation` unless its options give one.

Metrics:
    accuracy        per-task accuracy from `didi.evaluate.evaluate_artifact` (routed experts, oracle
                    router; needs `data`, and heads beside the fine-tunes or `heads`); with `individual`
                    (a report.json of the fine-tunes, or {task: accuracy}) also normalised accuracy.
    reconstruction  data-free: per task, ‖θ̂_t − θ_t‖² / ‖θ_t − θ0‖² over every tensor, where θ̂_t is what
                    the artifact serves for task t (`Artifact.task_deltas`): the relative error of its
                    task vector.

Routers (metric accuracy): `oracle` rows route each example to its own task; `learned` adds, for every
dynamic row (static merges serve one model, nothing to route), a `<label>+learned` row served by ONE router
trained on `validation` under `<output>/router/` (`didi.router.train_router`: it reads θ0 only, so it serves
every artifact of the zoo; reused by later runs when its settings are the same), with its routing accuracy.

Paired differences (metric accuracy): each row's report keeps every test example's correctness
(`didi.evaluate`), so a row and a reference row (`reference`; and each `+learned` row and its oracle row)
are compared on the same examples: b = examples the row gets right and the reference wrong, c = the reverse,
and the exact McNemar p-value of b vs c (`mcnemar_exact`), pooled over tasks and per task.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from didi import jsonio
from didi.backbones.base import Zoo
from didi.errors import DidiError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.text import Annotation
    from matplotlib.transforms import Bbox

Metric = Literal["reconstruction", "accuracy"]
Routing = Literal["oracle", "learned"]

#: methods that write a library + front (`didi.methods.merge_library`), not one artifact: searched once,
#: one row per budget (the front point `didi export --budget` extracts)
FRONT_METHODS = ("merge",)
#: suffix of a row served by the learned router
LEARNED = "+learned"


def size_option(method: str) -> str | None:
    """Name of the option that sets a method's size (`budget` or `target`), or None for fixed-size methods."""
    from didi.methods import get_method

    names = {f.name for f in dataclasses.fields(get_method(method).options)}
    return "budget" if "budget" in names else "target" if "target" in names else None


def plan_runs(methods: list[str], budgets: list[float], options: dict[str, dict] | None = None) -> list[dict]:
    """[{label, method, options}] for methods × budgets (fixed-size methods once)."""
    from didi.methods import get_method

    options = options or {}
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise DidiError(f"options: given for {unknown[0]!r}, which is not in methods {methods}")
    if not methods:
        raise DidiError("methods: empty; list at least one registered method (see `didi methods`)")
    runs = []
    for m in methods:
        get_method(m)  # clear error for an unknown name before anything runs
        opt, front = size_option(m), m in FRONT_METHODS
        if opt is None and not front:
            runs.append({"label": m, "method": m, "budget": None, "options": dict(options.get(m, {}))})
            continue
        if not budgets:
            why = " (a front point per budget)" if front else ""
            raise DidiError(f"budgets: method {m!r} needs at least one budget{why}")
        for b in budgets:  # a front method searches once and takes one point per budget
            run = {"label": f"{m}@{b:g}", "method": m, "budget": float(b)}
            run["options"] = dict(options.get(m, {}))
            if front:
                run["front"] = True
            else:
                run["options"][opt] = b
            runs.append(run)
    labels = [r["label"] for r in runs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise DidiError(f"methods/budgets: run {dup[0]!r} is listed twice")
    return runs


def reconstruction_errors(artifact, zoo: Zoo) -> dict[str, dict]:
    """{task: {"rel_err"}}: ‖served delta − τ_t‖² / ‖τ_t‖² over every floating tensor (one task in memory)."""
    out = {}
    for t in artifact.tasks:
        deltas = artifact.task_deltas(t)
        err = ref = 0.0
        for p in zoo.plan:
            if not p.dtype.is_floating_point:
                continue
            base = zoo.base_source.get(p.name).double()
            tau = zoo.task_sources[t].get(p.name).double() - base
            served = deltas[p.name].double() if p.name in deltas else torch.zeros_like(tau)
            err += float(((served - tau) ** 2).sum())
            ref += float((tau**2).sum())
        out[t] = {"rel_err": err / ref if ref > 0 else 0.0}
    return out


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats in both storage (lower) and metric."""
    front = []
    for i, (s, v) in enumerate(points):
        dominated = False
        for j, (s2, v2) in enumerate(points):
            better = v2 >= v if higher_is_better else v2 <= v
            strictly = s2 < s or (v2 > v if higher_is_better else v2 < v)
            if j != i and s2 <= s and better and strictly:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


#: One colour and one marker shape per method: tab10 and five darker tones of tab20b, then black (16
#: colours); with 13 shapes, (colour, shape) stays unique for 208 methods.
_COLOURS = [
    *(f"C{i}" for i in range(10)),
    *("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#000000"),
]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*", "d"]
_MARKER_PT = 6.0  # width of a marker, points


def _place_labels(
    fig: Figure, ax: Axes, anchors: list[tuple[float, float, str]], obstacles: list[Bbox]
) -> list[Annotation]:
    """Annotate `anchors` (x, y, text) beside their points, inside the axes, where a label overlaps no other
    label and, if any such spot is near, no marker nor the legend; farther spots get a leader line."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken: list[Bbox] = []
    placed = []
    dirs = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]

    def annotate(x: float, y: float, text: str, dist: float, dx: int, dy: int) -> Annotation:
        ann = ax.annotate(
            text,
            (x, y),
            xytext=(dx * dist, dy * dist),
            textcoords="offset points",
            fontsize=7,
            ha={1: "left", -1: "right", 0: "center"}[dx],
            va={1: "bottom", -1: "top", 0: "center"}[dy],
            zorder=6,
            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.6},  # over lines
            arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.25"} if dist > 5 else None,
        )
        ann.set_in_layout(False)  # placed after the layout: it must not move the axes
        return ann

    leaders: list[tuple[float, float]] = []  # points along the leader lines placed so far, pixels
    for x, y, text in anchors:
        px, py = ax.transData.transform((x, y))
        best = None  # (markers covered, rank, dist, dx, dy, bbox, leader points): nearest, fewest markers
        for rank, (dist, (dx, dy)) in enumerate((d, v) for d in (5, 12, 20, 30, 42, 56, 72) for v in dirs):
            ann = annotate(x, y, text, dist, dx, dy)
            ann.update_positions(renderer)
            bb = Text.get_window_extent(ann, renderer).padded(1.5)  # the text alone, not its leader line
            ann.remove()
            if not (inside.contains(bb.x0, bb.y0) and inside.contains(bb.x1, bb.y1)):
                continue
            cx, cy = (bb.x0 + bb.x1) / 2, (bb.y0 + bb.y1) / 2
            line = [(px + (cx - px) * f / 12, py + (cy - py) * f / 12) for f in range(12)] if dist > 5 else []
            if any(bb.overlaps(t) for t in taken) or any(bb.contains(u, v) for u, v in leaders):
                continue
            if any(t.contains(u, v) for t in taken for u, v in line):  # its leader would cross a label
                continue
            cand = (sum(bb.overlaps(o) for o in obstacles), rank, dist, dx, dy, bb, line)
            best = min(best, cand, key=lambda c: c[:2]) if best else cand
            if cand[0] == 0:
                break
        if best is None:  # no free spot inside the axes at all: the legend and the line still name it
            continue
        placed.append(annotate(x, y, text, *best[2:5]))
        taken.append(best[5])
        leaders += best[6]
    return placed


def _front_label(labels: list[str]) -> str:
    """One label for coincident front points: "didi / didi_greedy @2" when they share the budget."""
    if len(labels) == 1:
        return labels[0]
    parts = [lab.rpartition("@") for lab in labels]
    if all(p[1] for p in parts) and len({p[2] for p in parts}) == 1:
        return " / ".join(p[0] for p in parts) + " @" + parts[0][2]
    return " / ".join(labels)


def pareto_figure(rows: list[dict], key: str, ylabel: str, higher_is_better: bool, title: str) -> Figure:
    """Metric vs storage ratio: one colour and hollow marker shape per method, in a legend beside the axes.

    Points that would hide one another (`didi` and `didi_greedy` at the same budget and score) are drawn side
    by side, a marker's width apart around their true position (the legend says so; the data are not
    changed); methods with several budgets are joined in storage order; only the Pareto-front points are
    named, each where its label overlaps no other text (coincident ones share a label). Returned un-encoded
    so that tests can measure the text; `pareto_png` encodes it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, SymmetricalLogLocator
    from matplotlib.transforms import Bbox

    pts = [(float(r["storage_ratio"]), float(r[key])) for r in rows]
    front = pareto_front(pts, higher_is_better)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = plt.figure(figsize=(8.5, 5.0), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    if not higher_is_better:  # errors span decades: log scale, linear near 0 (an exact method scores 0)
        ax.set_yscale("symlog", linthresh=1e-4)
        pos = [y for _, y in pts if y > 0]
        if pos and min(pos) >= 1e-4 and max(pos) / min(pos) < 300:  # few decades: more labelled ticks
            ax.yaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=1e-4, subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    handles, artists, order = [], [], []  # order: row indices in drawing order
    for k, m in enumerate(methods):
        idx = sorted((i for i, r in enumerate(rows) if r["method"] == m), key=lambda i: pts[i])
        colour, marker = _COLOURS[k % len(_COLOURS)], _MARKERS[k % len(_MARKERS)]
        xs, ys = [pts[i][0] for i in idx], [pts[i][1] for i in idx]
        line = ax.plot(xs, ys, color=colour, lw=0.8, alpha=0.5, zorder=3)[0] if len(idx) > 1 else None
        sc = ax.scatter(
            xs, ys, s=_MARKER_PT**2, marker=marker, facecolors="none", edgecolors=[colour], lw=1.3, zorder=4
        )
        artists.append((idx, sc, line))
        order += idx
        handles.append(
            Line2D([], [], color=colour, marker=marker, mfc="none", lw=0.8 if len(idx) > 1 else 0, label=m)
        )
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="k", ls="--", lw=1, zorder=2)
    handles.append(Line2D([], [], color="k", ls="--", lw=1, label="Pareto front (named)"))
    ax.set_xlabel("storage ratio (× |θ0|)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    legend = dict(loc="outside right upper", fontsize=8, title="method", title_fontsize=8)
    fig.legend(handles=handles, **legend)
    fig.canvas.draw()  # layout and autoscale
    ax.set_xlim(ax.get_xlim())  # frozen: moving markers below must not rescale the axes
    ax.set_ylim(ax.get_ylim())

    # groups of points whose markers would mostly cover each other, in drawing order
    near = 0.6 * _MARKER_PT / 72 * fig.dpi
    groups: list[list[int]] = []
    for i in order:
        x, y = ax.transData.transform(pts[i])
        for g in groups:
            u, v = ax.transData.transform(pts[g[0]])
            if abs(u - x) < near and abs(v - y) < near:
                g.append(i)
                break
        else:
            groups.append([i])
    if any(len(g) > 1 for g in groups):  # say so in the legend, then lay out again
        note = Line2D([], [], lw=0, label="points that coincide\nare drawn side by side")
        fig.legends[0].remove()
        fig.legend(handles=[*handles, note], **legend)
        fig.canvas.draw()

    step = (_MARKER_PT + 1.5) / 72 * fig.dpi  # a marker's width plus a gap, pixels
    shown: dict[int, tuple[float, float]] = {}  # row index -> data position drawn
    for g in groups:
        x, y = ax.transData.transform(pts[g[0]])
        for j, i in enumerate(g):
            dx = (j - (len(g) - 1) / 2) * step
            shown[i] = tuple(ax.transData.inverted().transform((x + dx, y)))
    for idx, sc, line in artists:
        sc.set_offsets([shown[i] for i in idx])
        if line is not None:
            line.set_data([shown[i][0] for i in idx], [shown[i][1] for i in idx])
    r = _MARKER_PT / 72 * fig.dpi / 2
    markers = [
        Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in ax.transData.transform(list(shown.values()))
    ]
    legend_box = fig.legends[0].get_window_extent(fig.canvas.get_renderer())
    fset = set(front)
    anchors = [
        (*pts[g[0]], _front_label([rows[i]["label"] for i in g if i in fset]))
        for g in groups
        if fset & set(g)
    ]
    _place_labels(fig, ax, anchors, [legend_box, *markers])
    return fig


def pareto_png(rows: list[dict], key: str, ylabel: str, higher_is_better: bool, title: str) -> bytes:
    """PNG bytes of `pareto_figure` (what `didi compare` writes as pareto.png)."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows, key, ylabel, higher_is_better, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def redraw_pareto(results_json: str | Path) -> Path:
    """Redraw the pareto.png beside a `didi compare` results.json (after a change to the plot, without
    running any method again); the labels are those `run_compare` gives. Returns the PNG's path."""
    path = Path(results_json)
    res = json.loads(path.read_text())
    key, higher = res["pareto_key"], res["metric"] == "accuracy"
    ylabel = (  # as in run_compare
        {"average_normalized": "normalised accuracy (avg)", "average": "average accuracy"}[key]
        if higher
        else "relative reconstruction error (avg)"
    )
    out = path.parent / "pareto.png"
    _write_atomic(out, pareto_png(res["rows"], key, ylabel, higher, f"{ylabel} vs storage"))
    return out


def _write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)


def markdown_table(rows: list[dict], tasks: list[str], metric: Metric) -> str:
    key = "accuracy" if metric == "accuracy" else "rel_err"
    scale, fmt = (100.0, "{:.2f}") if metric == "accuracy" else (1.0, "{:.4g}")
    norm = any("average_normalized" in r for r in rows)
    routed = any("routing_accuracy" in r for r in rows)
    extra = (["normalised"] if norm else []) + (["routed right"] if routed else [])
    head = ["method", "budget", "storage ratio", *tasks, "average", *extra, "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        cells = [
            r["method"],
            "" if r["budget"] is None else f"{r['budget']:g}",
            f"{r['storage_ratio']:.4g}",
            *(fmt.format(scale * r["tasks"][t][key]) for t in tasks),
            fmt.format(scale * r["average"]),
        ]
        if norm:
            cells.append(fmt.format(scale * r["average_normalized"]) if "average_normalized" in r else "")
        if routed:
            cells.append(f"{100 * r['routing_accuracy']:.2f}" if "routing_accuracy" in r else "")
        cells.append(f"{r['wall_time_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    what = (
        "accuracy (%) per task, routed with the oracle router (`+learned` rows: with the learned router; "
        "routed right: % of examples whose top-1 task is their own)"
        if metric == "accuracy"
        else "relative reconstruction error ‖θ̂_t − θ_t‖² / ‖τ_t‖² per task (lower is better)"
    )
    note = f"Metric: {what}. Wall time: the method's run (merge), not the evaluation."
    if any(r.get("front") for r in rows):
        note += " MERGE rows: front points of one search; its wall time is every one's."
    return note + "\n\n" + "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- paired differences
def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of b vs c discordant pairs: under "both rows are equally accurate"
    the b + c discordant examples split as Binomial(b + c, 1/2), so p = min(1, 2·P(X ≤ min(b, c))),
    computed in exact integers (1 when there is no discordant pair)."""
    if b < 0 or c < 0:
        raise DidiError(f"McNemar: discordant counts must be non-negative, found b={b}, c={c}")
    n, k = b + c, min(b, c)
    term = total = 1  # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i + 1)
        total += term
    return min(1.0, 2 * total / 2**n)


def _outcomes(row: dict, task: str) -> tuple[list[bool], dict]:
    from didi.evaluate import EXAMPLES_ENCODING
    from didi.evaluators import unpack_correct

    ex = row.get("examples") or {}
    if task not in ex.get("tasks", {}):
        raise DidiError(
            f"reference: row {row['label']!r} has no per-example outcomes for task {task!r} (only "
            f"classification reports keep them), so it cannot be paired"
        )
    if ex.get("encoding") != EXAMPLES_ENCODING:
        raise DidiError(
            f"row {row['label']!r}: per-example outcomes in an unknown encoding {ex.get('encoding')!r}"
        )
    v = ex["tasks"][task]
    return unpack_correct(v["correct"], v["n"]), v


def paired_difference(row: dict, ref: dict) -> dict:
    """`row` against `ref` on the same test examples: per task and pooled over tasks, b (row right,
    reference wrong), c (the reverse), n, the accuracy difference (points) and the exact McNemar p-value.
    Refuses rows whose tasks, example counts or data digests differ (not the same examples)."""
    if list(row["tasks"]) != list(ref["tasks"]):
        raise DidiError(
            f"reference: rows {row['label']!r} and {ref['label']!r} were scored on other tasks "
            f"({list(row['tasks'])} vs {list(ref['tasks'])})"
        )
    tasks, B, C, N = {}, 0, 0, 0
    for t in row["tasks"]:
        a, va = _outcomes(row, t)
        r, vr = _outcomes(ref, t)
        if va["sha256"] != vr["sha256"] or va["n"] != vr["n"]:
            raise DidiError(
                f"reference: rows {row['label']!r} and {ref['label']!r} were scored on different data for "
                f"task {t!r} (sha256 {va['sha256'][:12]}… on {va['n']} examples vs {vr['sha256'][:12]}… on "
                f"{vr['n']}); a paired test needs the same examples"
            )
        b = sum(x and not y for x, y in zip(a, r))
        c = sum(y and not x for x, y in zip(a, r))
        n = len(a)
        tasks[t] = {"b": b, "c": c, "n": n, "difference": 100 * (b - c) / n, "p_value": mcnemar_exact(b, c)}
        B, C, N = B + b, C + c, N + n
    out = {
        "row": row["label"],
        "reference": ref["label"],
        # the mean over tasks of each task's difference: the difference of the rows' average accuracies
        "difference": sum(v["difference"] for v in tasks.values()) / len(tasks),
        "b": B,
        "c": C,
        "n": N,
        "p_value": mcnemar_exact(B, C),
        "tasks": tasks,
    }
    if "average_normalized" in row and "average_normalized" in ref:
        out["difference_normalized"] = 100 * (row["average_normalized"] - ref["average_normalized"])
    return out


def reference_pairs(rows: list[dict], reference: str | list[str] | None) -> list[tuple[dict, dict]]:
    """(row, reference row) pairs: every other row against each reference, then each `+learned` row against
    its oracle row (when both are in the table); each pair once."""
    by_label = {r["label"]: r for r in rows}
    refs = [reference] if isinstance(reference, str) else list(reference or [])
    unknown = [x for x in refs if x not in by_label]
    if unknown:
        raise DidiError(f"reference: {unknown[0]!r} is not a row of this comparison (rows: {list(by_label)})")
    pairs = [(r, by_label[x]) for x in dict.fromkeys(refs) for r in rows if r["label"] != x]
    for r in rows:
        base = r["label"][: -len(LEARNED)] if r["label"].endswith(LEARNED) else None
        if base in by_label and not any(p[0] is r and p[1]["label"] == base for p in pairs):
            pairs.append((r, by_label[base]))
    return pairs


def paired_markdown(paired: list[dict]) -> str:
    norm = any("difference_normalized" in p for p in paired)
    head = ["row", "reference", "Δ average (points)", *(["Δ normalised (points)"] if norm else [])]
    head += ["b: row right only", "c: reference right only", "n", "McNemar p"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for p in paired:
        cells = [p["row"], p["reference"], f"{p['difference']:+.2f}"]
        if norm:
            cells.append(f"{p['difference_normalized']:+.2f}" if "difference_normalized" in p else "")
        cells += [str(p["b"]), str(p["c"]), str(p["n"]), f"{p['p_value']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "Paired differences on the same test examples (row − reference). Δ average: the difference of the "
        "rows' average accuracies; b, c: examples, pooled over the tasks, that only the row / only the "
        "reference gets right; McNemar p: exact two-sided binomial test of b against c (per task in "
        "results.json)."
    )
    return note + "\n\n" + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- MERGE rows
def _merge_options(opts: dict, validation: dict | None, evaluation: dict) -> dict:
    """MERGE's options for a compare run: compare's validation data, heads, tokenizer, batch size, token
    length and trainer unless the method's own options set them; resume an interrupted search."""
    opts = dict(opts)
    if opts.get("validation") is None:
        if not validation:
            raise DidiError(
                "validation: method merge scores its configurations on each task's validation split; give "
                "--validation '{task: data dir or validation .jsonl}' (never test data), or options "
                "{merge: {validation: ...}}"
            )
        opts["validation"] = dict(validation)
    for key in ("heads", "tokenizer", "batch_size", "max_length"):
        if key not in opts and evaluation.get(key) is not None:
            opts[key] = evaluation[key]
    if "trainer" not in opts and evaluation.get("trainer") is not None:
        opts["trainer"] = evaluation["trainer"]
    return opts


def _library(zoo: Zoo, out: Path, method: str, opts: dict, timings: dict) -> tuple[Path, float, bool]:
    """The method's library under `<out>/libraries/` (searched now, or reused when its settings are the
    same); returns (path, search wall time, reused)."""
    from didi.methods import apply_method, get_method
    from didi.methods.merge import work_dir_for
    from didi.methods.merge_library import read_library

    spec = get_method(method)
    lib = out / "libraries" / method
    if lib.exists():
        manifest, _ = read_library(lib, verify=False)
        want = spec.make_options(opts).hyper_parameters()
        if _jsonable(manifest["method"].get("hyper_parameters")) != _jsonable(want):
            raise DidiError(
                f"{lib}: a library of other settings is already there; delete it or choose another output"
            )
        wall = float(timings.get(f"{method}:search", manifest.get("search", {}).get("wall_s", math.nan)))
        return lib, wall, True
    lib.parent.mkdir(parents=True, exist_ok=True)
    if "resume" not in opts and work_dir_for(lib).exists():  # an interrupted search of this output
        opts = {**opts, "resume": True}
    t0 = time.perf_counter()
    apply_method(method, zoo, lib, opts)
    wall = time.perf_counter() - t0
    timings[f"{method}:search"] = wall
    return lib, wall, False


def _front_artifact(lib: Path, path: Path, budget: float) -> bool:
    """Extract the front point of `lib` within `budget` to `path` (`didi export --format artifact --budget`),
    or check that the artifact there is that point of that library; returns whether it was reused."""
    from didi.artifact import load_artifact
    from didi.export import export_library_point
    from didi.methods.merge_library import choose_point, read_library

    if not path.exists():
        export_library_point(lib, path, "artifact", None, budget)
        return False
    _, front = read_library(lib, verify=False)
    want = choose_point(front, budget=budget)
    got = load_artifact(path, verify=False).manifest.get("metrics", {}).get("merge", {})
    if (got.get("library"), got.get("point"), got.get("genome")) != (
        str(lib.resolve()),
        want["index"],
        want["genome"],
    ):
        raise DidiError(
            f"{path}: an artifact of other settings is already there (not front point {want['index']} of "
            f"{lib}); delete it or choose another output"
        )
    return True


# ------------------------------------------------------------------------------------------- the router
def _router(
    zoo: Zoo, out: Path, artifact: Path, validation: dict, opts, evaluation: dict
) -> tuple[Path, dict]:
    """ONE learned router for the zoo at `<out>/router/` (trained with `artifact`, whose θ0 and tasks every
    artifact of the zoo shares), or the one already there when it was trained with the same options, data
    and token length; returns (path, a record for results.json)."""
    from didi.router import confusion_warnings, input_kind, read_router_config, task_source, train_router

    path = out / "router"
    missing = [t for t in zoo.task_names if t not in validation]
    unknown = [t for t in validation if t not in zoo.task_names]
    if missing or unknown:
        raise DidiError(
            f"validation: the learned router needs validation inputs of every task of the zoo "
            f"{zoo.task_names}: "
            + (f"no data for task {missing[0]!r}" if missing else f"task {unknown[0]!r} is not in the zoo")
        )
    data = {t: str(task_source(t, validation[t], input_kind(zoo.adapter), "auto")) for t in zoo.task_names}
    max_length = evaluation.get("max_length", 128) if input_kind(zoo.adapter) == "text" else None
    if path.exists():
        cfg = read_router_config(path)
        tr = cfg.get("training", {})
        serving = ("top_k", "mixing", "threshold")  # applied at evaluation, not in training
        have = {k: v for k, v in tr.get("options", {}).items() if k not in serving}
        want = {k: v for k, v in dataclasses.asdict(opts).items() if k not in serving}
        same = (
            _jsonable(have) == _jsonable(want)
            and tr.get("data") == data
            and tr.get("max_length") == max_length
            and (opts.threshold != "auto" or tr.get("options", {}).get("threshold") == "auto")
        )
        if not same:
            raise DidiError(
                f"{path}: a router trained with other settings or data is already there; delete it or "
                f"choose another output"
            )
        return path, {"path": str(path), "reused": True, "wall_time_s": None, "training": tr}
    t0 = time.perf_counter()
    train_router(
        artifact,
        validation,
        path,
        opts,
        "auto",
        tokenizer=evaluation.get("tokenizer"),
        batch_size=evaluation.get("batch_size", 32),
        max_length=evaluation.get("max_length", 128),
        trainer=evaluation.get("trainer") or _default_trainer(),
    )
    wall = time.perf_counter() - t0
    tr = read_router_config(path).get("training", {})
    for w in confusion_warnings(tr):
        print(f"didi compare: router {path}: {w}", file=sys.stderr, flush=True)
    return path, {"path": str(path), "reused": False, "wall_time_s": wall, "training": tr}


def _default_trainer():
    from didi.trainer import TrainerConfig

    return TrainerConfig()


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


# ------------------------------------------------------------------------------------------- the run
def run_compare(
    zoo: Zoo,
    output: str | Path,
    methods: list[str],
    budgets: list[float],
    options: dict[str, dict] | None = None,
    metric: Metric = "reconstruction",
    evaluation: dict[str, Any] | None = None,
    wandb: bool = False,
    reference: str | list[str] | None = None,
    routers: list[Routing] | tuple[Routing, ...] = ("oracle",),
    validation: dict[str, str] | None = None,
    router: Any = None,
) -> dict:
    """Run every (method, budget), score it, write results.json, results.md and pareto.png under `output`.

    `evaluation` holds the keyword arguments of `didi.evaluate.evaluate_artifact` (data, heads, individual,
    batch_size, limit_per_task, trainer, ...) for metric = accuracy. `reference`: row label(s) every other
    row is paired with (McNemar). `routers`: `oracle` and/or `learned` (one router trained on `validation`
    with `router`, a `didi.router.RouterOptions`, for every dynamic row). `validation`: {task: validation
    data}, for the learned router and MERGE's search (never test data).
    """
    from didi.artifact import load_artifact
    from didi.methods import apply_method, get_method
    from didi.router import RouterOptions

    if metric not in ("reconstruction", "accuracy"):
        raise DidiError(f"metric: expected reconstruction or accuracy, found {metric!r}")
    evaluation = dict(evaluation or {})
    if metric == "accuracy" and not evaluation.get("data"):
        raise DidiError(
            "metric accuracy: give the evaluation data ({task: test.jsonl or directory}); or use "
            "metric reconstruction (data-free)"
        )
    routers = list(routers)
    bad = [r for r in routers if r not in ("oracle", "learned")]
    if bad or not routers or len(set(routers)) != len(routers):
        raise DidiError(f"routers: expected a non-empty list of oracle and/or learned, found {routers}")
    learned = "learned" in routers
    if metric != "accuracy" and (learned or reference):
        raise DidiError(
            f"{'routers: learned' if learned else 'reference'}: needs metric accuracy (a router and a "
            f"paired test act on test examples); the reconstruction metric is data-free"
        )
    router_opts = router if router is not None else RouterOptions()
    if learned:
        router_opts.validate(len(zoo.task_names))
        if not validation:
            raise DidiError(
                "routers: learned: give --validation '{task: data dir or validation .jsonl}': the router "
                "trains on each task's validation inputs (never on test data)"
            )
    runs = plan_runs(methods, budgets, options)
    # what can be refused is refused before anything runs: MERGE's validation data, the learned rows, the
    # references
    for run in runs:
        if run.get("front"):
            run["options"] = _merge_options(run["options"], validation, evaluation)
    labels = []
    for run in runs:
        dynamic = get_method(run["method"]).kind != "static"
        labels += [run["label"]] if "oracle" in routers or not dynamic else []
        labels += [run["label"] + LEARNED] if learned and dynamic else []
    if learned and not any(lab.endswith(LEARNED) for lab in labels):
        raise DidiError(
            "routers: learned: no dynamic method among the methods (static merges serve one model for "
            "every task; there is nothing to route)"
        )
    if reference is not None:
        refs = [reference] if isinstance(reference, str) else list(reference)
        unknown = [x for x in refs if x not in labels]
        if unknown or not refs:
            raise DidiError(
                f"reference: {unknown[0] if unknown else refs!r} is not a row of this comparison (rows: "
                f"{labels})"
            )
    out = Path(output)
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    timings_f = out / "timings.json"
    timings = json.loads(timings_f.read_text()) if timings_f.exists() else {}

    # 1. the artifacts (made or reused)
    built, libraries = [], {}
    for run in runs:
        spec = get_method(run["method"])
        path = out / "artifacts" / run["label"]
        if run.get("front"):
            m = run["method"]
            if m not in libraries:
                libraries[m] = _library(zoo, out, m, run["options"], timings)
                _write_atomic(timings_f, jsonio.dumps(timings, indent=1))
            lib, wall, lib_reused = libraries[m]
            reused = _front_artifact(lib, path, run["budget"]) and lib_reused
            a = load_artifact(path)
            hyper = _jsonable(a.manifest["method"].get("hyper_parameters", {}))
        else:
            opts = spec.make_options(run["options"])
            hyper = _jsonable(dataclasses.asdict(opts))
            reused = path.exists()
            if reused:
                a = load_artifact(path)
                m = a.manifest["method"]
                if m.get("registry_name", m["name"]) != run["method"] or not _same_hyper(
                    m, _jsonable(dataclasses.asdict(_effective(run["method"], opts))), run["method"]
                ):
                    raise DidiError(
                        f"{path}: an artifact of other settings is already there; delete it or "
                        f"choose another output"
                    )
                wall = float(timings.get(run["label"], float("nan")))
            else:
                t0 = time.perf_counter()
                apply_method(run["method"], zoo, path, opts)
                wall = time.perf_counter() - t0
                timings[run["label"]] = wall
                _write_atomic(timings_f, jsonio.dumps(timings, indent=1))
                a = load_artifact(path)
        row = {
            "label": run["label"],
            "method": run["method"],
            "budget": run["budget"],
            "options": hyper,
            "storage_ratio": a.storage_ratio,
            "wall_time_s": wall,
            "reused": reused,
            "artifact": str(path),
        }
        if run.get("front"):
            row["front"] = {**a.manifest["metrics"]["merge"], "library": str(libraries[run["method"]][0])}
        built.append((row, a, spec.kind != "static"))

    # 2. one learned router for every dynamic row
    router_path, router_record = None, None
    if learned:
        dynamic = [row["artifact"] for row, _, dyn in built if dyn]
        router_path, router_record = _router(zoo, out, Path(dynamic[0]), validation, router_opts, evaluation)

    # 3. scores; results.json and results.md are rewritten after every row (marked partial until the last),
    # so a long comparison that is stopped still leaves every finished row readable
    rows: list[dict] = []
    result: dict = {}
    expected = sum(
        (1 if "oracle" in routers or not dyn else 0) + (1 if learned and dyn else 0) for _, _, dyn in built
    )
    for row, a, dynamic in built:
        if metric == "reconstruction":
            res = reconstruction_errors(a, zoo)
            rows.append({**row, "tasks": res, "average": sum(v["rel_err"] for v in res.values()) / len(res)})
            result = _write_results(out, rows, expected, metric, reference, router_record)
            continue
        from didi.evaluate import evaluate_artifact

        if "oracle" in routers or not dynamic:
            rep, again = _evaluated(out, row["label"], a, evaluate_artifact, evaluation)
            rows.append({**_scored(row, rep), "evaluation_reused": again})
            result = _write_results(out, rows, expected, metric, reference, router_record)
        if learned and dynamic:
            routed = {
                **evaluation,
                "router": str(router_path),
                "top_k": router_opts.top_k,
                "mixing": router_opts.mixing,
                "threshold": None if router_opts.threshold == "auto" else router_opts.threshold,
                "compare_oracle": False,
            }
            rep, again = _evaluated(out, row["label"] + LEARNED, a, evaluate_artifact, routed)
            lrow = _scored({**row, "label": row["label"] + LEARNED, "method": row["method"] + LEARNED}, rep)
            lrow["evaluation_reused"] = again
            lrow["routing_accuracy"], lrow["fallback"] = rep["routing_accuracy"], rep["fallback"]
            lrow["router"] = rep["router"]
            rows.append(lrow)
            result = _write_results(out, rows, expected, metric, reference, router_record)
    if wandb:
        _log_wandb(result, out)
    return result


def _write_results(
    out: Path, rows: list[dict], expected: int, metric: Metric, reference, router_record: dict | None
) -> dict:
    """results.json and results.md of the rows scored so far; with every row also pareto.png. Until then
    both say they are partial (results.json: `complete` false, `rows_expected`)."""
    complete = len(rows) >= expected
    tasks = list(rows[0]["tasks"])
    key = "average_normalized" if all("average_normalized" in r for r in rows) else "average"
    higher = metric == "accuracy"
    paired = []
    if metric == "accuracy":
        labels = {r["label"] for r in rows}
        refs = [] if reference is None else [reference] if isinstance(reference, str) else list(reference)
        scored = [x for x in refs if x in labels]  # a reference not scored yet: its pairs come with it
        paired = [paired_difference(r, ref) for r, ref in reference_pairs(rows, scored)]
    result = {
        "metric": metric,
        "pareto_key": key,
        "tasks": tasks,
        "rows": rows,
        "pareto_front": [
            rows[i]["label"] for i in pareto_front([(r["storage_ratio"], r[key]) for r in rows], higher)
        ],
    }
    if not complete:
        result.update(complete=False, rows_expected=expected)
    if paired:
        result["reference"] = reference
        result["paired"] = paired
    if router_record is not None:
        result["router"] = router_record
    md = markdown_table(rows, tasks, metric)
    if paired:
        md += "\n" + paired_markdown(paired)
    if not complete:
        md = (
            f"**Partial: {len(rows)} of {expected} rows scored so far** (the comparison is running or was "
            f"stopped; a rerun reuses every finished row).\n\n" + md
        )
    _write_atomic(out / "results.json", jsonio.dumps(result, indent=1, default=str))
    _write_atomic(out / "results.md", md)
    if complete:
        ylabel = (
            {"average_normalized": "normalised accuracy (avg)", "average": "average accuracy"}[key]
            if higher
            else "relative reconstruction error (avg)"
        )
        _write_atomic(out / "pareto.png", pareto_png(rows, key, ylabel, higher, f"{ylabel} vs storage"))
    return result


def _evaluation_key(art, kwargs: dict) -> str | None:
    """What an evaluation report depends on: the artifact (its manifest, which holds every tensor file's
    checksum), the test data's sha256, the individual report, the router's files and every setting but the
    trainer's (which changes no result); None when some input cannot be hashed (then nothing is reused)."""
    import hashlib

    from didi.evaluate import data_digest
    from didi.sources import file_sha256

    kind = "image" if art.manifest.get("adapter", {}).get("name") == "open_clip" else "text"
    try:
        ident = {
            "manifest": file_sha256(Path(art.path) / "manifest.json"),
            "data": {t: data_digest(p, kind) for t, p in sorted(kwargs["data"].items())},
            "settings": _jsonable({k: v for k, v in kwargs.items() if k not in ("trainer", "data")}),
        }
        ind = kwargs.get("individual")
        if isinstance(ind, (str, Path)):
            ident["individual"] = file_sha256(ind)
        router = kwargs.get("router", "oracle")
        if router != "oracle":
            folder = Path(art.path) / "router" if router == "learned" else Path(router)
            ident["router"] = {f.name: file_sha256(f) for f in sorted(folder.glob("router.*"))}
    except OSError:
        return None
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _evaluated(out: Path, label: str, art, evaluate, kwargs: dict) -> tuple[dict, bool]:
    """(report, reused): a row's evaluation, kept in <out>/evaluations/<label>.json with its key and reused
    while the key holds, so a second `didi compare` only evaluates what is new or changed."""
    import inspect

    bound = inspect.signature(evaluate).bind(art.path, **kwargs)
    bound.apply_defaults()  # a setting left at its default and the same setting given are one key
    key = _evaluation_key(art, {k: v for k, v in bound.arguments.items() if k != "artifact"})
    path = out / "evaluations" / f"{label}.json"
    if key is not None and path.exists():
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            return kept["report"], True
    rep = evaluate(art.path, **kwargs)
    if key is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, jsonio.dumps({"key": key, "report": rep}, default=str))
    return rep, False


def _scored(row: dict, rep: dict) -> dict:
    """A row with an evaluation report's scores (and its per-example outcomes, for paired tests)."""
    row = {**row, "tasks": rep["tasks"], "average": rep["average"]}
    if "average_normalized" in rep:
        row["average_normalized"] = rep["average_normalized"]
    if "examples" in rep:
        row["examples"] = rep["examples"]
    return row


#: DiDi settings that change no result (where the factors are cached, which device computes them)
_DIDI_NEUTRAL = {"cache_dir", "device"}


def _effective(name: str, opts: Any) -> Any:
    """The options a method really runs with (a DiDi variant forces some; others run as given)."""
    if not name.startswith("didi"):
        return opts
    from didi.methods.didi_variants import effective_options

    return effective_options(name, opts)


def _same_hyper(method_entry: dict, hyper: dict, name: str) -> bool:
    got = json.loads(json.dumps(method_entry.get("hyper_parameters", {}), default=str))
    if not name.startswith("didi"):
        return got == hyper
    # DiDi records its own layout (MergeOptions.hyper_parameters): compare what changes the artifact
    if abs(float(got.get("budget", -1)) - float(hyper["budget"])) > 1e-12:
        return False
    defaults = {"storage": "elements", "expert_dtype": None}  # manifests from before these options
    for key in ("allocation", "shared", "storage", "expert_dtype", "search", "refine"):
        if key in hyper and got.get(key, defaults.get(key)) != hyper[key]:
            return False
    drop = lambda d: {k: v for k, v in (d or {}).items() if k not in _DIDI_NEUTRAL}  # noqa: E731
    if "decompose" in hyper and drop(got.get("decompose")) != drop(hyper["decompose"]):
        return False
    return bool(got.get("calibration")) == bool(hyper.get("calibration"))


def _log_wandb(result: dict, out: Path) -> None:
    """Table + Pareto image to W&B (honours WANDB_MODE=offline/disabled)."""
    import wandb

    run = wandb.init(project="didi", job_type="compare", dir=str(out), reinit=True)
    cols = ["label", "method", "budget", "storage_ratio", "average", "wall_time_s"]
    table = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in result["rows"]])
    run.log({"compare/table": table, "compare/pareto": wandb.Image(str(out / "pareto.png"))})
    run.finish()
    wandb.teardown()  # drop W&B's process-wide state (its mode is fixed at first setup)
