"""Calibrated vs data-free DiDi on a built real zoo (`benchmarks/zoo`): normalised test accuracy.

For every layout (folded, low_rank) and budget (1.02, 1.05 by default) it merges the zoo data-free and
calibrated (`--calibration`, docs/method.md §8) on each task's validation inputs: pooled second moments over a
grid of ε with the default ALS refinement in the whitened metric, and per-task second moments on the folded
layout, whose shared part is then fixed (`--refine.optimizer none`, next to the data-free merge without
refinement); `--scales output unit` adds the unit-scaled metric of each. It evaluates every artifact on the
zoo's test splits with the oracle router and writes benchmarks/results/<name>.json and .md: accuracy,
normalised accuracy and the paired difference against the matching data-free row (examples only one of them
gets right, exact McNemar p-value).

    python -m benchmarks.zoo build --out /tmp/zoo/zoo_real           # once
    python benchmarks/calibration_trial.py --zoo /tmp/zoo/zoo_real    # the default grid (24 merges)
    python benchmarks/calibration_trial.py --zoo Z --budgets 1.02 --layouts folded --eps 0.01 --modes pooled

Artifacts, the factor caches and each evaluation are kept under --work (a second run reuses them).
The second moments are collected once per run and shared by every calibrated merge (memoised here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import md_table, write_results  # noqa: E402


def _bits(packed: str, n: int) -> list[bool]:
    """Per-example correctness from the report's hex (4 examples a digit, first example the highest bit)."""
    return ["".join(f"{int(c, 16):04b}" for c in packed)[i] == "1" for i in range(n)]


def mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of b vs c discordant pairs (Binomial(b + c, 1/2))."""
    n, k = b + c, min(b, c)
    term = total = 1
    for i in range(k):
        term = term * (n - i) // (i + 1)
        total += term
    return min(1.0, 2 * total / 2**n)


def paired(row: dict, ref: dict) -> dict:
    """Row vs reference on the same test examples: b (row right only), c (reference right only), p."""
    b = c = 0
    for t, e in row["examples"]["tasks"].items():
        r = ref["examples"]["tasks"][t]
        assert e["n"] == r["n"] and e["sha256"] == r["sha256"], f"{t}: not the same test examples"
        for x, y in zip(_bits(e["correct"], e["n"]), _bits(r["correct"], r["n"])):
            b += x and not y
            c += y and not x
    return {"b": b, "c": c, "p": mcnemar(b, c)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True, help="a zoo built by `python -m benchmarks.zoo build` (zoo.json)")
    ap.add_argument("--work", default="/tmp/calibration_trial", help="artifacts, caches, evaluations")
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.02, 1.05])
    ap.add_argument("--layouts", nargs="+", default=["folded", "low_rank"], choices=["folded", "low_rank"])
    ap.add_argument("--modes", nargs="+", default=["pooled", "per_task"], choices=["pooled", "per_task"])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    ap.add_argument(
        "--scales", nargs="+", default=["output"], choices=["output", "unit"], help="--calibration_scale"
    )
    ap.add_argument("--examples", type=int, default=256, help="validation inputs per task (calibration)")
    ap.add_argument("--search-steps", type=int, default=200)
    ap.add_argument("--limit-per-task", type=int, default=None, help="test examples per task (all: None)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--name", default="calibration_trial", help="benchmarks/results/<name>.json and .md")
    args = ap.parse_args(argv)

    import torch

    import didi.calibration as calibration
    from didi.backbones import Zoo, build_adapter
    from didi.decompose import DecomposeConfig
    from didi.evaluate import evaluate_artifact
    from didi.pipeline import MergeOptions, run_merge
    from didi.refine import RefineConfig
    from didi.search import SearchConfig
    from didi.trainer import TrainerConfig

    z = json.loads((Path(args.zoo) / "zoo.json").read_text())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    zoo = Zoo(build_adapter("hf_encoder"), z["base"], z["tasks"])
    data, maxlen = z["data"], int(z["max_length"])
    accel = "gpu" if torch.cuda.is_available() else "cpu"
    trainer = TrainerConfig(accelerator=accel, logger="none", progress_bar=False)

    moments_of = calibration.second_moments
    memo: dict = {}

    def memo_moments(*a, **k):  # one collection for every calibrated merge of this run
        key = json.dumps([str(x) for x in a[1:]] + sorted((kk, str(v)) for kk, v in k.items()))
        if key not in memo:
            memo[key] = moments_of(*a, **k)
        return memo[key]

    calibration.second_moments = memo_moments

    def grid(mode: str):
        for scale in args.scales:
            for eps in args.eps:
                kw = {"calibration_mode": mode, "calibration_eps": eps, "calibration_scale": scale}
                yield f"{mode.replace('_', ' ')} ε={eps:g} {scale}", kw

    def variants(layout: str):
        yield "data-free", {}, {}
        if "pooled" in args.modes:
            for label, kw in grid("pooled"):
                yield label, kw, {}
        if layout == "folded" and "per_task" in args.modes:
            none = {"refine": RefineConfig(optimizer="none")}
            yield "data-free, no refinement", {}, none
            for label, kw in grid("per_task"):
                yield f"{label}, no refinement", kw, none

    rows = []
    for layout in args.layouts:
        for budget in args.budgets:
            refs: dict[str, dict] = {}
            for label, cal, extra in variants(layout):
                key = f"{layout}@{budget:g} {label}"
                slug = key.replace(" ", "_").replace(",", "").replace("=", "").replace("ε", "eps")
                art, ev = work / "artifacts" / slug, work / "evals" / f"{slug}.json"
                t0 = time.perf_counter()
                if not art.exists():
                    opts = MergeOptions(
                        budget=budget,
                        shared=layout,
                        decompose=DecomposeConfig(cache_dir=str(work / "cache")),
                        search=SearchConfig(steps=args.search_steps),
                        trainer=trainer,
                        **({"calibration": data, "calibration_examples": args.examples} if cal else {}),
                        **({"calibration_max_length": maxlen} if cal else {}),
                        **cal,
                        **extra,
                    )
                    opts.validate()
                    run_merge(zoo, art, opts, progress=False)
                merge_s = time.perf_counter() - t0
                if ev.exists():
                    rep = json.loads(ev.read_text())
                else:
                    rep = evaluate_artifact(
                        art, data, individual=z["individual"], batch_size=args.batch_size,
                        max_length=maxlen, limit_per_task=args.limit_per_task, trainer=trainer,
                    )  # fmt: skip
                    ev.parent.mkdir(parents=True, exist_ok=True)
                    ev.write_text(json.dumps(rep))
                man = json.loads((art / "manifest.json").read_text())
                refine = man["metrics"]["refine"]
                row = {
                    "layout": layout,
                    "budget": budget,
                    "variant": label,
                    "ratio": rep["storage_ratio"],
                    "average": rep["average"],
                    "normalized": rep.get("average_normalized"),
                    "rec_err_after": refine.get("rec_err_after"),
                    "whitened_metric": "calibration" in refine,
                    "calibrated_matrices": refine.get("calibration", {}).get("calibrated"),
                    "seconds": merge_s,
                    "tasks": {t: v["accuracy"] for t, v in rep["tasks"].items()},
                }
                ref = refs.get("data-free, no refinement" if "no refinement" in label else "data-free")
                if ref is not None:
                    row["vs_data_free"] = {
                        "normalized_points": 100 * (row["normalized"] - ref["row"]["normalized"]),
                        **paired(rep, ref["rep"]),
                    }
                refs[label] = {"row": row, "rep": rep}
                rows.append(row)
                print(f"{key}: normalised {100 * row['normalized']:.2f} %", file=sys.stderr, flush=True)

    table = md_table(
        [
            "layout", "budget", "variant", "ratio", "accuracy %", "normalised %", "Δ vs data-free (points)",
            "b / c", "McNemar p", "rec. error after (metric)",
        ],
        [
            [
                r["layout"], f"{r['budget']:g}", r["variant"], f"{r['ratio']:.4f}",
                f"{100 * r['average']:.2f}", f"{100 * r['normalized']:.2f}",
                f"{r['vs_data_free']['normalized_points']:+.2f}" if "vs_data_free" in r else "",
                f"{r['vs_data_free']['b']} / {r['vs_data_free']['c']}" if "vs_data_free" in r else "",
                f"{r['vs_data_free']['p']:.3g}" if "vs_data_free" in r else "",
                f"{r['rec_err_after']:.4f} ({'whitened' if r['whitened_metric'] else 'weights'})",
            ]
            for r in rows
        ],
    )  # fmt: skip
    note = (
        "\n\nNormalised: test accuracy / the fine-tune's, averaged over the tasks (oracle router). Δ and the "
        "paired counts compare each calibrated row with the data-free row of the same layout, budget and "
        "refinement on the same test examples (b: calibrated right only, c: data-free right only). The "
        "reconstruction error of a calibrated row is in its whitened metric (docs/method.md §8), so it is "
        "not comparable across rows."
    )
    write_results(
        args.name,
        {
            "command": " ".join(["python benchmarks/calibration_trial.py", *sys.argv[1:]]),
            "zoo": z,
            "rows": rows,
        },
        table + note,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
