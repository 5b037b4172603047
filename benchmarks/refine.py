"""Stage 2: ALS (closed-form block updates) vs Adam vs no refinement, at equal ranks.

Relative reconstruction error (1/T)Σ‖A_sB_s + A_tB_t − τ_t‖² / Σ‖τ_t‖² and seconds, on a ViT-shaped zoo with
fine-tune-like spectra, ranks from the default allocation at 1.24× (the same ranks for every optimiser).

    python benchmarks/refine.py                      # width 256, 12 blocks, 8 tasks
    python benchmarks/refine.py --width 32 --layers 2 --tasks 3      # smoke test
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import md_table, write_results

from didi.allocation import allocate
from didi.backbones import Adapter, Zoo
from didi.decompose import DecomposeConfig, decompose
from didi.refine import RefineConfig, refine_matrices
from didi.search import SearchConfig
from didi.synthetic import make_spectral_zoo
from didi.trainer import TrainerConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--budget", type=float, default=1.24)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="didi_refine_"))
    base, paths = make_spectral_zoo(root / "zoo", T=args.tasks, width=args.width, layers=args.layers, seed=2)
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in paths.items()})
    tc = TrainerConfig(accelerator="cpu", logger="none", progress_bar=False)
    store = decompose(zoo, DecomposeConfig(cache_dir=str(root / "cache"), device="cpu"), progress=False)
    ranks = allocate(store, args.budget, SearchConfig(), tc, "shared", "greedy")
    rows, results = [], []
    for label, cfg in [
        ("none (truncated SVDs)", RefineConfig(optimizer="none")),
        ("adam, 200 steps", RefineConfig(optimizer="adam", steps=200)),
        ("adam, 1000 steps", RefineConfig(optimizer="adam", steps=1000)),
        ("als, 1 sweep", RefineConfig(optimizer="als", sweeps=1)),
        ("als, 4 sweeps (default)", RefineConfig(optimizer="als", sweeps=4)),
        ("als, 10 sweeps", RefineConfig(optimizer="als", sweeps=10)),
    ]:
        t = time.perf_counter()
        _, _, m = refine_matrices(zoo, store, ranks, cfg, tc, root / f"work_{len(rows)}")
        dt = time.perf_counter() - t
        rows.append([label, m["rec_err_after"], dt])
        results.append(
            {
                "optimizer": label,
                "rec_err": m["rec_err_after"],
                "rec_err_before": m["rec_err_before"],
                "seconds": dt,
            }
        )
        print(rows[-1], flush=True)
    table = md_table(["stage-2 optimiser", "rel. reconstruction error", "seconds"], rows)
    table += (
        f"\n\nZoo: ViT-shaped, width {args.width}, {args.layers} blocks, {args.tasks} tasks, "
        f"power-law spectra; ranks: greedy allocation at {args.budget}× "
        f"(ratio {ranks.info['ratio']:.4f}), the same for every row."
    )
    write_results(
        f"refine_w{args.width}",
        {"command": "python benchmarks/refine.py " + " ".join(sys.argv[1:]), "results": results},
        table,
    )


if __name__ == "__main__":
    main()
