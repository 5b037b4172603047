"""Stage 2: data-free refinement of the LoRA factors (docs/method.md §2.3, §6), one layer batch at a time.

Init A = U√Σ, B = √ΣVᵀ from the truncated SVDs. The loss (1/T) Σ_t ‖A_sB_s + A_tB_t − τ_t‖² is separable
across matrices, so each training step takes this process's share of a layer batch, moves only those τ's and
factors to the device, optimises them to the end and writes them to a per-matrix file; no state crosses
matrices, so DDP needs no gradient exchange and 2 processes reproduce 1 process exactly.

Two optimisers:
- `als` (default): exact block-coordinate descent. With the shared factors fixed, each expert's optimum is the
  rank-r_t truncated SVD of τ_t − A_sB_s; with the experts fixed, the shared optimum is the rank-r_s truncated
  SVD of mean_t(τ_t − A_tB_t). Each block is solved by subspace iteration warm-started from the current
  factors, and a block update is kept only if it lowers the error, so the error never increases.
- `adam`: the paper's gradient refinement (learning rate relative to each factor's RMS).

With the shared part folded into the stored base (`shared: folded`), the shared module is a dense m×n matrix
M_s (B_s is None): it costs nothing, and its ALS block is exact, M_s = mean_t(τ_t − A_tB_t).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import lightning as L
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from didi.allocation import Ranks
from didi.backbones.base import Zoo
from didi.datamodules.layers import LayerBatchDataModule
from didi.decompose import FactorStore, too_big_for_memory
from didi.linalg import (
    explained,
    minus_left,
    minus_right,
    orthonormal_all,
    squared_norm64,
    svd,
    t_matmul,
)
from didi.progress import StageProgressBar
from didi.quantize import fake_quantize, fake_quantize_pair, stored_pair
from didi.streamed import PHASES, BlockReader, refine_als_streamed
from didi.task_vectors import stack_taus
from didi.tensorfile import LazyTensor, lazy_tensors
from didi.trainer import TrainerConfig, Trainers, barrier


@dataclass
class RefineConfig:
    """Stage-2 hyper-parameters.

    Args:
        optimizer: `als` (closed-form block updates), `adam`, or `none` (keep the truncated SVDs).
        sweeps: ALS sweeps (experts then shared) per matrix.
        power_iters: subspace iterations inside each ALS block update. 0 (default): one alternating
            least-squares step per block and sweep, Q = orth(X·Bᵀ), B = QᵀX. Why: the error falls more per
            product over sweeps than within a block: 8 sweeps at 0 take 80 products with the task vectors
            per matrix (T = 4) where 4 sweeps at 2 took 120, and end lower at ranks 32, 96 and 160 of an
            8192×2048 matrix (benchmarks/refine_settings.py) and on a Llama-1B-shaped 2-layer zoo at 1.05×
            (ranks near 12; a one-off run); 6 sweeps ended higher there.
        steps: Adam iterations per matrix.
        lr: Adam step relative to the RMS of each initial factor.
        layer_batch_size: matrices per training step.
        dtype: compute dtype (`float32` or `float64`).
    """

    optimizer: Literal["als", "adam", "none"] = "als"
    sweeps: int = 8
    power_iters: int = 0
    steps: int = 200
    lr: float = 0.01
    layer_batch_size: int | None = 8
    dtype: str = "float32"


def init_factors(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U_r √Σ_r (m×r), B = √Σ_r V_rᵀ (r×n)."""
    sq = S[:r].clamp_min(0).sqrt().to(U.dtype)
    return U[:, :r] * sq, (V[:, :r] * sq).T.contiguous()


def shared_matrix(A_s: torch.Tensor, B_s: torch.Tensor | None) -> torch.Tensor:
    """The shared module as a matrix: A_sB_s, or A_s itself when it is a dense folded part (B_s None)."""
    return A_s if B_s is None else A_s @ B_s


