"""The randomized truncated SVD against the full SVD on fine-tune-like spectra, and the one-sided exactness
that keeps the closed form and the greedy error formula exact for the factors it returns."""

from __future__ import annotations

import pytest
import torch

from didi.linalg import randomized_svd, svd
from didi.synthetic import spectral


@pytest.mark.parametrize("shape,decay", [((512, 256), 0.6), ((256, 768), 0.5), ((384, 384), 0.9)])
def test_top_singular_values_match_the_full_svd(shape, decay):
    g = torch.Generator().manual_seed(1)
    M = spectral(*shape, decay=decay, scale=1.0, g=g).double()
    K, keep = 96, 48  # the store keeps K; a merge uses at most about half of it (the search width margin)
    U, S, Vh = randomized_svd(M, K)
    S_full = svd(M)[1]
    rel = ((S[:keep] - S_full[:keep]).abs() / S_full[:keep]).max()
    assert rel < 1e-3, float(rel)
    assert (S <= S_full[:K] * (1 + 1e-12)).all()  # a range finder never overestimates
    assert U.shape == (shape[0], K) and Vh.shape == (K, shape[1])


def test_one_sided_exactness_makes_the_truncation_error_exact():
    """UᵀM = ΣVh, hence ‖M − U_rΣ_rVh_r‖² = ‖M‖² − Σ_{j≤r}σ_j² for every r (what the allocators use)."""
    g = torch.Generator().manual_seed(2)
    M = spectral(300, 200, decay=0.4, scale=1.0, g=g).double()
    U, S, Vh = randomized_svd(M, 40, oversample=8, power_iters=1)
    torch.testing.assert_close(U.T @ M, S[:, None] * Vh, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(U.T @ U, torch.eye(40, dtype=M.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(40, dtype=M.dtype), atol=1e-10, rtol=0)
    for r in (0, 1, 17, 40):
        err = ((M - (U[:, :r] * S[:r]) @ Vh[:r]) ** 2).sum()
        torch.testing.assert_close(err, (M**2).sum() - (S[:r] ** 2).sum(), atol=1e-9, rtol=1e-9)


def test_reproducible_and_exact_on_exactly_low_rank_matrices():
    g = torch.Generator().manual_seed(3)
    A, B = (
        torch.randn(200, 12, generator=g, dtype=torch.float64),
        torch.randn(12, 150, generator=g, dtype=torch.float64),
    )
    M = A @ B
    U, S, Vh = randomized_svd(M, 12, oversample=4, power_iters=0)
    torch.testing.assert_close((U * S) @ Vh, M, atol=1e-9, rtol=1e-9)
    U2, S2, Vh2 = randomized_svd(M, 12, oversample=4, power_iters=0)
    assert torch.equal(S, S2) and torch.equal(U, U2) and torch.equal(Vh, Vh2)
