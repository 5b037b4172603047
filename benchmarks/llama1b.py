"""A Llama-3.2-1B-shaped zoo merged end to end on this machine (issue 11): seconds per stage, peak RSS, and
the reconstruction error against a full-SVD merge of the same zoo.

The zoo has Llama-3.2-1B's shapes (16 layers, hidden 2048, intermediate 8192, 32 query / 8 KV
heads, vocabulary 128256, tied embeddings: no `lm_head` tensor is stored) in bf16 safetensors shards, θ0
and 4 tasks. Its task vectors have fine-tune-like spectra: per matrix a component common to the tasks and
one per task, each of rank 48 with power-law singular values σ_i ∝ i^-0.7, plus a dense Gaussian tail
holding about a quarter of the energy; the bf16 rounding of θ0 + τ adds its own noise, as in real bf16
fine-tunes. It is written once (`--zoo DIR` keeps it between runs: about 12.4 GB).

Each merge runs in a fresh subprocess that reports its own peak RSS (`ru_maxrss`) and the seconds of the
decomposition, the search and the refinement (+ artifact); results are kept per run in DIR/rows/ so a run that
was stopped resumes at the next missing row. Rows:

- `full@B`: the reference, full SVDs at full width (`--decompose.max_rank null --decompose.svd full`); the two
  budgets share one factor store (its decomposition is timed by the first). At Llama's vocabulary it does
  not fit a 24 GB machine: a 2-layer zoo's run was stopped by the out-of-memory killer after its
  decomposition (the 128256×2048 embedding in memory, every module at full width).
- `exact@B`: full SVDs (`--decompose.svd full`) kept at the width the defaults take from the budget: the same
  singular vectors as `full@B` up to that width, so the same merge whenever no module reaches the width
  (`at_width` 0: the closed form of a rank r below it reads only σ_1..σ_r and the tail energy); it isolates
  what the randomized SVD costs, at a full SVD's time, and fits in memory.
- `auto@B`: the defaults (`max_rank` from the budget, `svd: auto`).

`--model 8b` writes a zoo of Llama-3.1-8B's own shapes instead (hidden 4096, intermediate 14336, 32 query /
8 KV heads of 128, vocabulary 128256, untied embeddings: `embed_tokens` and `lm_head`) with `--layers` decoder
layers (default 2: 1,486,901,248 parameters, about 14.9 GB), and merges it in `auto@B` rows at
`equivalent_budget(B)`, the budget that gives its matrices as much rank per unit of Σ(m + n) as the 8B's at
B (and so the 8B's width K). With
`--time_shapes` it then projects the whole 8B from that zoo's own measurements (`projection_8b_measured`):
only the layer count is extrapolated, not a rate from other shapes.

    python benchmarks/llama1b.py --zoo /tmp/llama1b            # every row, then the table
    python benchmarks/llama1b.py --zoo /tmp/llama1b --rows full@1.24 full@1.05
    python benchmarks/llama1b.py --layers 2 --vocab 8192       # a smoke test of the script (small zoo)
    python benchmarks/llama1b.py --model 8b --zoo /tmp/zoo8b --time_shapes   # about 30 min on 2 cores

Writes benchmarks/results/llama1b.json and .md (with the default shapes), else
llama1b_L{layers}_h{hidden}_v{vocab}.*; with `--model 8b`, llama8b_L{layers}.*.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import device_info, git_rev  # noqa: E402
from llama_streaming import L8B_EMB, L8B_LAYER, L8B_LAYERS  # noqa: E402

ROWS = ("full@1.24", "full@1.05", "exact@1.24", "exact@1.05", "auto@1.24", "auto@1.05")
RANK, ALPHA, TAIL = 48, 0.7, 0.25  # rank and decay of each low-rank part; energy share of the dense tail


def config(hidden: int, layers: int, vocab: int, model: str = "1b") -> dict:
    """Llama-3.2-1B's config.json, architecture fields only (width, depth and vocabulary overridable); with
    `model` "8b", Llama-3.1-8B's (hidden 4096, intermediate 14336, 32 query / 8 KV heads of 128, untied
    embeddings) at `layers` layers (`hidden` and `vocab` ignored)."""
    head = 64 if model == "1b" else 128
    if model == "8b":
        hidden, vocab = 4096, 128256
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden if model == "1b" else 14336,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // head,
        "num_key_value_heads": hidden // (4 * head),
        "head_dim": head,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0 if model == "1b" else 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": model == "1b",
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    }


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    return out if cfg["tie_word_embeddings"] else [*out, ("lm_head.weight", (v, h))]


def _low_rank(m: int, n: int, g, scale: float):
    import torch

    s = torch.arange(1, RANK + 1, dtype=torch.float32).pow(-ALPHA)
    U = torch.randn(m, RANK, generator=g) / m**0.5
    V = torch.randn(RANK, n, generator=g) / n**0.5
    return (U * (s * scale / s.norm())) @ V


def task_vector(m: int, n: int, g, common, rms: float = 1e-3):
    """One task's τ for an m×n matrix: the common part, a task part and a dense tail (Frobenius shares
    (1−TAIL)/2, (1−TAIL)/2, TAIL of ‖τ‖² = rms²·m·n)."""
    import torch

    total = rms * (m * n) ** 0.5
    low = ((1 - TAIL) / 2) ** 0.5 * total
    tail = torch.randn(m, n, generator=g) * (TAIL**0.5 * rms)
    return tail.add_(common).add_(_low_rank(m, n, g, low))


def make(root: Path, cfg: dict, T: int, shard_gb: float = 1.0) -> None:
    """θ0 and T fine-tunes, tensor by tensor (never a whole model in memory), in HF sharded layout."""
    import torch
    from safetensors.torch import save_file

    names = ["base", *[f"task{t}" for t in range(T)]]
    dirs = {k: root / k for k in names}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=1))
    shards = {k: [] for k in names}  # finished shard dicts are written at once; the open one accumulates
    open_ = {k: {} for k in names}
    size = 0
    weight_map: list[tuple[str, int]] = []

    def flush() -> None:
        nonlocal size
        for k in names:
            idx = len(shards[k])
            save_file(open_[k], str(dirs[k] / f"part-{idx:05d}.safetensors"), metadata={"format": "pt"})
            shards[k].append(list(open_[k]))
            open_[k] = {}
        size = 0

    for j, (name, shape) in enumerate(tensor_shapes(cfg)):
        g = torch.Generator().manual_seed(1000 + j)
        if len(shape) == 1:
            base = torch.ones(shape)
            taus = [0.01 * torch.randn(shape, generator=g) for _ in range(T)]
        else:
            m, n = shape
            base = torch.randn(shape, generator=g) * 0.02
            common = _low_rank(m, n, g, ((1 - TAIL) / 2) ** 0.5 * 1e-3 * (m * n) ** 0.5)
            # one task's fp32 τ at a time (the same draws in the same order as all T at once): an 8B
            # embedding's T copies would be 8.4 GB
            taus = (task_vector(m, n, g, common) for _ in range(T))
        open_["base"][name] = base.to(torch.bfloat16)
        for t, tau in enumerate(taus):
            open_[f"task{t}"][name] = (base + tau).to(torch.bfloat16)
            del tau
        taus = common = base = None
        weight_map.append((name, len(shards["base"])))
        size += 2 * int(torch.tensor(shape).prod())
        if size >= shard_gb * 2**30:
            flush()
        print(f"\rmake: {j + 1}/{len(tensor_shapes(cfg))} tensors", end="", file=sys.stderr, flush=True)
    if open_["base"]:
        flush()
    print(file=sys.stderr)
    n_shards = len(shards["base"])
    for k in names:
        for i in range(n_shards):
            src = dirs[k] / f"part-{i:05d}.safetensors"
            src.rename(dirs[k] / f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors")
        index = {
            "metadata": {"total_size": sum(2 * int(torch.tensor(s).prod()) for _, s in tensor_shapes(cfg))},
            "weight_map": {n: f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for n, i in weight_map},
        }
        (dirs[k] / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (root / "zoo_done").write_text("ok")


def equivalent_budget(zoo, budget: float) -> float:
    """The budget at which `zoo` gets as much rank per unit of Σ(m + n) as Llama-3.1-8B at `budget`:
    (b − 1)·parameters / Σ(m + n) equal for both. Why: a few-layer 8B-shaped zoo holds most of its parameters
    in its two embeddings, so the same ratio would give its matrices other ranks than the 8B's; at this budget
    `allocation.auto_width` gives the 8B's width K and the search about the 8B's ranks."""
    all8 = L8B["layer"] * L8B["layers"] + L8B["embeddings"]
    per_unit = (budget - 1.0) * L8B["params"] / sum(m + n for m, n in all8)
    return 1.0 + per_unit * sum(sum(p.matrix_shape) for p in zoo.matrices) / zoo.base_params


@contextmanager
def refine_seconds(seconds: dict[int, float]):
    """Stage 2's seconds per matrix into `seconds` (by matrix index): its job's load (`RefineJobs` called one
    index at a time) plus its refinement, from its step's start or the previous matrix's file to its own file
    (`save_file` in didi.refine). Instrumentation only: the same calls in the same order."""
    import didi.refine as R

    load, step, save = R.RefineJobs.__call__, R.LoRARefine.training_step, R.save_file
    mark = [0.0]

    def load_each(self, indices: list[int]) -> list[dict]:
        jobs = []
        for i in indices:
            t0 = time.perf_counter()
            jobs += load(self, [i])
            seconds[i] = seconds.get(i, 0.0) + time.perf_counter() - t0
        return jobs

    def step_marked(self, batch, batch_idx):
        mark[0] = time.perf_counter()
        return step(self, batch, batch_idx)

    def save_marked(tensors, path, *args, **kwargs):
        out = save(tensors, path, *args, **kwargs)
        now, i = time.perf_counter(), int(Path(path).stem)
        seconds[i] = seconds.get(i, 0.0) + now - mark[0]
        mark[0] = now
        return out

    R.RefineJobs.__call__, R.LoRARefine.training_step, R.save_file = load_each, step_marked, save_marked
    try:
        yield
    finally:
        R.RefineJobs.__call__, R.LoRARefine.training_step, R.save_file = load, step, save


def merge(root: Path, row: str, T: int, model: str = "1b") -> dict:
    """One merge (`kind@budget`) in this process; returns seconds per stage (stage 2's also per matrix),
    peak RSS and errors. On the 8B-shaped zoo the budget is the 8B's, realised at `equivalent_budget`."""
    from didi.allocation import resolve_width
    from didi.backbones import Zoo
    from didi.backbones.hf_llama import HFLlamaAdapter
    from didi.decompose import DecomposeConfig
    from didi.pipeline import MergeOptions, run_refine, run_search
    from didi.shards import factor_store
    from didi.trainer import TrainerConfig, Trainers

    kind, row_budget = row.split("@")
    zoo = Zoo(
        HFLlamaAdapter(),
        str(root / "zoo" / "base"),
        {f"task{t}": str(root / "zoo" / f"task{t}") for t in range(T)},
    )
    budget = float(row_budget) if model == "1b" else equivalent_budget(zoo, float(row_budget))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dcfg = DecomposeConfig(cache_dir=str(root / "cache"), device="cpu")
    if kind == "full":
        dcfg.max_rank, dcfg.svd = None, "full"
    elif kind == "exact":
        # the width stays `auto`; a full SVD needs the whole matrix in memory (never row-streamed)
        dcfg.svd, dcfg.stream_mb = "full", None
    opts = MergeOptions(
        budget=budget,
        decompose=dcfg,
        trainer=TrainerConfig(accelerator="cpu", logger="none", progress_bar=False),
    )
    out = root / "out" / row
    shutil.rmtree(out, ignore_errors=True)
    # the row times its decomposition: a factor store cached by an earlier row or run would be read instead
    shutil.rmtree(root / "cache", ignore_errors=True)
    shutil.rmtree(out.with_name(f".{out.name}.work"), ignore_errors=True)
    trainers = Trainers(opts.trainer)
    times = {}
    c0 = time.process_time()
    t0 = time.perf_counter()
    # the width run_search will use (max_rank auto: from the budget), decomposed here to time it alone
    store = factor_store(zoo, resolve_width(zoo, opts.decompose, budget), trainers, progress=True)
    times["decompose_s"] = time.perf_counter() - t0
    times["decompose_cpu_s"] = time.process_time() - c0
    t1 = time.perf_counter()
    ranks, store = run_search(zoo, out, opts, progress=True, trainers=trainers)  # the store: a cache lookup
    times["search_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    per_matrix: dict[int, float] = {}
    with refine_seconds(per_matrix):
        path = run_refine(zoo, out, ranks, opts, progress=True, trainers=trainers, store=store)
    times["refine_write_s"] = time.perf_counter() - t2
    times["end_to_end_s"] = time.perf_counter() - t0
    times["end_to_end_cpu_s"] = time.process_time() - c0  # this process's threads (all stages run in it)
    manifest = json.loads((path / "manifest.json").read_text())
    ref = manifest["metrics"]["refine"]
    widths = sorted({e.K for e in store.matrices})
    return {
        "row": row,
        **times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_imports_mb": rss0,
        "rec_err_svd": ref["rec_err_before"],
        "rec_err": ref["rec_err_after"],
        "store_widths": widths,
        "at_width": ranks.info.get("at_width"),
        "shares": store.shares,
        "storage_ratio": manifest.get("storage", {}).get("ratio"),
        "base_params": zoo.base_params,
        "budget": budget,
        "refine_matrix_s": {store.matrices[i].name: s for i, s in sorted(per_matrix.items())},
    }


def time_shapes(root: Path, T: int, budgets: list[float], model: str = "1b") -> dict:
    """Seconds to decompose one of each matrix shape (layer 0's seven projections, and the embeddings: those
    outside the layers, `lm_head` too where untied) with full SVDs at full width and with the defaults at each
    budget's width; the whole model's decomposition is then t(embeddings) + layers · t(layer 0), its layers
    being identical in shape. The reads are timed with it (a warm page cache: the zoo was just read). The
    8B-shaped zoo: the defaults only, at each budget's `equivalent_budget` (a full SVD of its 128256×4096
    embeddings does not fit this machine)."""
    from didi.allocation import resolve_width
    from didi.backbones import Zoo
    from didi.backbones.hf_llama import HFLlamaAdapter
    from didi.decompose import DecomposeConfig, ShareWriter, make_layout

    zoo = Zoo(
        HFLlamaAdapter(),
        str(root / "zoo" / "base"),
        {f"task{t}": str(root / "zoo" / f"task{t}") for t in range(T)},
    )
    layers = 1 + max(p.layer for p in zoo.plan if p.layer >= 0)
    pos = {
        "embedding": [i for i, p in enumerate(zoo.plan) if p.layer < 0 and p.matrix_shape is not None],
        "layer": [i for i, p in enumerate(zoo.plan) if p.layer == 0 and p.matrix_shape is not None],
    }
    variants = {"full": DecomposeConfig(max_rank=None, svd="full", device="cpu")} if model == "1b" else {}
    for b in budgets:
        zb = b if model == "1b" else equivalent_budget(zoo, b)
        variants[f"auto@{b:g}"] = resolve_width(zoo, DecomposeConfig(device="cpu"), zb)
    out = {"layers": layers}
    for name, cfg in variants.items():
        row = {"max_rank": cfg.max_rank}
        for part, positions in pos.items():
            with tempfile.TemporaryDirectory(dir=root) as d:
                make_layout(Path(d))
                w = ShareWriter(zoo, cfg, Path(d))
                t0, c0 = time.perf_counter(), time.process_time()
                for i in positions:
                    w.add(i)
                w.finish(0)
                row[f"{part}_s"] = time.perf_counter() - t0
                row[f"{part}_cpu_s"] = time.process_time() - c0  # all threads: robust to a shared machine
        row["model_s"] = row["embedding_s"] + layers * row["layer_s"]
        row["model_cpu_s"] = row["embedding_cpu_s"] + layers * row["layer_cpu_s"]
        out[name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    return out


def child(args: list[str]) -> dict:
    """Run this script in a fresh process (its own peak RSS); its last stdout line is its JSON result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"child {args} failed with exit code {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


#: Llama-3.1-8B: one decoder layer's projections, 32 layers, its two untied 128256×4096 embeddings
L8B = {"layer": L8B_LAYER, "layers": L8B_LAYERS, "embeddings": L8B_EMB, "params": 8_030_261_248}
OVERSAMPLE = 32  # DecomposeConfig.oversample, which the measured rows ran with


def width(budget: float, params: int, shapes: list[tuple[int, int]], T: int) -> int:
    """`allocation.auto_width`'s rule (per-task non-matrix costs, a few norms, neglected)."""
    even = (budget - 1.0) * params / (T * sum(m + n for m, n in shapes))
    K = 32 * max(1, math.ceil(2 * even / 32))
    return min(K, max(min(s) for s in shapes))


def projection_8b(rows: dict, cfg: dict, T: int) -> tuple[dict, str]:
    """Llama-3.1-8B (T tasks) from the measured rates of the 1B-shaped rows, by cost models: decomposition
    ∝ Σ (T+1)·m·n·l (l = K + oversample, the range finder's width), search ∝ matrices·K² (the closed-form
    terms C_t), refinement ∝ Σ m·n·K. Host memory is the measured 1B peak with its largest in-memory
    matrix's (T+1) fp32 copies scaled to the 8B's (14336×4096 vs 8192×2048), k = 4.26 copies of working set
    per copy (benchmarks/llama_streaming.py's calibration)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    lay1 = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    all1 = lay1 * cfg["num_hidden_layers"] + [(v, h)]
    all8 = L8B["layer"] * L8B["layers"] + L8B["embeddings"]
    out = {}
    for b in ("1.24", "1.05"):
        r = rows.get(f"auto@{b}")
        if not r:
            continue
        K1, K8 = r["store_widths"][-1], width(float(b), L8B["params"], all8, T)

        def mnl(shapes_, l_):
            return sum(m * n * min(l_, m, n) for m, n in shapes_)

        dec = r["decompose_s"] * mnl(all8, K8 + OVERSAMPLE) / mnl(all1, K1 + OVERSAMPLE)
        search = r["search_s"] * (len(all8) * K8**2) / (len(all1) * K1**2)
        refine = r["refine_write_s"] * mnl(all8, K8) / mnl(all1, K1)
        big1, big8 = max(m * n for m, n in lay1), max(m * n for m, n in L8B["layer"])
        mem = r["peak_rss_mb"] / 1024 + 4.26 * (T + 1) * (big8 - big1) * 4 / 2**30
        out[b] = {
            "width_K": K8,
            "decompose_h": dec / 3600,
            "search_h": search / 3600,
            "refine_h": refine / 3600,
            "total_h": (dec + search + refine) / 3600,
            "peak_host_gib": mem,
        }
    text = (
        "Llama-3.1-8B, T = 4, on this CPU (2 threads), from the measured 1B-shaped row(s): decomposition "
        "∝ Σ (T+1)·m·n·(K + oversample), search ∝ matrices·K², refinement ∝ Σ m·n·K (K from the budget for "
        "each model); host memory = the measured 1B peak + 4.26·(T+1)·4 B·(14336·4096 − 8192·2048) for the "
        "larger in-memory matrix."
    )
    md = (
        text + "\n\n| budget | K | decompose (h) | search (h) | refine (h) | total (h) | peak host (GiB) |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )
    for b, q in out.items():
        md += (
            f"| {b}× | {q['width_K']} | {q['decompose_h']:.2f} | {q['search_h']:.2f} | "
            f"{q['refine_h']:.2f} | {q['total_h']:.2f} | {q['peak_host_gib']:.1f} |\n"
        )
    return out, md


def projection_8b_measured(rows: dict, shapes: dict | None, layers: int) -> tuple[dict, str]:
    """Llama-3.1-8B from the rows of a `layers`-layer zoo of its own shapes: each matrix's cost is measured
    at the 8B's shapes and width, so only the layer count is scaled. Decomposition = t(embeddings) +
    32·t(layer 0) (`time_shapes`) + the rest of the row's decomposition (the stage's set-up, the
    checkpoints' fingerprints, the non-matrix tensors) × parameters; refinement = the embeddings' seconds +
    32 × a layer's mean (`refine_seconds`) + the rest of stage 2 (its set-up and the artifact) × parameters;
    search × matrices (its terms are per matrix at one width); host memory = the measured peak (the largest
    in-memory matrix and the streamed embeddings are the 8B's own; the peak does not grow with the layer
    count, benchmarks/llama_streaming.py)."""
    out = {}
    L8 = L8B["layers"]
    for name, r in rows.items():
        sh = (shapes or {}).get(name)
        if not sh or "refine_matrix_s" not in r:
            continue
        per = r["refine_matrix_s"]
        in_layers = {k: v for k, v in per.items() if k.startswith("model.layers.")}
        emb = sum(per.values()) - sum(in_layers.values())
        layer = sum(in_layers.values()) / layers
        rest = r["refine_write_s"] - sum(per.values())
        scale = L8B["params"] / r["base_params"]
        dec_rest = r["decompose_s"] - (sh["embedding_s"] + layers * sh["layer_s"])
        dec = sh["embedding_s"] + L8 * sh["layer_s"] + max(dec_rest, 0.0) * scale
        search = r["search_s"] * (len(L8B["embeddings"]) + L8 * len(L8B["layer"])) / len(per)
        refine = emb + L8 * layer + rest * scale
        out[name] = {
            "width_K": r["store_widths"][-1],
            "zoo_budget": r["budget"],
            "embeddings_decompose_s": sh["embedding_s"],
            "layer_decompose_s": sh["layer_s"],
            "embeddings_refine_s": emb,
            "layer_refine_s": layer,
            "decompose_rest_s": dec_rest,
            "refine_rest_s": rest,
            "decompose_h": dec / 3600,
            "search_h": search / 3600,
            "refine_h": refine / 3600,
            "total_h": (dec + search + refine) / 3600,
            "peak_host_gib": r["peak_rss_mb"] / 1024,
        }
    text = (
        f"Llama-3.1-8B, T = 4, on this CPU (2 threads), measured per shape on this {layers}-layer zoo of its "
        "shapes at its width K (the zoo's budget gives the 8B's rank per unit of Σ(m + n) at the row's): "
        "decomposition = embeddings + 32 × layer 0 (timed alone) + the rest of the row's decomposition × "
        "parameters, refinement = embeddings + 32 × a layer's mean (timed per matrix) + the rest of stage 2 "
        "× parameters, search × matrices; host memory = the measured peak."
    )
    md = (
        text + "\n\n| budget | zoo's budget | K | decompose: embeddings, a layer (s) | "
        "refine: embeddings, a layer (s) | decompose (h) | search (h) | refine (h) | total (h) | "
        "peak host (GiB) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    for name, q in out.items():
        md += (
            f"| {name.split('@')[1]}× | {q['zoo_budget']:.4f}× | {q['width_K']} | "
            f"{q['embeddings_decompose_s']:.1f}, {q['layer_decompose_s']:.1f} | "
            f"{q['embeddings_refine_s']:.1f}, {q['layer_refine_s']:.1f} | {q['decompose_h']:.2f} | "
            f"{q['search_h']:.2f} | {q['refine_h']:.2f} | {q['total_h']:.2f} | {q['peak_host_gib']:.1f} |\n"
        )
    return out, md


def table(rows: dict[str, dict], info: dict, shapes: dict | None) -> tuple[dict, str]:
    """The summary (speed-ups and error ratios against the full-SVD rows) and its markdown."""
    summary = {}
    for b in ("1.24", "1.05"):
        auto = rows.get(f"auto@{b}")
        for ref in ("full", "exact"):
            r = rows.get(f"{ref}@{b}")
            if not (r and auto):
                continue
            # the full-width store is shared by both budgets: its decomposition time is the first row's
            shared = [rows[x]["decompose_s"] for x in rows if x.startswith("full@")]
            dec = max(shared) if ref == "full" else r["decompose_s"]
            summary.setdefault(b, {})[ref] = {
                "decompose_speedup": dec / auto["decompose_s"],
                "rec_err_ratio": auto["rec_err"] / r["rec_err"],
                "reference_at_width": r.get("at_width"),
            }
    md = [
        f"Device: {info['device']}; zoo: {info['zoo']}; commit {info['commit']}.",
        "",
        "| row | decompose (s) | search (s) | refine + write (s) | end to end (s) | peak RSS (MB) | "
        "store widths K | rec. error (SVD init) | rec. error |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, r in rows.items():
        widths = r["store_widths"]
        w = f"{widths[0]}–{widths[-1]}" if len(widths) > 1 else str(widths[0])
        md.append(
            f"| {name} | {r['decompose_s']:.1f} | {r['search_s']:.1f} | {r['refine_write_s']:.1f} | "
            f"{r['end_to_end_s']:.1f} | {r['peak_rss_mb']:.0f} | {w} | {r['rec_err_svd']:.5f} | "
            f"{r['rec_err']:.5f} |"
        )
    if summary:
        md += [
            "",
            "| budget | reference | decomposition speed-up (reference ÷ auto) | "
            "rec. error auto ÷ reference | modules at the reference's width |",
            "|---|---|---:|---:|---:|",
        ]
        md += [
            f"| {b}× | {ref}@{b} | {s['decompose_speedup']:.1f}× | {s['rec_err_ratio']:.4f} | "
            f"{s['reference_at_width']} |"
            for b, refs in summary.items()
            for ref, s in refs.items()
        ]
    if shapes:
        full = shapes.get("full")
        md += [
            "",
            "Decomposition per shape (one of each: the embeddings, and layer 0's seven projections; the "
            f"zoo's = embeddings + {shapes['layers']} × layer):",
            "",
            "| SVD | width K | embeddings (s) | one layer (s) | zoo (s) | speed-up vs full |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, r in shapes.items():
            if name == "layers":
                continue
            k = "all" if r["max_rank"] is None else r["max_rank"]
            speedup = f"{full['model_s'] / r['model_s']:.1f}×" if full else "–"
            md.append(
                f"| {name} | {k} | {r['embedding_s']:.1f} | {r['layer_s']:.1f} | {r['model_s']:.1f} | "
                f"{speedup} |"
            )
            if full:
                summary.setdefault("shapes_speedup", {})[name] = full["model_s"] / r["model_s"]
    return summary, "\n".join(md) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--zoo", help="where the zoo, factor stores and outputs live (kept); default: a temp dir")
    p.add_argument(
        "--model",
        choices=("1b", "8b"),
        default="1b",
        help="1b: Llama-3.2-1B's shapes (default); 8b: Llama-3.1-8B's, at --layers layers (default 2), for a "
        "projection of the whole 8B measured at its own shapes (rows auto@B only)",
    )
    p.add_argument("--rows", nargs="+", help=f"rows to run (default: {' '.join(ROWS)}; 8b: auto@1.24)")
    p.add_argument("--layers", type=int, help="decoder layers (default: 16; 8b: 2)")
    p.add_argument("--hidden", type=int, default=2048, help="1b only")
    p.add_argument("--vocab", type=int, default=128256, help="1b only")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument(
        "--time_shapes",
        action="store_true",
        help="time the decomposition of one of each shape, full SVD vs the defaults at 1.24 and 1.05 "
        "(8b: the defaults at 1.24; its projection needs them)",
    )
    p.add_argument("--_make", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_shapes", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_merge", help=argparse.SUPPRESS)
    a = p.parse_args()
    eight = a.model == "8b"
    a.layers = a.layers or (2 if eight else 16)
    a.rows = a.rows or (["auto@1.24"] if eight else list(ROWS))
    if eight and any(not r.startswith("auto@") for r in a.rows):
        p.error(
            f"--rows: the 8b zoo runs auto@B rows only (a full SVD of its embeddings does not fit here), "
            f"got {' '.join(a.rows)}"
        )
    if eight:
        a.hidden, a.vocab = 4096, 128256
    small = not eight and (a.layers, a.hidden, a.vocab) != (16, 2048, 128256)
    cfg = config(a.hidden, a.layers, a.vocab, a.model)
    tmp = None
    top = Path(a.zoo) if a.zoo else Path(tmp := tempfile.mkdtemp(prefix="llama1b-"))
    stem = f"llama1b_L{a.layers}_h{a.hidden}_v{a.vocab}" if small else "llama1b"
    stem = f"llama8b_L{a.layers}" if eight else stem
    root = top / stem  # one folder per zoo shape: its zoo, rows, factor stores and outputs
    root.mkdir(parents=True, exist_ok=True)
    try:
        if a._make:
            make(root / "zoo", cfg, a.tasks)
            print(json.dumps({"ok": True}))
            return
        if a._merge:
            print(json.dumps(merge(root, a._merge, a.tasks, a.model)))
            return
        if a._shapes:
            print(json.dumps(time_shapes(root, a.tasks, [1.24] if eight else [1.24, 1.05], a.model)))
            return
        shape_args = ["--zoo", str(top), "--layers", str(a.layers), "--hidden", str(a.hidden)]
        shape_args += ["--vocab", str(a.vocab), "--tasks", str(a.tasks), "--model", a.model]
        if not (root / "zoo" / "zoo_done").exists():
            t0 = time.perf_counter()
            child([*shape_args, "--_make"])
            print(f"zoo written in {time.perf_counter() - t0:.0f} s", flush=True)
        (root / "rows").mkdir(exist_ok=True)
        if a.time_shapes and not (root / "rows" / "shapes.json").exists():
            (root / "rows" / "shapes.json").write_text(
                json.dumps(child([*shape_args, "--_shapes"]), indent=1)
            )
        for row in a.rows:
            f = root / "rows" / f"{row}.json"
            if f.exists():
                continue
            r = child([*shape_args, "--_merge", row])
            f.write_text(json.dumps(r, indent=1))
            print(json.dumps(r), flush=True)
        names = [*ROWS, *(r for r in a.rows if r not in ROWS)]
        rows = {r: json.loads(f.read_text()) for r in names if (f := root / "rows" / f"{r}.json").exists()}
        shapes = json.loads(f.read_text()) if (f := root / "rows" / "shapes.json").exists() else None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    info = {
        "device": device_info(),
        "commit": git_rev(),
        "zoo": f"{a.layers} layers, hidden {a.hidden}, vocabulary {a.vocab}, {a.tasks} tasks, bf16, "
        f"{'untied' if eight else 'tied'} embeddings, {rows[next(iter(rows))]['base_params']:,} parameters",
    }
    summary, md = table(rows, info, shapes)
    if eight or not small:
        proj, text = (
            projection_8b_measured(rows, shapes, a.layers) if eight else projection_8b(rows, cfg, a.tasks)
        )
        summary["projection_llama_3_1_8b"] = proj
        md += "\n" + text
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"info": info, "rows": rows, "summary": summary, "shapes": shapes}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
