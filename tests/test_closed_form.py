"""The stage-1 closed form equals the materialised loss (docs/method.md §3), full and truncated SVD, fp64."""

import pytest
import torch

from didi.closed_form import hard_error, hard_mask, literal_error, soft_error, soft_mask
from didi.decompose import cross_gram64, decompose_matrix, terms_from_factors


def _case(m, n, T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, m, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("m,n,K", [(12, 9, None), (9, 12, None), (12, 9, 4), (20, 15, 6), (15, 20, 15)])
def test_closed_form_equals_materialised_loss(m, n, K):
    T = 3
    taus = _case(m, n, T, seed=m * n + (K or 0))
    f, _, _ = decompose_matrix(
        taus, lambda x: x.mean(0), max_rank=None
    )  # full factors: the literal reference
    k = min(m, n)
    Kw = K or k
    terms = terms_from_factors(f, Kw, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for beta in (0.5, 3.0, 10.0):
        r_s = torch.rand(1, generator=g, dtype=torch.float64) * Kw
        r_t = torch.rand(1, T, generator=g, dtype=torch.float64) * Kw
        closed = soft_error(terms, r_s, r_t, beta)[0]
        # literal: masks over the first Kw components only; components beyond Kw are dropped (truncated SVD)
        g_s = torch.zeros(k, dtype=torch.float64)
        g_t = torch.zeros(T, k, dtype=torch.float64)
        g_s[:Kw] = soft_mask(r_s, Kw, beta)[0]
        g_t[:, :Kw] = soft_mask(r_t, Kw, beta)[0]
        lit = literal_error(taus, f["U_s"], f["S_s"], f["V_s"], f["U_t"], f["S_t"], f["V_t"], g_s, g_t)
        rel = ((closed - lit).abs() / lit.abs().clamp_min(1e-30)).max()
        assert rel <= 1e-6, (beta, closed, lit)


def test_truncated_store_matches_full_store():
    """A store that kept only K components gives the same closed form at width ≤ K as a full one."""
    taus = _case(18, 14, 3, seed=5)
    full, _, _ = decompose_matrix(taus, lambda x: x.mean(0), max_rank=None)
    trunc, _, _ = decompose_matrix(taus, lambda x: x.mean(0), max_rank=6)
    a, b = terms_from_factors(full, 5, dtype=torch.float64), terms_from_factors(trunc, 5, dtype=torch.float64)
    r_s, r_t = torch.tensor([2.3], dtype=torch.float64), torch.tensor([[1.0, 4.2, 0.4]], dtype=torch.float64)
    torch.testing.assert_close(
        soft_error(a, r_s, r_t, 4.0), soft_error(b, r_s, r_t, 4.0), rtol=1e-9, atol=1e-9
    )


def test_hard_error_is_truncation_error():
    taus = _case(10, 8, 2, seed=3)
    f, _, _ = decompose_matrix(taus, lambda x: x.mean(0), max_rank=None)
    terms = terms_from_factors(f, 8, dtype=torch.float64)
    r_s, r_t = torch.tensor([3]), torch.tensor([[2, 5]])
    Ms = taus.mean(0)
    U, S, Vh = torch.linalg.svd(Ms)
    Ms3 = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    expect = []
    for t, r in enumerate((2, 5)):
        Ut, St, Vht = torch.linalg.svd(taus[t] - Ms)
        expect.append(((Ms3 + Ut[:, :r] @ torch.diag(St[:r]) @ Vht[:r] - taus[t]) ** 2).sum())
    torch.testing.assert_close(hard_error(terms, r_s, r_t)[0], torch.stack(expect), rtol=1e-9, atol=1e-9)
    assert hard_mask(torch.tensor([2]), 4).tolist() == [[1, 1, 0, 0]]


def test_soft_mask_keeps_integer_rank_at_large_beta():
    g = soft_mask(torch.tensor([3.0]), 6, beta=10.0)[0]
    assert (g[:3] > 0.99).all() and (g[3:] < 0.01).all()


def test_cross_gram_in_row_blocks_equals_the_whole_float64_product():
    """The search's C_t = (U_sᵀU_t) ∘ (V_sᵀV_t) needs AᵀB_t in float64; taken a few rows at a time (so that
    no float64 copy of Llama's embedding factors is held) it is the whole product up to summation order."""
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(1000, 7, generator=g), torch.randn(3, 1000, 5, generator=g)
    whole = torch.einsum("mk,tmj->tkj", A.double(), B.double())
    for chunk in (1, 64, 500, 1 << 22):  # 1 row per block … the whole matrix in one
        torch.testing.assert_close(cross_gram64(A, B, chunk=chunk), whole, rtol=1e-12, atol=1e-12)
    assert torch.equal(cross_gram64(A, B), whole)  # within one block: the same product as before
    assert cross_gram64(A[:0], B[:, :0]).shape == (3, 7, 5)
