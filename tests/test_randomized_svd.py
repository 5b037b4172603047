"""The randomized truncated SVD against the full SVD on fine-tune-like spectra, and the one-sided exactness
that keeps the closed form and the greedy error formula exact for the factors it returns."""

from __future__ import annotations

import pytest
import torch

from didi.linalg import randomized_svd, svd
from didi.synthetic import spectral


@pytest.mark.parametrize("shape,decay", [((1536, 768), 0.6), ((768, 1536), 0.5), ((1024, 1024), 0.9)])
def test_top_singular_values_match_the_full_svd(shape, decay):
    """Shapes whose min(m, n) is three times the Krylov basis (2·(96 + 32) columns), so that it samples the
    range (on a 256-wide matrix it would span all of it and be exact); measured: at most 2.3e-4."""
    g = torch.Generator().manual_seed(1)
    M = spectral(*shape, decay=decay, scale=1.0, g=g).double()
    K, keep = 96, 48  # the store keeps K; a merge uses at most about half of it (the search width margin)
    U, S, Vh = randomized_svd(M, K)
    S_full = svd(M)[1]
    rel = ((S[:keep] - S_full[:keep]).abs() / S_full[:keep]).max()
    assert rel < 5e-4, float(rel)
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


def _spectral_taus(T: int, m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shared = spectral(m, n, decay=0.7, scale=1.0, g=g)
    return torch.stack([shared + spectral(m, n, decay=0.6, scale=0.7, g=g) for _ in range(T)]).double()


def test_closed_form_is_exact_for_randomized_factors():
    """The store's terms from randomized factors give the materialised loss of those same factors."""
    from didi.closed_form import literal_error, soft_error, soft_mask
    from didi.decompose import decompose_matrix, terms_from_factors

    T, m, n, K = 3, 160, 120, 20
    taus = _spectral_taus(T, m, n, seed=4)
    f, _, _ = decompose_matrix(taus, lambda x: x.mean(0), max_rank=K, svd_method="randomized")
    terms = terms_from_factors(f, K, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for beta in (0.5, 4.0):
        r_s = torch.rand(1, generator=g, dtype=torch.float64) * K
        r_t = torch.rand(1, T, generator=g, dtype=torch.float64) * K
        closed = soft_error(terms, r_s, r_t, beta)[0]
        g_s, g_t = soft_mask(r_s, K, beta)[0], soft_mask(r_t, K, beta)[0]
        lit = literal_error(taus, f["U_s"], f["S_s"], f["V_s"], f["U_t"], f["S_t"], f["V_t"], g_s, g_t)
        torch.testing.assert_close(closed, lit, rtol=1e-9, atol=1e-12)


def test_auto_choice_goes_both_ways(monkeypatch):
    import didi.decompose as dec

    assert dec.randomized_is_cheaper(4096, 14336, 256) and not dec.randomized_is_cheaper(768, 768, 256)
    calls = []
    real = dec.randomized_svds
    monkeypatch.setattr(
        dec, "randomized_svds", lambda Ms, *a, **k: calls.extend([1] * len(Ms)) or real(Ms, *a, **k)
    )
    taus = _spectral_taus(2, 256, 192, seed=5)
    dec.decompose_matrix(taus.clone(), lambda x: x.mean(0), max_rank=8, svd_method="auto")
    assert len(calls) == 3  # 8 + 32 ≤ 192 / 4: the shared module and both experts by the range finder
    calls.clear()
    dec.decompose_matrix(taus.clone(), lambda x: x.mean(0), max_rank=64, svd_method="auto")
    assert calls == []  # 64 + 32 > 192 / 4: full SVDs
    dec.decompose_matrix(taus.clone(), lambda x: x.mean(0), max_rank=None, svd_method="randomized")
    assert calls == []  # no truncation asked for: nothing to gain


def test_merge_error_with_randomized_factors_is_within_half_a_percent(tmp_path):
    """Greedy allocation at 1.05× and 1.24× on a spectral zoo: the exact error of the randomized store's
    allocation is within 0.5 % of the full-SVD store's at the same width."""
    from didi.allocation import greedy_ranks
    from didi.backbones import Adapter, Zoo
    from didi.budget import Allocator
    from didi.decompose import DecomposeConfig, decompose
    from didi.synthetic import make_spectral_zoo

    base, tasks = make_spectral_zoo(tmp_path / "zoo", T=3, width=192, layers=2, seed=1)
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in tasks.items()})
    stores = {
        how: decompose(
            zoo,
            DecomposeConfig(max_rank=24, svd=how, cache_dir=str(tmp_path / "c"), device="cpu"),
            progress=False,
        )
        for how in ("full", "randomized")
    }
    assert stores["full"].root != stores["randomized"].root  # the method is part of the cache key
    for target in (1.05, 1.24):
        errs = {}
        for how, store in stores.items():
            r_s, r_t, _, _ = greedy_ranks(store, target, "shared")
            errs[how] = r_s, r_t
        from didi.allocation import TermsCache, rank_problem

        out = {}
        for how, store in stores.items():
            widths = [e.K for e in store.matrices]
            cache = TermsCache(store, widths)
            alloc = Allocator(
                cache.groups(list(range(len(widths))), torch.float64), rank_problem(store, widths, "shared")
            )
            out[how] = alloc.error(*errs[how])
        assert out["randomized"] <= out["full"] * 1.005, (target, out)


