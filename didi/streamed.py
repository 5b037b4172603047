"""Row-streamed decomposition and ALS refinement of matrices too large to hold T+1 times in memory (issue 11).

`decompose_batch` and `refine_als` take every task vector of a matrix at once: (T+1)·m·n numbers, over 5 GB in
fp32 for Llama's 128256×2048 embeddings with T = 4 (twice that at 4096). Yet both touch the matrices only
through products with thin matrices (w = K + oversample columns, or a rank): M·Z and Q_rowsᵀ·M_rows are a
stack and a sum over row blocks of M. So the functions here read the checkpoints a row block at a time
(`BlockReader`), form the task vectors, the shared part and the experts of those rows only, and accumulate
the products. Memory: O((m + n)·w·(T+1)) plus one block of the T+1 tensors. Results equal the in-memory
randomized path (docs/method.md §3.2) and `refine_als` up to float rounding (the order of summation, and in
the refinement products with τ from which the low-rank terms' are subtracted).

The price is reads: every product with a whole matrix is one pass over its rows. `decompose_streamed`
makes 2·power_iters + 3 passes (9 at the defaults); `refine_als_streamed` 2·(2·power_iters + 1) per sweep,
plus two. A pass costs its matmuls plus reading and casting the T+1 blocks (a block is read into buffers
allocated once, since a fresh block-sized allocation is page-faulted in again every time) and QRs of the
tall sketches (several on threads at once). benchmarks/streamed_embedding.py times each phase. On a GPU with
room for them (`keeps_rows`), the row blocks read in the first pass stay in device memory and every later pass
reads them there: the host still holds one block, and the checkpoints are read once per stage.

Only row-separable shared merges can be streamed (`STREAMABLE_MERGES`): a row of the mean depends on that row
of the τ's alone, whereas TIES trims by a per-tensor quantile and TSV-M takes SVDs of whole task vectors.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from didi import linalg
from didi.backbones.base import TensorPlan, Zoo
from didi.errors import DidiError
from didi.linalg import add_t_matmul, explained, minus_left, minus_right, squared_norm64, svd
from didi.quantize import stored_pair
from didi.sources import _ST_DTYPES, TensorSource

#: shared merges whose rows depend only on the same rows of the task vectors
STREAMABLE_MERGES = frozenset({"mean"})

#: the default size of one block of the T+1 (or T) row-sliced tensors in the compute dtype: large enough
#: that each matmul is efficient, small beside such a matrix's factors (when blocks were read through
#: `Zoo.read_rows`, which maps the shards again per block, a pass over Llama's 128256×2048 embedding took 19 s
#: in 64 MB blocks against 9.7 s in 256 MB ones)
BLOCK_BYTES = 256 * 2**20

#: (start, stop) -> task-vector rows [T, stop − start, n]
RowReader = Callable[[int, int], torch.Tensor]

#: the share of a GPU's free memory that a streamed matrix's row blocks may take when kept there
KEEP_SHARE = 0.5


def keeps_rows(device: torch.device, nbytes: int) -> bool:
    """Whether a streamed matrix's row blocks (`nbytes` in all, as the passes use them) stay on `device`
    after the first pass, so that every later pass reads them from device memory instead of from the
    checkpoints again.

    Why only on a GPU: streaming bounds host memory, which keeping the rows in host memory would undo,
    while a GPU's memory is a budget of its own. There a pass over host rows costs a read, a cast and a
    host-to-device copy of the whole matrix T+1 times over, and a refinement makes ~80 passes. Why half
    the free memory: the other half is left to the factors (O((m + n)·w·(T+1))) and the workspaces."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= KEEP_SHARE * free


class _KeptBlocks:
    """A stage's row blocks kept from its first pass for every later one: `keep` (None: `keeps_rows` of the
    device and the blocks' `nbytes`), else every pass reads its blocks again. A kept block must be a copy,
    never a reader's buffer that its next read overwrites (`copy=self.keep` where it is moved)."""

    def __init__(self, keep: bool | None, device: torch.device, nbytes: int) -> None:
        self.keep = keeps_rows(device, nbytes) if keep is None else keep
        self.blocks: list[tuple[slice, torch.Tensor]] = []
        self.complete = False

    def replay(self, read: Iterator[tuple[slice, torch.Tensor]]) -> Iterator[tuple[slice, torch.Tensor]]:
        """The kept blocks once a whole pass is kept (`read` is then never started), else `read`'s blocks,
        kept as they go."""
        if self.complete:
            yield from self.blocks
            return
        for block in read:
            if self.keep:
                self.blocks.append(block)
            yield block
        self.complete = self.keep

    def release(self) -> None:
        self.blocks, self.complete = [], False


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


