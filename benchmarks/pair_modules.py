"""One module for two tasks that share their inputs: how much of both can it keep?

An input router cannot tell apart two tasks that ask different questions of the same inputs (the 8-task zoo's
`tweet_sentiment` and `tweet_intensity`): it sees the same input for both, so whatever it serves that input
with must answer both questions. This measures candidate modules on both tasks of such a pair, each with the
task's own head: each fine-tune alone, and static merges of the pair's two fine-tunes. The best row bounds
what input routing among these modules can keep on the pair (docs/routing.md, "Tasks that share their
inputs").

    python -m benchmarks.zoo build --out zoo_real
    python benchmarks/pair_modules.py --zoo zoo_real --name compare_zoo/pair_modules
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import md_table, write_results  # noqa: E402

MERGES = ["averaging", "task_arithmetic", "ties", "tsv_m"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True, help="a zoo built by `python -m benchmarks.zoo build --out DIR`")
    ap.add_argument("--pair", nargs=2, default=["tweet_sentiment", "tweet_intensity"])
    ap.add_argument("--merges", nargs="+", default=MERGES, help="static merges of the pair (registry names)")
    ap.add_argument("--name", default="pair_modules", help="benchmarks/results/<name>.{json,md}")
    args = ap.parse_args(argv)

    from didi.backbones import Zoo, build_adapter
    from didi.evaluate import evaluate_artifact, evaluate_models
    from didi.methods import apply_method
    from didi.trainer import TrainerConfig

    z = json.loads((Path(args.zoo) / "zoo.json").read_text())
    pair = list(args.pair)
    data = {t: z["data"][t] for t in pair}
    heads = {t: z["tasks"][t] for t in pair}
    ev = dict(
        tokenizer=z["base"],
        individual=z["individual"],
        max_length=z["max_length"],
        trainer=TrainerConfig(accelerator="cpu", devices=1, logger="none", progress_bar=False),
    )
    reports = {}
    for t in pair:
        reports[f"{t} fine-tune"] = evaluate_models({"*": z["tasks"][t]}, data, heads=heads, **ev)
    tmp = Path(tempfile.mkdtemp(prefix="pair_modules-"))
    try:
        zoo = Zoo(build_adapter(z.get("backbone", "hf_encoder")), z["base"], heads)
        for m in args.merges:
            art = apply_method(m, zoo, tmp / m)
            reports[f"{m} of the pair"] = evaluate_artifact(art, data, base=z["base"], **ev)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for module, rep in reports.items():
        norm = {t: rep["tasks"][t]["normalized_accuracy"] for t in pair}
        rows.append({"module": module, "normalized": norm, "mean": sum(norm.values()) / len(pair)})
    best = max(rows, key=lambda r: r["mean"])
    body = [[r["module"], *(f"{r['normalized'][t]:.4f}" for t in pair), f"{r['mean']:.4f}"] for r in rows]
    note = (
        f"\n\nNormalised accuracy (accuracy / the fine-tune's) of one module on both tasks of the pair, each "
        f"task with its own head. Best: {best['module']} ({best['mean']:.4f})."
    )
    write_results(
        args.name,
        {
            "command": " ".join(["python benchmarks/pair_modules.py", *sys.argv[1:]]),
            "pair": pair,
            "rows": rows,
            "best": best,
        },
        md_table(["module", *pair, "mean"], body) + note,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
