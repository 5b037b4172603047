"""The decomposition and the refinement of one matrix, this checkout's didi against another's, alternating.

One Llama-3.2-1B-shaped MLP matrix (8192×2048) with 4 tasks of fine-tune-like task vectors
(`benchmarks/llama1b.py`'s writer: a common and a per-task part of rank 48, σ_i ∝ i^−0.7, a dense tail with a
quarter of the energy), as the 1.24× merge of that model handles it: `decompose_batch` at the width the
budget gives (K = 192, the randomized range finder), then `refine_als` (4 sweeps, 2 power iterations) from
the truncated SVDs at ranks r_s = r_t = 96. Each measurement runs in a fresh process (`--_child`) with one
checkout's didi first on its path; `--against DIR` (a checkout of another commit, e.g. `git worktree add`)
alternates the two, A B A B …, so that a drift of the machine's speed hits both alike, and reports each
stage's median seconds and the median of the pairwise ratios. The relative errors of both are reported:
the same computation up to float rounding.

    git worktree add --detach /tmp/old 1952bf9
    python benchmarks/stage_speed.py --against /tmp/old --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import md_table, write_results  # noqa: E402

M, N, T, K, R = 8192, 2048, 4, 192, 96


def child() -> dict:
    """One measurement with the didi first on sys.path (the parent sets PYTHONPATH)."""
    import torch
    from llama1b import _low_rank, task_vector

    import didi
    from didi.decompose import decompose_batch
    from didi.merges import mean_merge  # the registry's own function, as a merge passes it
    from didi.refine import init_factors, refine_als, task_errors

    g = torch.Generator().manual_seed(0)
    common = _low_rank(M, N, g, 1e-3)
    taus = torch.stack([task_vector(M, N, g, common) for _ in range(T)]).float()
    work = taus.clone()[None]
    t0 = time.perf_counter()
    ((factors, _, _),) = decompose_batch(work, mean_merge, K, svd_method="auto", consume=True)
    t1 = time.perf_counter()
    A_s, B_s = init_factors(factors["U_s"], factors["S_s"].float(), factors["V_s"], R)
    pairs = [
        init_factors(factors["U_t"][t], factors["S_t"][t].float(), factors["V_t"][t], R) for t in range(T)
    ]
    A_t, B_t = [a for a, _ in pairs], [b for _, b in pairs]
    total = float((taus.double() ** 2).sum())
    before = float(task_errors(taus, A_s, B_s, A_t, B_t).sum()) / total
    t2 = time.perf_counter()
    out = refine_als(taus, A_s, B_s, A_t, B_t, sweeps=4, power_iters=2)
    t3 = time.perf_counter()
    after = float(task_errors(taus, *out).sum()) / total
    return {
        "didi": str(Path(didi.__file__).parent.parent),
        "decompose_s": t1 - t0,
        "refine_s": t3 - t2,
        "rec_err_before": before,
        "rec_err_after": after,
    }


def measure(checkout: str) -> dict:
    env = {**os.environ, "PYTHONPATH": checkout}
    out = subprocess.run(
        [sys.executable, __file__, "--_child"], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise SystemExit(f"measurement with {checkout} failed:\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(r["didi"]).resolve() != Path(checkout).resolve():
        raise SystemExit(f"{checkout}: the child imported didi from {r['didi']}")
    return r


def _commit(checkout: str) -> str:
    out = subprocess.run(
        ["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--against", help="a checkout of another commit to compare with (B)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--name", default="stage_speed")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        print(json.dumps(child()))
        return
    sides = {"this": str(HERE.parent)}
    if a.against:
        sides["against"] = str(Path(a.against).resolve())
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for i in range(a.rounds + 1):  # round 0 warms the page cache and the imports, not counted
        for k, path in sides.items():
            r = measure(path)
            if i:
                runs[k].append(r)
            print(
                f"round {i} {k}: decompose {r['decompose_s']:.2f} s, refine {r['refine_s']:.2f} s", flush=True
            )
    med = {}
    for k, rs in runs.items():
        med[k] = {s: statistics.median(r[s] for r in rs) for s in ("decompose_s", "refine_s")}
        med[k].update(rec_err_before=rs[0]["rec_err_before"], rec_err_after=rs[0]["rec_err_after"])
    head = ["checkout", "commit", "decompose s (median)", "refine s (median)"]
    head += ["rec. error (SVD init)", "rec. error (refined)"]
    commits = {k: _commit(path) for k, path in sides.items()}
    rows = [[k, commits[k], *med[k].values()] for k in med]
    table = md_table(head, rows)
    payload = {
        "command": "python benchmarks/stage_speed.py " + " ".join(sys.argv[1:]),
        "commits": commits,
        "runs": runs,
        "median": med,
        "rounds": a.rounds,
        "matrix": {"m": M, "n": N, "tasks": T, "width_K": K, "ranks": R},
    }
    if a.against:
        ratio = {
            s: statistics.median(b[s] / t[s] for t, b in zip(runs["this"], runs["against"]))
            for s in ("decompose_s", "refine_s")
        }
        payload["ratio_against_over_this"] = ratio
        table += (
            f"\n\nMedian of the pairwise ratios (against ÷ this): decomposition {ratio['decompose_s']:.2f}×, "
            f"refinement {ratio['refine_s']:.2f}×; {a.rounds} rounds after one warm-up round."
        )
    write_results(a.name, payload, table)


if __name__ == "__main__":
    main()
