"""Routed mixed-task throughput vs the dense single model (issue 5's benchmark).

Model: a ViT-B/32-SHAPED stack built from nn.Linear layers (12 pre-norm blocks, width 768, 12 heads, MLP 3072,
50 tokens = 49 patches + class token, scaled-dot-product attention), not open_clip itself: open_clip's attention
is nn.MultiheadAttention, whose in-projection has no routed wrapper yet (routing.py would fall back to splitting
the batch per task), so this measures the routed Linear path on the same 48 matrix shapes
(in-proj 2304×768, out-proj 768×768, fc 3072×768, proj 768×3072).
Artifact: 8 tasks, shared + expert ranks at 1.24× of |θ0| of those matrices spread uniformly (one rank unit across
the 48 matrices costs 147,456 elements; 0.24 × 84.9M / 147,456 / 9 modules ≈ rank 15 each), random factors.
Measured: forward passes per second at batch 64 on CPU for (a) the dense model, (b) routed, mixed batch of 8
tasks × 8 rows, (c) routed, one-task batch (materialised fast path, weights kept between batches).

    python benchmarks/routed_throughput.py              # the real numbers (the lead runs this)
    python benchmarks/routed_throughput.py --tiny       # smoke test: width 32, 2 blocks, batch 8
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from didi.artifact import load_artifact, write_artifact
from didi.backbones import Adapter
from didi.routing import RoutedModel

RESULTS = Path(__file__).parent / "results"


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.c_fc, self.c_proj = nn.Linear(width, mlp), nn.Linear(mlp, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, W = x.shape
        q, k, v = self.in_proj(self.ln_1(x)).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, W)
        x = x + self.out_proj(a)
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class Tower(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def make_artifact(model: nn.Module, path: Path, tasks: int, rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mats = {n: p for n, p in model.named_parameters() if p.dim() == 2}

    def pair(m, n):
        return 0.01 * torch.randn(m, rank, generator=g), 0.01 * torch.randn(rank, n, generator=g)

    shared, per_task = {}, {f"t{j}": {} for j in range(tasks)}
    for name, p in mats.items():
        shared[f"{name}::lora_A"], shared[f"{name}::lora_B"] = pair(*p.shape)
        for t in per_task:
            per_task[t][f"{name}::lora_A"], per_task[t][f"{name}::lora_B"] = pair(*p.shape)
    tensors = {n: {"shape": list(p.shape), "dtype": "float32", "matrix_shape": list(p.shape)}
               for n, p in model.named_parameters()}
    manifest = {"method": {"name": "benchmark"}, "adapter": {"name": "state_dict", "settings": {}},
                "sources": {"base": {"path": "none"}}, "tasks": list(per_task),
                "base_params": sum(p.numel() for p in mats.values()), "tensors": tensors}
    write_artifact(path, manifest, {}, shared, per_task)
    return load_artifact(path)


def rate(fn, repeats: int, warmup: int = 1) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return repeats / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="smoke test at width 32, 2 blocks, batch 8")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--ratio", type=float, default=1.24)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    width, layers, heads, mlp, tokens, batch, T = (32, 2, 2, 128, 50, 8, 8) if a.tiny else (768, 12, 12, 3072, 50, 64, 8)
    torch.manual_seed(0)
    model = Tower(width, layers, heads, mlp).eval()
    mats = [p for p in model.parameters() if p.dim() == 2]
    base = sum(p.numel() for p in mats)
    unit = sum(sum(p.shape) for p in mats)
    rank = max(1, int((a.ratio - 1) * base / unit / (T + 1)))
    with tempfile.TemporaryDirectory() as tmp:
        art = make_artifact(model, Path(tmp) / "art", T, rank)
        ratio = art.storage_ratio
        routed = RoutedModel(copy.deepcopy(model), art, adapter=Adapter())
    x = torch.randn(batch, tokens, width)
    mixed = torch.arange(batch) % T
    one = torch.zeros(batch, dtype=torch.long)
    r_dense = rate(lambda: model(x), a.repeats)
    r_mixed = rate(lambda: routed(x, task_ids=mixed), a.repeats)
    r_one = rate(lambda: routed(x, task_ids=one), a.repeats)
    res = {"model": f"ViT-B/32-shaped nn.Linear stack ({layers} blocks, width {width}, MLP {mlp}, {tokens} tokens)"
           if not a.tiny else "tiny smoke test", "tasks": T, "rank_per_module": rank, "storage_ratio": ratio,
           "batch": batch, "device": "cpu", "threads": torch.get_num_threads(), "cpu": platform.processor(),
           "torch": torch.__version__, "forward_per_s": {"dense": r_dense, "routed_mixed": r_mixed,
                                                         "routed_one_task": r_one},
           "ratio_mixed_vs_dense": r_mixed / r_dense, "ratio_one_task_vs_dense": r_one / r_dense}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "routed_throughput_tiny" if a.tiny else "routed_throughput"
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    md = (f"# Routed throughput ({res['model']})\n\n{T} tasks, rank {rank} per module (storage {ratio:.3g}×), "
          f"batch {batch}, CPU, {res['threads']} threads, torch {torch.__version__}.\n\n"
          f"| path | forward/s | × dense |\n|---|---:|---:|\n"
          f"| dense single model | {r_dense:.3g} | 1.00 |\n"
          f"| routed, mixed batch ({T} tasks) | {r_mixed:.3g} | {r_mixed / r_dense:.2f} |\n"
          f"| routed, one-task batch (fast path) | {r_one:.3g} | {r_one / r_dense:.2f} |\n")
    (out / f"{name}.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
