"""Row-streamed decomposition and ALS refinement of matrices too large to hold T+1 times in memory (issue 11).

`decompose_batch` and `refine_als` take every task vector of a matrix at once: (T+1)·m·n numbers, over 5 GB in
fp32 for Llama's 128256×2048 embeddings with T = 4 (twice that at 4096). Yet both touch the matrices only
through products with thin matrices (w = K + oversample columns, or a rank): M·Z and Q_rowsᵀ·M_rows are a
stack and a sum over row blocks of M. So the functions here read the checkpoints a row block at a time
(`Zoo.read_rows`), form the task vectors, the shared part and the experts of those rows only, and accumulate
the products. Memory: O((m + n)·w·(T+1)) plus one block of the T+1 tensors. Results equal the in-memory
randomized path (docs/method.md §3.2) and `refine_als` up to the order of float summation.

The price is reads: every product with a whole matrix is one pass over its rows. `decompose_streamed`
makes 2·power_iters + 2 passes (10 at the defaults); `refine_als_streamed` 2·(2·power_iters + 3) per sweep,
plus one.

Only row-separable shared merges can be streamed (`STREAMABLE_MERGES`): a row of the mean depends on that row
of the τ's alone, whereas TIES trims by a per-tensor quantile and TSV-M takes SVDs of whole task vectors.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from didi.backbones.base import TensorPlan, Zoo
from didi.errors import DidiError
from didi.linalg import orthonormal, svd
from didi.merges import mean_merge
from didi.quantize import stored_pair

#: shared merges whose rows depend only on the same rows of the task vectors
STREAMABLE_MERGES = frozenset({"mean"})

#: the default size of one block of the T+1 (or T) row-sliced tensors: each block read opens and maps the
#: checkpoint shards again, and on Llama's 128256×2048 embedding one pass took 19 s in 64 MB blocks against
#: 9.7 s in 256 MB ones (this CPU, a shared machine); a block stays small beside such a matrix's factors
BLOCK_BYTES = 256 * 2**20

#: (start, stop) -> task-vector rows [T, stop − start, n]
RowReader = Callable[[int, int], torch.Tensor]


def block_rows(n: int, tensors: int, itemsize: int, target: int = BLOCK_BYTES) -> int:
    """Rows per block so that one block of `tensors` row-sliced tensors of n columns is about `target`
    bytes: large enough that each matmul is efficient, small enough to be negligible next to the factors."""
    return max(1, target // max(1, tensors * n * itemsize))


def row_slices(m: int, row_block: int) -> Iterator[slice]:
    """The row blocks [start, stop) covering m rows in order (the order the hashes need)."""
    if row_block < 1:
        raise DidiError(f"row_block: expected a positive number of rows per block, found {row_block}")
    for start in range(0, m, row_block):
        yield slice(start, min(m, start + row_block))


def gram64(X: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """G_ij = ⟨X_i, X_j⟩ of the J matrices X [J, ...], accumulated in float64 a chunk of columns at a time.

    Why float64: the closed form subtracts these norms from one another (c_t, docs/method.md §3.2), which
    needs more than fp32's 7 digits. Why a Gram matrix: every module is converted to float64 once for all
    its inner products (pairwise dots converted each operand again, and the conversions dominated the pass);
    the chunks keep the float64 copy small.
    """
    flat = X.reshape(X.shape[0], -1)
    G = torch.zeros(X.shape[0], X.shape[0], dtype=torch.float64, device=X.device)
    for s in range(0, flat.shape[1], chunk):
        d = flat[:, s : s + chunk].double()
        G += d @ d.T
    return G


class PhaseTimer:
    """Seconds spent per phase of the streamed passes (reads, conversion, hashing, norms, matmuls, QR), summed
    while `on` (benchmarks/streamed_embedding.py); off, a phase costs one attribute test."""

    def __init__(self) -> None:
        self.on = False
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.on:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


#: the module's one timer (the benchmark switches it on)
PHASES = PhaseTimer()


# ------------------------------------------------------------------------------------------- decomposition
class _ModuleRows:
    """Row blocks of the T+1 modules of one matrix read from the checkpoints, as [T+1, rows, n]: module 0 is
    the shared part (mean of the τ's), 1..T the experts M_t = τ_t − M_s.

    The first pass (`first=True`) also hashes every source's rows and accumulates the float64 norms, so that
    no pass is spent on them alone.
    """

    def __init__(
        self, zoo: Zoo, plan: TensorPlan, dtype: torch.dtype, device: torch.device, row_block: int
    ) -> None:
        self.zoo, self.name, self.dtype, self.device = zoo, plan.name, dtype, device
        self.m, self.n = _row_separable_shape(plan)
        self.T = len(zoo.task_names)
        self.row_block = row_block
        prefix = f"{dtype}|{tuple(plan.shape)}|".encode()  # as didi.sources.tensor_sha256 of the whole
        self.hashes = [hashlib.sha256(prefix) for _ in range(self.T + 1)]
        f64 = dict(dtype=torch.float64, device=device)
        self.ms_sq = torch.zeros((), **f64)
        self.mt_sq, self.inner, self.tau_sq = (torch.zeros(self.T, **f64) for _ in range(3))

    def blocks(self, first: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
        T, n = self.T, self.n
        for sl in row_slices(self.m, self.row_block):
            with PHASES("read"):
                base, tasks = self.zoo.read_rows(self.name, sl.start, sl.stop, self.dtype)
            if first:
                with PHASES("hash"):
                    for h, t in zip(self.hashes, [base, *tasks]):
                        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
            rows = sl.stop - sl.start
            # τ_t written straight into the experts' slots, then M_s = mean and M_t = τ_t − M_s in place:
            # one block buffer, the same operations as decompose_batch does on the whole matrix
            with PHASES("modules"):
                X = torch.empty(T + 1, rows, n, dtype=self.dtype, device=self.device)
                b = base.to(self.device).reshape(rows, n)
                for t, x in enumerate(tasks):
                    torch.sub(x.to(self.device).reshape(rows, n), b, out=X[1 + t])
                del base, tasks, b
                X[0] = mean_merge(X[1:])
            if first:
                with PHASES("gram64"):
                    self.tau_sq += gram64(X[1:]).diagonal()
            with PHASES("modules"):
                X[1:] -= X[0]
            if first:
                with PHASES("gram64"):
                    G = gram64(X)
                    self.ms_sq += G[0, 0]
                    self.mt_sq += G.diagonal()[1:]
                    self.inner += G[0, 1:]
            yield sl, X

    def sha256(self) -> dict[str, str]:
        return {label: h.hexdigest() for label, h in zip(["base", *self.zoo.task_names], self.hashes)}


def _row_separable_shape(plan: TensorPlan) -> tuple[int, int]:
    """(m, n) of a decomposed tensor whose matrix rows are its dim-0 slices (the adapters' reshape rule
    (out, in, kh, kw) → (out, in·kh·kw)); a rule that permutes dimensions cannot be read by rows."""
    if plan.matrix_shape is None:
        raise DidiError(f"tensor '{plan.name}' is not a decomposed matrix; nothing to stream")
    m, n = plan.matrix_shape
    if not plan.shape or plan.shape[0] != m or math.prod(plan.shape[1:]) != n:
        raise DidiError(
            f"tensor '{plan.name}': its matrix shape {[m, n]} is not its shape {list(plan.shape)} read by "
            f"rows along dim 0, so it cannot be streamed"
        )
    return m, n


def _sketch(rows: _ModuleRows, Z: torch.Tensor, first: bool = False) -> torch.Tensor:
    """Y_i = M_i·Z_i for every module, [T+1, m, w], one pass."""
    Y = Z.new_empty(Z.shape[0], rows.m, Z.shape[-1])
    for sl, X in rows.blocks(first):
        with PHASES("matmul"):
            Y[:, sl] = X @ Z
    return Y


def _co_sketch(rows: _ModuleRows, Q: torch.Tensor) -> torch.Tensor:
    """Z_i = M_iᵀ·Q_i for every module, [T+1, n, w], summed over the row blocks in one pass."""
    Z = Q.new_zeros(Q.shape[0], rows.n, Q.shape[-1])
    for sl, X in rows.blocks():
        with PHASES("matmul"):
            Z.baddbmm_(X.mT, Q[:, sl])
    return Z


def _orthonormal_each(Y: torch.Tensor) -> torch.Tensor:
    """Q of each module's QR, in place: one module's workspace at a time, not the batch's."""
    with PHASES("qr"):
        for i in range(Y.shape[0]):
            Y[i] = orthonormal(Y[i])
    return Y


def _projections(rows: _ModuleRows, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass for Q_iᵀM_i [T+1, w, n] (whose SVD gives the factors) and the cross projections Q_sᵀM_t and
    Q_tᵀM_s [T, w, n]: a_t = diag(U_sᵀM_tV_s) and b_t = diag(U_tᵀM_sV_t) follow from them once V is known,
    without another pass over the matrix."""
    T, w = rows.T, Q.shape[-1]
    P = Q.new_zeros(T + 1, w, rows.n)
    Ps, Pt = Q.new_zeros(T, w, rows.n), Q.new_zeros(T, w, rows.n)
    for sl, X in rows.blocks():
        with PHASES("matmul"):
            q = Q[:, sl]
            P.baddbmm_(q.mT, X)
            Ps += q[0].mT @ X[1:]
            Pt.baddbmm_(q[1:].mT, X[0].expand(T, *X[0].shape))
    return P, Ps, Pt


def decompose_streamed(
    zoo: Zoo,
    plan: TensorPlan,
    K: int,
    oversample: int = 32,
    power_iters: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    row_block: int | None = None,
    rtol: float | None = None,
) -> tuple[dict[str, torch.Tensor], int, list[int], dict[str, str]]:
    """`decompose_batch(taus[None], mean, K, svd_method="randomized", ...)[0]` of one matrix, never holding an
    m×n matrix: returns (factors, bound_s, bound_t, sha256) with the same factor dict (U_s, S_s, V_s, U_t,
    S_t, V_t, a, b, ms_sq, mt_sq, inner, tau_sq; contiguous CPU tensors, S and the inner products float64)
    and sha256 = {"base": hex, task: hex}, each equal to `didi.sources.tensor_sha256` of the whole tensor read
    in `dtype` (what the manifest records).

    Why: the T+1 modules of Llama's embeddings do not fit in host memory (module docstring). Each pass reads
    every row block of θ0 and the T tasks once and updates all T+1 range finders together: Y = MΩ row by row,
    MᵀQ summed over the blocks, each power iteration re-orthonormalised on both sides, then the SVD of QᵀM, as
    `linalg.randomized_svd` does, with the same Ω per module (a generator seeded with the module index,
    0 = shared, 1..T = experts), so the factors match the in-memory path up to float summation order. The
    squared norms (float64) and the hashes come from the first pass; a and b from the projection pass.

    Only the `mean` shared merge is row-separable; the caller decides when to stream. Memory is
    O((m + n)·(K + oversample)·(T+1)) (the projections hold (3T+1)·(K + oversample)·n) plus one row block
    (`row_block` rows; default: about 256 MB for the T+1 tensors). With K + oversample ≥ min(m, n) the range
    finder spans the whole range (a full SVD up to rounding) and the saving is gone: stream only K ≪ min(m,n).
    NaN/Inf in any block is a DidiError naming the source and tensor (`Zoo.read_rows`). A tensor whose task
    vectors are all zero comes back with tau_sq all 0 (the caller may treat it as a zero delta).
    """
    m, n = _row_separable_shape(plan)
    T = len(zoo.task_names)
    if K < 1:
        raise DidiError(f"tensor '{plan.name}': K={K}; a decomposition keeps at least one component")
    K = min(K, m, n)
    w = min(K + oversample, m, n)
    device = torch.device(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = _ModuleRows(zoo, plan, dtype, device, row_block or block_rows(n, T + 1, itemsize))
    omega = torch.stack([_omega(n, w, i, dtype, device) for i in range(T + 1)])
    Q = _orthonormal_each(_sketch(rows, omega, first=True))
    del omega
    for _ in range(power_iters):
        Z = _orthonormal_each(_co_sketch(rows, Q))
        del Q
        Q = _orthonormal_each(_sketch(rows, Z))
        del Z
    P, Ps, Pt = _projections(rows, Q)
    with PHASES("svd"):
        U, S, V, Ub = _factor(Q, P, K)
    del Q, P
    f64 = torch.float64
    a = torch.stack([(Ub[0].to(f64) * (Ps[t].to(f64) @ V[0].to(f64))).sum(0) for t in range(T)])
    b = torch.stack([(Ub[1 + t].to(f64) * (Pt[t].to(f64) @ V[1 + t].to(f64))).sum(0) for t in range(T)])
    tol = (rtol if rtol is not None else max(m, n) * torch.finfo(dtype).eps) * float(S[:, 0].max())
    factors = {
        "U_s": U[0],
        "S_s": S[0].to(f64),
        "V_s": V[0],
        "U_t": U[1:],
        "S_t": S[1:].to(f64),
        "V_t": V[1:],
        "a": a,
        "b": b,
        "ms_sq": rows.ms_sq,
        "mt_sq": rows.mt_sq,
        "inner": rows.inner,
        "tau_sq": rows.tau_sq,
    }
    factors = {k: v.detach().contiguous().cpu() for k, v in factors.items()}
    return factors, int((S[0] > tol).sum()), [int((S[1 + t] > tol).sum()) for t in range(T)], rows.sha256()


def _omega(n: int, w: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The Gaussian test matrix of module `seed`, drawn exactly as `linalg.randomized_svd` draws it."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, w, generator=g, device=device, dtype=dtype)


def _factor(
    Q: torch.Tensor, P: torch.Tensor, K: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """U = Q·Ũ [T+1, m, K], σ [T+1, K], V [T+1, n, K] and Ũ [T+1, w, K] from the SVDs Ũ Σ Vᵀ of QᵀM."""
    U, S, V, Ub = [], [], [], []
    for i in range(Q.shape[0]):
        ub, s, vh = svd(P[i])
        Ub.append(ub[:, :K])
        U.append(Q[i] @ ub[:, :K])
        S.append(s[:K])
        V.append(vh[:K].T)
    return torch.stack(U), torch.stack(S), torch.stack(V), torch.stack(Ub)


# ------------------------------------------------------------------------------------------------- refine
class _TaskRows:
    """Row blocks of the task vectors [T, rows, n] from a reader, on the factors' device and dtype."""

    def __init__(
        self, read_rows: RowReader, m: int, n: int, T: int, row_block: int, like: torch.Tensor
    ) -> None:
        self.read_rows, self.m, self.n, self.T, self.row_block = read_rows, m, n, T, row_block
        self.dtype, self.device = like.dtype, like.device

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for sl in row_slices(self.m, self.row_block):
            with PHASES("read"):
                tau = self.read_rows(sl.start, sl.stop)
                tau = tau.to(self.device, self.dtype).reshape(self.T, sl.stop - sl.start, self.n)
            yield sl, tau


#: (row slice, τ rows [T, rows, n]) -> the rows of the J matrices being fitted, [J, rows, n]
Targets = Callable[[slice, torch.Tensor], torch.Tensor]


def _residual_sq(rows: _TaskRows, residual: Targets) -> torch.Tensor:
    """‖residual‖² per leading index, [J] float64, summed over the row blocks (never expanded as
    ‖X‖² − ‖QᵀX‖², which cancels: the accept tests compare errors that differ in their last digits)."""
    total = None
    for sl, tau in rows.blocks():
        with PHASES("residual"):
            part = residual(sl, tau).square().sum((-2, -1), dtype=torch.float64)
        total = part if total is None else total + part
    return total


def _lockstep_best_rank_r(
    rows: _TaskRows, targets: Targets, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], iters: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`refine._best_rank_r` of the J matrices `targets` returns, all in lockstep so that each pass reads each
    row block once: Q = orth(X Bᵀ) (orth(A) where B is 0), `iters` times Q = orth(X (XᵀQ)), then (Q, QᵀX)."""
    J = len(A)
    Q: list[torch.Tensor | None] = [None] * J
    start = [j for j in range(J) if B[j].abs().sum() > 0]
    for j in range(J):
        if j not in start:
            with PHASES("qr"):
                Q[j] = orthonormal(A[j])
    if start:
        Y = _stream_rows(rows, targets, {j: B[j].T for j in start})
        with PHASES("qr"):
            for j in start:
                Q[j] = orthonormal(Y[j])
    for _ in range(iters):
        Z = {j: torch.zeros(rows.n, A[j].shape[1], dtype=A[j].dtype, device=A[j].device) for j in range(J)}
        for sl, tau in rows.blocks():
            with PHASES("matmul"):
                X = targets(sl, tau)
                for j in range(J):
                    Z[j] += X[j].T @ Q[j][sl]
        Y = _stream_rows(rows, targets, Z)
        with PHASES("qr"):
            Q = [orthonormal(Y[j]) for j in range(J)]
    Bn = [torch.zeros(A[j].shape[1], rows.n, dtype=A[j].dtype, device=A[j].device) for j in range(J)]
    for sl, tau in rows.blocks():
        with PHASES("matmul"):
            X = targets(sl, tau)
            for j in range(J):
                Bn[j] += Q[j][sl].T @ X[j]
    return Q, Bn


def _stream_rows(rows: _TaskRows, targets: Targets, Z: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Y_j = X_j·Z_j (m × width) for the targets j in Z, one pass."""
    Y = {j: z.new_empty(rows.m, z.shape[1]) for j, z in Z.items()}
    for sl, tau in rows.blocks():
        with PHASES("matmul"):
            X = targets(sl, tau)
            for j, z in Z.items():
                Y[j][sl] = X[j] @ z
    return Y


def refine_als_streamed(
    read_rows: RowReader,
    m: int,
    n: int,
    T: int,
    A_s: torch.Tensor,
    B_s: torch.Tensor | None,
    A_t: Sequence[torch.Tensor],
    B_t: Sequence[torch.Tensor],
    sweeps: int,
    power_iters: int,
    row_block: int | None = None,
    expert_dtype: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """`refine.refine_als` on task vectors read a row block at a time: returns (A_s, B_s, A_t, B_t,
    err_before [T], err_after [T]) with A m×r, B r×n and the errors ‖A_sB_s + A_tB_t − τ_t‖² (float64,
    summed over the blocks; `refine.task_errors`' semantics) of the initial and of the returned factors.

    Why: refining Llama's embeddings in memory needs all T task vectors at once. The block-coordinate descent
    is `refine_als`'s: with the shared factors fixed, each expert's update is the best rank-r_t fit of
    τ_t − A_sB_s by subspace iteration warm-started from its factors, kept only if it lowers that task's
    error; then the shared update is the best rank-r_s fit of mean_t(τ_t − A_tB_t), kept only if it lowers
    the total error. So the error never increases. Every product (X Bᵀ, XᵀQ, QᵀX, the errors) is accumulated
    over row blocks of τ_t = task rows − base rows (`read_rows(start, stop)` → [T, rows, n]); the T experts
    iterate in lockstep, so a pass reads each block once for all of them. The results equal `refine_als` on
    the same inputs up to float rounding (an accept test that ties to the last digit may go either way).

    Factors are low-rank only: a folded shared part (B_s None, a dense m×n M_s) is not streamed, since it is
    the very m×n matrix streaming avoids holding. Compute dtype and device are A_s's. `row_block` default:
    about 256 MB for the T task-vector rows.

    `expert_dtype` other than float32 (docs/method.md §9.2): the experts given are the stored (dequantized)
    ones; the sweeps run in float, then the experts are quantized once more and the errors recomputed in one
    more pass over the rows; if that is not below the starting error, the starting factors are returned. A
    streamed matrix is thus quantized after its ALS, not inside it as `refine.refine_als` does.
    """
    if B_s is None:
        raise DidiError(
            "refine_als_streamed: a folded shared part (B_s None, a dense m×n matrix) cannot be streamed; "
            "refine it in memory"
        )
    itemsize = A_s.element_size()
    rows = _TaskRows(read_rows, m, n, T, row_block or block_rows(n, T, itemsize), A_s)
    A_t, B_t = list(A_t), list(B_t)

    def current(sl: slice, tau: torch.Tensor) -> torch.Tensor:
        S = A_s[sl] @ B_s
        return torch.stack([S + A_t[t][sl] @ B_t[t] - tau[t] for t in range(T)])

    err = _residual_sq(rows, current)
    err_before = err.clone()
    start = (A_s, B_s, list(A_t), list(B_t))
    for _ in range(sweeps):
        A_t, B_t, err = _expert_step(rows, A_s, B_s, A_t, B_t, err, power_iters)
        if A_s.shape[1]:
            A_s, B_s, err = _shared_step(rows, A_s, B_s, A_t, B_t, err, power_iters)
    if expert_dtype != "float32":
        pairs = [stored_pair(A, B, expert_dtype) for A, B in zip(A_t, B_t)]
        A_t, B_t = [p[1] for p in pairs], [p[2] for p in pairs]
        err = _residual_sq(rows, current)
        if float(err.sum()) >= float(err_before.sum()):
            A_s, B_s, A_t, B_t = start
            err = err_before.clone()
    return A_s, B_s, A_t, B_t, err_before, err


def _expert_step(
    rows: _TaskRows, A_s, B_s, A_t: list, B_t: list, err: torch.Tensor, iters: int
) -> tuple[list, list, torch.Tensor]:
    """Every expert of rank > 0 refitted to X_t = τ_t − A_sB_s together; each kept if its error drops."""
    active = [t for t in range(rows.T) if A_t[t].shape[1]]
    if not active:
        return A_t, B_t, err

    def targets(sl: slice, tau: torch.Tensor) -> torch.Tensor:
        return tau[active] - A_s[sl] @ B_s

    Q, Bn = _lockstep_best_rank_r(rows, targets, [A_t[t] for t in active], [B_t[t] for t in active], iters)
    e = _residual_sq(
        rows, lambda sl, tau: targets(sl, tau) - torch.stack([Q[j][sl] @ Bn[j] for j in range(len(active))])
    )
    A_t, B_t, err = list(A_t), list(B_t), err.clone()
    for j, t in enumerate(active):
        if e[j] < err[t]:
            A_t[t], B_t[t], err[t] = Q[j], Bn[j], e[j]
    return A_t, B_t, err


def _shared_step(
    rows: _TaskRows, A_s, B_s, A_t: list, B_t: list, err: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared factors refitted to mean_t(τ_t − A_tB_t); kept if the total error drops."""

    def residuals(sl: slice, tau: torch.Tensor) -> torch.Tensor:
        return torch.stack([tau[t] - A_t[t][sl] @ B_t[t] for t in range(rows.T)])

    (Q,), (Bn,) = _lockstep_best_rank_r(
        rows, lambda sl, tau: residuals(sl, tau).mean(0)[None], [A_s], [B_s], iters
    )
    new = _residual_sq(rows, lambda sl, tau: residuals(sl, tau) - (Q[sl] @ Bn)[None])
    if new.sum() < err.sum():
        return Q, Bn, new
    return A_s, B_s, err