def residual_sq(X: torch.Tensor, A: torch.Tensor, B: torch.Tensor, minus: torch.Tensor | None = None):
    """‖X − AB (− minus)‖² (float64), the product subtracted inside the GEMM (addmm, β = 1) and the squares
    summed in one read (`linalg.squared_norm64`): one m×n temporary instead of the three of
    `((X − A@B) ** 2).sum()`. Why: the errors reported before and after stage 2 (`task_errors`) and the
    quantized fits read every residual, and such element-wise passes were a third of an ALS sweep when the
    sweeps still formed residuals (profiled, 8192×2048). Under autograd (Adam) the plain form, whose gradient
    stays finite at a zero residual."""
    D = torch.addmm(X, A, B, alpha=-1) if A.shape[-1] else X.clone()
    if minus is not None:
        D.sub_(minus)
    if D.requires_grad:
        return D.pow(2).sum()
    return squared_norm64(D)


def task_errors(taus: torch.Tensor, A_s, B_s, A_t: list, B_t: list) -> torch.Tensor:
    """‖A_sB_s + A_tB_t − τ_t‖² per task [T] (materialised: stage 2 needs τ anyway); B_s None: A_s is M_s."""
    Ms = shared_matrix(A_s, B_s)
    return torch.stack([residual_sq(tau, A, B, minus=Ms) for tau, A, B in zip(taus, A_t, B_t)])


class _Target:
    """The matrix X = D − Σ A·B a block update fits, given by D (τ_t or mean τ, m×n) and low-rank terms,
    and used only through products: X·Z = D·Z − A(B·Z), Xᵀ·Q = Dᵀ·Q − Bᵀ(Aᵀ·Q). Why: forming X, and
    the shared part A_sB_s or the experts' mean it subtracts, cost m×n passes per update that were as slow
    as the products themselves at ranks near 32 (8192×2048, 4 tasks)."""

    def __init__(self, D: torch.Tensor, terms: list) -> None:
        self.D, self.terms = D, [(A, B) for A, B in terms if A.shape[1]]

    def right(self, Z: torch.Tensor) -> torch.Tensor:
        return minus_right(self.D @ Z, self.terms, Z)

    def left(self, Q: torch.Tensor) -> torch.Tensor:
        return minus_left(t_matmul(self.D, Q), self.terms, Q)

    def dense(self) -> torch.Tensor:
        X = self.D.clone()
        for A, B in self.terms:
            X.addmm_(A, B, alpha=-1)
        return X


def _best_rank_r(X: _Target, A: torch.Tensor, P: torch.Tensor | None, iters: int) -> tuple:
    """Rank-r approximation of X by subspace iteration from P = X·Bᵀ, the product with the current factors
    (from the column space of A when B is zero: P None); returns (Q, QᵀX), Q with orthonormal columns."""
    return _best_rank_r_all([X], [A], [P], iters)[0]


def _best_rank_r_all(Xs: list[_Target], As: list, Ps: list, iters: int) -> list[tuple]:
    """`_best_rank_r` of several targets in lockstep, their QRs side by side (`orthonormal_all`: each the
    same single-threaded call, so the same bits as one target after another). Why: the QR of an m×r start
    runs LAPACK on one thread, and the experts' T fits (independent given the shared part) left the other
    cores idle meanwhile."""
    Qs = orthonormal_all([A if P is None else P for A, P in zip(As, Ps)])
    for _ in range(iters):
        Qs = orthonormal_all([X.right(X.left(Q)) for X, Q in zip(Xs, Qs)])
    return [(Q, X.left(Q).T.contiguous()) for X, Q in zip(Xs, Qs)]


