"""Routed mixed-task throughput vs the dense single model (issue 5's benchmark).

Model: open_clip's own `ViT-B-32` image tower (random weights, `pretrained=None`; the architecture a user
serves, with nn.MultiheadAttention and the conv patch embedding), through `OpenClipAdapter` + `RoutedModel`,
exactly as `didi evaluate` runs it. Artifact: 8 tasks; every decomposed matrix of the tower (conv1 as
768×3072, the 12 packed in-projections 2304×768, out-projections, MLPs, the final projection) gets one shared
and one expert rank per task, spread uniformly so the artifact costs the requested ratio of |θ0| (1.24×: rank
14 each). Factors are random; the time of a forward does not depend on their values.

Measured: image forward passes per second at batch 64 (224×224) for (a) the dense model, (b) routed, a mixed
batch of 8 tasks × 8 interleaved rows with experts on every matrix: open_clip uses `positional_embedding` and
`proj` as raw parameters (x + pos, x @ proj) that no layer wrapper reaches, so such a batch runs once per task
group on materialised weights, (c) the same batch in one pass, with those two tensors given shared terms only,
(d) routed, a one-task batch (materialised fast path, weights kept between batches). The three are timed in
alternating rounds so a change of machine load hits them alike; the median round counts.

    python benchmarks/routed_throughput.py                      # the numbers in BENCHMARKS.md
    python benchmarks/routed_throughput.py --device cuda        # on a GPU
    python benchmarks/routed_throughput.py --tiny               # smoke test: a 2-layer tower, batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from didi.artifact import load_artifact, write_artifact
from didi.backbones.open_clip import OpenClipAdapter
from didi.eval_image import ImageFeatures
from didi.routing import RoutedModel

RESULTS = Path(__file__).parent / "results"
RAW_PARAMS = ("visual.positional_embedding", "visual.proj")
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def make_artifact(
    adapter: OpenClipAdapter,
    base: dict,
    path: Path,
    tasks: int,
    ratio: float,
    seed: int = 0,
    shared_only: tuple[str, ...] = (),
):
    """Uniform ranks at `ratio`: (T + 1) · r · Σ(m + n) = (ratio − 1) · |θ0| over the decomposed matrices.
    Tensors in `shared_only` get their shared pair but no experts (folded once, never routed)."""
    g = torch.Generator().manual_seed(seed)
    scope = {k: v for k, v in base.items() if adapter.in_scope(k)}
    mats = {
        k: adapter.matrix_shape(k, tuple(v.shape))
        for k, v in scope.items()
        if adapter.is_decomposed(k, tuple(v.shape), v.dtype)
    }
    base_params = sum(v.numel() for v in scope.values())
    rank = max(1, int((ratio - 1) * base_params / ((tasks + 1) * sum(m + n for m, n in mats.values()))))

    def pair(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return 0.01 * torch.randn(m, rank, generator=g), 0.01 * torch.randn(rank, n, generator=g)

    shared, per_task = {}, {f"t{j}": {} for j in range(tasks)}
    for name, (m, n) in mats.items():
        shared[f"{name}::lora_A"], shared[f"{name}::lora_B"] = pair(m, n)
        for t in per_task:
            if name not in shared_only:
                per_task[t][f"{name}::lora_A"], per_task[t][f"{name}::lora_B"] = pair(m, n)
    tensors = {
        k: {"shape": list(v.shape), "dtype": "float32", "matrix_shape": list(mats[k]) if k in mats else None}
        for k, v in scope.items()
    }
    manifest = {
        "method": {"name": "benchmark"},
        "adapter": {"name": "open_clip", "settings": adapter.settings()},
        "sources": {"base": {"path": "none"}},
        "tasks": list(per_task),
        "base_params": base_params,
        "tensors": tensors,
    }
    write_artifact(path, manifest, {}, shared, per_task)
    return load_artifact(path), rank


def timed(fn, sync) -> float:
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="smoke test: 2-layer tower, batch 8")
    ap.add_argument(
        "--rounds", type=int, default=7, help="alternating rounds (one forward of each path each)"
    )
    ap.add_argument("--ratio", type=float, default=1.24)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=None, help="default 64 (8 with --tiny)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    T, batch = a.tasks, a.batch or (8 if a.tiny else 64)
    adapter = OpenClipAdapter(model_config=TINY) if a.tiny else OpenClipAdapter("ViT-B-32")
    torch.manual_seed(0)
    clip = adapter.create("cpu").eval()
    base = {k: v.detach().clone() for k, v in clip.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        art, rank = make_artifact(adapter, base, Path(tmp) / "art", T, a.ratio)
        ratio = art.storage_ratio
        routed = RoutedModel(ImageFeatures(adapter.build_model(base)), art, adapter=adapter, prefix="clip")
        art1, _ = make_artifact(adapter, base, Path(tmp) / "art1", T, a.ratio, shared_only=RAW_PARAMS)
        one_pass = RoutedModel(ImageFeatures(adapter.build_model(base)), art1, adapter=adapter, prefix="clip")
    # open_clip uses these two as raw parameters (x + pos, x @ proj), which no layer wrapper reaches: with
    # experts on them a mixed batch runs per task group (fast path per group); without, in one pass
    assert set(routed.swapped) == set(RAW_PARAMS) and not one_pass.swapped, (routed.swapped, one_pass.swapped)
    dense = ImageFeatures(clip)
    dev = torch.device(a.device)
    dense, routed, one_pass = dense.to(dev), routed.to(dev), one_pass.to(dev)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(batch, 3, size, size, device=dev)
    mixed = torch.arange(batch) % T  # interleaved: the slow (index) path, not the contiguous one
    one = torch.zeros(batch, dtype=torch.long)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    paths = {
        "dense": lambda: dense(x),
        "routed_mixed": lambda: routed(x, task_ids=mixed),
        "routed_mixed_one_pass": lambda: one_pass(x, task_ids=mixed),
        "routed_one_task": lambda: routed(x, task_ids=one),
    }
    times: dict[str, list[float]] = {k: [] for k in paths}
    with torch.inference_mode():
        for fn in paths.values():  # warm-up (and the fast path's materialisation)
            timed(fn, sync)
        torch.testing.assert_close(paths["routed_mixed"]().shape, paths["dense"]().shape)
        for _ in range(a.rounds):
            for k, fn in paths.items():
                times[k].append(timed(fn, sync))
    per_s = {k: 1.0 / statistics.median(v) for k, v in times.items()}
    name_dev = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    res = {
        "model": "open_clip ViT-B-32 image tower (random weights)"
        if not a.tiny
        else "tiny open_clip (smoke)",
        "tasks": T,
        "rank_per_module": rank,
        "storage_ratio": ratio,
        "batch": batch,
        "image_size": size,
        "device": a.device,
        "device_name": name_dev,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": a.rounds,
        "seconds_per_forward": times,
        "forward_per_s": per_s,
        "ratio_mixed_vs_dense": per_s["routed_mixed"] / per_s["dense"],
        "ratio_mixed_one_pass_vs_dense": per_s["routed_mixed_one_pass"] / per_s["dense"],
        "ratio_one_task_vs_dense": per_s["routed_one_task"] / per_s["dense"],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "routed_throughput_tiny" if a.tiny else f"routed_throughput_{a.device.split(':')[0]}"
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    md = (
        f"# Routed throughput ({res['model']})\n\n{T} tasks, rank {rank} per module (storage {ratio:.3g}×), "
        f"batch {batch} at {size}×{size}, {a.device} ({name_dev}), {res['threads']} threads, torch "
        f"{torch.__version__}, median of {a.rounds} alternating rounds.\n\n"
        f"| path | forward/s | × dense |\n|---|---:|---:|\n"
        f"| dense single model | {per_s['dense']:.3g} | 1.00 |\n"
        f"| routed, mixed batch ({T} tasks, interleaved rows), "
        f"experts on every matrix: runs per task group | "
        f"{per_s['routed_mixed']:.3g} | {res['ratio_mixed_vs_dense']:.2f} |\n"
        f"| routed, mixed batch, one pass (positional embedding and `proj` shared-only) | "
        f"{per_s['routed_mixed_one_pass']:.3g} | {res['ratio_mixed_one_pass_vs_dense']:.2f} |\n"
        f"| routed, one-task batch (fast path) | {per_s['routed_one_task']:.3g} | "
        f"{res['ratio_one_task_vs_dense']:.2f} |\n"
    )
    (out / f"{name}.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
