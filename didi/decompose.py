"""Step 1 of DiDi: split task vectors into shared + experts, SVD them, and keep the results in a factor store.

Per decomposed matrix: M_s = merge(τ_1..τ_T) (mean by default), M_t = τ_t − M_s, and thin SVDs of all T+1
modules in one batched call. The store keeps U, σ, V up to `max_rank` plus the few inner products that make
the closed form exact for any search width K ≤ max_rank (docs/method.md §3), so searches at other budgets and
stage 2 reuse it instead of redoing SVDs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from didi.artifact import sweep_stale_temps, temp_sibling
from didi.backbones.base import TensorPlan, Zoo
from didi.closed_form import GroupTerms
from didi.errors import DidiError
from didi.linalg import each_on_one_thread, krylov_shape, randomized_svds, squared_norm64, svd
from didi.merges import mean_merge, shared_merge_fn
from didi.progress import stage_bar
from didi.sources import file_sha256, load_owned
from didi.streamed import STREAMABLE_MERGES, decompose_streamed_part, join_parts
from didi.task_vectors import DeltaReader

STORE_VERSION = 3  # 3: sha256 of every file in index.json ("file_sha256"), checked when a store is opened

#: stores whose files this process has hashed (or written), by (root, index.json mtime): a merge opens its
#: store once per stage, and one full read of it per process is enough
_VERIFIED: set[tuple[str, int]] = set()


class CorruptStore(DidiError):
    """A factor store whose files do not match the checksums it was written with (`decompose` recomputes)."""


@dataclass(frozen=True)
class MatrixEntry:
    """Index row of one decomposed matrix in the store."""

    idx: int
    name: str
    shape: tuple[int, ...]
    m: int
    n: int
    K: int  # columns kept in the store (min(m, n) or max_rank)
    bound_s: int  # numerical rank of M_s (≤ K)
    bound_t: tuple[int, ...]  # numerical rank of each M_t
    layer: int
    kind: str


class FactorStore:
    """On-disk results of `decompose` for one zoo and one set of decomposition settings."""

    def __init__(self, root: str | Path, verify: bool = True) -> None:
        """`verify`: hash every file against index.json once per process (a bit flip in a cached store would
        otherwise pass silently into every later merge); raises CorruptStore on a mismatch."""
        self.root = Path(root)
        index = self.root / "index.json"
        if not index.exists():
            raise DidiError(f"{self.root}: not a didi factor store (no index.json)")
        try:
            meta = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptStore(f"{index}: unreadable index ({e})") from e
        if meta.get("store_version") != STORE_VERSION:
            raise DidiError(
                f"{self.root}: factor store version {meta.get('store_version')} is not "
                f"{STORE_VERSION}; delete it to recompute"
            )
        self.meta = meta
        self.tasks: list[str] = meta["tasks"]
        self.matrices = [
            MatrixEntry(**{**e, "shape": tuple(e["shape"]), "bound_t": tuple(e["bound_t"])})
            for e in meta["matrices"]
        ]
        self.nonmatrix: dict[str, dict] = meta["nonmatrix"]  # name -> {"shape", "zero": bool}
        self.base_params: int = meta["base_params"]
        self.sha256: dict = meta["sha256"]
        if verify:
            self.verify()

    def verify(self) -> None:
        """Stream every file of the store once against its sha256 in index.json (skipped when this process
        already did, or wrote the store); raises CorruptStore naming the first missing or changed file."""
        key = (str(self.root.resolve()), (self.root / "index.json").stat().st_mtime_ns)
        if key in _VERIFIED:
            return
        for rel, digest in self.meta["file_sha256"].items():
            f = self.root / rel
            if not f.is_file():
                raise CorruptStore(f"{f}: missing from the factor store")
            if file_sha256(f) != digest:
                raise CorruptStore(f"{f}: sha256 does not match the factor store's index (corrupt on disk)")
        _VERIFIED.add(key)

    @property
    def shares(self) -> dict | None:
        """Who computed which share of this store (`shares.json`: processes, tensors, estimated flops,
        seconds); not part of the store's contents (not in index.json), so stores computed by different
        numbers of processes are the same bytes otherwise."""
        f = self.root / "shares.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def load(self, i: int) -> dict[str, torch.Tensor]:
        return load_owned(self.root / "matrices" / f"{i:05d}.safetensors")

    def factors(self, i: int, r_s: int, r_t: int) -> dict[str, torch.Tensor]:
        """U, S, V of the shared part (r_s columns) and of the experts (r_t columns) of matrix i: only those
        columns are copied out of the file's map (refinement needs rank r, the file holds width K)."""
        f = load_file(str(self.root / "matrices" / f"{i:05d}.safetensors"))
        return {
            "U_s": f["U_s"][:, :r_s].clone(),
            "S_s": f["S_s"][:r_s].clone(),
            "V_s": f["V_s"][:, :r_s].clone(),
            "U_t": f["U_t"][..., :r_t].clone(),
            "S_t": f["S_t"][:, :r_t].clone(),
            "V_t": f["V_t"][..., :r_t].clone(),
        }

    def spectra(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert singular values σ_t [T,K] and ‖M_t‖² [T] of matrix i, read alone (the folded allocation)."""
        with safe_open(
            str(self.root / "matrices" / f"{i:05d}.safetensors"), framework="pt", device="cpu"
        ) as f:
            return f.get_tensor("S_t").clone(), f.get_tensor("mt_sq").clone()

    @property
    def shared_merge(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The static merge that defined M_s when this store was computed."""
        return shared_merge_fn(self.meta["config"]["shared_merge"])

    def tau_sq(self, i: int) -> torch.Tensor:
        """‖τ_t‖² of matrix i per task [T], read alone (not the whole factor file)."""
        with safe_open(
            str(self.root / "matrices" / f"{i:05d}.safetensors"), framework="pt", device="cpu"
        ) as f:
            return f.get_tensor("tau_sq").clone()

    def tau_total(self) -> float:
        """Σ_l Σ_t ‖τ_t,l‖² over the decomposed matrices: the denominator of every relative error."""
        return float(sum(float(self.tau_sq(e.idx).sum()) for e in self.matrices))

    def nonmatrix_path(self, name: str) -> Path:
        """The file of one non-decomposed tensor's deltas: {task: delta}, float32."""
        return self.root / "nonmatrix" / f"{self.nonmatrix[name]['file']:05d}.safetensors"

    def nonmatrix_deltas(self, name: str) -> dict[str, torch.Tensor]:
        """task -> delta of one non-decomposed tensor (one file per tensor: memory stays per tensor)."""
        if self.nonmatrix[name]["zero"]:
            return {}
        return load_owned(self.nonmatrix_path(name))

    def terms(self, i: int, K: int, device=None, dtype=torch.float32) -> GroupTerms:
        """Closed-form terms of matrix i at search width K (≤ stored K), batched as L=1."""
        f = self.load(i)
        return terms_from_factors(f, K, device=device, dtype=dtype)


def cross_gram64(A: torch.Tensor, B: torch.Tensor, device=None, chunk: int = 1 << 22) -> torch.Tensor:
    """AᵀB_t for every t [T, k, j] in float64, from A [m, k] and B [T, m, j] converted a block of about
    `chunk` elements of rows at a time. Why: a float64 copy of the whole factors was the search's peak for
    Llama's embedding (1.2 GB beside the 0.6 GB fp32 file at K = 224, T = 4, twice that for the 8B's); a
    matrix within one block is one product, as before."""
    m = A.shape[0]
    rows = max(1, chunk // max(1, A.shape[1] + B.shape[0] * B.shape[2]))
    out = None
    for s in range(0, m, rows):
        a = A[s : s + rows].to(device, torch.float64)
        part = torch.einsum("mk,tmj->tkj", a, B[:, s : s + rows].to(device, torch.float64))
        out = part if out is None else out.add_(part)
    if out is None:  # no rows
        return torch.zeros(B.shape[0], A.shape[1], B.shape[2], dtype=torch.float64, device=device)
    return out


def terms_from_factors(f: dict[str, torch.Tensor], K: int, device=None, dtype=torch.float32) -> GroupTerms:
    """C_t, p_t, q_t and c_t = ‖R_s + R_t‖² at width K from the stored factors
    (docs/method.md §3, truncated case)."""
    Ks = f["S_s"].shape[-1]
    if K > Ks:
        raise DidiError(f"search width K={K} exceeds the {Ks} singular components kept in the factor store")
    wdt = torch.float64
    S_s, S_t = f["S_s"][:K].to(device, wdt), f["S_t"][:, :K].to(device, wdt)
    a, b = f["a"][:, :K].to(device, wdt), f["b"][:, :K].to(device, wdt)
    C = cross_gram64(f["U_s"][:, :K], f["U_t"][..., :K], device) * cross_gram64(
        f["V_s"][:, :K], f["V_t"][..., :K], device
    )  # [T,K,K]
    Cs_t = torch.einsum("tkj,tj->tk", C, S_t)
    Cts = torch.einsum("tkj,k->tj", C, S_s)
    p = a - Cs_t
    q = b - Cts
    const = (
        f["ms_sq"].to(device, wdt)
        - (S_s**2).sum()
        + f["mt_sq"].to(device, wdt)
        - (S_t**2).sum(-1)
        + 2 * (f["inner"].to(device, wdt) - (S_t * b).sum(-1) - (S_s * a).sum(-1) + (S_s * Cs_t).sum(-1))
    )
    const = const.clamp_min(0)
    out = GroupTerms(
        S_s[None], S_t[None], C[None], p[None], q[None], const[None], f["tau_sq"].to(device, wdt)[None]
    )
    return out.to(dtype=dtype)


def numerical_rank(S: torch.Tensor, tol: float) -> int:
    return int((S > tol).sum())


def _dot64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ x·y in float64: each row's product in the tensors' dtype (for x·x the row's norm:
    `linalg.squared_norm64`), the rows summed in float64. Why: converting the matrices to float64 a chunk at a
    time took 116 ms per 8192×2048 pair, a sixth of a module's randomized decomposition; the rows take 8 ms
    (x·y) and 2.5 ms (x·x), within 1e-9 of the float64 sum relative to ‖x‖·‖y‖. Small tensors (up to 2^16
    values) are summed in float64 outright, exactly."""
    if x.numel() <= 1 << 16:
        return torch.dot(x.reshape(-1).double(), y.reshape(-1).double())
    X = x.reshape(-1, x.shape[-1])
    if y is x:
        return squared_norm64(X)
    Y = y.reshape(X.shape)
    return (X.unsqueeze(1) @ Y.unsqueeze(2)).double().sum()


def decompose_batch(
    taus: torch.Tensor,
    merge: Callable[[torch.Tensor], torch.Tensor],
    max_rank: int | None,
    rtol: float | None = None,
    consume: bool = False,
    svd_method: str = "full",
    oversample: int = 32,
    power_iters: int = 3,
) -> list[tuple[dict[str, torch.Tensor], int, list[int]]]:
    """SVDs and inner products of B same-shape matrices, taus [B,T,m,n] on the compute device/dtype.

    With B > 1 the B·(T+1) SVDs (shared + experts of every matrix) run as one batched call (many small
    matrices on a GPU). A single matrix (B = 1: every matrix on the CPU, and any matrix larger than the batch
    cap) runs its T+1 SVDs one after the other, each truncated to K at once: the working set stays near
    2·(T+1) copies of the matrix instead of about 10 for the batched call (measured on Llama's embeddings).
    `consume=True` lets the residuals M_t overwrite `taus` in place. `svd_method`: `full`, or `randomized`
    (`linalg.randomized_svds`: the block Krylov range finders of a matrix's T+1 modules in lockstep), or
    `auto`: randomized when K + oversample ≤ min(m, n) / 4 (see `randomized_is_cheaper`), else full.
    """
    B, T, m, n = taus.shape
    k = min(m, n)
    K = k if max_rank is None else min(k, max_rank)
    tau_sq = torch.stack([torch.stack([_dot64(x, x) for x in taus[j]]) for j in range(B)])  # before M_t
    Ms = torch.stack([merge(x) for x in taus])  # [B,m,n]
    Mt = taus.sub_(Ms[:, None]) if consume else taus - Ms[:, None]
    randomized = svd_method == "randomized" or (
        svd_method == "auto" and randomized_is_cheaper(m, n, K, oversample)
    )
    if randomized and K + oversample >= k:  # the range finder would cost more than the SVD it replaces
        randomized = False
    # the mean's residuals sum to zero: the last expert's first range-finder product and its a_t follow
    # from the others' (one product of width K + oversample and one of width K fewer per matrix)
    zero_sum = merge is mean_merge and T > 1
    if B > 1 and not randomized:
        U, S, Vh = svd(torch.cat([Ms[:, None], Mt], 1).reshape(B * (T + 1), m, n))
        U = U[..., :K].reshape(B, T + 1, m, K)
        S = S[..., :K].reshape(B, T + 1, K)
        V = Vh[..., :K, :].transpose(-2, -1).reshape(B, T + 1, n, K)
        del Vh
    else:
        U = Ms.new_empty(B, T + 1, m, K)
        V = Ms.new_empty(B, T + 1, n, K)
        S = Ms.new_empty(B, T + 1, K)
        for j in range(B):
            modules = [Ms[j], *Mt[j]]
            # the range finder is seeded by the module index (the experts share seed 1 under the mean merge):
            # every run and process gets the same factors; the T+1 range finders run in lockstep, their
            # single-threaded QRs side by side
            if randomized:
                triplets = randomized_svds(
                    modules, K, oversample, power_iters, seeds=range(T + 1), zero_sum=zero_sum
                )
            elif m * n <= SIDE_BY_SIDE:
                triplets = each_on_one_thread(lambda X: _truncated(svd(X), K), modules)
            else:
                triplets = (svd(X) for X in modules)
            for i, (u, s_, vh) in enumerate(triplets):
                U[j, i], S[j, i], V[j, i] = u[:, :K], s_[:K], vh[:K].T
            del triplets, u, vh
    eps = torch.finfo(taus.dtype).eps
    f64 = torch.float64
    out = []
    for j in range(B):
        U_s, S_s, V_s, U_t, S_t, V_t = U[j, 0], S[j, 0], V[j, 0], U[j, 1:], S[j, 1:], V[j, 1:]
        ms, mt = Ms[j], Mt[j]
        a = [(U_s * (mt[t] @ V_s)).sum(0) for t in range(T - 1 if zero_sum else T)]  # diag(U_sᵀ M_t V_s)
        a = torch.stack(a + [-torch.stack(a).sum(0)] if zero_sum else a)  # Σ_t M_t = 0 ⇒ Σ_t a_t = 0
        b = torch.stack([((U_t[t] * (ms @ V_t[t])).sum(0)) for t in range(T)])  # diag(U_tᵀ M_s V_t)
        scale = float(S[j, :, 0].max()) if K else 0.0
        tol = (rtol if rtol is not None else max(m, n) * eps) * scale
        factors = {
            "U_s": U_s,
            "S_s": S_s.to(f64),
            "V_s": V_s,
            "U_t": U_t,
            "S_t": S_t.to(f64),
            "V_t": V_t,
            "a": a.to(f64),
            "b": b.to(f64),
            "ms_sq": _dot64(ms, ms),
            "mt_sq": torch.stack([_dot64(x, x) for x in mt]),
            "inner": torch.stack([_dot64(ms, x) for x in mt]),
            "tau_sq": tau_sq[j],
        }
        out.append(
            (
                {k_: v.detach().contiguous().cpu() for k_, v in factors.items()},
                numerical_rank(S_s, tol),
                [numerical_rank(S_t[t], tol) for t in range(T)],
            )
        )
    return out


#: the largest module (elements) whose T+1 full SVDs run side by side, one per thread (`each_on_one_thread`):
#: LAPACK runs on one thread, so one at a time left the other cores idle (Llama's k/v projections); larger
#: modules run one after another, keeping one SVD's working set (a whole embedding's is gigabytes)
SIDE_BY_SIDE = 1 << 24


def _truncated(usv: tuple, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first K triplets as copies, so the full factors are freed at once."""
    u, s_, vh = usv
    return u[:, :K].clone(), s_[:K].clone(), vh[:K].clone()


def randomized_is_cheaper(m: int, n: int, K: int, oversample: int = 32) -> bool:
    """The automatic choice between the full and the randomized SVD of an m×n module kept at width K.

    Measured on this project's 2-core CPU (benchmarks/svd_crossover.py): the randomized SVD with 4 power
    iterations costs about as much as the full one at (K + oversample) ≈ 0.4·min(m, n), at least 2× less at
    ≤ 0.27·min(m, n) in every shape measured, and 18× less for a 2048×2048 module at K = 128; `auto` takes it
    up to 0.25·min(m, n).
    """
    return K + oversample <= min(m, n) / 4


def decompose_matrix(
    taus: torch.Tensor,
    merge: Callable[[torch.Tensor], torch.Tensor],
    max_rank: int | None,
    rtol: float | None = None,
    **svd_options: Any,
) -> tuple[dict[str, torch.Tensor], int, list[int]]:
    """One matrix, taus [T,m,n]: see `decompose_batch` (and its SVD options)."""
    return decompose_batch(taus[None], merge, max_rank, rtol, **svd_options)[0]


@dataclass
class DecomposeConfig:
    """How task vectors are decomposed.

    Args:
        shared_merge: static merge that defines the shared part M_s (`mean` is the paper's choice).
        max_rank: keep at most this many singular components per module: `auto` (default) takes the width
            from the budget (`allocation.auto_width`: twice the rank an even spread of the budget would give,
            rounded up to a multiple of 32), an integer fixes it, None keeps every component (full SVDs).
            The closed form stays exact for the factors kept (docs/method.md §3.2).
        dtype: `float32` or `float64` for the SVDs.
        device: `auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, ...
        cache_dir: where factor stores live; a second merge of the same models reuses them.
        batch_mb: same-shape matrices are decomposed together (one batched SVD call, which pays off on a GPU
            with many small matrices); at most this many MB of task vectors are buffered in all, across
            shapes (the largest pending group is decomposed when the cap is reached), so host memory does not
            grow with the layer count. 0 decomposes every matrix on its own as soon as it is read. None
            (auto): 64 on a GPU, 0 on the CPU, where batching saved no time (16-layer Llama test: 46.1 s vs
            46.3 s) but its buffers and batched-SVD workspaces doubled the peak memory of the decomposition.
        svd: `full` (LAPACK), `randomized` (a seeded range finder at width max_rank: `linalg.randomized_svd`,
            exact on one side so the closed form and the allocators stay exact for the factors stored), or
            `auto`: randomized for a module when max_rank + oversample ≤ min(m, n) / 4, where it is several
            times cheaper, else full. Without max_rank every SVD is full.
        oversample: extra columns of the range finder (its blocks are (max_rank + oversample)/2 wide).
        power_iters: iterations of the block Krylov range finder, each adding a block to its basis.
        stream_mb: a matrix whose T+1 copies in the compute dtype pass this many MB (Llama's embeddings) is
            decomposed from row blocks read straight from the checkpoints (`didi.streamed`), so host memory
            stays O((m + n)·K·T) for it; it needs the randomized SVD and the `mean` shared merge. None: never.
    """

    shared_merge: str = "mean"
    max_rank: Union[int, Literal["auto"], None] = "auto"
    dtype: str = "float32"
    device: str = "auto"
    cache_dir: str = "~/.cache/didi/factors"
    batch_mb: int | None = None
    svd: Literal["auto", "full", "randomized"] = "auto"
    oversample: int = 32
    power_iters: int = 3
    stream_mb: int | None = 2048

    def validate(self) -> None:
        """Refuse settings that cannot work, before any file is read or written (issue 11): a CUDA device
        this machine lacks, a max_rank ≤ 0, a randomized SVD with nothing to truncate, negative range-finder
        settings. The checks that need the zoo (max_rank above every matrix's rank) are
        `allocation.check_decompose_inputs`."""
        check_device(self.device)
        if (
            self.max_rank is not None
            and self.max_rank != "auto"
            and (isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank <= 0)
        ):
            raise DidiError(
                f"decompose.max_rank: expected a positive number of singular components, 'auto' (from the "
                f"budget) or None (all), "
                f"found {self.max_rank!r}"
            )
        if self.svd not in ("auto", "full", "randomized"):
            raise DidiError(f"decompose.svd: expected 'auto', 'full' or 'randomized', found {self.svd!r}")
        if self.svd == "randomized" and self.max_rank is None:
            raise DidiError(
                "decompose.svd: 'randomized' needs decompose.max_rank (the width it truncates to), found "
                "max_rank None: nothing to truncate; use --decompose.svd auto or full, or give "
                "--decompose.max_rank"
            )
        if self.stream_mb is not None and (
            isinstance(self.stream_mb, bool) or not isinstance(self.stream_mb, int) or self.stream_mb <= 0
        ):
            raise DidiError(
                f"decompose.stream_mb: expected a positive number of MB or None, found {self.stream_mb!r}"
            )
        for name in ("oversample", "power_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DidiError(f"decompose.{name}: expected an integer ≥ 0, found {v!r}")

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in ("float32", "float64"):
            raise DidiError(f"decompose.dtype: expected 'float32' or 'float64', found {self.dtype!r}")
        return getattr(torch, self.dtype)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def check_device(device: str) -> None:
    """Refuse a decomposition device this machine does not have: `cuda` without CUDA, `cuda:N` with N at or
    above the device count, a string torch does not read as a device."""
    if device == "auto":
        return
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DidiError(
            f"decompose.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', found {device!r} ({e})"
        ) from None
    if d.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise DidiError(
            f"decompose.device: {device!r} asked for, but this machine has no CUDA device "
            f"(torch.cuda.is_available() is False); use --decompose.device cpu or auto"
        )
    count = torch.cuda.device_count()
    if d.index is not None and d.index >= count:
        raise DidiError(
            f"decompose.device: {device!r} asked for, but this machine has {count} CUDA device(s) "
            f"(cuda:0 to cuda:{count - 1}); use one of those, cpu or auto"
        )


def _fingerprint(zoo: Zoo, cfg: DecomposeConfig) -> str:
    """Cache key: the sources' file stats, the task order, the adapter's settings and the decomposition."""
    h = hashlib.sha256()

    def stat(p: str) -> list:
        p = Path(p)
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]

    payload = {
        "v": STORE_VERSION,
        "base": stat(zoo.base),
        "tasks": [[t, stat(p)] for t, p in zoo.tasks.items()],
        "adapter": [zoo.adapter.registry_name, zoo.adapter.settings()],
        # batch_mb and stream_mb change no result; the SVD method and its settings do (when max_rank makes a
        # truncated SVD)
        "cfg": [cfg.shared_merge, cfg.max_rank, cfg.dtype]
        + ([cfg.svd, cfg.oversample, cfg.power_iters] if cfg.max_rank is not None else []),
    }
    h.update(json.dumps(payload, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def store_root(zoo: Zoo, cfg: DecomposeConfig) -> Path:
    """Where the factor store of `zoo` under `cfg` lives (or will live) in the cache."""
    return Path(os.path.expanduser(cfg.cache_dir)) / _fingerprint(zoo, cfg)


def unbudgeted(cfg: DecomposeConfig) -> DecomposeConfig:
    """`cfg` with `max_rank: auto`, which needs a budget, read as None (every component)."""
    return replace(cfg, max_rank=None) if cfg.max_rank == "auto" else cfg


def cached_store(zoo: Zoo, cfg: DecomposeConfig) -> FactorStore | None:
    """The cached factor store of `zoo` under `cfg`, or None (a corrupt one is deleted: it is recomputed).

    `max_rank: auto` needs a budget (`allocation.resolve_width`, as the pipeline does); here, without one, it
    keeps every component."""
    cfg = unbudgeted(cfg)
    cfg.validate()
    shared_merge_fn(cfg.shared_merge)
    root = store_root(zoo, cfg)
    sweep_stale_temps(root)  # left by decompositions that were killed
    if (root / "index.json").exists():
        try:
            return FactorStore(root)
        except CorruptStore as e:
            warnings.warn(f"{e}; the factor store is deleted and recomputed", UserWarning, stacklevel=2)
            _discard(root)
    return None


def decompose(zoo: Zoo, cfg: DecomposeConfig, progress: bool = True) -> FactorStore:
    """Return the factor store for `zoo`, computing it in this process (and writing it atomically) only if
    not cached. `didi.shards.factor_store` is the same under a launcher, sharded across processes."""
    cfg = unbudgeted(cfg)
    store = cached_store(zoo, cfg)
    if store is not None:
        return store
    root = store_root(zoo, cfg)
    tmp = temp_sibling(root)
    make_layout(tmp)
    try:
        writer = ShareWriter(zoo, cfg, tmp)
        positions = list(range(len(zoo.plan)))
        for pos in stage_bar(
            "decompose", len(positions), "tensors", disable=not progress, iterable=positions
        ):
            writer.add(pos)
        assemble(tmp, zoo, cfg, [writer.finish(rank=0)])
        install(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FactorStore(root)


def make_layout(out: Path) -> None:
    (out / "matrices").mkdir(parents=True, exist_ok=True)
    (out / "nonmatrix").mkdir(exist_ok=True)


def install(tmp: Path, root: Path) -> None:
    """Rename a finished store into place (another process that renamed its own first wins)."""
    try:
        os.replace(tmp, root)
        _VERIFIED.add((str(root.resolve()), (root / "index.json").stat().st_mtime_ns))
    except OSError:  # another process renamed its store into place first: that one is used
        if not (root / "index.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(root: Path) -> None:
    """Take a corrupt store out of the cache: renamed away first (atomic, so no process opens it half
    deleted), then removed. Another process may have done either already."""
    gone = temp_sibling(root)
    try:
        os.replace(root, gone)
    except FileNotFoundError:
        return
    shutil.rmtree(gone, ignore_errors=True)


# ------------------------------------------------------------------------------------ work and its shares
def uses_randomized(m: int, n: int, K: int, svd_method: str, oversample: int) -> bool:
    """Whether an m×n module kept at width K gets the randomized SVD (`decompose_batch`'s choice)."""
    randomized = svd_method == "randomized" or (
        svd_method == "auto" and randomized_is_cheaper(m, n, K, oversample)
    )
    return randomized and K + oversample < min(m, n)


def width_of(m: int, n: int, cfg: DecomposeConfig) -> int:
    return min(m, n) if cfg.max_rank is None else min(m, n, int(cfg.max_rank))


def too_big_for_memory(m: int, n: int, T: int, stream_mb: int | None, itemsize: int = 4) -> bool:
    """Whether an m×n matrix's T+1 copies pass `stream_mb` (None: nothing is streamed): the one bound that
    sends a matrix to the row-streamed decomposition and refinement."""
    return stream_mb is not None and (T + 1) * m * n * itemsize > stream_mb * 2**20


def streams(plan: TensorPlan, T: int, cfg: DecomposeConfig) -> bool:
    """Whether this matrix is decomposed from row blocks read straight from the checkpoints
    (`didi.streamed`): its T+1 float copies would pass `cfg.stream_mb`, it gets the randomized SVD (only
    products with row blocks are needed), and the shared merge is row-separable."""
    if plan.matrix_shape is None:
        return False
    m, n = plan.matrix_shape
    if not too_big_for_memory(m, n, T, cfg.stream_mb, torch.finfo(cfg.torch_dtype()).bits // 8):
        return False
    return cfg.shared_merge in STREAMABLE_MERGES and uses_randomized(
        m, n, width_of(m, n, cfg), cfg.svd, cfg.oversample
    )


def svd_flops(m: int, n: int, K: int, randomized: bool, oversample: int, power_iters: int) -> float:
    """Estimated flops of one module's SVD: a full thin SVD ≈ 4·m·n·k + 8·k³ (k = min(m, n)); the block
    Krylov range finder (`linalg.krylov_shape`: `blocks` blocks of b columns) ≈ 2·m·n·b·(2·power_iters + 1)
    for its products, 2·m·n·b·blocks for the projection on the basis, QRs 4·(m + n)·b²·(power_iters + 1) and
    the re-orthogonalisation 8·m·b²·i of block i against the i before it."""
    k = min(m, n)
    if not randomized:
        return 4.0 * m * n * k + 8.0 * k**3
    b, blocks = krylov_shape(m, n, K, oversample, power_iters)
    products = 2.0 * m * n * b * (2 * power_iters + 1 + blocks)
    return products + 4.0 * (m + n) * b * b * (power_iters + 1) + 8.0 * m * b * b * sum(range(blocks))


def tensor_cost(plan: TensorPlan, T: int, cfg: DecomposeConfig) -> float:
    """Estimated flops of decomposing one tensor (what the shards balance): T+1 SVDs of a matrix and the
    inner products a, b (`module_cost` summed), or a read per element of anything else."""
    if plan.matrix_shape is None:
        return float((T + 1) * plan.numel)
    return sum(module_cost(plan, T, cfg, i) for i in range(T + 1))


def module_cost(plan: TensorPlan, T: int, cfg: DecomposeConfig, module: int) -> float:
    """Estimated flops of one module of a matrix: its SVD, and for module 0 (the shared part) the T
    products of a_t, for module t + 1 (expert t) that of b_t (2·m·n·K each)."""
    m, n = plan.matrix_shape
    K = width_of(m, n, cfg)
    one = svd_flops(
        m, n, K, uses_randomized(m, n, K, cfg.svd, cfg.oversample), cfg.oversample, cfg.power_iters
    )
    return one + 2.0 * (T if module == 0 else 1) * m * n * K


#: a unit of the decomposition's work: a tensor's plan position, and which module of a row-streamed matrix
#: (None: the whole tensor)
Unit = tuple[int, int | None]


def work_units(zoo: Zoo, cfg: DecomposeConfig, world: int) -> tuple[list[Unit], list[float]]:
    """What the shards balance, with the estimated cost of each: every tensor whole, except that with
    several processes each of a row-streamed matrix's T+1 modules is a unit of its own. Why: Llama's
    embedding is the largest piece of work and of memory (its T+1 range finders); whole, it lands on one
    process, whose peak then does not fall with the number of processes (`decompose_streamed_part`)."""
    cfg = unbudgeted(cfg)
    T = len(zoo.tasks)
    units: list[Unit] = []
    costs: list[float] = []
    for pos, plan in enumerate(zoo.plan):
        if world > 1 and streams(plan, T, cfg):
            units += [(pos, i) for i in range(T + 1)]
            costs += [module_cost(plan, T, cfg, i) for i in range(T + 1)]
        else:
            units.append((pos, None))
            costs.append(tensor_cost(plan, T, cfg))
    return units, costs


def share_of(units: list[Unit], picked: list[int]) -> list[tuple[int, tuple[int, ...] | None]]:
    """One process's units (indices into `units`) as its work in plan order: (position, None) for a whole
    tensor, (position, modules) for the modules it holds of a row-streamed matrix."""
    held: dict[int, list[int] | None] = {}
    for u in picked:
        pos, module = units[u]
        if module is None:
            held[pos] = None
        else:
            held.setdefault(pos, []).append(module)
    return [(pos, None if mods is None else tuple(sorted(mods))) for pos, mods in sorted(held.items())]


def assign_shares(costs: list[float], world: int) -> list[list[int]]:
    """Plan positions per rank, balanced by estimated cost: the most expensive first, each to the least
    loaded rank (ties: the lower position, the lower rank), each share in plan order. Deterministic, so every
    rank computes the same assignment without talking to the others."""
    load = [0.0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for pos in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda j: (load[j], j))
        shares[r].append(pos)
        load[r] += costs[pos]
    return [sorted(s) for s in shares]


def out_of_memory(
    names: list[str],
    shape: tuple[int, int],
    device: torch.device,
    cfg: DecomposeConfig,
    streamed: bool = False,
) -> DidiError:
    """The error of a decomposition that ran out of device memory: which matrix, and the bound that helps."""
    what = f"'{names[0]}'" + (f" (and {len(names) - 1} more of its shape, batched)" if len(names) > 1 else "")
    m, n = shape
    if streamed:
        hint = "its row blocks and factors did not fit: lower --decompose.max_rank or use a larger device"
    else:
        hint = (
            f"the T+1 copies of {'each' if len(names) > 1 else 'it'} did not fit: --decompose.stream_mb "
            f"{max(1, (m * n * 4) >> 20)} row-streams matrices of this size (from the checkpoints, "
            f"O((m + n)·K·T) memory)"
            + ("; --decompose.batch_mb 0 stops batching same-shape matrices" if len(names) > 1 else "")
        )
    return DidiError(f"decompose: out of memory on {device} for matrix {what}, {m}×{n}; {hint}")


class ShareWriter:
    """Decomposes the tensors it is given (by plan position) into a store layout, each into a file named by
    its position (`p000123.safetensors`), and records what it wrote: `assemble` turns the records of every
    share into the store's index. Same-shape matrices may wait for one batched SVD (`batch_mb`)."""

    def __init__(
        self,
        zoo: Zoo,
        cfg: DecomposeConfig,
        out: Path,
        device: torch.device | None = None,
        share: list[int] | None = None,
        prefetch: bool | None = None,
    ) -> None:
        """`device`: where the SVDs run (default: cfg's; a sharded fit gives each rank its own GPU). `share`:
        the positions this writer will be given, in order: with a GPU the next one's read (disk, the cast to
        float) runs in a thread while the current one is decomposed, so disk and device overlap (`prefetch`:
        None = with a GPU only; on the CPU both would compete for the same cores)."""
        cfg = unbudgeted(cfg)
        self.zoo, self.cfg, self.out = zoo, cfg, Path(out)
        self.dtype, self.device = cfg.torch_dtype(), device or cfg.torch_device()
        T = len(zoo.tasks)
        order = [p for p in (share or []) if not streams(zoo.plan[p], T, cfg)]
        self.next_read = dict(zip(order, order[1:]))  # position -> the next in-memory read of the share
        prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self.pool = ThreadPoolExecutor(1) if prefetch and order else None
        self.prefetched: dict[int, Future] = {}
        self.merge = shared_merge_fn(cfg.shared_merge)
        self.reader = DeltaReader(zoo, self.dtype)
        self.pending: dict[tuple[int, int], list] = {}  # matrix shape -> [(pos, plan, taus)]
        self.matrices: dict[int, dict] = {}
        self.nonmatrix: dict[int, dict] = {}
        self.parts: dict[int, dict] = {}  # position -> the modules of a streamed matrix this share holds
        self.sha: dict[str, str] = {}  # file name -> sha256, hashed right after it is written
        self.flops = 0.0
        self.busy = 0.0  # seconds spent in `add` and `finish`: this share's own work
        gpu = self.device.type == "cuda"
        self.cap = (cfg.batch_mb if cfg.batch_mb is not None else 64 if gpu else 0) * 2**20

    def _save(self, tensors: dict, sub: str, pos: int) -> None:
        key, digest = save_hashed(self.out, sub, pos, tensors)
        self.sha[key] = digest

    def add(self, pos: int, modules: tuple[int, ...] | None = None) -> None:
        """Decompose tensor `pos`, or only the given `modules` (0: shared, t + 1: expert t) of a row-streamed
        matrix, which `assemble` joins with the other processes' parts."""
        t0 = time.perf_counter()
        try:
            self._add(pos, modules)
        finally:
            self.busy += time.perf_counter() - t0

    def _add(self, pos: int, modules: tuple[int, ...] | None = None) -> None:
        plan = self.zoo.plan[pos]
        T = len(self.zoo.tasks)
        if modules is not None and len(set(modules)) < T + 1:
            if not streams(plan, T, self.cfg):
                raise DidiError(f"decompose: '{plan.name}' is not row-streamed; only its whole can be added")
            self.flops += sum(module_cost(plan, T, self.cfg, i) for i in set(modules))
            self._add_streamed(pos, plan, sorted(set(modules)))
            return
        self.flops += tensor_cost(plan, T, self.cfg)
        if streams(plan, T, self.cfg):
            self._add_streamed(pos, plan)
            return
        d = self._read(pos)
        if d is None:  # an integer tensor no task changed
            return
        if not d.is_matrix or d.zero:
            self._nonmatrix(pos, plan, d.zero, None if d.zero else d.taus)
            return
        shape = plan.matrix_shape
        self.pending.setdefault(shape, []).append((pos, plan, d.matrices()))
        del d
        # the cap is on everything buffered, across shapes: memory stays flat in the number of layers
        while self.pending and self._held(self.pending) >= self.cap:
            self._flush(max(self.pending, key=lambda s: self._held({s: self.pending[s]})))

    def _read(self, pos: int):
        """The task vectors of tensor `pos` (prefetched with a GPU), and the next one's read started."""
        if self.pool is None:
            return self.reader.read(self.zoo.plan[pos])
        fut = self.prefetched.pop(pos, None) or self.pool.submit(self.reader.read, self.zoo.plan[pos])
        nxt = self.next_read.get(pos)
        if nxt is not None and nxt not in self.prefetched:
            self.prefetched[nxt] = self.pool.submit(self.reader.read, self.zoo.plan[nxt])
        return fut.result()

    def _nonmatrix(self, pos: int, plan: TensorPlan, zero: bool, taus: torch.Tensor | None) -> None:
        self.nonmatrix[pos] = nonmatrix_record(plan, zero)
        if not zero:
            tasks = self.zoo.task_names
            self._save(
                {t: tau.to(torch.float32).contiguous() for t, tau in zip(tasks, taus)}, "nonmatrix", pos
            )

    def _add_streamed(self, pos: int, plan: TensorPlan, modules: list[int] | None = None) -> None:
        """A row-streamed matrix whole (`modules` None), or the part of it that holds `modules`, written for
        `assemble` to join with the other processes' parts."""
        m, n = plan.matrix_shape
        T = len(self.zoo.tasks)
        try:
            part, sha = decompose_streamed_part(
                self.zoo,
                plan,
                width_of(m, n, self.cfg),
                range(T + 1) if modules is None else modules,
                oversample=self.cfg.oversample,
                power_iters=self.cfg.power_iters,
                dtype=self.dtype,
                device=self.device,
            )
        except torch.OutOfMemoryError as e:
            raise out_of_memory([plan.name], (m, n), self.device, self.cfg, streamed=True) from e
        for source, digest in (sha or {}).items():
            self.reader.sha256[source][plan.name] = digest
        if (
            modules is not None
        ):  # not hashed: rank 0 joins it into the file the index records, then deletes it
            file = f"matrices/p{pos:06d}.modules-{'-'.join(map(str, modules))}.safetensors"
            save_file(part, str(self.out / file))
            self.parts[pos] = {"name": plan.name, "modules": modules, "file": file}
            return
        factors, bound_s, bound_t = join_parts([part], T, m, n, self.dtype)
        del part
        if not bool((factors["tau_sq"] > 0).any()):
            self._nonmatrix(pos, plan, True, None)
            return
        self._entry(pos, plan, factors, bound_s, bound_t)

    @staticmethod
    def _held(groups: dict) -> int:
        return sum(t.numel() * t.element_size() for batch in groups.values() for _, _, t in batch)

    def _flush(self, shape: tuple[int, int]) -> None:
        batch = self.pending.pop(shape, [])
        if not batch:
            return
        items, taus = [(pos, plan) for pos, plan, _ in batch], [t for _, _, t in batch]
        del batch
        # one matrix: its own buffer (no stacked copy), overwritten by its residuals
        try:
            stacked = taus[0][None].to(self.device) if len(taus) == 1 else torch.stack(taus).to(self.device)
            del taus
            results = decompose_batch(
                stacked,
                self.merge,
                self.cfg.max_rank,
                consume=True,
                svd_method=self.cfg.svd,
                oversample=self.cfg.oversample,
                power_iters=self.cfg.power_iters,
            )
        except torch.OutOfMemoryError as e:
            raise out_of_memory([plan.name for _, plan in items], shape, self.device, self.cfg) from e
        del stacked
        for (pos, plan), (factors, bound_s, bound_t) in zip(items, results):
            self._entry(pos, plan, factors, bound_s, bound_t)

    def _entry(self, pos: int, plan: TensorPlan, factors: dict, bound_s: int, bound_t: list[int]) -> None:
        self._save(factors, "matrices", pos)
        self.matrices[pos] = matrix_record(plan, factors, bound_s, bound_t)

    def finish(self, rank: int) -> dict:
        """Decompose what still waits and return this share's record (JSON-able)."""
        t0 = time.perf_counter()
        for shape in list(self.pending):
            self._flush(shape)
        self.busy += time.perf_counter() - t0
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        return {
            "rank": rank,
            "matrices": {str(k): v for k, v in self.matrices.items()},
            "nonmatrix": {str(k): v for k, v in self.nonmatrix.items()},
            "parts": {str(k): v for k, v in self.parts.items()},
            "sha256": self.reader.sha256,
            "file_sha256": self.sha,
            "tensors": len(self.matrices) + len(self.nonmatrix),
            "flops_est": self.flops,
            "seconds": self.busy,
        }


def save_hashed(out: Path, sub: str, pos: int, tensors: dict) -> tuple[str, str]:
    """Write tensor `pos`'s file under out/sub and return (its name in the store, its sha256), hashed right
    after it is written."""
    name = f"p{pos:06d}.safetensors"
    save_file(tensors, str(out / sub / name))
    return f"{sub}/{name}", file_sha256(out / sub / name)


def nonmatrix_record(plan: TensorPlan, zero: bool) -> dict:
    """A tensor's entry in a share's record when it is stored whole, or as zero (no task changed it)."""
    return {"name": plan.name, "shape": list(plan.shape), "zero": zero}


def matrix_record(plan: TensorPlan, factors: dict, bound_s: int, bound_t: list[int]) -> dict:
    """A decomposed matrix's entry in a share's record (the index's `MatrixEntry` without its number)."""
    m, n = plan.matrix_shape
    return {
        "name": plan.name,
        "shape": list(plan.shape),
        "m": m,
        "n": n,
        "K": int(factors["S_s"].shape[0]),
        "bound_s": bound_s,
        "bound_t": list(bound_t),
        "layer": plan.layer,
        "kind": plan.kind,
    }


def _unseen(out: Path, rank: int, file: str, name: str) -> DidiError:
    return DidiError(
        f"{out}: rank {rank}'s file {file} ({name}) is not visible to rank 0; decompose.cache_dir must be on "
        f"a file system every rank (every node) sees"
    )


def join_streamed(out: Path, zoo: Zoo, cfg: DecomposeConfig, records: list[dict]) -> None:
    """Join the parts of each row-streamed matrix whose modules several shares decomposed into its factor
    file, as the whole matrix's would be written (`join_parts`), recorded in the share that holds its shared
    module (which hashed the sources); the part files are removed."""
    held: dict[int, list[tuple[dict, dict]]] = {}
    for r in records:
        for pos, e in r.get("parts", {}).items():
            held.setdefault(int(pos), []).append((r, e))
    T = len(zoo.tasks)
    for pos, pieces in sorted(held.items()):
        plan = zoo.plan[pos]
        for r, e in pieces:
            if not (out / e["file"]).is_file():
                raise _unseen(out, r["rank"], e["file"], e["name"])
        try:
            factors, bound_s, bound_t = join_parts(
                [load_file(str(out / e["file"])) for _, e in pieces],
                T,
                *plan.matrix_shape,
                cfg.torch_dtype(),
            )
        except DidiError as err:
            raise DidiError(f"{out}: '{plan.name}': {err}") from None
        owner = next(r for r, e in pieces if 0 in e["modules"])
        if not bool((factors["tau_sq"] > 0).any()):
            owner["nonmatrix"][str(pos)] = nonmatrix_record(plan, True)
        else:
            key, digest = save_hashed(out, "matrices", pos, factors)
            owner["file_sha256"][key] = digest
            owner["matrices"][str(pos)] = matrix_record(plan, factors, bound_s, bound_t)
        del factors
        for _, e in pieces:
            (out / e["file"]).unlink()


def assemble(out: Path, zoo: Zoo, cfg: DecomposeConfig, records: list[dict]) -> None:
    """Turn the shares' records and files in `out` into the store: streamed matrices' parts joined
    (`join_streamed`), files renamed to their index in plan order, index.json written last (so a store
    without it is unfinished). Whoever computed which share, the store is the same bytes. A file a record
    names but `out` lacks is an error naming the directory: the cache must be on a file system every rank
    sees."""
    cfg = unbudgeted(cfg)
    join_streamed(out, zoo, cfg, records)
    for sub, kind in (("matrices", "matrices"), ("nonmatrix", "nonmatrix")):
        for r in records:
            for pos, e in r[kind].items():
                if kind == "nonmatrix" and e["zero"]:
                    continue
                f = out / sub / f"p{int(pos):06d}.safetensors"
                if not f.is_file():
                    raise _unseen(out, r["rank"], f"{sub}/{f.name}", e["name"])
    mats = sorted((int(pos), e, r) for r in records for pos, e in r["matrices"].items())
    file_sha = {}
    matrices = []
    for i, (pos, e, r) in enumerate(mats):
        os.replace(out / "matrices" / f"p{pos:06d}.safetensors", out / "matrices" / f"{i:05d}.safetensors")
        file_sha[f"matrices/{i:05d}.safetensors"] = r["file_sha256"][f"matrices/p{pos:06d}.safetensors"]
        matrices.append(
            MatrixEntry(
                i,
                e["name"],
                tuple(e["shape"]),
                e["m"],
                e["n"],
                e["K"],
                e["bound_s"],
                tuple(e["bound_t"]),
                e["layer"],
                e["kind"],
            )
        )
    if not matrices:
        raise DidiError(f"{zoo.base}: no matrix has a non-zero task vector; nothing to decompose")
    nonmatrix = {}
    for j, (pos, e, r) in enumerate(
        sorted((int(p), e, r) for r in records for p, e in r["nonmatrix"].items())
    ):
        nonmatrix[e["name"]] = {"shape": e["shape"], "zero": e["zero"], "file": j}
        if not e["zero"]:
            os.replace(
                out / "nonmatrix" / f"p{pos:06d}.safetensors", out / "nonmatrix" / f"{j:05d}.safetensors"
            )
            file_sha[f"nonmatrix/{j:05d}.safetensors"] = r["file_sha256"][f"nonmatrix/p{pos:06d}.safetensors"]
    sha256 = {}
    for source in ["base", *zoo.task_names]:
        seen = {}
        for r in records:
            seen.update(r["sha256"][source])
        sha256[source] = {p.name: seen[p.name] for p in zoo.plan if p.name in seen}
    meta = {
        "store_version": STORE_VERSION,
        "tasks": zoo.task_names,
        "base_params": zoo.base_params,
        "config": asdict(cfg),
        "matrices": [asdict(e) for e in matrices],
        "nonmatrix": nonmatrix,
        "sha256": sha256,
        "file_sha256": dict(sorted(file_sha.items())),
    }
    shares = [
        {
            **{k: r[k] for k in ("rank", "tensors", "flops_est", "seconds")},
            # the modules (0: shared, t + 1: expert t) it decomposed of matrices split between processes
            "modules": {e["name"]: e["modules"] for e in r.get("parts", {}).values()},
        }
        for r in records
    ]
    (out / "shares.json").write_text(json.dumps({"world": len(records), "shares": shares}, indent=1))
    (out / "index.json").write_text(json.dumps(meta))