def _start(X: _Target, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor | None:
    """X·Bᵀ, the product that starts a block's subspace iteration and gives its current fit (`explained`);
    None when B is zero (a start from A alone)."""
    return X.right(B.T) if bool(B.abs().sum() > 0) else None


def _solve_right(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """argmin_B ‖X − A B‖² (A m×r of full column rank): the normal equations in float64 (r×r), with a ridge
    of 1e-12·trace against a rank-deficient A."""
    G = (A.T @ A).double()
    G = G + torch.eye(G.shape[0], dtype=G.dtype, device=G.device) * (
        1e-12 * float(G.diagonal().sum()) + 1e-300
    )
    return torch.linalg.solve(G, (A.T @ X).double()).to(X.dtype)


def quantized_fit(
    X: torch.Tensor, A: torch.Tensor, B: torch.Tensor, fmt: str, iters: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A quantized rank-r fit Â B̂ of X from a float pair (A, B) that spans a good rank-r subspace
    (docs/method.md §9.2): rotate it into its SVD basis with balanced scales, A = U√σ, B = √σVᵀ; then
    alternate, `iters` times, quantize A → Â, solve B = argmin ‖X − ÂB‖, quantize B → B̂, solve A = argmin
    ‖X − AB̂‖; the last step quantizes the pair. Returns the best quantized pair seen (Â, B̂, ‖X − ÂB̂‖²):
    each factor is solved against the other's dequantized values, so the quantization error of one is
    absorbed by the other."""
    Ub, S, Vh = svd(B)
    sq = S.clamp_min(0).sqrt()
    A, B = (A @ Ub) * sq, sq[:, None] * Vh
    A_q, B_q = fake_quantize_pair(A, B, fmt)
    best = (A_q, B_q, residual_sq(X, A_q, B_q))
    for _ in range(iters):
        A_q = fake_quantize(A, fmt, 0)
        B_q = fake_quantize(_solve_right(A_q, X), fmt, 1)
        e = residual_sq(X, A_q, B_q)
        if e < best[2]:
            best = (A_q, B_q, e)
        A = _solve_right(B_q.T, X.T).T
        A_q = fake_quantize(A, fmt, 0)
        e = residual_sq(X, A_q, B_q)
        if e < best[2]:
            best = (A_q, B_q, e)
    return best


def refine_als(
    taus: torch.Tensor,
    A_s,
    B_s,
    A_t: list,
    B_t: list,
    sweeps: int,
    power_iters: int,
    expert_dtype: str = "float32",
):
    """Exact block-coordinate descent; each accepted block update lowers the total error.

    No m×n matrix is formed (docs/method.md §6.1): a block's target, τ_t − A_sB_s for an expert and
    mean_t(τ_t − A_tB_t) for the shared part, is used through its products (`_Target`), and an update is kept
    when the new fit explains more of the target than the current factors do (`explained`: the same test as
    comparing the errors, without the residuals). Why: residuals, targets and their norms took about half of
    a sweep's time at rank 32 on the 8192×2048 matrix of benchmarks/refine_settings.py (timed before and
    after the change).

    `expert_dtype` int8 / nf4 / bfloat16: quantization-aware (docs/method.md §9.2). The experts come in and go
    out quantized (fake-quantized: dequantized values in the compute dtype); an expert's update is the float
    best rank-r fit of its residual followed by `quantized_fit` (which needs the residual itself), kept if
    the error of the quantized pair drops; the shared block is solved against the quantized experts. The
    errors compared are therefore those of what is stored. A folded shared part (B_s None, dense) is the exact
    optimum mean_t(τ_t − A_tB_t) at every sweep."""
    T = taus.shape[0]
    quantized = expert_dtype != "float32"
    folded = B_s is None
    shared_step = folded or A_s.shape[1] > 0  # a rank-0 shared part has no block to update
    tau_mean = taus.mean(0) if sweeps and shared_step else None
    for _ in range(sweeps):
        # given the shared part the experts' blocks are independent: their fits run in lockstep, except with
        # a folded shared part, whose targets τ_t − M_s are dense (one m×n copy at a time)
        active = [t for t in range(T) if A_t[t].shape[1]]
        for group in [[t] for t in active] if folded else [active]:
            if folded:
                Xs = [_Target(taus[t] - A_s, []) for t in group]
            else:
                Xs = [_Target(taus[t], [(A_s, B_s)]) for t in group]
            Ps = [_start(X, A_t[t], B_t[t]) for X, t in zip(Xs, group)]
            fits = _best_rank_r_all(Xs, [A_t[t] for t in group], Ps, power_iters)
            for X, P, (Q, B), t in zip(Xs, Ps, fits, group):
                if quantized:
                    D = X.dense()
                    x_sq = squared_norm64(D)
                    A, B, e = quantized_fit(D, Q, B, expert_dtype)
                    better = e < x_sq - explained(P, A_t[t], B_t[t])
                    del D
                else:
                    A, better = Q, squared_norm64(B) > explained(P, A_t[t], B_t[t])
                if better:
                    A_t[t], B_t[t] = A, B
            Xs = Ps = fits = X = P = None  # a folded target's dense copy goes before the next is formed
        if not shared_step:
            continue
        # Σ_t ‖τ_t − A_tB_t − M‖² = T·‖R − M‖² + const with R = mean_t(τ_t − A_tB_t): the total drops iff
        # the shared fit of R explains more of it
        R = _Target(tau_mean, [(a / T, b) for a, b in zip(A_t, B_t)])
        if folded:
            A_s = R.dense()
            continue
        P = _start(R, A_s, B_s)
        Q, B = _best_rank_r(R, A_s, P, power_iters)
        if squared_norm64(B) > explained(P, A_s, B_s):
            A_s, B_s = Q, B
    return A_s, B_s, A_t, B_t


def refine_adam(taus: torch.Tensor, A_s, B_s, A_t: list, B_t: list, steps: int, lr: float):
    shared = [A_s] if B_s is None else [A_s, B_s]  # a folded shared part is one dense parameter
    h, T = len(shared), taus.shape[0]
    params = [p.clone().requires_grad_(True) for p in [*shared, *A_t, *B_t]]
    groups = [
        {"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-12))}
        for p in params
        if p.numel()
    ]
    if not groups:
        return A_s, B_s, A_t, B_t

    def unpack(ps: list) -> tuple:
        return ps[0], (None if h == 1 else ps[1]), ps[h : h + T], ps[h + T :]

    opt = torch.optim.Adam(groups)
    best = None
    with torch.enable_grad():
        for _ in range(steps + 1):
            opt.zero_grad()
            loss = task_errors(taus, *unpack(params)).sum()
            if best is None or loss.item() < best[0]:  # keep the best iterate: never worse than the init
                best = (loss.item(), [p.detach().clone() for p in params])
            loss.backward()
            opt.step()
    return unpack(best[1])


def _stored_experts(A_t: list, B_t: list, fmt: str) -> tuple[list[dict], list, list]:
    """Every expert pair as stored in `fmt` (`didi.quantize.stored_pair`): (the tensors, Â's, B̂'s)."""
    out = [stored_pair(A, B, fmt) for A, B in zip(A_t, B_t)]
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


class LoRARefine(L.LightningModule):
    """Fit loop over layer batches; each batch item is a list of matrix jobs, results go to `out_dir`.

    A job is a dict with `idx`, `taus` [T,m,n], `U_s,S_s,V_s,U_t,S_t,V_t` and ranks `r_s`, `r_t`; a job of a
    folded merge also has `M_s` [m,n], the dense shared part, which replaces the shared factors (file key
    `M_s`).

    Logs `refine/rec_err_before` and `refine/rec_err_after`: the running relative errors of every matrix
    refined so far (`prior`: the absolute errors of matrices an interrupted run finished), as
    `refine_matrices` computes its metrics, so the bar's last value is the summary's.
    """

    #: The refinement bar's labels (didi.progress): the names the summary prints.
    progress_labels = {"refine/rec_err_before": "rec_err_before", "refine/rec_err_after": "rec_err_after"}

    def __init__(
        self,
        cfg: RefineConfig,
        out_dir: str | Path,
        tau_total: float,
        on_result: Callable[[dict], None] | None = None,
        prior: tuple[float, float] = (0.0, 0.0),
        expert_dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.expert_dtype = expert_dtype
        self.out_dir = Path(out_dir)
        self.tau_total = tau_total
        self.prior = prior
        self._sums: list[float] | None = None  # this process's running (before, after), set at the first step
        self.automatic_optimization = False  # each step solves its matrices to the end
        # DDP refuses a module without a trainable parameter; this one is never used (matrices are
        # independent).
        self._ddp_anchor = nn.Parameter(torch.zeros(()))

    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        dt = getattr(torch, self.cfg.dtype)
        if self._sums is None:  # the earlier run's matrices are counted once, by rank 0
            self._sums = list(self.prior) if self.global_rank == 0 else [0.0, 0.0]
        for job in batch:
            # taken out of the job: once A = U√Σ is formed nothing holds the store's factors (for Llama's
            # embedding (T+1)·m·r floats beside the refinement's own)
            mv = {k: job.pop(k).to(self.device, dt) for k in ("U_s", "S_s", "V_s", "U_t", "S_t", "V_t")}
            if "M_s" in job:
                A_s, B_s = job["M_s"].to(self.device, dt), None
            else:
                A_s, B_s = init_factors(mv["U_s"], mv["S_s"], mv["V_s"], int(job["r_s"]))
            pairs = [
                init_factors(mv["U_t"][t], mv["S_t"][t], mv["V_t"][t], int(r))
                for t, r in enumerate(job["r_t"])
            ]
            A_t, B_t = [a for a, _ in pairs], [b for _, b in pairs]
            del mv, pairs
            q = self.expert_dtype
            stored: list[dict] = []
            if q != "float32":  # the start is the truncated SVD as it would be stored
                A_t, B_t = _stored_experts(A_t, B_t, q)[1:]
            if "rows" in job:  # a matrix too large for memory: row blocks read from the checkpoints
                A_s, B_s, A_t, B_t, err0, err1 = refine_als_streamed(
                    job["rows"], job["m"], job["n"], len(A_t), A_s, B_s, A_t, B_t,
                    self.cfg.sweeps, self.cfg.power_iters, expert_dtype=q, consume=True,
                )  # fmt: skip
                e0, e1 = float(err0.sum()), float(err1.sum())
                if q != "float32":
                    stored = _stored_experts(A_t, B_t, q)[0]
            else:
                taus = job["taus"].to(self.device, dt)
                e0 = float(task_errors(taus, A_s, B_s, A_t, B_t).sum())
                if self.cfg.optimizer == "als":
                    A_s, B_s, A_t, B_t = refine_als(
                        taus, A_s, B_s, A_t, B_t, self.cfg.sweeps, self.cfg.power_iters, q
                    )
                elif self.cfg.optimizer == "adam":
                    A_s, B_s, A_t, B_t = refine_adam(taus, A_s, B_s, A_t, B_t, self.cfg.steps, self.cfg.lr)
                if q != "float32":  # the error of exactly what is stored (Adam's factors are rounded here)
                    stored, A_t, B_t = _stored_experts(A_t, B_t, q)
                e1 = float(task_errors(taus, A_s, B_s, A_t, B_t).sum())
            tensors = {
                "err_before": torch.tensor(e0, dtype=torch.float64),
                "err_after": torch.tensor(e1, dtype=torch.float64),
                **({"M_s": A_s} if B_s is None else {"A_s": A_s, "B_s": B_s}),
            }
            if q == "float32":
                for t in range(len(A_t)):
                    tensors[f"A_t{t}"], tensors[f"B_t{t}"] = A_t[t], B_t[t]
            out = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
            for t, pair in enumerate(stored):  # quantized experts: their codes and scales as stored
                out.update({f"q{t}::{k}": v.detach().contiguous().cpu() for k, v in pair.items()})
            save_file(out, str(self.out_dir / f"{int(job['idx']):05d}.safetensors"))
            # the errors as stored (float32) and as `refine_matrices` reads them back
            self._sums[0] += float(torch.tensor(e0, dtype=torch.float32))
            self._sums[1] += float(torch.tensor(e1, dtype=torch.float32))
        world = self.trainer.world_size
        for key, total in zip(("refine/rec_err_before", "refine/rec_err_after"), self._sums):
            self.log(key, total / self.tau_total, reduce_fx="sum", sync_dist=world > 1, prog_bar=True)

    def configure_optimizers(self):
        return None


# ------------------------------------------------------------------------------------------------ stage 2
def expert_dtype_of(ranks: Ranks) -> str:
    """The experts' stored dtype a ranks file was priced for (float32 unless its pricing says otherwise)."""
    return ranks.info.get("expert_dtype") or "float32"


class TaskVectorRows:
    """Rows [start, stop) of one matrix's task vectors, [T, rows, n] float32, read from the checkpoints into a
    buffer that the next call overwrites (`didi.streamed.BlockReader`: the files stay open until `close`,
    which `refine_als_streamed` calls at its end); each block is checked for NaN/Inf at its first read only.
    A class, not a closure, so that `ddp_spawn` can pickle the jobs (the open files are not pickled)."""

    def __init__(self, zoo: Zoo, name: str, n: int) -> None:
        self.zoo, self.name, self.n = zoo, name, n
        self._reader: BlockReader | None = None
        self._checked: set[int] = set()

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        if self._reader is None or self._reader.out.shape[1] < stop - start:
            self.close()
            self._reader = BlockReader(self.zoo, self.name, self.n, torch.float32, stop - start)
        X = self._reader.read(start, stop, check=start not in self._checked)
        self._checked.add(start)
        with PHASES("convert"):
            X[1:] -= X[0]
        return X[1:]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}


class RefineJobs:
    """Loads the refinement jobs of a layer batch: τ_t read from the checkpoints, factors from the store.

    A class, not a closure, so that `ddp_spawn` can pickle it."""

    def __init__(
        self, zoo: Zoo, store: FactorStore, ranks: Ranks, done_dir: Path, optimizer: str = "als"
    ) -> None:
        self.zoo, self.store, self.ranks, self.done_dir = zoo, store, ranks, done_dir
        self.optimizer = optimizer
        self.expert_dtype = expert_dtype_of(ranks)

    def streams(self, i: int) -> bool:
        """Matrix i is refined from row blocks (`didi.streamed.refine_als_streamed`) instead of in memory:
        its T+1 fp32 copies pass the store's `stream_mb` (Llama's embeddings), the optimiser is ALS (which
        needs products, not dense residuals) and the shared part is low-rank (a folded one is the dense m×n
        matrix streaming avoids)."""
        e, stream_mb = self.store.matrices[i], self.store.meta["config"].get("stream_mb")
        return (
            too_big_for_memory(e.m, e.n, len(self.store.tasks), stream_mb)
            and self.optimizer == "als"
            and self.ranks.info.get("shared") != "folded"
        )

    def finished(self, i: int) -> bool:
        """Matrix `i` was refined by an earlier (interrupted) run at these ranks and this layout; a file left
        at other ranks (a run with other options, same output) is redone, not reused."""
        path = self.done_dir / f"{i:05d}.safetensors"
        if not path.exists():
            return False
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                width = {k: f.get_slice(k).get_shape()[1] for k in keys if k.startswith("A_")}
                q = self.expert_dtype
                if q != "float32":  # rank = number of A's columns, in the stored format of this run
                    a_key = {"bfloat16": "lora_A", "int8": "lora_A.int8"}.get(q)
                    for t in range(self.ranks.r_t.shape[1]):
                        ks = (
                            [f"q{t}::lora_A.nf4", f"q{t}::lora_A.nf4_odd"]
                            if a_key is None
                            else [f"q{t}::{a_key}"]
                        )
                        k = next((k for k in ks if k in keys), None)
                        if k is not None and (q != "bfloat16" or f.get_slice(k).get_dtype() == "BF16"):
                            width[f"A_t{t}"] = f.get_slice(k).get_shape()[1]
        except Exception:  # a file cut short by the interrupt
            return False
        r_t = [int(r) for r in self.ranks.r_t[i]]
        folded = self.ranks.info.get("shared") == "folded"
        shared_ok = "M_s" in keys if folded else width.get("A_s") == int(self.ranks.r_s[i])
        experts = {k for k in width if k.startswith("A_t")}
        return (
            shared_ok
            and {"err_before", "err_after"} <= keys
            and experts == {f"A_t{t}" for t in range(len(r_t))}
            and all(width[f"A_t{t}"] == r for t, r in enumerate(r_t))
        )

    def __call__(self, indices: list[int]) -> list[dict]:
        jobs = []
        for i in indices:
            if self.finished(i):
                continue  # finished by an earlier (interrupted) run
            e = self.store.matrices[i]
            r_s, r_t = int(self.ranks.r_s[i]), [int(r) for r in self.ranks.r_t[i]]
            if self.streams(i):
                rows = TaskVectorRows(self.zoo, e.name, e.n)
                jobs.append({"idx": i, "rows": rows, "m": e.m, "n": e.n, "r_s": r_s, "r_t": r_t})
                jobs[-1].update(self.store.factors(i, r_s, max(r_t, default=0)))
                continue
            base, taus = self.zoo.read(e.name)
            taus = stack_taus(base, taus).reshape(-1, e.m, e.n)
            del base
            # only the leading r columns are used (the initial truncated-SVD factors): a job holds rank-r
            # factors, not the store's width K (for Llama's embeddings, 128256×K per task)
            job = {
                "idx": i,
                "taus": taus,
                "r_s": r_s,
                "r_t": r_t,
                **self.store.factors(i, r_s, max(r_t, default=0)),
            }
            if self.ranks.info.get("shared") == "folded":
                job["M_s"] = self.store.shared_merge(taus)
            jobs.append(job)
        return jobs


def refine_matrices(
    zoo: Zoo,
    store: FactorStore,
    ranks: Ranks,
    rcfg: RefineConfig,
    trainers: Trainers | TrainerConfig,
    work_dir: Path,
) -> tuple[dict, dict, dict]:
    """Stage 2 over every matrix (a Lightning fit over layer batches; finished matrices of an interrupted run
    are kept in `work_dir/refine` and not redone); returns (shared terms, per-task terms, metrics). A folded
    shared part comes back as shared `NAME::fold` terms, which `write_didi_artifact` adds to the stored
    base."""
    if isinstance(trainers, TrainerConfig):
        trainers = Trainers(trainers)
    out = work_dir / "refine"
    out.mkdir(parents=True, exist_ok=True)
    tau_total = store.tau_total()
    jobs = RefineJobs(zoo, store, ranks, out, rcfg.optimizer)
    q = jobs.expert_dtype
    prior = [0.0, 0.0]  # errors of the matrices an interrupted run finished (the bar starts from them)
    for e in store.matrices:
        if jobs.finished(e.idx):
            f = lazy_tensors(out / f"{e.idx:05d}.safetensors")
            prior[0] += float(f["err_before"].load())
            prior[1] += float(f["err_after"].load())
    dm = LayerBatchDataModule(len(store.matrices), jobs, rcfg.layer_batch_size)
    module = LoRARefine(rcfg, out, tau_total, prior=(prior[0], prior[1]), expert_dtype=q)
    bar = StageProgressBar("refine", "matrices", batch_units=[len(b) for b in dm.dataset.batches])
    trainer = trainers.fit("refine", max_epochs=1, progress=bar)
    trainer.fit(module, datamodule=dm)
    barrier()
    # the factors stay in their per-matrix files until the artifact is written (LazyTensor): memory does
    # not grow with the number of matrices
    shared, tasks = {}, {t: {} for t in store.tasks}
    before = after = 0.0
    for e in store.matrices:
        f = lazy_tensors(out / f"{e.idx:05d}.safetensors")
        before, after = before + float(f["err_before"].load()), after + float(f["err_after"].load())
        if "M_s" in f:  # folded: the dense shared part goes into the stored base, in the tensor's own shape
            shared[f"{e.name}::fold"] = LazyTensor(
                tuple(e.shape),
                torch.float32,
                lambda x=f["M_s"], shape=tuple(e.shape): x.load().reshape(shape),
            )
        elif f["A_s"].shape[1]:
            shared[f"{e.name}::lora_A"], shared[f"{e.name}::lora_B"] = f["A_s"], f["B_s"]
        for j, t in enumerate(store.tasks):
            if q != "float32":  # codes and scales under their artifact suffixes (didi.quantize)
                if int(ranks.r_t[e.idx, j]):
                    for k in f:
                        if k.startswith(f"q{j}::"):
                            tasks[t][f"{e.name}::{k.split('::', 1)[1]}"] = f[k]
            elif f[f"A_t{j}"].shape[1]:
                tasks[t][f"{e.name}::lora_A"], tasks[t][f"{e.name}::lora_B"] = f[f"A_t{j}"], f[f"B_t{j}"]
    metrics = {
        "rec_err_before": before / tau_total,
        "rec_err_after": after / tau_total,
        "optimizer": rcfg.optimizer,
    }
    if q != "float32":
        metrics["expert_dtype"] = q
        metrics["errors_of"] = f"the stored {q} experts (dequantized), before and after"
    return shared, tasks, metrics
