"""Quantized experts on a bf16 base (issue 12): a tiny Llama zoo merged at budgets priced in bytes with the
experts stored in float32, bfloat16, int8 or nf4, scored by the data-free reconstruction error.

The zoo is benchmarks/llama1b.py's (Llama-3.2-1B's architecture, bf16 safetensors, tied embeddings, task
vectors with fine-tune-like spectra: a common and a per-task low-rank part with power-law singular values
plus a dense tail), written by its `make` at a small shape (default: 2 layers, hidden 256, vocabulary
8192, 4 tasks) into a temporary folder that is deleted at the end (`--work DIR` keeps it).

Every setting is one `didi.compare.run_compare` (methods `didi` and `didi_folded` × `--budgets`, metric
reconstruction: per task ‖θ̂_t − θ_t‖² / ‖τ_t‖² over every floating tensor) in its own output folder,
because compare reuses artifacts by label; the settings share one factor cache. Settings:

- `elements`: the default (the budget counts stored numbers over |θ0|, float32 experts);
- `bytes` with `--expert_dtype` none (float32), bfloat16, int8, nf4: the budget counts stored bytes over
  θ0's bytes (bf16: 2 per parameter), factors priced in their stored dtype, scales included.

On a bf16 base a float32 expert element costs as much as 2 parameters of θ0, so priced in bytes the float32
experts get about half the rank the elements-priced default gets; bfloat16 experts win that factor 2 back,
int8 ≈ 2× more and nf4 ≈ 4× more than bfloat16 (less than on a float32 base, where nf4 buys ≈ 8×).

    python benchmarks/quantized_llama.py                       # every row (≈ 4 min on 2 cores, 1 thread)
    python benchmarks/quantized_llama.py --budgets 1.05 --dtypes none nf4 --name quantized_llama_smoke

Writes benchmarks/results/<name>.json and .md (default name: quantized_llama).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import md_table, write_results  # noqa: E402
from llama1b import config, make  # noqa: E402

METHODS = {"didi": "low_rank", "didi_folded": "folded"}
DTYPES = ("none", "bfloat16", "int8", "nf4")


def settings(dtypes: list[str]) -> list[tuple[str, str, str | None]]:
    """(folder name, storage, expert dtype): the elements-priced default, then bytes × each dtype."""
    out = [("elements", "elements", None)]
    out += [(f"bytes_{d}", "bytes", None if d == "none" else d) for d in dtypes]
    return out


def mean_ranks(ranks: dict[str, dict[str, int]], tasks: list[str], layout: str) -> tuple[float, float | None]:
    """Mean expert rank (over matrices and tasks) and mean shared rank (None: the folded layout, whose
    shared part is dense in the stored base)."""
    mats = [r for r in ranks.values() if r]
    expert = sum(r.get(t, 0) for r in mats for t in tasks) / (len(mats) * len(tasks))
    shared = sum(r.get("shared", 0) for r in mats) / len(mats)
    return expert, (shared if layout == "low_rank" else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.02, 1.05, 1.1, 1.24])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="bytes-priced rows")
    ap.add_argument(
        "--work", default=None, help="zoo, factor cache and artifacts (kept); default: a temp dir"
    )
    ap.add_argument("--name", default="quantized_llama", help="benchmarks/results/<name>.json and .md")
    args = ap.parse_args(argv)
    if args.hidden % 256:
        ap.error("--hidden: a multiple of 256 (llama1b.config: hidden / 256 key-value heads of width 64)")

    from didi.backbones import Zoo
    from didi.backbones.hf_llama import HFLlamaAdapter
    from didi.compare import run_compare

    tmp = None
    work = Path(args.work) if args.work else Path(tmp := tempfile.mkdtemp(prefix="quantized_llama-"))
    rows: list[dict] = []
    try:
        cfg = config(args.hidden, args.layers, args.vocab)
        zdir = work / "zoo"
        t0 = time.perf_counter()
        if not (zdir / "zoo_done").exists():
            make(zdir, cfg, args.tasks)
        make_s = time.perf_counter() - t0
        tasks = [f"task{t}" for t in range(args.tasks)]
        zoo = Zoo(HFLlamaAdapter(), str(zdir / "base"), {t: str(zdir / t) for t in tasks})
        for folder, storage, dtype in settings(args.dtypes):
            opts = {
                "storage": storage,
                "expert_dtype": dtype,
                "decompose": {"cache_dir": str(work / "cache"), "device": "cpu"},
                "trainer": {"accelerator": "cpu", "logger": "none", "progress_bar": False},
            }
            res = run_compare(
                zoo, work / "out" / folder, list(METHODS), args.budgets, {m: opts for m in METHODS}
            )
            for r in res["rows"]:
                man = json.loads((Path(r["artifact"]) / "manifest.json").read_text())
                st = man["storage"]
                expert, shared = mean_ranks(man["ranks"], tasks, METHODS[r["method"]])
                rows.append(
                    {
                        "layout": METHODS[r["method"]],
                        "method": r["method"],
                        "storage": storage,
                        "expert_dtype": dtype or "float32",
                        "budget": r["budget"],
                        "ratio_elements": st["ratio_elements"],
                        "ratio_bytes": st["ratio_bytes"],
                        "mean_expert_rank": expert,
                        "mean_shared_rank": shared,
                        "rel_err": r["average"],
                        "rel_err_tasks": {t: v["rel_err"] for t, v in r["tasks"].items()},
                        "wall_s": r["wall_time_s"],
                    }
                )
                print(
                    f"{r['label']} {folder}: ratio {st['ratio_elements']:.4f} el, {st['ratio_bytes']:.4f} "
                    f"B, rel. error {r['average']:.4f}, {r['wall_time_s']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
        base_params = zoo.base_params
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    order = {s[0]: i for i, s in enumerate(settings(list(DTYPES)))}

    def key(r):
        setting = (
            "elements"
            if r["storage"] == "elements"
            else f"bytes_{r['expert_dtype']}".replace("float32", "none")
        )
        return (r["layout"] != "low_rank", r["budget"], order[setting])

    rows.sort(key=key)
    # each bytes-priced row against the bytes-priced float32 row of its layout and budget (equal bytes)
    ref = {
        (r["layout"], r["budget"]): r["rel_err"]
        for r in rows
        if r["storage"] == "bytes" and r["expert_dtype"] == "float32"
    }
    for r in rows:
        f32 = ref.get((r["layout"], r["budget"]))
        r["err_vs_float32_bytes"] = r["rel_err"] / f32 if r["storage"] == "bytes" and f32 else None

    # at equal bytes, does each narrower dtype reconstruct better than the wider one (float32 > ... > nf4)?
    groups: dict[tuple, list[float]] = {}
    for r in rows:  # sorted: float32, bfloat16, int8, nf4 within a group
        if r["storage"] == "bytes":
            groups.setdefault((r["layout"], r["budget"]), []).append(r["rel_err"])
    ordered = sum(all(a > b for a, b in zip(e, e[1:])) for e in groups.values())
    names = [d.replace("none", "float32") for d in DTYPES if d in args.dtypes]
    finding = (
        f" At equal bytes the error falls with each narrower dtype ({' > '.join(names)}) in {ordered} of "
        f"{len(groups)} (layout, budget) groups."
    )
    if len(names) > 1 and names[0] == "float32":
        q = [
            r["err_vs_float32_bytes"]
            for r in rows
            if r["storage"] == "bytes" and r["expert_dtype"] == names[-1]
        ]
        finding += f" {names[-1]} ÷ float32: {min(q):.3f}–{max(q):.3f}."
    table = md_table(
        [
            "layout", "budget", "priced in", "expert dtype", "ratio (elements)", "ratio (bytes)",
            "mean expert rank", "mean shared rank", "rel. rec. error", "÷ float32 (bytes)", "wall s",
        ],
        [
            [
                r["layout"], f"{r['budget']:g}", r["storage"], r["expert_dtype"],
                f"{r['ratio_elements']:.4f}", f"{r['ratio_bytes']:.4f}", f"{r['mean_expert_rank']:.2f}",
                "" if r["mean_shared_rank"] is None else f"{r['mean_shared_rank']:.2f}",
                f"{r['rel_err']:.4f}",
                "" if r["err_vs_float32_bytes"] is None else f"{r['err_vs_float32_bytes']:.3f}",
                f"{r['wall_s']:.1f}",
            ]
            for r in rows
        ],
    )  # fmt: skip
    zoo_text = (
        f"{args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}, {args.tasks} tasks, bf16, "
        f"tied embeddings, {base_params:,} parameters (benchmarks/llama1b.py's zoo writer)"
    )
    note = (
        f"\n\nZoo: {zoo_text}. Rel. rec. error: ‖θ̂_t − θ_t‖² / ‖τ_t‖² averaged over the tasks "
        "(`didi compare --metric reconstruction`; a quantized row's is that of the stored, dequantized "
        "experts). Ratio (elements): 1 + stored numbers / |θ0|; ratio (bytes): 1 + stored bytes / θ0's bytes "
        "(bf16). The elements-priced rows are the default (float32 experts): on a bf16 base they store about "
        "twice their budget's bytes. Mean expert rank: over matrices and tasks (the embedding included). "
        "÷ float32 (bytes): the row's error over the bytes-priced float32 row of its layout and budget "
        "(equal bytes). A float32 expert element costs as much as 2 bf16 parameters of θ0, so bfloat16 "
        "experts buy about 2× the float32 rank at equal bytes, int8 about 2× more and nf4 about 4× more; the "
        "shared module of the low_rank layout stays float32." + finding
    )
    write_results(
        args.name,
        {
            "command": " ".join(
                ["python benchmarks/quantized_llama.py", *(sys.argv[1:] if argv is None else argv)]
            ),
            "zoo": zoo_text,
            "base_params": base_params,
            "zoo_write_s": make_s,
            "budgets": args.budgets,
            "rows": rows,
        },
        table + note,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
