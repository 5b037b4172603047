"""Learned vs oracle routing split by task group: which tasks the learned router's loss comes from.

Reads kept `didi compare` evaluations (`<label>.json` oracle rows, `<label>+learned.json` learned rows, one
directory per mixing rule) and writes, per artifact, normalised accuracy over every task, over the tasks whose
inputs differ, and over a group of tasks that share their inputs (`--pair`), with the learned router's loss
against the oracle on each. On the 8-task zoo the two tweet tasks have the same inputs: no input router can
tell them apart, so the split shows how much of the gap that pair is.

    python benchmarks/routing_split.py --oracle benchmarks/results/compare_zoo/accuracy/results.json \\
        --learned sum=benchmarks/results/compare_zoo/learned_router \\
                  max=benchmarks/results/compare_zoo/learned_router_max \\
        --name compare_zoo/learned_router_max/split
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import md_table, write_results  # noqa: E402


def group_means(tasks: dict[str, dict], pair: list[str]) -> dict[str, float]:
    """Mean normalised accuracy over all tasks, the tasks outside `pair`, and `pair`."""

    def mean(names: list[str]) -> float:
        return sum(tasks[t]["normalized_accuracy"] for t in names) / len(names)

    rest = [t for t in tasks if t not in pair]
    return {"all": mean(list(tasks)), "distinct_inputs": mean(rest), "shared_inputs": mean(pair)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oracle", required=True, help="a `didi compare` results.json with the oracle rows")
    ap.add_argument("--learned", nargs="+", required=True, help="RULE=DIR of <label>+learned.json files")
    ap.add_argument("--pair", nargs="+", default=["tweet_sentiment", "tweet_intensity"])
    ap.add_argument("--name", default="routing_split", help="benchmarks/results/<name>.{json,md}")
    args = ap.parse_args(argv)

    oracle = {r["label"]: r for r in json.loads(Path(args.oracle).read_text())["rows"]}
    learned: dict[str, dict[str, dict]] = {}
    for item in args.learned:
        rule, _, folder = item.partition("=")
        for f in sorted(Path(folder).glob("*+learned.json")):
            rep = json.loads(f.read_text())
            learned.setdefault(f.name[: -len("+learned.json")], {})[rule] = rep.get("report", rep)
    rows = []
    for label, by_rule in sorted(learned.items()):
        if label not in oracle:
            continue
        row = {"artifact": label, "oracle": group_means(oracle[label]["tasks"], args.pair)}
        for rule, rep in sorted(by_rule.items()):
            g = group_means(rep["tasks"], args.pair)
            row[rule] = {**g, "loss_points": {k: 100 * (row["oracle"][k] - v) for k, v in g.items()}}
        rows.append(row)
    rules = sorted({r for v in learned.values() for r in v})
    head = ["artifact", "oracle: all / distinct / shared"]
    for rule in rules:
        head += [f"{rule}: all / distinct / shared", f"{rule}: points lost (all / distinct / shared)"]
    body = []
    for r in rows:
        line = [r["artifact"], " / ".join(f"{r['oracle'][k]:.4f}" for k in r["oracle"])]
        for rule in rules:
            g = r.get(rule)
            line += (
                [" / ".join(f"{g[k]:.4f}" for k in r["oracle"]),
                 " / ".join(f"{g['loss_points'][k]:.2f}" for k in r["oracle"])]
                if g else ["", ""]
            )  # fmt: skip
        body.append(line)
    note = (
        f"\n\nNormalised accuracy (accuracy / the fine-tune's) averaged over all tasks, over the tasks whose "
        f"inputs differ, and over the tasks sharing their inputs ({', '.join(args.pair)}); points lost = "
        "100 × (oracle − learned)."
    )
    write_results(
        args.name,
        {"command": " ".join(["python benchmarks/routing_split.py", *sys.argv[1:]]), "pair": args.pair,
         "rows": rows},
        md_table(head, body) + note,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
