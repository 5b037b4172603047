"""`didi compare`: run methods × budgets on one zoo, score every artifact the same way, write a table and a
Pareto plot (metric vs storage ratio), so a user can answer "which method, at which budget?".

Methods that take a size (an options field named `budget`, like DiDi and its ablations, or `target`, like
FlexMerge) run once per budget; the others run once. Artifacts go to `<output>/artifacts/<label>/` and are
reused when a later run asks for the same label with the same hyper-parameters (DiDi's factor cache is shared
through `decompose.cache_dir` as usual), so adding a method or a budget only computes what is new.

Metrics:
    accuracy        per-task accuracy from `didi.evaluate.evaluate_artifact` (routed experts, oracle
                    router; needs `data`, and heads beside the fine-tunes or `heads`); with `individual`
                    (a report.json of the fine-tunes, or {task: accuracy}) also normalised accuracy.
    reconstruction  data-free: per task, ‖θ̂_t − θ_t‖² / ‖θ_t − θ0‖² over every tensor, where θ̂_t is what
                    the artifact serves for task t (`Artifact.task_deltas`): the relative error of its
                    task vector.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
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
        opt = size_option(m)
        if opt is None:
            runs.append({"label": m, "method": m, "budget": None, "options": dict(options.get(m, {}))})
            continue
        if not budgets:
            raise DidiError(f"budgets: method {m!r} needs at least one budget")
        for b in budgets:
            runs.append(
                {
                    "label": f"{m}@{b:g}",
                    "method": m,
                    "budget": float(b),
                    "options": {**options.get(m, {}), opt: b},
                }
            )
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
    extra = ["normalised"] if norm else []
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
        cells.append(f"{r['wall_time_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    what = (
        "accuracy (%) per task, routed with the oracle router"
        if metric == "accuracy"
        else "relative reconstruction error ‖θ̂_t − θ_t‖² / ‖τ_t‖² per task (lower is better)"
    )
    note = f"Metric: {what}. Wall time: the method's run (merge), not the evaluation."
    return note + "\n\n" + "\n".join(lines) + "\n"


def run_compare(
    zoo: Zoo,
    output: str | Path,
    methods: list[str],
    budgets: list[float],
    options: dict[str, dict] | None = None,
    metric: Metric = "reconstruction",
    evaluation: dict[str, Any] | None = None,
    wandb: bool = False,
) -> dict:
    """Run every (method, budget), score it, write results.json, results.md and pareto.png under `output`.

    `evaluation` holds the keyword arguments of `didi.evaluate.evaluate_artifact` (data, heads, individual,
    batch_size, limit_per_task, trainer, ...) for metric = accuracy.
    """
    from didi.artifact import load_artifact
    from didi.methods import apply_method, get_method

    if metric not in ("reconstruction", "accuracy"):
        raise DidiError(f"metric: expected reconstruction or accuracy, found {metric!r}")
    evaluation = dict(evaluation or {})
    if metric == "accuracy" and not evaluation.get("data"):
        raise DidiError(
            "metric accuracy: give the evaluation data ({task: test.jsonl or directory}); or use "
            "metric reconstruction (data-free)"
        )
    runs = plan_runs(methods, budgets, options)
    out = Path(output)
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    timings_f = out / "timings.json"
    timings = json.loads(timings_f.read_text()) if timings_f.exists() else {}
    rows = []
    for run in runs:
        spec = get_method(run["method"])
        opts = spec.make_options(run["options"])
        hyper = json.loads(json.dumps(dataclasses.asdict(opts), default=str))
        path = out / "artifacts" / run["label"]
        reused = path.exists()
        if reused:
            a = load_artifact(path)
            m = a.manifest["method"]
            if m.get("registry_name", m["name"]) != run["method"] or not _same_hyper(m, hyper, run["method"]):
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
        if metric == "reconstruction":
            res = reconstruction_errors(a, zoo)
            row["tasks"] = res
            row["average"] = sum(v["rel_err"] for v in res.values()) / len(res)
        else:
            from didi.evaluate import evaluate_artifact

            rep = evaluate_artifact(path, **evaluation)
            row["tasks"] = rep["tasks"]
            row["average"] = rep["average"]
            if "average_normalized" in rep:
                row["average_normalized"] = rep["average_normalized"]
        rows.append(row)
    tasks = list(rows[0]["tasks"])
    key = "average_normalized" if all("average_normalized" in r for r in rows) else "average"
    higher = metric == "accuracy"
    ylabel = (
        {"average_normalized": "normalised accuracy (avg)", "average": "average accuracy"}[key]
        if higher
        else "relative reconstruction error (avg)"
    )
    png = pareto_png(rows, key, ylabel, higher, f"{ylabel} vs storage")
    result = {
        "metric": metric,
        "pareto_key": key,
        "tasks": tasks,
        "rows": rows,
        "pareto_front": [
            rows[i]["label"] for i in pareto_front([(r["storage_ratio"], r[key]) for r in rows], higher)
        ],
    }
    _write_atomic(out / "results.json", jsonio.dumps(result, indent=1, default=str))
    _write_atomic(out / "results.md", markdown_table(rows, tasks, metric))
    _write_atomic(out / "pareto.png", png)
    if wandb:
        _log_wandb(result, out)
    return result


def _same_hyper(method_entry: dict, hyper: dict, name: str) -> bool:
    got = method_entry.get("hyper_parameters", {})
    if name.startswith("didi"):  # DiDi records its own hyper-parameter layout; compare the budget only
        return abs(float(got.get("budget", -1)) - float(hyper["budget"])) < 1e-12
    return json.loads(json.dumps(got, default=str)) == hyper


def _log_wandb(result: dict, out: Path) -> None:
    """Table + Pareto image to W&B (honours WANDB_MODE=offline/disabled)."""
    import wandb

    run = wandb.init(project="didi", job_type="compare", dir=str(out), reinit=True)
    cols = ["label", "method", "budget", "storage_ratio", "average", "wall_time_s"]
    table = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in result["rows"]])
    run.log({"compare/table": table, "compare/pareto": wandb.Image(str(out / "pareto.png"))})
    run.finish()
    wandb.teardown()  # drop W&B's process-wide state (its mode is fixed at first setup)