def gram64(X: torch.Tensor, chunk: int = 1 << 20, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """G_ij = ⟨X_i, X_j⟩ of the J matrices X [J, ...], accumulated in float64 a chunk of columns at a time.

    Why float64: the closed form subtracts these norms from one another (c_t, docs/method.md §3.2), which
    needs more than fp32's 7 digits. Why a Gram matrix: every module is converted to float64 once for all
    its inner products (pairwise dots converted each operand again, and the conversions dominated the pass);
    the chunks keep the float64 copy small. `buffer` (float64, at least [J, chunk]): the chunks' copy, reused
    from call to call (a fresh one is page-faulted in at every call).
    """
    flat = X.reshape(X.shape[0], -1)
    G = torch.zeros(X.shape[0], X.shape[0], dtype=torch.float64, device=X.device)
    for s in range(0, flat.shape[1], chunk):
        part = flat[:, s : s + chunk]
        d = part.double() if buffer is None else buffer[: part.shape[0], : part.shape[1]].copy_(part)
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


# --------------------------------------------------------------------------------------------- block reads
class BlockReader:
    """Rows [start, stop) of one tensor in θ0 and in every task, as one tensor [T+1, rows, n] in `dtype` (θ0
    first) that is overwritten by the next read; a context manager that closes the files.

    Why: `Zoo.read_rows` opens and maps each shard again for every block and returns fresh tensors (a copy
    out of the map, then a cast), and a fresh allocation of a block's size is page-faulted in again each time:
    on a 128256×2048 bf16 embedding that took longer than the block's matmuls. Here each safetensors file
    stays open for the reader's life, a block is `readinto` a buffer allocated once (plain reads, no map, so
    the page cache does not count in the process's RSS), and cast into a second buffer with `copy_`. A zoo
    whose `read_rows` is not `Zoo`'s own (a calibrated zoo reads whitened rows) and pickled checkpoints are
    read through `read_rows` / the loaded tensor, copied into the same buffer.

    `check=True` tests the rows for NaN/Inf as `Zoo.read_rows` does (the same error, naming the source); the
    streamed passes check only their first pass, since every later pass reads the same bytes.
    """

    def __init__(self, zoo: Zoo, name: str, n: int, dtype: torch.dtype, row_block: int) -> None:
        self.zoo, self.name, self.n, self.dtype = zoo, name, n, dtype
        self.sources: list[tuple[str, TensorSource]] = [("base", zoo.base_source), *zoo.task_sources.items()]
        self.out = torch.empty(len(self.sources), row_block, n, dtype=dtype)
        self.files: list = []
        self.raw: dict[torch.dtype, torch.Tensor] = {}
        # (file, byte offset of row 0, stored dtype) per source; None: read through the zoo or from memory
        self.direct: list[tuple | None] = [None] * len(self.sources)
        if type(zoo).read_rows is Zoo.read_rows:
            for i, (_, src) in enumerate(self.sources):
                if not src.pickled:
                    self.direct[i] = self._open(src.file_of(name))

    def _open(self, path) -> tuple:
        f = open(path, "rb", buffering=0)
        self.files.append(f)
        size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(size))[self.name]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None or not dtype.is_floating_point:
            raise DidiError(f"{path}: tensor '{self.name}' of dtype {entry['dtype']} cannot be streamed")
        return f, 8 + size + entry["data_offsets"][0], dtype

    def __enter__(self) -> "BlockReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files = []

    def read(self, start: int, stop: int, check: bool = False) -> torch.Tensor:
        rows = stop - start
        out = self.out[:, :rows]
        via_zoo = None
        for i, (label, src) in enumerate(self.sources):
            with PHASES("read"):
                if self.direct[i] is not None:
                    f, offset, stored = self.direct[i]
                    raw = out[i] if stored == self.dtype else self._raw(stored)[:rows]
                    _read_exactly(f, offset + start * self.n * raw.element_size(), raw)
                elif type(self.zoo).read_rows is not Zoo.read_rows:
                    if via_zoo is None:
                        base, xs = self.zoo.read_rows(self.name, start, stop, self.dtype)
                        via_zoo = [base, *xs]
                    raw = via_zoo[i].reshape(rows, self.n)
                else:
                    raw = src.get_rows(self.name, start, stop).reshape(rows, self.n)
            with PHASES("convert"):
                if raw.data_ptr() != out[i].data_ptr():
                    out[i].copy_(raw)
                if check and raw.dtype.is_floating_point and not torch.isfinite(out[i].sum()):
                    if not torch.isfinite(out[i]).all():
                        where = "the base model" if label == "base" else f"task '{label}'"
                        raise DidiError(f"{where} ({src.path}): tensor '{self.name}' contains NaN or Inf")
        return out

    def _raw(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.raw:
            self.raw[dtype] = torch.empty(self.out.shape[1], self.n, dtype=dtype)
        return self.raw[dtype]


def _read_exactly(f, offset: int, into: torch.Tensor) -> None:
    """Fill the contiguous tensor `into` with the bytes at `offset` of the open file `f`."""
    if not into.numel():
        return
    view = memoryview(into.view(torch.uint8).numpy()).cast("B")
    f.seek(offset)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise DidiError(f"{f.name}: file ends inside the data of a tensor (truncated?)")
        done += got


# ------------------------------------------------------------------------------------------- decomposition
class _ModuleRows:
    """Row blocks of the T+1 modules of one matrix read from the checkpoints, as [T+1, rows, n]: module 0 is
    the shared part (mean of the τ's), 1..T the experts M_t = τ_t − M_s. A block is a view of a buffer that
    the next block overwrites; a context manager (the reader's files).

    The first pass (`first=True`) checks every source's rows for NaN/Inf and, with `stats`, also hashes them
    and accumulates the float64 norms, so that no pass is spent on them alone. With `keep` (None:
    `keeps_rows`), the first pass keeps each block's modules and every later pass yields those
    (`_KeptBlocks`).
    """

    def __init__(
        self,
        zoo: Zoo,
        plan: TensorPlan,
        dtype: torch.dtype,
        device: torch.device,
        row_block: int,
        stats: bool = True,
        keep: bool | None = False,
    ) -> None:
        self.zoo, self.name, self.dtype, self.device, self.stats = zoo, plan.name, dtype, device, stats
        self.m, self.n = _row_separable_shape(plan)
        self.T = len(zoo.task_names)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.kept = _KeptBlocks(keep, device, (self.T + 1) * self.m * self.n * itemsize)
        self.row_block = row_block
        self.reader = BlockReader(zoo, plan.name, self.n, dtype, row_block)
        prefix = f"{dtype}|{tuple(plan.shape)}|".encode()  # as didi.sources.tensor_sha256 of the whole
        self.hashes = [hashlib.sha256(prefix) for _ in range(self.T + 1)]
        f64 = dict(dtype=torch.float64, device=device)
        self.ms_sq = torch.zeros((), **f64)
        self.mt_sq, self.inner, self.tau_sq = (torch.zeros(self.T, **f64) for _ in range(3))
        self.f64: torch.Tensor | None = None

    def __enter__(self) -> "_ModuleRows":
        return self

    def __exit__(self, *exc) -> None:
        self.reader.close()
        self.kept.release()

    def blocks(self, first: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
        return self.kept.replay(self._read(first))

    def _read(self, first: bool) -> Iterator[tuple[slice, torch.Tensor]]:
        stats = first and self.stats
        for sl in row_slices(self.m, self.row_block):
            X = self.reader.read(sl.start, sl.stop, check=first)  # θ0, then the tasks
            if stats:
                with PHASES("hash"):
                    for h, t in zip(self.hashes, X):
                        h.update(t.view(torch.uint8).numpy())
            X = X.to(self.device, copy=self.kept.keep)  # a kept block must not be the reader's buffer
            # in place, the same operations as decompose_batch on the whole matrix: τ_t = task − θ0 in the
            # experts' slots, M_s = their mean in θ0's, then M_t = τ_t − M_s
            with PHASES("modules"):
                X[1:] -= X[0]
                torch.mean(X[1:], 0, out=X[0])
            if stats:
                with PHASES("gram64"):
                    self.tau_sq += gram64(X[1:], buffer=self._f64()).diagonal()
            with PHASES("modules"):
                X[1:] -= X[0]
            if stats:
                with PHASES("gram64"):
                    G = gram64(X, buffer=self._f64())
                    self.ms_sq += G[0, 0]
                    self.mt_sq += G.diagonal()[1:]
                    self.inner += G[0, 1:]
            yield sl, X
        self.f64 = None

    def _f64(self) -> torch.Tensor:
        """gram64's float64 chunk buffer, allocated at the first block (first pass only)."""
        if self.f64 is None:
            self.f64 = torch.empty(self.T + 1, 1 << 20, dtype=torch.float64, device=self.device)
        return self.f64

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


# Every product below is taken module by module (a loop of 2-D matmuls, never one batched or broadcast
# product over the modules): a module's factors are then the same bits whichever other modules are computed
# beside it, which is what lets the processes of a sharded run split one matrix's modules between them and
# still write the 1-process store byte for byte (`decompose_streamed_part`).
def _sketch(rows: _ModuleRows, mods: list[int], Z: torch.Tensor, first: bool = False) -> torch.Tensor:
    """Y_j = M_{mods[j]}·Z_j for each module asked, [J, m, w], one pass."""
    Y = Z.new_empty(len(mods), rows.m, Z.shape[-1])
    for sl, X in rows.blocks(first):
        with PHASES("matmul"):
            for j, i in enumerate(mods):
                torch.matmul(X[i], Z[j], out=Y[j, sl])
    return Y


def _co_sketch(rows: _ModuleRows, mods: list[int], Q: torch.Tensor) -> torch.Tensor:
    """Z_j = M_{mods[j]}ᵀ·Q_j, [J, n, w], summed over the row blocks in one pass."""
    Z = Q.new_zeros(len(mods), rows.n, Q.shape[-1])
    for sl, X in rows.blocks():
        with PHASES("matmul"):
            for j, i in enumerate(mods):
                add_t_matmul(Z[j], X[i], Q[j, sl])
    return Z


def _orthonormal_each(Y: torch.Tensor) -> torch.Tensor:
    """Q of each module's QR, in place (one module's workspace at a time per thread, not the batch's)."""
    orthonormal_over(list(Y))
    return Y


def orthonormal_all(Ys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`linalg.orthonormal_all`, timed as the `qr` phase."""
    with PHASES("qr"):
        return linalg.orthonormal_all(Ys)


def orthonormal_over(Ys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`orthonormal_all` written over the Y's own memory (the same Q's): the sketches are not needed after
    their QR, and a second set of m×w matrices beside them is what a streamed matrix's peak is made of."""
    with PHASES("qr"):
        return linalg.each_on_one_thread(_orthonormal_over, Ys)


def _orthonormal_over(Y: torch.Tensor) -> torch.Tensor:
    Q = linalg.orthonormal(Y)
    return Y.copy_(Q) if Q.shape == Y.shape else Q


def _projections(rows: _ModuleRows, mods: list[int], B: torch.Tensor) -> torch.Tensor:
    """B_jᵀM_{mods[j]} [J, basis, n] (whose SVDs give the factors), summed over the row blocks."""
    P = B.new_zeros(len(mods), B.shape[-1], rows.n)
    for sl, X in rows.blocks():
        with PHASES("matmul"):
            for j, i in enumerate(mods):
                P[j].addmm_(B[j, sl].T, X[i])
    return P


def _cross_terms(
    rows: _ModuleRows, mods: list[int], U: torch.Tensor, V: torch.Tensor
) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
    """a_t = diag(U_sᵀM_tV_s) [T, K] when the shared part (module 0) is among `mods`, and b_t =
    diag(U_tᵀM_sV_t) [K] for each expert among them (float64), as `decompose_batch` forms them: the sums
    over rows of U ∘ (M·V), accumulated over the row blocks in one pass at width K. Σ_t M_t = 0, so the last
    a_t is minus the sum of the others."""
    T, K = rows.T, U.shape[-1]
    f64 = dict(dtype=torch.float64, device=U.device)
    s = mods.index(0) if 0 in mods else None
    a = torch.zeros(T, K, **f64) if s is not None else None
    b = {i: torch.zeros(K, **f64) for i in mods if i}
    known = T - 1 if T > 1 else T
    for sl, X in rows.blocks():
        with PHASES("matmul"):
            if a is not None:
                for t in range(known):
                    a[t] += (U[s, sl] * (X[1 + t] @ V[s])).sum(0)
            for j, i in enumerate(mods):
                if i:
                    b[i] += (U[j, sl] * (X[0] @ V[j])).sum(0)
    if a is not None and known < T:
        a[known] = -a[:known].sum(0)
    return a, b


def decompose_streamed(
    zoo: Zoo,
    plan: TensorPlan,
    K: int,
    oversample: int = 32,
    power_iters: int = 3,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    row_block: int | None = None,
    rtol: float | None = None,
    keep_rows: bool | None = None,
) -> tuple[dict[str, torch.Tensor], int, list[int], dict[str, str]]:
    """`decompose_batch(taus[None], mean, K, svd_method="randomized", ...)[0]` of one matrix, never holding an
    m×n matrix: returns (factors, bound_s, bound_t, sha256) with the same factor dict (U_s, S_s, V_s, U_t,
    S_t, V_t, a, b, ms_sq, mt_sq, inner, tau_sq; contiguous CPU tensors, S and the inner products float64)
    and sha256 = {"base": hex, task: hex}, each equal to `didi.sources.tensor_sha256` of the whole tensor read
    in `dtype` (what the manifest records).

    Why: the T+1 modules of Llama's embeddings do not fit in host memory (module docstring). Each pass reads
    every row block of θ0 and the T tasks once and updates all T+1 block Krylov range finders together: Y = MΩ
    row by row, MᵀQ summed over the blocks, each iteration's block orthonormalised against the basis so far,
    then the SVD of BᵀM on the whole basis, as `linalg.randomized_svds` does, with the same Ω per module (a
    generator seeded with 0 for the shared part, 1 for every expert), so the factors match the in-memory path
    up to float summation order (that path takes the last expert's first product as minus the others'; here
    every module's own). The squared norms (float64) and the hashes come from the first pass; a and b from
    one more pass at width K (`_cross_terms`). It is `join_parts` of the one part holding every module
    (`decompose_streamed_part`).

    Only the `mean` shared merge is row-separable; the caller decides when to stream. Memory is
    O((m + n)·(K + oversample)·(T+1)) (the basis holds 2·(K + oversample) columns per module, and so do the
    projections BᵀM, as rows of length n) plus one row block
    (`row_block` rows; default: about 256 MB for the T+1 tensors). With K + oversample ≥ min(m, n) the range
    finder spans the whole range (a full SVD up to rounding) and the saving is gone: stream only K ≪ min(m,n).
    NaN/Inf in any block is a DidiError naming the source and tensor (checked in the first pass). A tensor
    whose task vectors are all zero comes back with tau_sq all 0 (the caller may treat it as a zero delta).
    `keep_rows`: keep the modules' row blocks on the device after the first pass (None: `keeps_rows`, on a
    GPU with room for them); the results are the same bits either way.
    """
    m, n = _row_separable_shape(plan)
    T = len(zoo.task_names)
    part, sha = decompose_streamed_part(
        zoo, plan, K, range(T + 1), oversample, power_iters, dtype, device, row_block, keep_rows
    )
    factors, bound_s, bound_t = join_parts([part], T, m, n, dtype, rtol)
    return factors, bound_s, bound_t, sha


def decompose_streamed_part(
    zoo: Zoo,
    plan: TensorPlan,
    K: int,
    modules: Sequence[int],
    oversample: int = 32,
    power_iters: int = 3,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    row_block: int | None = None,
    keep_rows: bool | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The factors of some of one streamed matrix's T+1 modules (0: the shared part, t + 1: expert t), as a
    flat dict of CPU tensors (`U.i`, `S.i` in `dtype`, `V.i`; `b.i` for an expert; with module 0 also `a`
    and the float64 norms `ms_sq`, `mt_sq`, `inner`, `tau_sq`) and, with module 0, the sources' sha256.

    Why parts: a sharded run gives the processes different modules of the largest matrix (Llama's
    embedding), so that no process holds every module's range finder; `join_parts` of the parts is the
    factor dict of `decompose_streamed`, byte for byte, since every product is taken module by module. Every
    part reads all T+1 sources in every pass (a module is formed from all of them); memory is the modules'
    share of `decompose_streamed`'s plus one row block (or, with `keep_rows`, every block on the device)."""
    m, n = _row_separable_shape(plan)
    T = len(zoo.task_names)
    mods = sorted(set(int(i) for i in modules))
    if not mods or mods[0] < 0 or mods[-1] > T:
        raise DidiError(f"tensor '{plan.name}': modules {mods}; expected a non-empty subset of 0..{T}")
    if K < 1:
        raise DidiError(f"tensor '{plan.name}': K={K}; a decomposition keeps at least one component")
    K = min(K, m, n)
    device = torch.device(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    b, blocks = linalg.krylov_shape(m, n, K, oversample, power_iters)
    J = len(mods)
    block = row_block or block_rows(n, T + 1, itemsize)
    with _ModuleRows(zoo, plan, dtype, device, block, stats=0 in mods, keep=keep_rows) as rows:
        # the experts share one Ω (seed 1), as `linalg.randomized_svds(..., zero_sum=True)` draws them
        omega = torch.stack([_omega(n, b, min(i, 1), dtype, device) for i in mods])
        Y = _orthonormal_each(_sketch(rows, mods, omega, first=True))
        del omega
        basis = Y.new_empty(J, m, b * blocks)
        basis[..., :b] = Y
        del Y
        Q = basis[..., :b]  # each block is used from the basis: no second copy of it is held
        for i in range(1, blocks if blocks > 1 else power_iters + 1):
            Z = _orthonormal_each(_co_sketch(rows, mods, Q))
            del Q
            Y = _sketch(rows, mods, Z)
            del Z
            j = i if blocks > 1 else 0  # one block: subspace iteration replaces it
            if blocks > 1:
                with PHASES("qr"):
                    for k in range(J):
                        linalg.against(Y[k], basis[k, :, : i * b])
            basis[..., j * b : (j + 1) * b] = _orthonormal_each(Y)
            del Y
            Q = basis[..., j * b : (j + 1) * b]
        del Q
        P = _projections(rows, mods, basis)
        with PHASES("svd"):
            U, S, V = _factor(basis, P, K)
        del basis, P
        a, b_ = _cross_terms(rows, mods, U, V)
    part = {}
    for j, i in enumerate(mods):
        part.update({f"U.{i}": U[j], f"S.{i}": S[j], f"V.{i}": V[j]})
        if i:
            part[f"b.{i}"] = b_[i]
    if a is not None:
        part.update(a=a, ms_sq=rows.ms_sq, mt_sq=rows.mt_sq, inner=rows.inner, tau_sq=rows.tau_sq)
    part = {k: v.detach().contiguous().cpu() for k, v in part.items()}
    return part, (rows.sha256() if 0 in mods else None)


def join_parts(
    parts: Sequence[dict[str, torch.Tensor]],
    T: int,
    m: int,
    n: int,
    dtype: torch.dtype = torch.float32,
    rtol: float | None = None,
) -> tuple[dict[str, torch.Tensor], int, list[int]]:
    """The factor dict of one streamed matrix and its numerical ranks (bound_s, bound_t) from the parts
    `decompose_streamed_part` wrote, which together hold every module once; the tolerance of the ranks is
    relative to the largest σ of all modules, as `decompose_batch`'s."""
    held: dict[str, torch.Tensor] = {}
    for part in parts:
        clash = held.keys() & part.keys()
        if clash:
            raise DidiError(f"streamed parts: {sorted(clash)[0]} is in two parts; each module belongs to one")
        held.update(part)
    missing = [k for k in ("a", *(f"U.{i}" for i in range(T + 1))) if k not in held]
    if missing:
        raise DidiError(
            f"streamed parts: {missing[0]} is in no part; the parts must hold all {T + 1} modules"
        )
    f64 = torch.float64
    S = [held[f"S.{i}"] for i in range(T + 1)]
    tol = (rtol if rtol is not None else max(m, n) * torch.finfo(dtype).eps) * max(float(s[0]) for s in S)
    factors = {
        "U_s": held["U.0"],
        "S_s": S[0].to(f64),
        "V_s": held["V.0"],
        "U_t": torch.stack([held[f"U.{i}"] for i in range(1, T + 1)]),
        "S_t": torch.stack(S[1:]).to(f64),
        "V_t": torch.stack([held[f"V.{i}"] for i in range(1, T + 1)]),
        "a": held["a"],
        "b": torch.stack([held[f"b.{i}"] for i in range(1, T + 1)]),
        **{k: held[k] for k in ("ms_sq", "mt_sq", "inner", "tau_sq")},
    }
    factors = {k: v.contiguous() for k, v in factors.items()}
    return factors, int((S[0] > tol).sum()), [int((s > tol).sum()) for s in S[1:]]


def _omega(n: int, w: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The Gaussian test matrix of module `seed`, drawn exactly as `linalg.randomized_svd` draws it."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, w, generator=g, device=device, dtype=dtype)


def _factor(B: torch.Tensor, P: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U = B·Ũ [J, m, K], σ [J, K] and V [J, n, K] from the SVDs Ũ Σ Vᵀ of P = BᵀM (side by side, as
    `linalg.randomized_svds` takes them)."""
    small = linalg.each_on_one_thread(svd, list(P))
    U = torch.stack([B[i] @ ub[:, :K] for i, (ub, _, _) in enumerate(small)])
    S = torch.stack([s[:K] for _, s, _ in small])
    V = torch.stack([vh[:K].T for _, _, vh in small])
    return U, S, V


# ------------------------------------------------------------------------------------------------- refine
#: low-rank terms A·B (A m×r, B r×n), whose rows [sl] are A[sl]·B
Terms = Sequence[tuple[torch.Tensor, torch.Tensor]]
#: which rows a product multiplies: τ_t (an int t) or the mean of the τ's ("mean")
Source = int | str


class _TaskRows:
    """Row blocks of the task vectors [T, rows, n] from a reader, on the factors' device and dtype, with
    scratch buffers of one block's rows for the mean and the residuals (allocated once: a fresh block-sized
    allocation is page-faulted in again at every block). With `keep` (None: `keeps_rows`), the first pass
    keeps the blocks and every later pass yields those (`_KeptBlocks`)."""

    def __init__(
        self,
        read_rows: RowReader,
        m: int,
        n: int,
        T: int,
        row_block: int,
        like: torch.Tensor,
        keep: bool | None = False,
    ) -> None:
        self.read_rows, self.m, self.n, self.T, self.row_block = read_rows, m, n, T, row_block
        self.dtype, self.device = like.dtype, like.device
        self.scratch = torch.empty(3, min(m, row_block), n, dtype=self.dtype, device=self.device)
        self.kept = _KeptBlocks(keep, self.device, T * m * n * like.element_size())

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        return self.kept.replay(self._read())

    def _read(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for sl in row_slices(self.m, self.row_block):
            tau = self.read_rows(sl.start, sl.stop)  # timed by the reader (BlockReader's phases)
            # a kept block must not be the reader's buffer, which its next call overwrites
            tau = tau.to(self.device, self.dtype, copy=self.kept.keep)
            yield sl, tau.reshape(self.T, sl.stop - sl.start, self.n)


def _pass(
    rows: _TaskRows,
    right: dict | None = None,
    left: dict | None = None,
    common: Terms = (),
    residuals: Sequence[tuple[int, Terms]] = (),
) -> tuple[dict, dict, torch.Tensor]:
    """One read of every row block for every product a step needs at that point:

    - right {key: (source, Z n×w)}: Y = source·Z [m, w], row block by row block;
    - left {key: (source, Q m×w)}: W = sourceᵀ·Q [n, w], summed over the blocks;
    - residuals [(t, terms)]: ‖τ_t − Σ common − Σ terms‖² [J] float64, summed over the blocks, each block's
      residual formed in full (never expanded as ‖X‖² − ‖QᵀX‖², which cancels): the errors reported before
      and after the refinement. The accept tests between need none (`linalg.explained`).

    Why products with τ_t and their mean, not with the targets (τ_t − A_sB_s, mean_t(τ_t − A_tB_t)): a target
    differs from them by low-rank terms whose products cost (m + n)·r·w instead of m·n·r per pass, so the
    caller subtracts those afterwards; and a pass can serve two steps at once (the next step's first product
    in this step's error pass).
    """
    right, left = right or {}, left or {}
    Y = {k: z.new_empty(rows.m, z.shape[1]) for k, (_, z) in right.items()}
    W = {k: q.new_zeros(rows.n, q.shape[1]) for k, (_, q) in left.items()}
    err = torch.zeros(len(residuals), dtype=torch.float64, device=rows.device)
    use_mean = any(src == "mean" for src, _ in [*right.values(), *left.values()])
    for sl, tau in rows.blocks():
        r = sl.stop - sl.start
        mean, shared, resid = (b[:r] for b in rows.scratch)
        with PHASES("matmul"):
            if use_mean:
                torch.mean(tau, 0, out=mean)
            src = lambda s: mean if s == "mean" else tau[s]  # noqa: E731
            for k, (s, z) in right.items():
                torch.matmul(src(s), z, out=Y[k][sl])
            for k, (s, q) in left.items():
                add_t_matmul(W[k], src(s), q[sl])
        if not residuals:
            continue
        with PHASES("residual"):
            shared.zero_()
            for A, B in common:
                shared.addmm_(A[sl], B)
            for j, (t, terms) in enumerate(residuals):
                torch.sub(tau[t], shared, out=resid)
                for A, B in terms:
                    resid.addmm_(A[sl], B, alpha=-1)
                # per row in the compute dtype, then float64: a float64 sum of float32 squares converts
                # every element (15× slower than the block's matmuls)
                err[j] += squared_norm64(resid)
    return Y, W, err


def _best_rank_r(
    rows: _TaskRows,
    source: dict[int, Source],
    minus: dict[int, Terms],
    A: dict[int, torch.Tensor],
    Y0: dict[int, torch.Tensor],
    iters: int,
    right: dict | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict]:
    """`refine._best_rank_r` of the matrices X_j = source_j − Σ minus_j (all in lockstep, so that each pass
    reads each row block once): Q = orth(X_j B_jᵀ) (`Y0[j]`, that product, computed by the caller's previous
    pass) or orth(A_j) where j has no Y0, then `iters` times Q = orth(X (XᵀQ)); returns (Q, QᵀX, Y) with Y
    the `right` products (`_pass`) taken in the last pass, which the caller's next step starts from.

    The products with X_j are those with source_j less the low-rank terms' (`_pass`). Memory: `Y0` is
    emptied once its products start the bases (the caller keeps none of them), each iteration's Q is dropped
    before the next sketch and that sketch becomes the next Q in place, so about two m×w matrices per j are
    held at once, not five."""
    keys = list(A)
    Q = dict(zip(keys, orthonormal_all([Y0[j] if j in Y0 else A[j] for j in keys])))
    Y0.clear()
    for _ in range(iters):
        _, W, _ = _pass(rows, left={j: (source[j], Q[j]) for j in keys})
        Z = {j: minus_left(W[j], minus[j], Q[j]) for j in keys}
        del W, Q
        Y, _, _ = _pass(rows, right={j: (source[j], Z[j]) for j in keys})
        Q = dict(zip(keys, orthonormal_over([minus_right(Y[j], minus[j], Z[j]) for j in keys])))
        del Y, Z
    Y, W, _ = _pass(rows, right=right, left={j: (source[j], Q[j]) for j in keys})
    return Q, {j: minus_left(W[j], minus[j], Q[j]).T.contiguous() for j in keys}, Y


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
    consume: bool = False,
    keep_rows: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """`refine.refine_als` on task vectors read a row block at a time: returns (A_s, B_s, A_t, B_t,
    err_before [T], err_after [T]) with A m×r, B r×n and the errors ‖A_sB_s + A_tB_t − τ_t‖² (float64,
    summed over the blocks; `refine.task_errors`' semantics) of the initial and of the returned factors.

    Why: refining Llama's embeddings in memory needs all T task vectors at once. The block-coordinate descent
    is `refine_als`'s: with the shared factors fixed, each expert's update is the best rank-r_t fit of
    τ_t − A_sB_s by subspace iteration warm-started from its factors, kept only if it lowers that task's
    error; then the shared update is the best rank-r_s fit of mean_t(τ_t − A_tB_t), kept only if it lowers
    the total error. So the error never increases. Every product (X Bᵀ, XᵀQ, QᵀX, the errors) is accumulated
    over row blocks of τ_t = task rows − base rows (`read_rows(start, stop)` → [T, rows, n]; it may return a
    buffer that its next call overwrites); the T experts iterate in lockstep, so a pass reads each block once
    for all of them. A step's first product X·Bᵀ is taken in the previous step's last pass (`_pass`), and an
    update is kept when it explains more of its target (`linalg.explained`), which needs no residual, so a
    sweep is 2·(2·power_iters + 1) passes, plus one for the starting errors and one for the final ones. The
    results equal `refine_als` on the same inputs up to float rounding (an accept test that ties to the last
    digit may go either way). `read_rows.close()`, where it has one, is called at the end.

    Factors are low-rank only: a folded shared part (B_s None, a dense m×n M_s) is not streamed, since it is
    the very m×n matrix streaming avoids holding. Compute dtype and device are A_s's. `row_block` default:
    about 256 MB for the T task-vector rows.

    `expert_dtype` other than float32 (docs/method.md §9.2): the experts given are the stored (dequantized)
    ones; the sweeps run in float, then the experts are quantized once more and the errors recomputed in one
    more pass over the rows; if that is not below the starting error, the starting factors are returned. A
    streamed matrix is thus quantized after its ALS, not inside it as `refine.refine_als` does.

    `consume`: the lists `A_t` and `B_t` are updated in place to the factors returned (as the sweeps go,
    with float32 experts), so that the caller's lists do not keep the starting experts (T·m·r floats) alive.

    `keep_rows`: keep the task vectors' row blocks on the device after the first pass, so that the reader is
    called once per block (None: `keeps_rows`, on a GPU with room for T·m·n numbers); same results.
    """
    if B_s is None:
        raise DidiError(
            "refine_als_streamed: a folded shared part (B_s None, a dense m×n matrix) cannot be streamed; "
            "refine it in memory"
        )
    try:
        itemsize = A_s.element_size()
        rows = _TaskRows(read_rows, m, n, T, row_block or block_rows(n, T, itemsize), A_s, keep_rows)
        # the starting factors are kept only where they may be returned
        given = (A_t, B_t) if consume else None
        A_t, B_t = list(A_t), list(B_t)
        start = (A_s, B_s, list(A_t), list(B_t)) if expert_dtype != "float32" else None
        # the starting errors, and τ_t·B_tᵀ for the first expert step in the same pass
        Y0, _, err = _pass(
            rows, right=_expert_starts(B_t) if sweeps else {}, residuals=_errors(A_s, B_s, A_t, B_t)
        )
        err_before = err.clone()
        for sweep in range(sweeps):
            last = sweep == sweeps - 1
            A_t, B_t, Y0 = _expert_step(rows, A_s, B_s, A_t, B_t, power_iters, Y0)
            if given is not None and start is None:
                given[0][:], given[1][:] = A_t, B_t
            if A_s.shape[1]:
                A_s, B_s, Y0 = _shared_step(rows, A_s, B_s, A_t, B_t, power_iters, Y0, last)
        if expert_dtype != "float32":
            pairs = [stored_pair(A, B, expert_dtype) for A, B in zip(A_t, B_t)]
            A_t, B_t = [p[1] for p in pairs], [p[2] for p in pairs]
        if sweeps or expert_dtype != "float32":  # the errors of what is returned
            _, _, err = _pass(rows, residuals=_errors(A_s, B_s, A_t, B_t))
        if expert_dtype != "float32":
            if float(err.sum()) >= float(err_before.sum()):
                A_s, B_s, A_t, B_t = start
                err = err_before.clone()
        if given is not None:
            given[0][:], given[1][:] = A_t, B_t
        return A_s, B_s, A_t, B_t, err_before, err
    finally:
        if hasattr(read_rows, "close"):
            read_rows.close()


def _errors(A_s, B_s, A_t: list, B_t: list) -> list[tuple[int, Terms]]:
    return [(t, [(A_s, B_s), (A, B)]) for t, (A, B) in enumerate(zip(A_t, B_t))]


def _expert_starts(B_t: list) -> dict:
    """The right products τ_t·B_tᵀ that start the experts of rank > 0 and B_t ≠ 0 (key ("x", t))."""
    return {("x", t): (t, B.T) for t, B in enumerate(B_t) if B.shape[0] and B.abs().sum() > 0}


def _expert_step(
    rows: _TaskRows, A_s, B_s, A_t: list, B_t: list, iters: int, Y0: dict
) -> tuple[list, list, dict]:
    """Every expert of rank > 0 refitted to X_t = τ_t − A_sB_s together; each kept if it explains more of X_t
    than the current factors (`linalg.explained`: its error drops). `Y0`: τ_t·B_tᵀ from the previous pass;
    returns the shared step's τ̄·B_sᵀ (key "s"), taken in this step's last pass."""
    active = [t for t in range(rows.T) if A_t[t].shape[1]]
    shared_start = {"s": ("mean", B_s.T)} if A_s.shape[1] and B_s.abs().sum() > 0 else {}
    if not active:
        Y, _, _ = _pass(rows, right=shared_start) if shared_start else ({}, None, None)
        return A_t, B_t, Y
    missing = {k: v for k, v in _expert_starts(B_t).items() if k not in Y0 and k[1] in active}
    if missing:  # no previous pass took them (no shared step before this one)
        Y0.update(_pass(rows, right=missing)[0])
    minus = {t: [(A_s, B_s)] for t in active}
    starts = {t: minus_right(Y0[("x", t)], minus[t], B_t[t].T) for t in active if ("x", t) in Y0}
    Y0.clear()  # the caller's: held by `starts` alone, which `_best_rank_r` empties
    # what the current factors explain, taken now so that the starts need not be kept to the end
    current = {t: explained(starts.get(t), A_t[t], B_t[t]) for t in active}
    Q, Bn, Y = _best_rank_r(
        rows, {t: t for t in active}, minus, {t: A_t[t] for t in active}, starts, iters, right=shared_start
    )
    A_t, B_t = list(A_t), list(B_t)
    for t in active:
        if squared_norm64(Bn[t]) > current[t]:
            A_t[t], B_t[t] = Q[t], Bn[t]
    return A_t, B_t, Y


def _shared_step(
    rows: _TaskRows, A_s, B_s, A_t: list, B_t: list, iters: int, Y0: dict, last: bool
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The shared factors refitted to R = mean_t(τ_t − A_tB_t); kept if they explain more of R than the
    current ones (the total error drops: Σ_t ‖τ_t − A_tB_t − M‖² = T·‖R − M‖² + const). `Y0`: τ̄·B_sᵀ from
    the previous pass; returns the next sweep's expert starts τ_t·B_tᵀ (none after the `last` sweep), taken in
    this step's last pass."""
    T = rows.T
    minus = {0: [(A / T, B) for A, B in zip(A_t, B_t) if A.shape[1]]}
    starts = {0: minus_right(Y0["s"], minus[0], B_s.T)} if "s" in Y0 else {}
    Y0.clear()
    current = explained(starts.get(0), A_s, B_s)
    nxt = {} if last else _expert_starts(B_t)
    Q, Bn, Y = _best_rank_r(rows, {0: "mean"}, minus, {0: A_s}, starts, iters, right=nxt)
    if squared_norm64(Bn[0]) > current:
        return Q[0], Bn[0], Y
    return A_s, B_s, Y
