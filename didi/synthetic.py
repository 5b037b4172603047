"""Synthetic zoos with planted low-rank task vectors (demo, tests, benchmarks).

Task vectors are τ_t = S + E_t (+ noise) per matrix, with a shared part S of rank `shared_rank` and zero-mean
experts: E_t = X_t for t < T and E_T = −Σ_{t<T} X_t, each X_t of rank `expert_rank`. Under the mean merge,
M_s = S and M_t = E_t exactly, so the planted ranks are (shared_rank, expert_rank, …, (T−1)·expert_rank).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from didi.linalg import orthonormal


def lowrank(m: int, n: int, r: int, scale: float, g: torch.Generator) -> torch.Tensor:
    if r == 0:
        return torch.zeros(m, n)
    U = orthonormal(torch.randn(m, r, generator=g))
    V = orthonormal(torch.randn(n, r, generator=g))
    s = scale * torch.linspace(1.0, 0.3, r)
    return (U * s) @ V.T


def planted_task_vectors(
    m: int,
    n: int,
    T: int,
    shared_rank: int,
    expert_rank: int,
    noise: float,
    g: torch.Generator,
    scale: float = 1.0,
) -> torch.Tensor:
    S = lowrank(m, n, shared_rank, scale, g)
    X = [lowrank(m, n, expert_rank, 0.7 * scale, g) for _ in range(T - 1)]
    E = X + [-torch.stack(X).sum(0)]
    taus = torch.stack([S + e for e in E])
    if noise:
        taus = taus + noise * scale * torch.randn(taus.shape, generator=g) / (m * n) ** 0.5
    return taus


def write_zoo(root: Path, base: dict[str, torch.Tensor], taus: dict, T: int) -> tuple[Path, dict[str, Path]]:
    """base.safetensors and task_<t>.safetensors = base + τ_t; returns (base path, {task: path})."""
    save_file(base, str(root / "base.safetensors"))
    tasks = {}
    for t in range(T):
        p = root / f"task_{t}.safetensors"
        save_file({k: (v + taus[k][t]).contiguous() for k, v in base.items()}, str(p))
        tasks[f"task_{t}"] = p
    return root / "base.safetensors", tasks


def block_shapes(width: int, layers: int, mlp_ratio: int = 4) -> dict[str, tuple[int, int]]:
    """A ViT-like block list: in-projection (3w×w), out-projection, MLP up and down, per layer."""
    out = {}
    for i in range(layers):
        out[f"blocks.{i}.attn.in_proj_weight"] = (3 * width, width)
        out[f"blocks.{i}.attn.out_proj.weight"] = (width, width)
        out[f"blocks.{i}.mlp.c_fc.weight"] = (mlp_ratio * width, width)
        out[f"blocks.{i}.mlp.c_proj.weight"] = (width, mlp_ratio * width)
    return out


def make_zoo(
    root: str | Path,
    T: int = 4,
    width: int = 32,
    layers: int = 2,
    shared_rank: int = 3,
    expert_rank: int = 2,
    noise: float = 0.0,
    seed: int = 0,
    with_vectors: bool = True,
    varied_ranks: bool = True,
) -> tuple[Path, dict[str, Path]]:
    """Write base.safetensors and task_<i>.safetensors under `root`; returns (base path, {task: path}).

    With `varied_ranks`, planted ranks grow with the layer index so that a good allocation is not uniform.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    taus: dict[str, torch.Tensor] = {}
    for name, (m, n) in block_shapes(width, layers).items():
        layer = int(name.split(".")[1])
        bump = layer if varied_ranks else 0
        base[name] = torch.randn(m, n, generator=g) / n**0.5
        taus[name] = planted_task_vectors(
            m, n, T, shared_rank + bump, expert_rank + bump // 2, noise, g, scale=1.0 + 0.5 * layer
        )
    if with_vectors:
        for i in range(layers):
            for nm in (f"blocks.{i}.ln_1.weight", f"blocks.{i}.attn.in_proj_bias"):
                size = width if "ln" in nm else 3 * width
                base[nm] = torch.ones(size) if "ln" in nm else torch.zeros(size)
                taus[nm] = 0.01 * torch.randn(T, size, generator=g)
        base["frozen.weight"] = torch.randn(width, 4, generator=g)  # never fine-tuned: zero delta
        taus["frozen.weight"] = torch.zeros(T, width, 4)
    return write_zoo(root, base, taus, T)


def spectral(m: int, n: int, decay: float, scale: float, g: torch.Generator) -> torch.Tensor:
    """A full-rank matrix with singular values scale · i^(−decay):
    a fine-tune-like, not exactly low-rank, spectrum."""
    k = min(m, n)
    U = orthonormal(torch.randn(m, k, generator=g))
    V = orthonormal(torch.randn(n, k, generator=g))
    s = scale * torch.arange(1, k + 1, dtype=torch.float32) ** (-decay)
    return (U * s) @ V.T


def make_spectral_zoo(
    root: str | Path, T: int = 8, width: int = 64, layers: int = 4, mlp_ratio: int = 4, seed: int = 0
) -> tuple[Path, dict[str, Path]]:
    """A ViT-shaped zoo whose task vectors have power-law spectra that vary by layer and matrix kind.

    Later layers get larger and more task-specific task vectors (as fine-tunes of vision transformers do),
    so the best rank allocation is far from uniform. Used by the allocation and end-to-end benchmarks.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    names = list(block_shapes(width, layers, mlp_ratio).items())
    for name, (m, n) in names:
        base[name] = torch.randn(m, n, generator=g) / n**0.5
    taus: dict[str, list[torch.Tensor]] = {}
    for j, (name, (m, n)) in enumerate(names):
        depth = int(name.split(".")[1]) / max(1, layers - 1)
        kind_decay = 0.6 + 0.15 * (j % 4)  # attention in/out and MLP up/down decay differently
        shared = spectral(m, n, kind_decay, 1.0 + depth, g)
        taus[name] = [
            shared
            + spectral(
                m,
                n,
                kind_decay + 0.2 - 0.3 * depth,
                (0.5 + 1.5 * depth) * (0.6 + 0.8 * torch.rand((), generator=g).item()),
                g,
            )
            for _ in range(T)
        ]
    return write_zoo(root, base, taus, T)
