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
from typing import Any, Literal

import torch

from didi import jsonio
from didi.backbones.base import Zoo
from didi.errors import DidiError

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


def pareto_png(rows: list[dict], key: str, ylabel: str, higher_is_better: bool, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["storage_ratio"], r[key]) for r in rows]
    front = pareto_front(pts, higher_is_better)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    methods = sorted({r["method"] for r in rows})
    cmap = plt.get_cmap("tab20")
    for k, m in enumerate(methods):
        sel = [r for r in rows if r["method"] == m]
        ax.scatter(
            [r["storage_ratio"] for r in sel], [r[key] for r in sel], color=cmap(k % 20), label=m, zorder=3
        )
    for r in rows:
        ax.annotate(
            r["label"], (r["storage_ratio"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.plot(
        [pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front", zorder=2
    )
    if not higher_is_better:  # errors span decades: log scale, linear near 0 (an exact method scores 0)
        ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("storage ratio (× |θ0|)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


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
