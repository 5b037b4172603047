"""SVD and QR that stay fast on CPU.

Measured here (torch 2.14 with MKL, 2-core AMD EPYC, other processes running): a batched fp32 SVD was 20–50×
and a QR 40× slower with 2 threads than with 1, because MKL's threaded LAPACK spins when cores are shared (and
DDP's processes always share them). Matrix products keep every thread; only these LAPACK calls run on one
thread on CPU. CUDA tensors are unaffected.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

import torch

_X = TypeVar("_X")
_Y = TypeVar("_Y")


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
    """Thin SVD (U, S, Vh), batched over leading dimensions.

    On the CPU a wide matrix (fewer rows than columns) is decomposed as its transpose, M = (Mᵀ)ᵀ = V Σ Uᵀ:
    torch's LAPACK path took 1.7–3.1× longer for a wide matrix than for its transpose (one thread, this
    project's CPU: 512×2048 0.19 → 0.095 s, 1024×4096 1.69 → 0.66 s, 448×8192 0.65 → 0.21 s;
    benchmarks/cpu_kernels.py). The randomized SVD's last step (BᵀM) and Llama's k/v projections are wide."""
    with one_cpu_thread(M):
        if M.device.type == "cpu" and M.shape[-2] < M.shape[-1]:
            U, S, Vh = torch.linalg.svd(M.mT, full_matrices=False)
            return Vh.mT, S, U.mT
        return torch.linalg.svd(M, full_matrices=False)


def orthonormal(M: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR factorisation."""
    with one_cpu_thread(M):
        return torch.linalg.qr(M)[0]


def squared_norm64(X: torch.Tensor) -> torch.Tensor:
    """‖X‖² in float64, from the norms of X's rows (its last dimension), which are scaled against overflow
    and summed in float64: one read, exact to about 1e-9. Why: one fp32 norm of a whole 8192×2048 matrix was
    1e-3 off, and `X.pow(2).sum()` (or a float64 copy) costs a pass and a temporary more, 14× slower."""
    return torch.linalg.vector_norm(X, dim=-1).double().square().sum()


#: a product Xᵀ·Q with Q of fewer columns than this is taken as (Qᵀ·X)ᵀ on the CPU (`t_matmul`)
THIN = 16


def _thin(Q: torch.Tensor) -> bool:
    """Whether Xᵀ·Q is taken as (QᵀX)ᵀ: Q of fewer than `THIN` columns, on the CPU."""
    return Q.shape[-1] < THIN and Q.device.type == "cpu"


