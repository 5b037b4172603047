"""The row-streamed decomposition and ALS refinement of a tied-embedding-shaped matrix (issue 11), timed per
phase: seconds in reads, in forming the modules (bf16 → fp32, subtraction, mean), hashing, float64 norms,
matmuls, QR and the error sums, with the process's peak RSS.

The zoo holds one 128256×2048 matrix (Llama-3.2-1B's tied embedding) in bf16 safetensors, θ0 and 4 tasks,
drawn exactly as benchmarks/llama1b.py draws its embedding (same functions, same seed: the same matrix).
It is written once into a temporary directory removed at the end, or into `--dir` (kept). The measurement
runs in a fresh subprocess (its own peak RSS): `decompose_streamed` at K (default 192, the store width of
llama1b's 1.24× row; 4 power iterations), then `refine_als_streamed` (by default 4 sweeps with 2 power
iterations: RefineConfig's defaults when the table's runs were made, kept so that reruns compare with them)
from the decomposition's factors truncated at rank `--rank` for the shared part and every expert.

    python benchmarks/streamed_embedding.py --label after             # full size: streamed_embedding.*
    python benchmarks/streamed_embedding.py --rows 32768 --label dev  # smaller: streamed_embedding_small.*

Each run is added to the results file under its `--label` (a later run with the same label replaces it),
with its command, commit, device and the CPU the machine's other processes used while it ran (busy time in
/proc/stat less the measurement's own; a shared machine slows every phase).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS, device_info, git_rev, md_table, vm_hwm_mb  # noqa: E402
from llama1b import TAIL, _low_rank, task_vector  # noqa: E402

NAME = "model.embed_tokens.weight"
#: phases in table order (didi.streamed.PHASES; before commit db5f2c9 "read" included the cast and, in the
#: refinement, τ = task − θ0, and the refinement's "matmul" formed the targets τ − low-rank block by block)
PHASES = ("read", "convert", "hash", "modules", "gram64", "matmul", "qr", "svd", "residual")


def make(root: Path, m: int, n: int, T: int) -> None:
    """θ0 and T tasks holding one m×n bf16 matrix, drawn as llama1b.make draws its embedding (tensor 0)."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1000)
    base = torch.randn(m, n, generator=g) * 0.02
    common = _low_rank(m, n, g, ((1 - TAIL) / 2) ** 0.5 * 1e-3 * (m * n) ** 0.5)
    save_file({NAME: base.to(torch.bfloat16)}, str(root / "base.safetensors"))
    for t in range(T):
        tau = task_vector(m, n, g, common)
        save_file({NAME: (base + tau).to(torch.bfloat16)}, str(root / f"task{t}.safetensors"))
        del tau
    (root / "done").write_text(f"{m}x{n} T={T}")


def measure(root: Path, T: int, K: int, rank: int, sweeps: int, power_iters: int) -> dict:
    """Decompose and refine the zoo's matrix in this process; seconds per phase and peak RSS."""
    import torch

    from didi import streamed
    from didi.backbones import Adapter, Zoo
    from didi.refine import TaskVectorRows, init_factors

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    zoo = Zoo(Adapter(), str(root / "base.safetensors"), {f"task{t}": str(root / f"task{t}.safetensors")
                                                           for t in range(T)})  # fmt: skip
    plan = next(p for p in zoo.plan if p.name == NAME)
    m, n = plan.matrix_shape
    out: dict = {"m": m, "n": n, "T": T, "K": K, "rank": rank, "sweeps": sweeps, "power_iters": power_iters}
    streamed.PHASES.on = True
    streamed.PHASES.seconds = {}
    t0 = time.perf_counter()
    f, bound_s, bound_t, _ = streamed.decompose_streamed(zoo, plan, K, power_iters=4)
    out["decompose_s"] = time.perf_counter() - t0
    out["decompose_phases"] = dict(streamed.PHASES.seconds)
    out["S_s_head"] = [float(x) for x in f["S_s"][:4]]
    tau_total = float(f["tau_sq"].sum())
    # the closed form's error of the SVD init at rank r (what refinement starts from), relative to Σ‖τ‖²
    A_s, B_s = init_factors(f["U_s"], f["S_s"], f["V_s"], rank)
    pairs = [init_factors(f["U_t"][t], f["S_t"][t], f["V_t"][t], rank) for t in range(T)]
    del f
    streamed.PHASES.seconds = {}
    t1 = time.perf_counter()
    res = streamed.refine_als_streamed(
        TaskVectorRows(zoo, NAME, n), m, n, T, A_s, B_s, [a for a, _ in pairs], [b for _, b in pairs],
        sweeps, power_iters,
    )  # fmt: skip
    out["refine_s"] = time.perf_counter() - t1
    out["refine_phases"] = dict(streamed.PHASES.seconds)
    out["rec_err_before"] = float(res[4].sum()) / tau_total
    out["rec_err_after"] = float(res[5].sum()) / tau_total
    out["peak_rss_mb"] = vm_hwm_mb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_after_imports_mb"] = rss0
    out["threads"] = torch.get_num_threads()
    return out


