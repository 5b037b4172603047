"""Stage-1 step: closed form (docs/method.md §3) vs literal materialised loss, ViT-B/32-shaped matrices.

12 blocks × {2304×768, 768×768, 3072×768, 768×3072}, 8 tasks, random full-rank task vectors. One "step" is the
forward and backward pass of the reconstruction term over all 48 matrices and 8 tasks. Reports the median step
time of each, the speed ratio and the loss agreement, at search width K = 128 (what 1.24× needs) and K = 768.

    python benchmarks/closed_form.py                  # full size (a few minutes on 2 CPU cores)
    python benchmarks/closed_form.py --layers 1       # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import md_table, write_results

from didi.closed_form import GroupTerms, literal_error, soft_error, soft_mask
from didi.decompose import decompose_matrix, terms_from_factors

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 768])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--literal_repeats", type=int, default=2)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    T = args.tasks
    factors = []
    t0 = time.perf_counter()
    for _ in range(args.layers):
        for m, n in SHAPES:
            taus = torch.randn(T, m, n, generator=g) * 0.01
            factors.append((decompose_matrix(taus, lambda x: x.mean(0), None)[0], taus))
    decompose_s = time.perf_counter() - t0
    rows, results = [], []
    for K in args.widths:
        by_shape: dict[tuple, list] = {}
        for f, taus in factors:
            by_shape.setdefault(tuple(taus.shape[1:]), []).append((f, taus))
        groups = []
        for items in by_shape.values():
            ts = [terms_from_factors(f, K, dtype=torch.float32) for f, _ in items]
            groups.append(
                GroupTerms(*(torch.cat([getattr(t, k) for t in ts]) for k in GroupTerms.__dataclass_fields__))
            )
        L = len(factors)
        r_s = torch.full((L,), K / 3, requires_grad=True)
        r_t = torch.full((L, T), K / 4, requires_grad=True)
        beta = 5.0

        def closed():
            loss, i = 0.0, 0
            for gt in groups:
                n = gt.sigma_s.shape[0]
                loss = loss + soft_error(gt, r_s[i : i + n], r_t[i : i + n], beta).sum()
                i += n
            loss.backward()
            return loss

        def literal():
            loss = 0.0
            for i, (f, taus) in enumerate(factors):
                k = f["S_s"].shape[0]
                g_s = torch.zeros(k)
                g_t = torch.zeros(T, k)
                g_s[:K] = soft_mask(r_s[i : i + 1], K, beta)[0]
                g_t[:, :K] = soft_mask(r_t[i], K, beta)
                e = literal_error(
                    taus, f["U_s"], f["S_s"].float(), f["V_s"], f["U_t"], f["S_t"].float(), f["V_t"], g_s, g_t
                ).sum()
                e.backward()
                loss = loss + e.detach()
            return loss

        lc, ll = float(closed()), float(literal())
        tc = statistics.median(timed(closed, args.repeats))
        tl = statistics.median(timed(literal, args.literal_repeats))
        rel = abs(lc - ll) / abs(ll)
        rows.append([K, L, T, tc * 1e3, tl, tl / tc, rel])
        results.append(
            {
                "K": K,
                "matrices": L,
                "tasks": T,
                "closed_form_step_s": tc,
                "literal_step_s": tl,
                "speedup": tl / tc,
                "loss_closed_form": lc,
                "loss_literal": ll,
                "rel_diff": rel,
            }
        )
        print(rows[-1], flush=True)
    table = md_table(
        [
            "K",
            "matrices",
            "tasks",
            "closed form step (ms)",
            "literal step (s)",
            "speed-up",
            "loss rel. diff (fp32)",
        ],
        rows,
    )
    write_results(
        "closed_form",
        {
            "command": "python benchmarks/closed_form.py " + " ".join(sys.argv[1:]),
            "decompose_s": decompose_s,
            "results": results,
        },
        table,
    )


if __name__ == "__main__":
    main()