def t_matmul(X: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Xᵀ·Q. Why not `X.mT @ Q` always: on the CPU, MKL's product with a transposed X ran at 0.8–6.0 GFLOPS
    for Q of 2–8 columns where (QᵀX)ᵀ ran at 11–40 (2 threads, X 8192×2048; benchmarks/cpu_kernels.py); from
    16 columns on the two are equal. The refinement's products with an expert of low rank are such."""
    return (Q.mT @ X).mT if _thin(Q) else X.mT @ Q


def add_t_matmul(W: torch.Tensor, X: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """W += Xᵀ·Q in place (`t_matmul`'s choice; `addmm_` with a transposed X otherwise)."""
    return W.add_((Q.mT @ X).mT) if _thin(Q) else W.addmm_(X.mT, Q)


def minus_right(Y: torch.Tensor, terms: Sequence, Z: torch.Tensor) -> torch.Tensor:
    """Y − (Σ A·B)·Z in place, for Y = D·Z already taken: the product of Z with D − Σ A·B at (m + n)·r·w
    flops per low-rank term (A m×r, B r×n) instead of forming the m×n difference."""
    for A, B in terms:
        Y.sub_(A @ (B @ Z))
    return Y


def minus_left(W: torch.Tensor, terms: Sequence, Q: torch.Tensor) -> torch.Tensor:
    """W − (Σ A·B)ᵀ·Q in place, for W = Dᵀ·Q already taken (`minus_right`'s transpose). AᵀQ is a thin
    transposed product too when Q has few columns (`t_matmul`)."""
    for A, B in terms:
        W.sub_(B.T @ t_matmul(A, Q))
    return W


def explained(P: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """‖X‖² − ‖X − AB‖² = 2⟨X·Bᵀ, A⟩ − ⟨AᵀA, BBᵀ⟩ (float64), from P = X·Bᵀ (None: B is zero, nothing
    explained): how much of X the factors explain, from m×r and r×r terms only. A fit Q, QᵀX with Q
    orthonormal explains ‖QᵀX‖², so comparing the two decides an ALS update without the m×n residual
    (docs/method.md §6.1)."""
    if P is None:
        return torch.zeros((), dtype=torch.float64, device=A.device)
    cross = (P * A).sum(dtype=torch.float64)  # summed in float64 without float64 copies (100× faster)
    return 2 * cross - ((A.T @ A).double() * (B @ B.T).double()).sum()


def each_on_one_thread(fn: Callable[[_X], _Y], xs: Sequence[_X]) -> list[_Y]:
    """[fn(x) for x in xs], on the CPU several at once, each call on one thread of its own.

    Why: `svd` and `orthonormal` run LAPACK on one thread (it was slower multi-threaded), so one call used one
    core of the CPU's. Independent calls (the T+1 modules of a matrix) share the cores out with identical
    results: each is the same single-threaded call."""
    workers = min(len(xs), torch.get_num_threads())
    if workers < 2 or any(getattr(x, "device", torch.device("cpu")).type != "cpu" for x in xs):
        return [fn(x) for x in xs]
    with one_cpu_thread(xs[0]), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda x: _one_thread(fn, x), xs))


def _one_thread(fn: Callable[[_X], _Y], x: _X) -> _Y:
    torch.set_num_threads(1)  # this worker's own OpenMP setting (a new thread starts from the default)
    return fn(x)


def orthonormal_all(Ys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`orthonormal` of each matrix, several at once (`each_on_one_thread`)."""
    return each_on_one_thread(orthonormal, Ys)


def krylov_shape(m: int, n: int, K: int, oversample: int, power_iters: int) -> tuple[int, int]:
    """(block width b, blocks) of the range finder of an m×n module kept at width K: with power iterations,
    blocks of b = ⌈(K + oversample)/2⌉ columns, one per iteration and the first, so the basis holds
    2·(K + oversample) columns after 3; one block of K + oversample without, or where the power_iters + 1
    blocks would not fit in min(m, n) (then the iterations replace the block: subspace iteration). Why not
    fewer blocks there: a basis cut to two blocks is one iteration's worth (σ_1..σ_128 within 3.5e-2 that way
    against 1.1e-3 now at K = 256 on a 400×400 module, tests/test_randomized_svd.py); only a forced
    `svd: randomized` gets there (`auto`: K + oversample ≤ min(m, n)/4)."""
    k = min(m, n)
    w = min(K + oversample, k)
    b = -(-w // 2)
    if power_iters < 1 or b * (power_iters + 1) > k:
        return w, 1
    return b, power_iters + 1


def randomized_svd(
    M: torch.Tensor, K: int, oversample: int = 32, power_iters: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-K singular triplets (U m×K, S K, Vh K×n) of one matrix by a randomized block Krylov range
    finder (Halko, Martinsson, Tropp; Musco and Musco): Y = MΩ with b = ⌈(K + oversample)/2⌉ columns, then
    `power_iters` times Y = M·orth(MᵀQ), each block orthonormalised against the basis so far and kept, and the
    SVD of the small BᵀM on the whole basis B (`krylov_shape`), at about 2·m·n·b·(3·power_iters + 2) flops
    instead of a full SVD's ~m·n·min(m, n).

    Why the Krylov basis, not subspace iteration (one block of K + oversample columns, only the last kept):
    the earlier blocks are products already paid for, so the blocks can be half as wide. On fine-tune-like
    spectra (an 8192×2048 matrix, 4 tasks, K 192, 3 iterations each) it took 2.04 s against 2.71 s, with
    σ's closer at every rank up to K (docs/method.md §3.2; benchmarks/svd_accuracy.py).

    Exact on one side, as the closed form needs (docs/method.md §3.2): U = B·Ũ with Ũ Σ Vh the SVD of BᵀM, so
    UᵀM = Σ·Vh exactly and ‖M − U_rΣ_rVh_r‖² = ‖M‖² − Σ_{j≤r} σ_j² for every r ≤ K; only how close the σ's are
    to the true ones depends on the spectrum (they are never larger). The seed makes the factors reproducible.
    Defaults: 32 extra columns and 3 iterations keep σ_1..σ_{K/2} within 5e-4 relative on the power-law
    spectra σ_i ∝ i^−0.5 to −0.9 of tests/test_randomized_svd.py, within 8.3e-4 on the σ_i ∝ i^−0.5 ones of
    benchmarks/svd_crossover.py at the widths `svd: auto` uses. The refinement re-fits the factors, so the
    σ's the search reads matter most.
    """
    return randomized_svds([M], K, oversample, power_iters, [seed])[0]


def randomized_svds(
    Ms: Sequence[torch.Tensor],
    K: int,
    oversample: int,
    power_iters: int,
    seeds: Sequence[int],
    zero_sum: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`randomized_svd` of several same-shape matrices (each with its own seed) in lockstep: the same
    products, and the QRs and small SVDs of all of them at once (`each_on_one_thread`), so the results are
    those of one call per matrix, bit for bit. Why: those single-threaded LAPACK calls were 28 % of an
    8192×2048 module's decomposition on 2 cores (profiled), with the other core idle.

    `zero_sum`: Ms[1:] sum to zero (the experts' residuals M_t = τ_t − mean_u τ_u). They then share one test
    matrix Ω (seeds[1]'s), so the last one's first product is minus the sum of the others' (Σ_t M_tΩ = 0):
    one product of the (3·power_iters + 2)·len(Ms) of width b fewer, and the same factors as drawing Ω from
    seeds[1] for each of them, up to rounding."""
    m, n = Ms[0].shape[-2:]
    if any(M.shape[-2:] != (m, n) for M in Ms):
        raise ValueError(f"randomized_svds: matrices of different shapes {[tuple(M.shape) for M in Ms]}")
    b, blocks = krylov_shape(m, n, K, oversample, power_iters)
    Ys: list[torch.Tensor] = []
    omega = None
    for i, (M, seed) in enumerate(zip(Ms, seeds)):
        if zero_sum and i == len(Ms) - 1 and i >= 2:
            Ys.append(-torch.stack(Ys[1:]).sum(0))
            continue
        if omega is None or not (zero_sum and i >= 2):  # with zero_sum the experts share seeds[1]'s draw
            g = torch.Generator(device=M.device).manual_seed(seed)
            omega = torch.randn(n, b, generator=g, device=M.device, dtype=M.dtype)
        Ys.append(M @ omega)
    Qs = orthonormal_all(Ys)
    bases = [Q.new_empty(m, b * blocks) for Q in Qs]
    for B, Q in zip(bases, Qs):
        B[:, :b] = Q
    for i in range(1, blocks if blocks > 1 else power_iters + 1):
        Zs = orthonormal_all([M.mT @ Q for M, Q in zip(Ms, Qs)])
        Ys = [M @ Z for M, Z in zip(Ms, Zs)]
        if blocks > 1:
            Ys = [against(Y, B[:, : i * b]) for Y, B in zip(Ys, bases)]
        Qs = orthonormal_all(Ys)
        j = i if blocks > 1 else 0  # one block: subspace iteration replaces it
        for B, Q in zip(bases, Qs):
            B[:, j * b : (j + 1) * b] = Q
    small = each_on_one_thread(svd, [B.mT @ M for M, B in zip(Ms, bases)])
    return [(B @ Ub[:, :K], S[:K], Vh[:K]) for B, (Ub, S, Vh) in zip(bases, small)]


def against(Y: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Y with its components along the orthonormal columns of B removed, twice (one classical Gram–Schmidt
    pass leaves about ε·κ of them; the second brings that to ε), in place; batched over leading dims."""
    for _ in range(2):
        Y.sub_(B @ (B.mT @ Y))
    return Y
