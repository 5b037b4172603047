"""End-to-end `didi merge` at 1.24× of 8 synthetic ViT-B/32-shaped task vectors: seconds per stage, peak RSS.

The zoo: 12 blocks × {2304×768, 768×768, 3072×768, 768×3072} with fine-tune-like power-law spectra
(didi.synthetic.make_spectral_zoo), written as safetensors; the merge runs with the default settings.

    python benchmarks/e2e_merge.py                    # ViT-B/32 shapes (several minutes on 2 CPU cores)
    python benchmarks/e2e_merge.py --width 64 --layers 2   # smoke test
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import md_table, peak_rss_mb, write_results

from didi.allocation import allocate
from didi.backbones import Adapter, Zoo
from didi.budget import parse_budget
from didi.decompose import DecomposeConfig, decompose
from didi.didi_artifact import write_didi_artifact
from didi.refine import RefineConfig, refine_matrices
from didi.search import SearchConfig
from didi.synthetic import make_spectral_zoo
from didi.trainer import TrainerConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--budget", default="S")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="didi_e2e_"))
    try:
        run(args, root)
    finally:  # an interrupted run must not leave gigabytes of zoo in /tmp
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path) -> None:
    t = time.perf_counter()
    base, paths = make_spectral_zoo(root / "zoo", T=args.tasks, width=args.width, layers=args.layers)
    make_zoo_s = time.perf_counter() - t
    rss_after_zoo = peak_rss_mb()
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in paths.items()})
    tc = TrainerConfig(accelerator="cpu", logger="none", progress_bar=False)
    times = {}
    # timed from scratch: an earlier run in the same --workdir left a factor store that would be read instead
    # of decomposed, and an artifact the writer refuses to overwrite
    for d in ("cache", "work", "merged"):
        shutil.rmtree(root / d, ignore_errors=True)
    t = time.perf_counter()
    store = decompose(zoo, DecomposeConfig(cache_dir=str(root / "cache"), device="cpu"), progress=False)
    times["decompose"] = time.perf_counter() - t
    t = time.perf_counter()
    ranks = allocate(store, parse_budget(args.budget), SearchConfig(), tc, "shared", "search", root / "work")
    times["search + budget"] = time.perf_counter() - t
    t = time.perf_counter()
    shared, tasks, metrics = refine_matrices(zoo, store, ranks, RefineConfig(), tc, root / "work")
    times["refine"] = time.perf_counter() - t
    t = time.perf_counter()
    out = write_didi_artifact(root / "merged", zoo, store, ranks, shared, tasks, {}, metrics)
    times["write artifact"] = time.perf_counter() - t
    total = sum(times.values())
    rows = [[k, v] for k, v in times.items()] + [["total", total]]
    table = md_table(["stage", "seconds"], rows)
    table += (
        f"\n\n|θ0| = {store.base_params:,}, {len(store.matrices)} matrices, {args.tasks} tasks, ratio "
        f"{ranks.info['ratio']:.5f} (target {ranks.info['target_ratio']}), relative error "
        f"{metrics['rec_err_before']:.4f} → {metrics['rec_err_after']:.4f} after refinement; "
        f"allocation kept: "
        f"{ranks.info.get('chosen')}; peak RSS {peak_rss_mb():.0f} MB (zoo generation alone "
        f"{rss_after_zoo:.0f} MB)."
    )
    write_results(
        f"e2e_merge_w{args.width}_l{args.layers}",
        {
            "command": "python benchmarks/e2e_merge.py " + " ".join(sys.argv[1:]),
            "seconds": times,
            "total_s": total,
            "make_zoo_s": make_zoo_s,
            "peak_rss_mb": peak_rss_mb(),
            "zoo_peak_rss_mb": rss_after_zoo,
            "base_params": store.base_params,
            "ratio": ranks.info["ratio"],
            "allocation": {k: v for k, v in ranks.info.items() if k != "continuous_ranks"},
            "refine": metrics,
        },
        table,
    )
    print("artifact", out)


if __name__ == "__main__":
    main()