def busy_s() -> float:
    """CPU-seconds all processes spent since boot (/proc/stat: user, nice, system, irq, softirq, steal)."""
    f = open("/proc/stat").readline().split()[1:]
    return sum(int(f[i]) for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK")


def write(name: str, runs: dict) -> None:
    cols = {
        part: [p for p in PHASES if any(p in r[f"{part}_phases"] for r in runs.values())]
        for part in ("decompose", "refine")
    }
    head = ["run", "decompose (s)", *[f"d: {p}" for p in cols["decompose"]], "sweeps", "refine (s)"]
    head += [f"r: {p}" for p in cols["refine"]]
    head += ["rec. err (SVD init)", "rec. err", "peak RSS (MB)", "other jobs (cores)"]
    rows = []
    for label, r in runs.items():
        cells = [label, r["decompose_s"], *[r["decompose_phases"].get(p, "–") for p in cols["decompose"]]]
        cells += [r["sweeps"], r["refine_s"], *[r["refine_phases"].get(p, "–") for p in cols["refine"]]]
        cells += [r["rec_err_before"], r["rec_err_after"], r.get("peak_rss_mb", "–"), r["others_cores"]]
        rows.append([f"{c:.1f}" if isinstance(c, float) and c >= 1 else c for c in cells])
    first = next(iter(runs.values()))
    lines = [
        f"Row-streamed {first['m']}×{first['n']} bf16 matrix, θ0 + {first['T']} tasks "
        f"(benchmarks/streamed_embedding.py): `decompose_streamed` at K = {first['K']} (oversample 32, "
        f"4 power iterations), then `refine_als_streamed` (`sweeps`, "
        f"{first['power_iters']} power iterations) at rank {first['rank']} for the shared part and every "
        "expert. Seconds per phase (d: decomposition, r: refinement; what no phase covers is the rest of "
        "the total; –: a phase that code did not have). The rec. errors are "
        "Σ_t‖A_sB_s + A_tB_t − τ_t‖² / Σ_t‖τ_t‖² of the initial and the refined factors. Other jobs: the "
        "CPU the machine's other processes used during the measurement, in cores on average (of "
        f"{os.cpu_count()}). Before commit db5f2c9 `read` includes the cast to float32 (and in the "
        "refinement τ = task − θ0), and the refinement's `matmul` includes forming τ_t − A_sB_s and "
        "mean_t(τ_t − A_tB_t) block by block.",
        "",
        md_table(head, rows),
        "",
    ]
    for label, r in runs.items():
        lines.append(
            f"- {label}: `{r['command']}`, commit {r['git']}, {r['device']}"
            + ("; the machine was shared with other jobs" if r["others_cores"] > 0.1 else "")
            + (f"; peak RSS {r['peak_rss_note']}" if "peak_rss_note" in r else "")
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(runs, indent=1))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=128256)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--K", type=int, default=192)
    ap.add_argument("--rank", type=int, default=None, help="refinement rank (default: K)")
    ap.add_argument("--sweeps", type=int, default=4)
    ap.add_argument("--power_iters", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None, help="keep the zoo here (default: a temporary one)")
    ap.add_argument("--label", default="run")
    ap.add_argument("--table", action="store_true", help="only rewrite the .md from the .json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    rank = a.rank or a.K
    full = (a.rows, a.cols, a.tasks) == (128256, 2048, 4)
    name = "streamed_embedding" if full else "streamed_embedding_small"
    path = RESULTS / f"{name}.json"
    if a.table:
        write(name, json.loads(path.read_text()))
        return
    if a.child:
        print(json.dumps(measure(a.dir, a.tasks, a.K, rank, a.sweeps, a.power_iters)))
        return
    root = a.dir or Path(tempfile.mkdtemp(prefix="streamed_embedding_"))
    try:
        done = root / "done"
        if not (done.exists() and done.read_text() == f"{a.rows}x{a.cols} T={a.tasks}"):
            make(root, a.rows, a.cols, a.tasks)
        busy0, own0, wall0 = busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        args = ["--dir", str(root), "--tasks", str(a.tasks), "--K", str(a.K), "--rank", str(rank),
                "--sweeps", str(a.sweeps), "--power_iters", str(a.power_iters), "--child"]  # fmt: skip
        proc = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            raise SystemExit(f"the measurement failed with exit code {proc.returncode}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime
        r["others_cores"] = (busy_s() - busy0 - own) / (time.perf_counter() - wall0)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    r.update(
        command="python benchmarks/streamed_embedding.py " + " ".join(sys.argv[1:]),
        git=git_rev(),
        device=device_info(),
    )
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[a.label] = r
    write(name, runs)


if __name__ == "__main__":
    main()
