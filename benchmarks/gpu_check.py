"""Device check (issue 11): one Llama-3.1-8B-sized decoder layer and its 128256×4096 embedding, θ0 + 4 tasks
in bf16 safetensors, merged by DiDi at 1.24× on one GPU: seconds per stage, peak GPU memory, peak host RSS.

Run by `benchmarks/gpu_check.sh` (read its header); this file is its body. Shapes: hidden 4096, intermediate
14336, 32 query / 8 KV heads, head_dim 128, vocabulary 128256, 1 layer, tied embeddings (only embed_tokens is
stored), 742,924,288 parameters; written by `benchmarks/llama1b.py`'s `make` (its task-vector spectra). The
merge is the defaults of `didi merge` (max_rank from the budget, `svd: auto`, the embedding row-streamed,
ALS refinement) with DecomposeConfig(device="cuda") and TrainerConfig(accelerator="gpu", devices=1), its
stages called one by one as `run_merge` runs them: decompose (`shards.factor_store`), search (a cache hit on
the store + the rank search + budget), refine + artifact. The zoo is written by a subprocess, so the host
peak (VmHWM of /proc/self/status) is the merge's own; the writer's peak is reported beside it.

    bash benchmarks/gpu_check.sh                              # on a CUDA machine (cut at 470 s)
    python benchmarks/gpu_check.py --device cpu --small       # the same code path on tiny shapes (CPU test)

Writes $OUT/gpu_check.json when OUT is set (the device machine returns files written there), else
benchmarks/results/gpu_check.json (`--out FILE` overrides both); the JSON is rewritten after every stage, so a
run stopped by its time limit still leaves what it measured. Exit status 2 without CUDA (`--device cuda`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import vm_hwm_mb  # noqa: E402  (torch-free)

#: (hidden, intermediate, heads, kv heads, head_dim, vocabulary): Llama-3.1-8B's, and a tiny one for tests
SHAPES = {"8b": (4096, 14336, 32, 8, 128, 128256), "small": (256, 896, 4, 1, 64, 4096)}


def zoo_config(small: bool) -> dict:
    from llama1b import config

    h, i, heads, kv, hd, v = SHAPES["small" if small else "8b"]
    cfg = config(h, 1, v)
    cfg.update(intermediate_size=i, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd)
    return cfg


def write_zoo(root: Path, small: bool, tasks: int) -> None:
    """The zoo (in a subprocess: `--_make`); prints its own peak RSS as the last stdout line."""
    from llama1b import make

    make(root, zoo_config(small), tasks)
    print(json.dumps({"peak_rss_mb": vm_hwm_mb()}))


def check(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}); this check needs one GPU. "
            "For a CPU test of the script: python benchmarks/gpu_check.py --device cpu --small",
            file=sys.stderr,
        )
        sys.exit(2)


_SIGTERM: list[bool] = []


def _terminated(signum, frame) -> None:
    """A time limit's SIGTERM unwinds through `finally`: the JSON is written, the work directory removed."""
    _SIGTERM.append(True)
    raise KeyboardInterrupt("SIGTERM (time limit)")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (hidden 256, vocabulary 4096): a test")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--budget", type=float, default=1.24)
    p.add_argument(
        "--stream_mb",
        type=int,
        help="DecomposeConfig.stream_mb (default: didi's, 2048, which streams the 8B embedding; 8 with "
        "--small, so the tiny embedding takes the same streamed path)",
    )
    p.add_argument(
        "--work", help="work directory (zoo, store, artifact), removed at the end; default: a temp dir"
    )
    p.add_argument(
        "--out", help="the JSON (default: $OUT/gpu_check.json, else benchmarks/results/gpu_check.json)"
    )
    p.add_argument("--_make", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._make:
        write_zoo(Path(a._make), a.small, a.tasks)
        return
    check(a.device)
    signal.signal(signal.SIGTERM, _terminated)
    if a.out:
        out = Path(a.out)
    elif os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu_check.json"
    else:
        out = HERE / "results" / "gpu_check.json"
    work = Path(a.work or tempfile.mkdtemp(prefix="didi-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"status": "started", "argv": sys.argv[1:]}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))

    try:
        run(a, work, res, save)
        res["status"] = "ok"
        res.pop("running", None)
    except BaseException as e:
        res["status"] = (
            f"stopped by SIGTERM (the time limit) in stage {res.get('running')}"
            if _SIGTERM
            else f"failed in stage {res.get('running')}: {type(e).__name__}: {e}"
        )
        raise
    finally:
        save()
        shutil.rmtree(work, ignore_errors=True)
        print(f"gpu_check: {res['status']}; results in {out}", file=sys.stderr, flush=True)


def run(a: argparse.Namespace, work: Path, res: dict, save) -> None:
    import torch
    from common import device_info, git_rev

    cuda = a.device == "cuda"
    res["info"] = {
        "device": device_info(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_rev(),
        "shapes": "small" if a.small else "llama-3.1-8b layer + embedding",
        "config": {k: v for k, v in zoo_config(a.small).items() if not isinstance(v, dict)},
        "tasks": a.tasks,
        "budget": a.budget,
        "cpu_threads": torch.get_num_threads(),
    }
    print(f"gpu_check: {res['info']['device']}", file=sys.stderr, flush=True)
    res["running"] = "write zoo"
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, __file__, "--_make", str(work / "zoo"), "--tasks", str(a.tasks)]
    made = subprocess.run(cmd + (["--small"] if a.small else []), env=env, stdout=subprocess.PIPE, text=True)
    if made.returncode:
        raise SystemExit(f"gpu_check: writing the zoo failed (exit {made.returncode})")
    res["zoo_write_s"] = time.perf_counter() - t0
    res["zoo_write_peak_rss_mb"] = json.loads(made.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    res["zoo_bytes"] = sum(f.stat().st_size for f in (work / "zoo").rglob("*.safetensors"))
    print(f"gpu_check: zoo written in {res['zoo_write_s']:.0f} s", file=sys.stderr, flush=True)
    save()

    from didi.allocation import resolve_width
    from didi.artifact import load_artifact
    from didi.backbones import Zoo
    from didi.backbones.hf_llama import HFLlamaAdapter
    from didi.decompose import DecomposeConfig, streams
    from didi.pipeline import MergeOptions, run_refine, run_search
    from didi.shards import factor_store
    from didi.streamed import keeps_rows
    from didi.trainer import TrainerConfig, Trainers

    zoo = Zoo(
        HFLlamaAdapter(),
        str(work / "zoo" / "base"),
        {f"task{t}": str(work / "zoo" / f"task{t}") for t in range(a.tasks)},
    )
    dcfg = DecomposeConfig(device=a.device, cache_dir=str(work / "cache"))
    if a.stream_mb is not None or a.small:
        dcfg.stream_mb = a.stream_mb if a.stream_mb is not None else 8
    opts = MergeOptions(
        budget=a.budget,
        decompose=dcfg,
        trainer=TrainerConfig(
            accelerator="gpu" if cuda else "cpu", devices=1, logger="none", progress_bar=False
        ),
    )
    width = resolve_width(zoo, opts.decompose, a.budget)
    T = len(zoo.tasks)
    streamed = [q for q in zoo.plan if streams(q, T, width)]
    device = width.torch_device()
    res["info"].update(
        base_params=zoo.base_params,
        width_K=width.max_rank,
        stream_mb=dcfg.stream_mb,
        streamed=[q.name for q in streamed],
        # whether each streamed matrix's rows stay on the device after the first pass, as judged before the
        # merge (decomposition: T+1 fp32 copies; refinement: T), from the free memory then
        rows_kept=[
            [
                keeps_rows(device, (T + 1) * math.prod(q.matrix_shape) * 4),
                keeps_rows(device, T * math.prod(q.matrix_shape) * 4),
            ]
            for q in streamed
        ],
    )
    trainers = Trainers(opts.trainer)
    out = work / "merged"
    stages: dict = {}
    res["stages"] = stages

    def stage(name: str, fn):
        res["running"] = name
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        value = fn()
        if cuda:
            torch.cuda.synchronize()
        rec = {"seconds": time.perf_counter() - t, "host_peak_rss_mb_so_far": vm_hwm_mb()}
        if cuda:
            rec["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            rec["gpu_max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        stages[name] = rec
        print(f"gpu_check: {name}: {json.dumps(rec)}", file=sys.stderr, flush=True)
        save()
        return value

    t0 = time.perf_counter()
    store = stage("decompose", lambda: factor_store(zoo, width, trainers, progress=True))
    ranks, store = stage("search", lambda: run_search(zoo, out, opts, progress=True, trainers=trainers))
    path = stage(
        "refine_write",
        lambda: run_refine(zoo, out, ranks, opts, progress=True, trainers=trainers, store=store),
    )
    res["end_to_end_s"] = time.perf_counter() - t0
    res["running"] = "checks"
    art = load_artifact(path)  # checksums verified
    m = art.manifest
    res["result"] = {
        "storage_ratio": m["storage"]["ratio"],
        "rec_err_svd": m["metrics"]["refine"]["rec_err_before"],
        "rec_err": m["metrics"]["refine"]["rec_err_after"],
        "store_widths": sorted({e.K for e in store.matrices}),
        "at_width": ranks.info.get("at_width"),
        "shares": store.shares,
        "artifact_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
    }
    res["host_peak_rss_mb"] = vm_hwm_mb()
    res["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        res["gpu_name"] = torch.cuda.get_device_name(0)
        res["gpu_total_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        res["gpu_max_allocated_gib"] = max(s["gpu_max_allocated_gib"] for s in stages.values())
    summary(res)


def summary(res: dict) -> None:
    """The stages as a table on stderr."""
    rows = [
        "| stage | seconds | GPU max allocated (GiB) | GPU max reserved (GiB) | host peak RSS so far (MB) |",
        "|---|---:|---:|---:|---:|",
        f"| write zoo (subprocess) | {res['zoo_write_s']:.1f} | | | {res['zoo_write_peak_rss_mb']:.0f} |",
    ]
    for name, st in res["stages"].items():
        gpu = [f"{st[k]:.2f}" if k in st else "" for k in ("gpu_max_allocated_gib", "gpu_max_reserved_gib")]
        rows.append(
            f"| {name} | {st['seconds']:.1f} | {' | '.join(gpu)} | {st['host_peak_rss_mb_so_far']:.0f} |"
        )
    rows.append(f"| merge end to end | {res['end_to_end_s']:.1f} | | | {res['host_peak_rss_mb']:.0f} |")
    r = res["result"]
    rows.append(
        f"\nstorage ratio {r['storage_ratio']:.4f}, rec. error {r['rec_err_svd']:.4f} (SVD) → "
        f"{r['rec_err']:.4f}, "
        f"store width K = {res['info']['width_K']}, streamed: {', '.join(res['info']['streamed']) or 'none'}"
        f" (rows kept on the device in decompose, refine: {res['info']['rows_kept']})"
    )
    print("\n".join(rows), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
