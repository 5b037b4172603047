"""Two CPU kernels whose slow cases `didi.linalg` routes around, each timed both ways:

1. Thin SVD of a wide matrix (fewer rows than columns): torch's own call on the matrix against
   `didi.linalg.svd`, which decomposes its transpose there. One thread (as `linalg.svd` runs LAPACK); the
   largest relative difference of the σ's and the reconstruction error. Shapes a merge meets: Llama's k/v
   projections (1B 512×2048, 8B 1024×4096) and the randomized SVD's last step BᵀM (2·(K + 32) rows, 448 at
   K 192, times a module's width).
2. Xᵀ·Q with Q of few columns (the refinement's products with a low-rank expert): `X.mT @ Q` against
   `didi.linalg.t_matmul`, which takes (QᵀX)ᵀ below 16 columns. All threads; GFLOPS.

    python benchmarks/cpu_kernels.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import md_table, timed, write_results

from didi.linalg import svd, t_matmul
from didi.synthetic import spectral

WIDE = [(448, 2048), (448, 8192), (512, 2048), (768, 4096), (1024, 4096)]
THIN = [2, 4, 8, 12, 16, 32, 64]


def wide_svds(repeats: int) -> tuple[list[dict], str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows, results = [], []
    for m, n in WIDE:
        M = spectral(m, n, decay=0.5, scale=1.0, g=g)
        S_torch = torch.linalg.svd(M, full_matrices=False)[1]
        U, S, Vh = svd(M)
        err = float(((S - S_torch).abs() / S_torch).max())
        rec = float(((U * S) @ Vh - M).norm() / M.norm())
        t_torch = timed(lambda: torch.linalg.svd(M, full_matrices=False), repeats, warm_up=True)
        t_didi = timed(lambda: svd(M), repeats, warm_up=True)
        rows.append([f"{m}×{n}", f"{t_torch:.3f}", f"{t_didi:.3f}", f"{t_torch / t_didi:.2f}"])
        rows[-1] += [f"{err:.1e}", f"{rec:.1e}"]
        results.append(
            {
                "m": m,
                "n": n,
                "torch_s": t_torch,
                "didi_s": t_didi,
                "speedup": t_torch / t_didi,
                "sigma_max_rel_diff": err,
                "reconstruction_rel_err": rec,
            }
        )
    torch.set_num_threads(threads)
    head = ["shape", "torch.linalg.svd s", "didi.linalg.svd s", "speed-up", "rel. diff σ", "rel. rec. err"]
    return results, "Thin SVD of a wide matrix, 1 thread:\n\n" + md_table(head, rows)


def thin_products(repeats: int) -> tuple[list[dict], str]:
    m, n = 8192, 2048
    X = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    rows, results = [], []
    for r in THIN:
        Q = torch.randn(m, r)
        gf = 2 * m * n * r / 1e9
        t_plain = timed(lambda: X.mT @ Q, repeats, warm_up=True)
        t_didi = timed(lambda: t_matmul(X, Q), repeats, warm_up=True)
        rows.append([r, f"{gf / t_plain:.1f}", f"{gf / t_didi:.1f}", f"{t_plain / t_didi:.2f}"])
        results.append({"m": m, "n": n, "columns": r, "plain_s": t_plain, "didi_s": t_didi})
    head = ["columns of Q", "X.mT @ Q GFLOPS", "t_matmul GFLOPS", "speed-up"]
    title = f"Xᵀ·Q with X {m}×{n}, {torch.get_num_threads()} threads:\n\n"
    return results, title + md_table(head, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    wide, t1 = wide_svds(args.repeats)
    thin, t2 = thin_products(args.repeats)
    write_results(
        "cpu_kernels",
        {
            "command": "python benchmarks/cpu_kernels.py " + " ".join(sys.argv[1:]),
            "wide_svd": wide,
            "thin_products": thin,
        },
        t1 + "\n\n" + t2,
    )


if __name__ == "__main__":
    main()
