"""Full SVD vs the randomized truncated SVD (`didi.linalg.randomized_svd` at its defaults: the block Krylov
range finder, 32 extra columns, 3 iterations) per module shape and kept width K: seconds, speed-up, and the
largest relative error of σ_1..σ_{K/2} on a fine-tune-like power-law spectrum (σ_i ∝ i^−0.5). Where the
speed-up crosses 1 is what `decompose.randomized_is_cheaper` (the `svd: auto` rule) is set from.

    python benchmarks/svd_crossover.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import md_table, timed, write_results

from didi.linalg import randomized_svd, svd
from didi.synthetic import spectral

SHAPES = [(768, 768), (3072, 768), (2048, 2048), (8192, 2048)]
WIDTHS = [32, 64, 128, 256, 512]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows, results = [], []
    for m, n in SHAPES:
        M = spectral(m, n, decay=0.5, scale=1.0, g=g)
        S_full = svd(M)[1]
        t_full = timed(lambda: svd(M), args.repeats)
        for K in WIDTHS:
            if K + 32 >= min(m, n):
                continue
            S = randomized_svd(M, K)[1]
            keep = K // 2
            err = float(((S[:keep] - S_full[:keep]).abs() / S_full[:keep]).max())
            t_rand = timed(lambda: randomized_svd(M, K), args.repeats)
            frac = (K + 32) / min(m, n)
            rows.append(
                [
                    f"{m}×{n}",
                    K,
                    f"{frac:.3f}",
                    f"{t_full:.3f}",
                    f"{t_rand:.3f}",
                    f"{t_full / t_rand:.2f}",
                    f"{err:.1e}",
                ]
            )
            results.append(
                {
                    "m": m,
                    "n": n,
                    "K": K,
                    "width_fraction": frac,
                    "full_s": t_full,
                    "randomized_s": t_rand,
                    "speedup": t_full / t_rand,
                    "sigma_rel_err_top_half": err,
                }
            )
    table = md_table(
        [
            "shape",
            "K",
            "(K+32)/min(m,n)",
            "full SVD s",
            "randomized s",
            "speed-up",
            "max rel. err σ_1..σ_K/2",
        ],
        rows,
    )
    write_results(
        "svd_crossover",
        {"command": "python benchmarks/svd_crossover.py " + " ".join(sys.argv[1:]), "results": results},
        table,
    )


if __name__ == "__main__":
    main()
