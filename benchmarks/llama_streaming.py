"""Peak host memory of a T-task DiDi merge of tiny Llama models vs. the layer count (goal: flat within ±10 %).

Each configuration runs in two fresh subprocesses: one writes θ0 and T synthetic fine-tunes (sharded bf16
safetensors, like real Llama checkpoints), the other merges them through the `hf_llama` adapter and reports
its own peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), its RSS after imports, and the time of the
decomposition and of the whole merge. A calibration merge with a large vocabulary (2 layers, 32768 × hidden
embeddings, so one matrix dominates the working set) measures memory per element of the largest matrix; with
the SVD rate of the deepest configuration it gives a projection for Llama-3.1-8B (4 and 8 tasks), printed with
its formula.

    python benchmarks/llama_streaming.py                 # 2, 8 and 16 layers (the lead's full run)
    python benchmarks/llama_streaming.py --layers 2      # smoke test

Writes benchmarks/results/llama_streaming.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Llama-3.1-8B shapes: (m, n) of each decomposed matrix of one decoder layer, and the embeddings
L8B_LAYER = [
    (4096, 4096),
    (1024, 4096),
    (1024, 4096),
    (4096, 4096),
    (14336, 4096),
    (14336, 4096),
    (4096, 14336),
]
L8B_EMB = [(128256, 4096), (128256, 4096)]
L8B_LAYERS = 32


def tiny_shapes(hidden: int, layers: int, vocab: int) -> tuple[list, list]:
    inter, kv = int(3.5 * hidden), hidden // 4
    layer = [
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (inter, hidden),
        (inter, hidden),
        (hidden, inter),
    ]
    return layer * layers, [(vocab, hidden)] * 2


def svd_work(shapes: list, T: int) -> float:
    """Cost model of decomposing one matrix list: (T+1) thin SVDs, each ∝ m·n·min(m, n)."""
    return sum((T + 1) * m * n * min(m, n) for m, n in shapes)


def llama_config(hidden: int, layers: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(3.5 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def make(root: Path, hidden: int, layers: int, vocab: int, T: int) -> None:
    """θ0 + T fine-tunes with rank-8 task vectors on every projection and the embeddings (bf16, sharded)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(hidden, layers, vocab)).to(torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(str(root / "base"), max_shard_size="50MB")
    g = torch.Generator().manual_seed(1)
    for t in range(T):
        sd = {}
        for k, w in base.items():
            if w.dim() == 2:
                d = torch.randn(w.shape[0], 8, generator=g) @ torch.randn(8, w.shape[1], generator=g)
                sd[k] = (w.float() + 0.02 * d / (8 * w.shape[1]) ** 0.5).to(w.dtype)
            else:
                sd[k] = (w.float() + 0.01 * torch.randn(w.shape, generator=g)).to(w.dtype)
        model.load_state_dict(sd)
        model.save_pretrained(str(root / f"task{t}"), max_shard_size="50MB")


def merge(root: Path, T: int, device: str) -> dict:
    """One merge; returns times and memory of this process."""
    import torch  # noqa: F401

    from didi.backbones import Zoo
    from didi.backbones.hf_llama import HFLlamaAdapter
    from didi.decompose import DecomposeConfig, decompose
    from didi.pipeline import MergeOptions, run_merge
    from didi.refine import RefineConfig
    from didi.search import SearchConfig
    from didi.trainer import TrainerConfig

    zoo = Zoo(
        HFLlamaAdapter(embeddings="low_rank"),
        str(root / "base"),
        {f"t{i}": str(root / f"task{i}") for i in range(T)},
    )
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after imports and the zoo's checks
    dcfg = DecomposeConfig(cache_dir=str(root / "cache"), device=device)
    t0 = time.perf_counter()
    decompose(zoo, dcfg, progress=False)  # cached: run_merge below reuses it
    t_dec = time.perf_counter() - t0
    rss_dec = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    run_merge(
        zoo,
        root / "merged",
        MergeOptions(
            1.1,
            dcfg,
            SearchConfig(steps=50),
            RefineConfig(sweeps=1),
            TrainerConfig(
                accelerator="cpu" if device == "cpu" else "auto", logger="none", progress_bar=False
            ),
        ),
        progress=False,
    )
    t_rest = time.perf_counter() - t0
    return {
        "rss_after_imports_mb": rss_imports / 1024,
        "peak_rss_decompose_mb": rss_dec / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "decompose_s": t_dec,
        "search_refine_write_s": t_rest,
        "base_params": zoo.base_params,
        "checkpoint_mb": sum(f.stat().st_size for f in (root / "base").glob("*.safetensors")) / 2**20,
    }


def child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
    )
    if out.returncode:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def projection(rows: list[dict], calib: dict, T_meas: int, hidden: int, vocab: int) -> tuple[list[dict], str]:
    """Llama-3.1-8B time and memory: time per unit of SVD work from the deepest row; memory per element of the
    largest matrix from the calibration run, whose embeddings are large enough to dominate the working set."""
    r = max(rows, key=lambda x: x["layers"])
    lay, emb = tiny_shapes(hidden, r["layers"], vocab)
    c_time = r["decompose_s"] / svd_work(lay + emb, T_meas)  # seconds per unit of m·n·min(m,n)
    big_c = calib["vocab"] * hidden
    # the whole merge's peak over R0, per fp32 copy of the largest matrix's T+1 versions
    k_mem = (calib["peak_rss_mb"] - calib["rss_after_imports_mb"]) * 2**20 / ((T_meas + 1) * big_c * 4)
    base_mb = r["rss_after_imports_mb"]
    out = []
    for T in (4, 8):
        for emb_policy, shapes in (
            ("low_rank", L8B_LAYER * L8B_LAYERS + L8B_EMB),
            ("per_task", L8B_LAYER * L8B_LAYERS),
        ):
            # one tensor (one layer batch) at a time: the largest decomposed matrix sets the working set; with
            # per_task embeddings, the T dense embedding deltas of one embedding tensor being written may be
            # larger
            big = max(m * n for m, n in shapes)
            held = 0 if emb_policy == "low_rank" else T * 128256 * 4096 * 4
            out.append(
                {
                    "tasks": T,
                    "embeddings": emb_policy,
                    "decompose_hours_cpu_rate": c_time * svd_work(shapes, T) / 3600,
                    "peak_host_gb": (base_mb * 2**20 + max(k_mem * (T + 1) * big * 4, held)) / 2**30,
                }
            )
    formula = (
        f"time = c · Σ_matrices (T+1)·m·n·min(m,n), c = {c_time:.3e} s (measured: {r['decompose_s']:.2f} s "
        f"for {r['layers']} layers, T={T_meas}); this is the CPU rate of this machine: on a GPU node divide "
        f"by the measured GPU/CPU SVD speed-up.\n"
        f"memory = R0 + k·(T+1)·max(m·n)·4 B with R0 = {base_mb:.0f} MB (after imports and zoo checks) and "
        f"k = {k_mem:.2f}, measured on a calibration merge whose embeddings ({calib['vocab']}×{hidden}, "
        f"{calib['layers']} layers) dominate the working set: whole-merge peak {calib['peak_rss_mb']:.0f} MB "
        f"(decompose {calib['peak_rss_decompose_mb']:.0f} MB). max(m·n) is the largest decomposed matrix: "
        f"the 128256×4096 embeddings with embeddings=low_rank (the default), 14336×4096 with per_task, where "
        f"the T dense embedding deltas of one embedding tensor (T·128256·4096·4 B) are the larger term."
    )
    return out, formula


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8, 16])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--calib_vocab", type=int, default=32768, help="vocabulary of the memory calibration run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--_make", help=argparse.SUPPRESS)
    p.add_argument("--_merge", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._make:
        make(Path(a._make), a.hidden, a.layers[0], a.vocab, a.tasks)
        print(json.dumps({"ok": True}))
        return
    if a._merge:
        print(json.dumps(merge(Path(a._merge), a.tasks, a.device)))
        return
    rows = []
    for L in a.layers:
        with tempfile.TemporaryDirectory() as d:
            common = [
                "--layers",
                str(L),
                "--hidden",
                str(a.hidden),
                "--vocab",
                str(a.vocab),
                "--tasks",
                str(a.tasks),
            ]
            child(["--_make", d, *common])
            r = child(["--_merge", d, *common, "--device", a.device])
            rows.append({"layers": L, **r})
            print(
                f"layers {L:>3}: peak RSS {r['peak_rss_mb']:.0f} MB "
                f"(decompose {r['peak_rss_decompose_mb']:.0f} MB, "
                f"after imports {r['rss_after_imports_mb']:.0f} MB), decompose {r['decompose_s']:.1f} s, "
                f"rest {r['search_refine_write_s']:.1f} s, checkpoint {r['checkpoint_mb']:.0f} MB",
                flush=True,
            )
    peaks = [r["peak_rss_mb"] for r in rows]
    spread = (max(peaks) - min(peaks)) / min(peaks)
    with tempfile.TemporaryDirectory() as d:  # calibration: a vocabulary large enough to dominate memory
        common = [
            "--layers",
            "2",
            "--hidden",
            str(a.hidden),
            "--vocab",
            str(a.calib_vocab),
            "--tasks",
            str(a.tasks),
        ]
        child(["--_make", d, *common])
        calib = {"layers": 2, "vocab": a.calib_vocab, **child(["--_merge", d, *common, "--device", a.device])}
        print(
            f"calibration (vocab {a.calib_vocab}, 2 layers): peak RSS {calib['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    proj, formula = projection(rows, calib, a.tasks, a.hidden, a.vocab)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {
            "hidden": a.hidden,
            "vocab": a.vocab,
            "tasks": a.tasks,
            "device": a.device,
            "dtype": "bfloat16 sources",
        },
        "rows": rows,
        "peak_rss_spread": spread,
        "flat_within_10pct": spread <= 0.10,
        "calibration": calib,
        "projection_llama_3_1_8b": proj,
        "projection_formula": formula,
    }
    (out / "llama_streaming.json").write_text(json.dumps(result, indent=1))
    md = [
        (
            "| layers | checkpoint (MB) | peak RSS (MB) | peak in decompose (MB) | "
            "decompose (s) | search+refine+write (s) |"
        ),
        "|---:|---:|---:|---:|---:|---:|",
    ]
    md += [
        f"| {r['layers']} | {r['checkpoint_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
        f"{r['peak_rss_decompose_mb']:.0f} | "
        f"{r['decompose_s']:.1f} | {r['search_refine_write_s']:.1f} |"
        for r in rows
    ]
    md += [
        "",
        f"Peak RSS spread: {100 * spread:.1f} % (goal ±10 %).",
        "",
        "Llama-3.1-8B projection:",
        "",
        "| tasks | embeddings | decompose (h, this CPU's rate) | peak host (GB) |",
        "|---:|---|---:|---:|",
    ]
    md += [
        f"| {q['tasks']} | {q['embeddings']} | {q['decompose_hours_cpu_rate']:.2f} | "
        f"{q['peak_host_gb']:.1f} |"
        for q in proj
    ]
    md += ["", formula]
    (out / "llama_streaming.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
