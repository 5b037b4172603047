"""Seconds and reconstruction error of the decomposition's and the refinement's iteration settings, on one
Llama-3.2-1B-shaped MLP matrix (8192×2048, 4 tasks of fine-tune-like task vectors, `benchmarks/llama1b.py`'s
writer) at the 1.24× width K = 192.

Why: the defaults of `--decompose.power_iters` and of `--refine.power_iters` / `--refine.sweeps` trade
seconds for accuracy, and the refinement re-fits the factors the decomposition hands it. For every rank r
(r_s = r_t = r) and every (refine power_iters, sweeps) this times `refine_als` from the truncated SVDs
(the median of `--repeats`, the settings alternating) and reports the relative error Σ_t‖A_sB_s + A_tB_t −
τ_t‖² / Σ‖τ‖² it reaches; then for every decomposition power_iters it times `decompose_batch` and reports
the largest relative error of σ_1..σ_r (shared module and experts, against full SVDs) and the refined error
at the default refinement.

    python benchmarks/refine_settings.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import device_info, git_rev, md_table, write_results  # noqa: E402

M, N, T, K = 8192, 2048, 4, 192


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 96, 160])
    p.add_argument("--refine", nargs="+", default=["2x4", "1x4", "0x6", "0x8"], help="power_iters x sweeps")
    p.add_argument("--decompose", type=int, nargs="+", default=[4, 3, 2], help="power_iters")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="refine_settings")
    a = p.parse_args()

    import torch
    from llama1b import _low_rank, task_vector

    from didi.decompose import decompose_batch
    from didi.linalg import svd
    from didi.refine import RefineConfig, init_factors, refine_als, task_errors

    g = torch.Generator().manual_seed(0)
    common = _low_rank(M, N, g, 1e-3)
    taus = torch.stack([task_vector(M, N, g, common) for _ in range(T)]).float()
    total = float((taus.double() ** 2).sum())
    default = RefineConfig()

    def factors(power_iters: int) -> tuple[dict, float]:
        t0 = time.perf_counter()
        ((f, _, _),) = decompose_batch(
            taus.clone()[None],
            lambda x: x.mean(0),
            K,
            svd_method="auto",
            consume=True,
            power_iters=power_iters,
        )
        return f, time.perf_counter() - t0

    def start(f: dict, r: int) -> tuple:
        A_s, B_s = init_factors(f["U_s"], f["S_s"].float(), f["V_s"], r)
        pairs = [init_factors(f["U_t"][t], f["S_t"][t].float(), f["V_t"][t], r) for t in range(T)]
        return A_s, B_s, [x for x, _ in pairs], [y for _, y in pairs]

    def refine(f: dict, r: int, q: int, sweeps: int) -> tuple[float, float]:
        A_s, B_s, A_t, B_t = start(f, r)
        t0 = time.perf_counter()
        out = refine_als(taus, A_s, B_s, A_t, B_t, sweeps=sweeps, power_iters=q)
        return time.perf_counter() - t0, float(task_errors(taus, *out).sum()) / total

    f4, _ = factors(4)
    settings = [tuple(int(x) for x in s.split("x")) for s in a.refine]
    refine_rows = []
    for r in a.ranks:
        A_s, B_s, A_t, B_t = start(f4, r)
        svd_err = float(task_errors(taus, A_s, B_s, A_t, B_t).sum()) / total
        times: dict = {s: [] for s in settings}
        errs: dict = {}
        for _ in range(a.repeats):
            for s in settings:
                sec, errs[s] = refine(f4, r, *s)
                times[s].append(sec)
        for s in settings:
            med = statistics.median(times[s])
            refine_rows.append([r, s[0], s[1], round(med, 3), round(svd_err, 5), round(errs[s], 5)])
            print(f"r {r} power_iters {s[0]} sweeps {s[1]}: {med:.2f} s, error {errs[s]:.5f}", flush=True)

    full = {"shared": svd(taus.mean(0))[1].double()}
    full.update({f"expert {t}": svd(taus[t] - taus.mean(0))[1].double() for t in range(T)})
    r_top = max(a.ranks)
    decompose_rows = []
    for q in a.decompose:
        secs = []
        for _ in range(a.repeats):
            f, sec = factors(q)
            secs.append(sec)
        S = {"shared": f["S_s"].double(), **{f"expert {t}": f["S_t"][t].double() for t in range(T)}}
        worst = {
            r: max(float(((S[k][:r] - v[:r]).abs() / v[:r]).max()) for k, v in full.items()) for r in a.ranks
        }
        refined = {r: refine(f, r, default.power_iters, default.sweeps)[1] for r in a.ranks}
        decompose_rows.append(
            [q, round(statistics.median(secs), 3)]
            + [f"{worst[r]:.1e}" for r in a.ranks]
            + [round(refined[r], 5) for r in a.ranks]
        )
        print(f"decompose power_iters {q}: {statistics.median(secs):.2f} s, σ error up to {r_top} "
              f"{worst[r_top]:.1e}", flush=True)  # fmt: skip

    table = md_table(
        [
            "rank r",
            "refine power_iters",
            "sweeps",
            "refine s (median)",
            "rec. error (SVD init)",
            "rec. error",
        ],
        refine_rows,
    )
    table += "\n\n" + md_table(
        ["decompose power_iters", "decompose s (median)"]
        + [f"max rel. err σ_1..σ_{r}" for r in a.ranks]
        + [f"rec. error at r = {r} (refined, defaults)" for r in a.ranks],
        decompose_rows,
    )
    table += f"\n\n{device_info()}; commit {git_rev()}; {a.repeats} repeats"
    payload = {
        "command": "python benchmarks/refine_settings.py " + " ".join(sys.argv[1:]),
        "device": device_info(),
        "commit": git_rev(),
        "matrix": {"m": M, "n": N, "tasks": T, "width_K": K},
        "refine_defaults": {"power_iters": default.power_iters, "sweeps": default.sweeps},
        "refine": [
            dict(zip(["rank", "power_iters", "sweeps", "seconds", "rec_err_svd", "rec_err"], x))
            for x in refine_rows
        ],  # fmt: skip
        "decompose": decompose_rows,
    }
    write_results(a.name, payload, table)


if __name__ == "__main__":
    main()
