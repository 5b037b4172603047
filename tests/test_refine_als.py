"""`refine_als` decides its block updates without residuals (`linalg.explained`, the targets used through
their products): the same decisions and factors as a literal block-coordinate descent that forms every
target and compares materialised errors (docs/method.md §6.1)."""

from __future__ import annotations

import pytest
import torch

from didi.linalg import explained
from didi.refine import init_factors, refine_als


def test_explained_is_the_error_drop_of_dense_factors():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 20, generator=g, dtype=torch.float64)
    A, B = (
        torch.randn(30, 4, generator=g, dtype=torch.float64),
        torch.randn(4, 20, generator=g, dtype=torch.float64),
    )
    dense = (X**2).sum() - ((X - A @ B) ** 2).sum()
    torch.testing.assert_close(explained(X @ B.T, A, B), dense, rtol=1e-12, atol=1e-12)
    Q = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=torch.float64))[0]
    torch.testing.assert_close(explained(X @ (Q.T @ X).T, Q, Q.T @ X), ((Q.T @ X) ** 2).sum())
    assert float(explained(None, A, B)) == 0.0  # B zero: nothing explained


def _literal_als(taus, A_s, B_s, A_t, B_t, sweeps, iters):
    """Block-coordinate descent written out: every target formed, every error materialised."""
    T = taus.shape[0]

    def best(X, A, B):
        Q = torch.linalg.qr(X @ B.T if bool(B.abs().sum() > 0) else A)[0]
        for _ in range(iters):
            Q = torch.linalg.qr(X @ (X.T @ Q))[0]
        return Q, Q.T @ X

    def total(As, Bs):
        return sum(float(((taus[t] - As @ Bs - A_t[t] @ B_t[t]) ** 2).sum()) for t in range(T))

    for _ in range(sweeps):
        for t in range(T):
            if not A_t[t].shape[1]:
                continue
            X = taus[t] - A_s @ B_s
            A, B = best(X, A_t[t], B_t[t])
            if ((X - A @ B) ** 2).sum() < ((X - A_t[t] @ B_t[t]) ** 2).sum():
                A_t[t], B_t[t] = A, B
        if A_s.shape[1]:
            R = torch.stack([taus[t] - A_t[t] @ B_t[t] for t in range(T)]).mean(0)
            A, B = best(R, A_s, B_s)
            if total(A, B) < total(A_s, B_s):
                A_s, B_s = A, B
    return A_s, B_s, A_t, B_t


@pytest.mark.parametrize("iters", [0, 2])
@pytest.mark.parametrize("r_s,r_t", [(3, [2, 0, 4]), (0, [3, 3, 3]), (5, [1, 2, 1])])
def test_refine_als_equals_a_literal_descent(iters, r_s, r_t):
    g = torch.Generator().manual_seed(3)
    T, m, n = 3, 24, 18
    common = torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(
        4, n, generator=g, dtype=torch.float64
    )
    taus = torch.stack([common + 0.5 * torch.randn(m, n, generator=g, dtype=torch.float64) for _ in range(T)])
    Ms = taus.mean(0)
    U, S, Vh = torch.linalg.svd(torch.cat([Ms[None], taus - Ms]), full_matrices=False)
    V = Vh.transpose(-2, -1)
    A_s, B_s = init_factors(U[0], S[0], V[0], r_s)
    pairs = [init_factors(U[t + 1], S[t + 1], V[t + 1], r) for t, r in enumerate(r_t)]

    def fresh():
        return A_s.clone(), B_s.clone(), [a.clone() for a, _ in pairs], [b.clone() for _, b in pairs]

    got = refine_als(taus, *fresh(), sweeps=4, power_iters=iters)
    want = _literal_als(taus, *fresh(), sweeps=4, iters=iters)
    torch.testing.assert_close(got[0] @ got[1], want[0] @ want[1], rtol=1e-9, atol=1e-9)
    for t in range(T):
        torch.testing.assert_close(got[2][t] @ got[3][t], want[2][t] @ want[3][t], rtol=1e-9, atol=1e-9)
    start = fresh()
    before = sum(
        float(((taus[t] - start[0] @ start[1] - start[2][t] @ start[3][t]) ** 2).sum()) for t in range(T)
    )
    after = sum(float(((taus[t] - got[0] @ got[1] - got[2][t] @ got[3][t]) ** 2).sum()) for t in range(T))
    assert after < 0.999 * before
