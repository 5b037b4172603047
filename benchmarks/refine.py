"""Stage 2: ALS (closed-form block updates) vs Adam vs no refinement, at equal ranks.

Relative reconstruction error (1/T)Σ‖A_sB_s + A_tB_t − τ_t‖² / Σ‖τ_t‖² and seconds, on a ViT-shaped zoo with
fine-tune-like spectra, ranks from the greedy allocation at 1.24× (the same ranks for every optimiser).

Timing: every optimiser runs once untimed first (the first call of a code path pays for imports, Lightning's
set-up and LAPACK's workspaces: an unwarmed 1-sweep ALS row once read 1.75 s against 0.42 s for 4 sweeps);
then rounds over the rows in turn, so that a load change on the machine hits every row alike, and each row's
median over its rounds is reported. Rows slower than `--repeat_below` seconds run in the first round only
(their warm-up share is negligible and repeating 1000 Adam steps would dominate the run). The table gives the
process's CPU seconds beside the wall time: on a machine shared with other jobs the wall time of a row
depends on their load, its CPU time much less (one torch thread by default, `--threads`, so that no thread
spins waiting for a descheduled sibling).

    python benchmarks/refine.py                      # width 64, 4 blocks, 4 tasks: 5-25 min on 2 cores
    python benchmarks/refine.py --width 32 --layers 2 --tasks 3 --rounds 2      # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from itertools import count
from pathlib import Path

import torch
from common import md_table, write_results

from didi.allocation import allocate
from didi.backbones import Adapter, Zoo
from didi.decompose import DecomposeConfig, decompose
from didi.refine import RefineConfig, refine_matrices
from didi.search import SearchConfig
from didi.synthetic import make_spectral_zoo
from didi.trainer import TrainerConfig

#: the ALS rows keep the 2 power iterations per block of the default when the results were made
ROWS: list[tuple[str, RefineConfig]] = [
    ("none (truncated SVDs)", RefineConfig(optimizer="none")),
    ("adam, 200 steps", RefineConfig(optimizer="adam", steps=200)),
    ("adam, 1000 steps", RefineConfig(optimizer="adam", steps=1000)),
    ("als, 1 sweep", RefineConfig(optimizer="als", sweeps=1, power_iters=2)),
    ("als, 4 sweeps (default)", RefineConfig(optimizer="als", sweeps=4, power_iters=2)),
    ("als, 10 sweeps", RefineConfig(optimizer="als", sweeps=10, power_iters=2)),
]
#: untimed first calls: one per code path, short
WARM_UP = [RefineConfig(optimizer="none"), RefineConfig(optimizer="adam", steps=5), RefineConfig(sweeps=1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--budget", type=float, default=1.24)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of the rows under --repeat_below")
    ap.add_argument("--repeat_below", type=float, default=10.0, help="seconds; slower rows are timed once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (intra-op)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="didi_refine_"))
    base, paths = make_spectral_zoo(root / "zoo", T=args.tasks, width=args.width, layers=args.layers, seed=2)
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in paths.items()})
    tc = TrainerConfig(accelerator="cpu", logger="none", progress_bar=False)
    store = decompose(zoo, DecomposeConfig(cache_dir=str(root / "cache"), device="cpu"), progress=False)
    ranks = allocate(store, args.budget, SearchConfig(), tc, "shared", "greedy")
    runs = count()

    def run(cfg: RefineConfig) -> tuple[dict, float, float]:
        """(metrics, wall seconds, CPU seconds of this process) of one refinement."""
        # a fresh work directory each time: refine_matrices keeps finished matrices and would not redo them
        t, c = time.perf_counter(), time.process_time()
        _, _, m = refine_matrices(zoo, store, ranks, cfg, tc, root / f"work_{next(runs)}")
        return m, time.perf_counter() - t, time.process_time() - c

    for cfg in WARM_UP:
        run(cfg)
    metrics: dict[str, dict] = {}
    times: dict[str, list[float]] = {label: [] for label, _ in ROWS}
    cpu: dict[str, list[float]] = {label: [] for label, _ in ROWS}
    for rnd in range(args.rounds):
        for label, cfg in ROWS:
            if rnd and cpu[label][0] >= args.repeat_below:
                continue
            m, dt, dc = run(cfg)
            metrics.setdefault(label, m)
            times[label].append(dt)
            cpu[label].append(dc)
            print(
                f"round {rnd}: {label}: rel. error {m['rec_err_after']:.4g}, {dc:.3g} CPU s, {dt:.3g} s",
                flush=True,
            )
    rows, results = [], []
    for label, _ in ROWS:
        m, sec, csec = metrics[label], statistics.median(times[label]), statistics.median(cpu[label])
        rows.append([label, m["rec_err_after"], csec, sec, len(times[label])])
        results.append(
            {
                "optimizer": label,
                "rec_err": m["rec_err_after"],
                "rec_err_before": m["rec_err_before"],
                "cpu_seconds": csec,
                "seconds": sec,
                "cpu_seconds_all": cpu[label],
                "seconds_all": times[label],
            }
        )
    head = ["stage-2 optimiser", "rel. reconstruction error", "CPU s (median)", "wall s (median)", "runs"]
    table = md_table(head, rows)
    table += (
        f"\n\nZoo: ViT-shaped, width {args.width}, {args.layers} blocks, {args.tasks} tasks, "
        f"power-law spectra; ranks: greedy allocation at {args.budget}× "
        f"(ratio {ranks.info['ratio']:.4f}), the same for every row; {args.threads} torch thread(s). Each "
        f"optimiser ran once untimed first; rows under {args.repeat_below:g} CPU s are the median of "
        f"{args.rounds} alternating rounds."
    )
    write_results(
        f"refine_w{args.width}",
        {"command": "python benchmarks/refine.py " + " ".join(sys.argv[1:]), "results": results},
        table,
    )


if __name__ == "__main__":
    main()