def test_lockstep_range_finders_equal_one_call_per_matrix():
    """`randomized_svds` runs the range finders of several matrices side by side (their QRs and small SVDs on
    threads of their own); a literal one-matrix-at-a-time range finder gives the same bits."""
    from didi.linalg import orthonormal, randomized_svds

    def literal(M, K, oversample, power_iters, seed):
        """Block Krylov written out: blocks of ⌈(K + oversample)/2⌉ columns, each orthogonalised against
        all before it (twice) and kept; the SVD of the whole basis' projection."""
        b = -(-min(K + oversample, *M.shape) // 2)
        Q = orthonormal(M @ torch.randn(M.shape[1], b, generator=torch.Generator().manual_seed(seed)))
        blocks = [Q]
        for _ in range(power_iters):
            Y = M @ orthonormal(M.T @ Q)
            for _ in range(2):
                Y = Y - torch.cat(blocks, 1) @ (torch.cat(blocks, 1).T @ Y)
            Q = orthonormal(Y)
            blocks.append(Q)
        B = torch.cat(blocks, 1)
        Ub, S, Vh = svd(B.T @ M)
        return B @ Ub[:, :K], S[:K], Vh[:K]

    g = torch.Generator().manual_seed(3)
    Ms = [torch.randn(300, 120, generator=g) * torch.logspace(0, -2, 120) for _ in range(3)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the threaded path, also on a 1-core runner
    try:
        got = randomized_svds(Ms, 16, 8, 2, seeds=[0, 1, 2])
    finally:
        torch.set_num_threads(threads)
    for M, seed, triplet in zip(Ms, range(3), got):
        for a, b in zip(triplet, literal(M, 16, 8, 2, seed)):
            assert torch.equal(a, b)


def test_krylov_basis_is_orthonormal_and_beats_subspace_iteration_at_equal_products():
    """The block Krylov range finder keeps every block of its iterations: its basis is orthonormal to
    rounding (else UᵀM = ΣVh, the one-sided exactness, would fail), and on a slowly decaying spectrum its
    σ's up to K/2 are closer to the full SVD's than subspace iteration's, whose products have more columns."""
    from didi.linalg import krylov_shape, orthonormal

    g = torch.Generator().manual_seed(6)
    M = spectral(600, 300, decay=0.5, scale=1.0, g=g).double()
    K, p, q = 48, 16, 3
    b, blocks = krylov_shape(*M.shape, K, p, q)
    assert (b, blocks) == (32, 4)
    U, S, Vh = randomized_svd(M, K, oversample=p, power_iters=q)
    torch.testing.assert_close(U.T @ U, torch.eye(K, dtype=M.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(U.T @ M, S[:, None] * Vh, rtol=0, atol=1e-12)
    # subspace iteration at width K + p: (2q + 2)·(K + p) = 512 columns of products against (3q + 2)·b = 352
    w = K + p
    Q = orthonormal(M @ torch.randn(M.shape[1], w, generator=torch.Generator().manual_seed(0), dtype=M.dtype))
    for _ in range(q):
        Q = orthonormal(M @ orthonormal(M.T @ Q))
    S_sub = svd(Q.T @ M)[1][:K]
    S_full = svd(M)[1][:K]
    err = lambda s: float(((S_full - s) / S_full)[: K // 2].abs().max())  # noqa: E731 (what a merge uses)
    assert err(S) < err(S_sub) / 2, (err(S), err(S_sub))  # measured: 8.5e-5 against 6.0e-4


def test_krylov_shape_falls_back_to_one_block_where_the_blocks_do_not_fit():
    from didi.linalg import krylov_shape

    assert krylov_shape(1000, 500, 96, 32, 3) == (64, 4)
    assert krylov_shape(1000, 256, 96, 32, 3) == (64, 4)  # the four blocks fill min(m, n) exactly
    assert krylov_shape(1000, 500, 96, 32, 0) == (128, 1)  # no iterations: one block of K + oversample
    assert krylov_shape(1000, 255, 96, 32, 3) == (128, 1)  # a fourth block would pass min(m, n)
    assert krylov_shape(1000, 200, 96, 32, 2) == (64, 3)  # three blocks for two iterations fit
    assert krylov_shape(1000, 101, 96, 32, 3) == (101, 1)  # K + oversample capped at min(m, n)
    # that subspace iteration spans the whole range: the full SVD's σ's, exact on one side
    M = spectral(300, 101, decay=0.5, scale=1.0, g=torch.Generator().manual_seed(7)).double()
    U, S, Vh = randomized_svd(M, 96, oversample=32, power_iters=3)
    torch.testing.assert_close(S, svd(M)[1][:96], rtol=1e-10, atol=0)
    torch.testing.assert_close(U.T @ M, S[:, None] * Vh, rtol=0, atol=1e-12)


def test_a_wide_forced_range_finder_keeps_its_iterations():
    """K + oversample near min(m, n) (only a forced `svd: randomized` gets there): the iterations replace the
    block instead of a basis cut to the blocks that fit, which was one iteration's worth (measured here:
    σ_1..σ_K/2 within 3.5e-2 relative that way, 1.1e-3 now)."""
    M = spectral(400, 400, decay=0.5, scale=1.0, g=torch.Generator().manual_seed(8)).double()
    K = 256
    S = randomized_svd(M, K, oversample=32, power_iters=3)[1]
    S_full = svd(M)[1][:K]
    assert float(((S_full - S) / S_full)[: K // 2].abs().max()) < 2e-3


def test_zero_sum_range_finders_equal_drawing_one_test_matrix_for_the_experts():
    """With `zero_sum` (the residuals of the mean sum to zero), the last expert's first product comes from
    the others'; the factors equal plain range finders that draw every expert's Ω from seed 1 (float64, to
    rounding)."""
    from didi.linalg import randomized_svds

    g = torch.Generator().manual_seed(4)
    taus = torch.stack([spectral(200, 90, decay=0.6, scale=1.0, g=g).double() for _ in range(4)])
    Ms = [taus.mean(0), *(taus - taus.mean(0))]
    got = randomized_svds(Ms, 20, 8, 2, seeds=range(5), zero_sum=True)
    want = randomized_svds(Ms, 20, 8, 2, seeds=[0, 1, 1, 1, 1])
    for (U, S, Vh), (U2, S2, Vh2) in zip(got, want):
        torch.testing.assert_close(S, S2, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(U * Vh[:, :1].T.sign(), U2 * Vh2[:, :1].T.sign(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("svd_method", ["full", "randomized"])
def test_cross_terms_of_the_mean_merge_equal_their_definition(svd_method):
    """a_t = diag(U_sᵀ M_t V_s) and b_t = diag(U_tᵀ M_s V_t), computed directly from the stored factors, for
    every task (the last a_t is taken from Σ_t a_t = 0 under the mean merge)."""
    from didi.decompose import decompose_matrix
    from didi.merges import mean_merge

    g = torch.Generator().manual_seed(5)
    taus = torch.stack([spectral(160, 120, decay=0.5, scale=1.0, g=g).double() for _ in range(3)])
    f, _, _ = decompose_matrix(taus.clone(), mean_merge, 24, svd_method=svd_method, oversample=8)
    Ms = taus.mean(0)
    for t in range(3):
        Mt = taus[t] - Ms
        a = ((f["U_s"] * (Mt @ f["V_s"])).sum(0)).double()
        b = ((f["U_t"][t] * (Ms @ f["V_t"][t])).sum(0)).double()
        torch.testing.assert_close(f["a"][t], a, rtol=0, atol=1e-10)
        torch.testing.assert_close(f["b"][t], b, rtol=0, atol=1e-10)
