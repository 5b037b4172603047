"""The CPU routes of `didi.linalg` (a wide matrix's SVD through its transpose, thin transposed products as
(QᵀX)ᵀ, small full SVDs side by side) against independent computations."""

from __future__ import annotations

import pytest
import torch

from didi import decompose
from didi.linalg import add_t_matmul, svd, t_matmul
from didi.merges import mean_merge


@pytest.mark.parametrize("shape", [(30, 70), (70, 30), (3, 20, 50), (40, 40)])
def test_svd_of_any_shape_is_a_thin_svd(shape):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(*shape, generator=g, dtype=torch.float64)
    k = min(shape[-2:])
    U, S, Vh = svd(M)
    assert (
        U.shape == (*shape[:-1], k)
        and S.shape == (*shape[:-2], k)
        and Vh.shape == (*shape[:-2], k, shape[-1])
    )
    eye = torch.eye(k, dtype=M.dtype).expand(*shape[:-2], k, k)
    torch.testing.assert_close(S, torch.linalg.svdvals(M), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close((U * S[..., None, :]) @ Vh, M, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(U.mT @ U, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(Vh @ Vh.mT, eye, atol=1e-12, rtol=0)
    assert (S[..., :-1] >= S[..., 1:]).all()


@pytest.mark.parametrize("cols", [1, 3, 15, 16, 40])
def test_t_matmul_is_the_transposed_product(cols):
    g = torch.Generator().manual_seed(1)
    X, Q = torch.randn(300, 50, generator=g), torch.randn(300, cols, generator=g)
    want = X.double().T @ Q.double()
    got = t_matmul(X, Q)
    assert got.shape == (50, cols)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    W = torch.ones(2, 50, cols)  # a view of a stacked buffer, as the streamed products accumulate into
    add_t_matmul(W[1], X, Q)
    torch.testing.assert_close(W[1].double(), want + 1, atol=1e-4, rtol=1e-5)
    assert (W[0] == 1).all()


def test_small_full_svds_side_by_side_equal_one_after_another(monkeypatch):
    """The T+1 full SVDs of a small module run on threads of their own; each is the same single-threaded
    call, so the factors equal those of the one-by-one path bit for bit."""
    g = torch.Generator().manual_seed(2)
    taus = torch.randn(1, 3, 40, 90, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        side = decompose.decompose_batch(taus.clone(), mean_merge, 12, svd_method="full")
        monkeypatch.setattr(decompose, "SIDE_BY_SIDE", 0)
        alone = decompose.decompose_batch(taus.clone(), mean_merge, 12, svd_method="full")
    finally:
        torch.set_num_threads(threads)
    (fa, ra_s, ra_t), (fb, rb_s, rb_t) = side[0], alone[0]
    assert (ra_s, ra_t) == (rb_s, rb_t)
    for key in fa:
        assert torch.equal(fa[key], fb[key]), key
    assert fa["U_s"].shape == (40, 12) and fa["V_t"].shape == (3, 90, 12)
