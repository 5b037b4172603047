"""The range finder's accuracy and speed: didi's block Krylov (`linalg.randomized_svds`) against subspace
iteration (the range finder didi used before, written out here) at the same oversampling and iterations.

One Llama-3.2-1B-shaped MLP matrix (8192×2048) with 4 tasks of fine-tune-like task vectors
(`benchmarks/llama1b.py`'s writer), as the mean merge decomposes it: the shared part M_s and the T experts
M_t = τ_t − M_s, their T+1 range finders in lockstep (the experts share one Ω, the last one's first product
from the others'). For each width K (192: the 1B model's at 1.24×; 64: at 1.05×) and method: the median
seconds of `--repeats` runs, and against the full SVD's σ's (float64) of each module, the largest relative
error of σ_1..σ_r and of the tail energy ‖M‖² − Σ_{j≤r}σ_j² (what the closed form reads) at several ranks r,
the worst over the T+1 modules.

    python benchmarks/svd_accuracy.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import md_table, write_results  # noqa: E402
from llama1b import _low_rank, task_vector  # noqa: E402

from didi.linalg import orthonormal, orthonormal_all, randomized_svds, svd  # noqa: E402

M, N, T = 8192, 2048, 4
OVERSAMPLE, ITERS = 32, 3
RANKS = {64: [12, 32, 48, 64], 192: [12, 48, 96, 192]}


def subspace_iteration(Ms: list[torch.Tensor], K: int) -> list[torch.Tensor]:
    """The σ's of subspace iteration at width K + oversample, in lockstep like didi's: Ω per module (the
    experts share seed 1's, the last first product from the others'), `ITERS` re-orthonormalised power
    iterations, then the SVD of QᵀM."""
    w = K + OVERSAMPLE
    omega = [torch.randn(N, w, generator=torch.Generator().manual_seed(min(i, 1))) for i in range(2)]
    Ys = [Ms[0] @ omega[0]] + [X @ omega[1] for X in Ms[1:-1]]
    Qs = orthonormal_all([*Ys, -torch.stack(Ys[1:]).sum(0)])
    for _ in range(ITERS):
        Qs = orthonormal_all([X.T @ Q for X, Q in zip(Ms, Qs)])
        Qs = orthonormal_all([X @ Q for X, Q in zip(Ms, Qs)])
    return [svd(Q.T @ X)[1][:K] for X, Q in zip(Ms, Qs)]


def krylov(Ms: list[torch.Tensor], K: int) -> list[torch.Tensor]:
    out = randomized_svds(Ms, K, OVERSAMPLE, ITERS, seeds=range(len(Ms)), zero_sum=True)
    return [S for _, S, _ in out]


def errors(
    S: list[torch.Tensor], exact: list[torch.Tensor], norms: list[float], r: int
) -> tuple[float, float]:
    sig = max(float(((s[:r].double() - e[:r]).abs() / e[:r]).max()) for s, e in zip(S, exact))
    tail = max(
        float(((e[:r] ** 2).sum() - (s[:r].double() ** 2).sum()) / (nm - (e[:r] ** 2).sum()))
        for s, e, nm in zip(S, exact, norms)
    )
    return sig, tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    _ = orthonormal(torch.randn(64, 8))  # load LAPACK before timing
    g = torch.Generator().manual_seed(0)
    common = _low_rank(M, N, g, 1e-3)
    taus = torch.stack([task_vector(M, N, g, common) for _ in range(T)]).float()
    mean = taus.mean(0)
    Ms = [mean, *(taus - mean)]
    exact = [torch.linalg.svdvals(X.double()) for X in Ms]
    norms = [float((X.double() ** 2).sum()) for X in Ms]
    rows, results = [], []
    for K, ranks in RANKS.items():
        for name, fn in (("subspace iteration", subspace_iteration), ("block Krylov (didi)", krylov)):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                S = fn(Ms, K)
                times.append(time.perf_counter() - t0)
            errs = {r: errors(S, exact, norms, r) for r in ranks}
            results.append(
                {"K": K, "method": name, "seconds": statistics.median(times), "times": times,
                 "sigma_rel_err": {r: e[0] for r, e in errs.items()},
                 "tail_rel_err": {r: e[1] for r, e in errs.items()}}
            )  # fmt: skip
            for r in ranks:
                rows.append(
                    [K, name, f"{statistics.median(times):.3f}", r, f"{errs[r][0]:.1e}", f"{errs[r][1]:.1e}"]
                )
                print(rows[-1], flush=True)
    head = ["K", "range finder", "seconds (median)", "r", "rel. err σ_1..σ_r", "rel. err tail energy at r"]
    table = md_table(head, rows) + (
        f"\n\nErrors: the largest over the T+1 = {T + 1} modules. Oversampling {OVERSAMPLE}, {ITERS} "
        "iterations for both; subspace iteration keeps K + oversample columns, block Krylov "
        "blocks of (K + oversample)/2 and all of its iterations'."
    )
    payload = {"command": "python benchmarks/svd_accuracy.py " + " ".join(sys.argv[1:]), "shape": [M, N],
               "tasks": T, "oversample": OVERSAMPLE, "iterations": ITERS, "results": results}  # fmt: skip
    write_results("svd_accuracy", payload, table)


if __name__ == "__main__":
    main()
