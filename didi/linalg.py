"""SVD and QR that stay fast on CPU.

Measured here (torch 2.14 with MKL, 2-core AMD EPYC, other processes running): a batched fp32 SVD was 20–50×
and a QR 40× slower with 2 threads than with 1, because MKL's threaded LAPACK spins when cores are shared (and
DDP's processes always share them). Matrix products keep every thread; only these LAPACK calls run on one
thread on CPU. CUDA tensors are unaffected.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def one_cpu_thread(t: torch.Tensor) -> Iterator[None]:
    if t.device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh), batched over leading dimensions."""
    with one_cpu_thread(M):
        return torch.linalg.svd(M, full_matrices=False)


def orthonormal(M: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR factorisation."""
    with one_cpu_thread(M):
        return torch.linalg.qr(M)[0]


def randomized_svd(
    M: torch.Tensor, K: int, oversample: int = 32, power_iters: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-K singular triplets (U m×K, S K, Vh K×n) of one matrix by a randomized range finder
    (Halko, Martinsson, Tropp: Y = MΩ with K + oversample columns, `power_iters` re-orthonormalised power
    iterations, then the SVD of the small QᵀM), at about (2·power_iters + 2)·m·n·(K + oversample) flops
    instead of a full SVD's ~m·n·min(m, n).

    Exact on one side, as the closed form needs (docs/method.md §3.2): U = Q·Ũ with Ũ Σ Vh the SVD of QᵀM, so
    UᵀM = Σ·Vh exactly and ‖M − U_rΣ_rVh_r‖² = ‖M‖² − Σ_{j≤r} σ_j² for every r ≤ K; only how close the σ's are
    to the true ones depends on the spectrum (they are never larger). The seed makes the factors reproducible.
    Defaults: on power-law spectra σ_i ∝ i^−0.5 (slower decay than fine-tunes show), 32 extra columns and 4
    power iterations keep σ_1..σ_{K/2} within 5e-4 relative in fp32 (benchmarks/svd_crossover.py); 16 and 2
    gave 6e-3.
    """
    m, n = M.shape[-2:]
    width = min(K + oversample, m, n)
    g = torch.Generator(device=M.device).manual_seed(seed)
    omega = torch.randn(n, width, generator=g, device=M.device, dtype=M.dtype)
    Q = orthonormal(M @ omega)
    for _ in range(power_iters):
        Q = orthonormal(M @ orthonormal(M.mT @ Q))
    Ub, S, Vh = svd(Q.mT @ M)
    return (Q @ Ub[:, :K]), S[:K], Vh[:K]
