"""Opt-in DiDi options against the data-free float default on a built real zoo (`benchmarks/zoo`): normalised
test accuracy at equal storage, paired on the same test examples.

Two trials, each against the default merge (data-free, float32 experts) of the same layout and budget:

- `calibration` (`--calibration`, docs/method.md §8): merges calibrated on each task's validation inputs:
  pooled second moments over a grid of ε with the default ALS refinement in the whitened metric, and per-task
  second moments on the folded layout, whose shared part is then fixed (`--refine.optimizer none`, next to
  the data-free merge without refinement); `--scales output unit` adds the unit-scaled metric of each.
- `quantized` (`--storage bytes --expert_dtype`, docs/method.md §9): the budget priced in bytes and the
  experts stored in each of `--dtypes` (int8, nf4, bfloat16), so the same bytes buy more rank. On a float32
  base the default's ratio in elements is its ratio in bytes, so the rows compare at equal bytes.
  `--pricing elements` adds each dtype priced in elements: the default's ranks, quantized (equal parameters).

Every artifact is evaluated on the zoo's test splits with the oracle router; benchmarks/results/<name>.json
and .md get accuracy, normalised accuracy and the paired difference against the matching default row (examples
only one of them gets right, exact McNemar p-value, `didi.compare.paired_difference`).

    python -m benchmarks.zoo build --out /tmp/zoo/zoo_real                    # once
    python benchmarks/option_trial.py calibration --zoo /tmp/zoo/zoo_real     # the default grid (24 merges)
    python benchmarks/option_trial.py calibration --zoo Z --budgets 1.02 --layouts folded --eps 0.01 \
        --modes pooled
    python benchmarks/option_trial.py quantized --zoo Z --budgets 1.02 1.05 --dtypes int8 nf4

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
from didi.compare import paired_difference  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trial", choices=["calibration", "quantized"], help="which options to measure")
    ap.add_argument("--zoo", required=True, help="a zoo built by `python -m benchmarks.zoo build` (zoo.json)")
    ap.add_argument("--work", default="/tmp/option_trial", help="artifacts, caches, evaluations")
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.02, 1.05])
    ap.add_argument("--layouts", nargs="+", default=["folded", "low_rank"], choices=["folded", "low_rank"])
    ap.add_argument("--modes", nargs="+", default=["pooled", "per_task"], choices=["pooled", "per_task"])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    ap.add_argument(
        "--scales", nargs="+", default=["output"], choices=["output", "unit"], help="--calibration_scale"
    )
    ap.add_argument(
        "--dtypes", nargs="+", default=["int8", "nf4"], choices=["bfloat16", "int8", "nf4"], help="quantized"
    )
    ap.add_argument(
        "--pricing",
        nargs="+",
        default=["bytes"],
        choices=["bytes", "elements"],
        help="quantized: --storage of each row (elements: the default's ranks, equal parameters)",
    )
    ap.add_argument("--examples", type=int, default=256, help="validation inputs per task (calibration)")
    ap.add_argument("--search-steps", type=int, default=200)
    ap.add_argument("--limit-per-task", type=int, default=None, help="test examples per task (all: None)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--name", default=None, help="benchmarks/results/<name>.json and .md (<trial>_trial)")
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
        yield "default", {}, {}
        if args.trial == "quantized":
            for q in args.dtypes:
                for pricing in args.pricing:
                    yield f"{q} experts, {pricing}", {}, {"storage": pricing, "expert_dtype": q}
            return
        if "pooled" in args.modes:
            for label, kw in grid("pooled"):
                yield label, kw, {}
        if layout == "folded" and "per_task" in args.modes:
            none = {"refine": RefineConfig(optimizer="none")}
            yield "default, no refinement", {}, none
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
                    "ratio_elements": man["storage"].get("ratio_elements", man["storage"]["ratio"]),
                    "ratio_bytes": man["storage"].get("ratio_bytes"),
                    "average": rep["average"],
                    "normalized": rep.get("average_normalized"),
                    "rec_err_after": refine.get("rec_err_after"),
                    "whitened_metric": "calibration" in refine,
                    "calibrated_matrices": refine.get("calibration", {}).get("calibrated"),
                    "seconds": merge_s,
                    "tasks": {t: v["accuracy"] for t, v in rep["tasks"].items()},
                }
                ref = refs.get("default, no refinement" if "no refinement" in label else "default")
                rep["label"] = key
                if ref is not None:
                    pair = paired_difference(rep, ref["rep"])
                    row["vs_default"] = {
                        "normalized_points": pair["difference_normalized"],
                        **{k: pair[k] for k in ("b", "c", "n", "p_value", "tasks")},
                    }
                refs[label] = {"row": row, "rep": rep}
                rows.append(row)
                print(f"{key}: normalised {100 * row['normalized']:.2f} %", file=sys.stderr, flush=True)

    table = md_table(
        [
            "layout", "budget", "variant", "ratio (elements)", "ratio (bytes)", "accuracy %", "normalised %",
            "Δ vs default (points)", "b / c", "McNemar p", "rec. error after (metric)",
        ],
        [
            [
                r["layout"], f"{r['budget']:g}", r["variant"], f"{r['ratio_elements']:.4f}",
                f"{r['ratio_bytes']:.4f}" if r["ratio_bytes"] is not None else "",
                f"{100 * r['average']:.2f}", f"{100 * r['normalized']:.2f}",
                f"{r['vs_default']['normalized_points']:+.2f}" if "vs_default" in r else "",
                f"{r['vs_default']['b']} / {r['vs_default']['c']}" if "vs_default" in r else "",
                f"{r['vs_default']['p_value']:.3g}" if "vs_default" in r else "",
                f"{r['rec_err_after']:.4f} ({'whitened' if r['whitened_metric'] else 'weights'})",
            ]
            for r in rows
        ],
    )  # fmt: skip
    note = (
        "\n\nNormalised: test accuracy / the fine-tune's, averaged over the tasks (oracle router). Δ and "
        "the paired counts compare each row with the default row (data-free, float32 experts, priced in "
        "elements) of the same layout, budget and refinement on the same test examples (b: the row right "
        "only, c: the default right only). The reconstruction error of a calibrated row is in its "
        "whitened metric (docs/method.md §8), so it is not comparable across rows; a quantized row's is "
        "that of the stored (dequantized) experts."
    )
    write_results(
        args.name or f"{args.trial}_trial",
        {
            "command": " ".join(["python benchmarks/option_trial.py", *sys.argv[1:]]),
            "zoo": z,
            "rows": rows,
        },
        table + note,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
