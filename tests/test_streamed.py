"""Row-streamed decomposition and refinement (didi.streamed) against independent in-memory computations: the
in-memory randomized decomposition, a full float64 SVD, the materialised loss, the whole tensor's sha256 and
`refine_als`; and the row readers against whole-tensor reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from didi.backbones import Adapter, Zoo
from didi.closed_form import hard_error
from didi.decompose import decompose_batch, terms_from_factors
from didi.errors import DidiError
from didi.merges import mean_merge
from didi.refine import TaskVectorRows, init_factors, refine_als, task_errors
from didi.sources import TensorSource, tensor_sha256
from didi.streamed import (
    BlockReader,
    decompose_streamed,
    decompose_streamed_part,
    join_parts,
    keeps_rows,
    refine_als_streamed,
)
from helpers import write_finetune_zoo

T = 3
SHAPES = {"tall.weight": (600, 40), "wide.weight": (24, 300)}


def _write_zoo(root: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> tuple[str, dict[str, str]]:
    return write_finetune_zoo(root, shapes, T, seed)


def _taus(root: str, tasks: dict[str, str], name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """τ_t as the code sees them (task − base, both read in `dtype`), read with safetensors directly."""
    base = load_file(root)[name].to(dtype)
    return torch.stack(
        [(load_file(p)[name].to(dtype) - base).reshape(base.shape[0], -1) for p in tasks.values()]
    )


@pytest.fixture
def zoo(tmp_path) -> Zoo:
    base, tasks = _write_zoo(tmp_path / "zoo", SHAPES)
    return Zoo(Adapter(), base, tasks)


def _plan(zoo: Zoo, name: str):
    return next(p for p in zoo.plan if p.name == name)


def _span_overlap(U: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """|diag(UᵀU')|: 1 for each column that spans the same line in both (signs are free)."""
    return (U.double().T @ U2.double()).diagonal().abs()


@pytest.mark.parametrize("name", list(SHAPES))
def test_streamed_factors_equal_in_memory_randomized(zoo, name):
    """(a) Same factors as decompose_batch(randomized) on the whole matrices, and a, b and the norms equal
    the dense formulas of the τ's in float64."""
    K, over, iters = 6, 6, 3
    base, xs = zoo.read(name)
    taus32 = torch.stack(xs).sub_(base).reshape(T, *_plan(zoo, name).matrix_shape)
    ref, ref_s, ref_t = decompose_batch(
        taus32[None].clone(), mean_merge, K, svd_method="randomized", oversample=over, power_iters=iters
    )[0]
    f, bound_s, bound_t, _ = decompose_streamed(
        zoo,
        _plan(zoo, name),
        K,
        oversample=over,
        power_iters=iters,
        row_block=64 if name == "tall.weight" else 5,
    )
    assert (bound_s, bound_t) == (ref_s, ref_t)
    assert {k: (v.shape, v.dtype) for k, v in f.items()} == {k: (v.shape, v.dtype) for k, v in ref.items()}
    assert all(v.is_contiguous() and v.device.type == "cpu" for v in f.values())
    for key in ("S_s", "S_t"):
        torch.testing.assert_close(f[key], ref[key], rtol=1e-4, atol=0)
    for U, U2 in ((f["U_s"], ref["U_s"]), (f["V_s"], ref["V_s"]), *zip(f["U_t"], ref["U_t"])):
        assert (_span_overlap(U, U2) > 1 - 1e-4).all()
    for V, V2 in zip(f["V_t"], ref["V_t"]):
        assert (_span_overlap(V, V2) > 1 - 1e-4).all()

    taus = taus32.double()
    Ms = taus.mean(0)
    Mt = taus - Ms
    U_s, V_s, U_t, V_t = (f[k].double() for k in ("U_s", "V_s", "U_t", "V_t"))
    a = torch.stack([(U_s.T @ Mt[t] @ V_s).diagonal() for t in range(T)])
    b = torch.stack([(U_t[t].T @ Ms @ V_t[t]).diagonal() for t in range(T)])
    scale = float(f["S_s"][0])
    torch.testing.assert_close(f["a"], a, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(f["b"], b, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(f["ms_sq"], (Ms**2).sum(), rtol=1e-6, atol=0)  # M_s is an fp32 mean
    torch.testing.assert_close(f["mt_sq"], (Mt**2).sum((1, 2)), rtol=1e-6, atol=0)
    torch.testing.assert_close(f["inner"], (Ms * Mt).sum((1, 2)), rtol=0, atol=1e-6 * float(f["ms_sq"]))
    torch.testing.assert_close(f["tau_sq"], (taus**2).sum((1, 2)), rtol=1e-10, atol=0)


def test_top_singular_values_match_a_full_float64_svd(zoo):
    """(b) σ_1..σ_{K/2} of every module within 1e-3 of the full SVD, on fine-tune-like spectra."""
    name, K = "tall.weight", 10
    f, _, _, _ = decompose_streamed(zoo, _plan(zoo, name), K, oversample=8, power_iters=4, row_block=50)
    taus = _taus(zoo.base, zoo.tasks, name).double()
    Ms = taus.mean(0)
    full = torch.linalg.svdvals(torch.cat([Ms[None], taus - Ms]))[:, : K // 2]
    got = torch.cat([f["S_s"][None], f["S_t"]])[:, : K // 2]
    assert ((got - full).abs() / full).max() < 1e-3


def test_closed_form_equals_materialised_loss_of_the_stored_factors(zoo):
    """(c) In float64 the terms from the streamed store give ‖τ_t − U_s,rΣV_sᵀ − U_t,rΣV_tᵀ‖² exactly."""
    name, K = "tall.weight", 8
    f, _, _, _ = decompose_streamed(
        zoo, _plan(zoo, name), K, oversample=4, power_iters=1, dtype=torch.float64, row_block=70
    )
    taus = _taus(zoo.base, zoo.tasks, name, torch.float64)
    terms = terms_from_factors(f, K, dtype=torch.float64)
    for r_s, r_t in ((0, [0, 0, 0]), (3, [1, 8, 0]), (8, [8, 8, 8]), (5, [2, 4, 6])):
        closed = hard_error(terms, torch.tensor([r_s]), torch.tensor([r_t]))[0]
        shared = (f["U_s"][:, :r_s] * f["S_s"][:r_s]) @ f["V_s"][:, :r_s].T
        lit = torch.stack(
            [
                (
                    (taus[t] - shared - (f["U_t"][t, :, :r] * f["S_t"][t, :r]) @ f["V_t"][t, :, :r].T) ** 2
                ).sum()
                for t, r in enumerate(r_t)
            ]
        )
        torch.testing.assert_close(closed, lit, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("split", [[[0], [1, 2, 3]], [[2], [0, 3], [1]], [[0, 1, 2, 3]]])
def test_parts_of_the_modules_join_to_the_whole_decomposition_bit_for_bit(zoo, split):
    """A sharded run gives processes different modules of one streamed matrix: the joined parts are the
    whole decomposition's factors to the last bit (each product is taken module by module), and only the
    part with the shared module hashes the sources."""
    name, K = "tall.weight", 6
    plan = _plan(zoo, name)
    whole, bound_s, bound_t, sha = decompose_streamed(zoo, plan, K, oversample=4, power_iters=2, row_block=64)
    parts = []
    for mods in split:
        part, part_sha = decompose_streamed_part(zoo, plan, K, mods, 4, 2, row_block=64)
        assert (part_sha == sha) if 0 in mods else part_sha is None
        assert {k.split(".")[0] for k in part} >= {"U", "S", "V"}
        parts.append(part)
    joined, js, jt = join_parts(parts, T, *plan.matrix_shape)
    assert (js, jt) == (bound_s, bound_t)
    assert joined.keys() == whole.keys()
    for k in whole:
        assert joined[k].dtype == whole[k].dtype and torch.equal(joined[k], whole[k]), k


def test_join_refuses_parts_that_miss_or_repeat_a_module(zoo):
    plan = _plan(zoo, "tall.weight")
    p0, _ = decompose_streamed_part(zoo, plan, 4, [0, 1], 2, 1)
    p2, _ = decompose_streamed_part(zoo, plan, 4, [2], 2, 1)
    with pytest.raises(DidiError, match=r"U\.3 is in no part"):
        join_parts([p0, p2], T, *plan.matrix_shape)
    with pytest.raises(DidiError, match=r"in two parts"):
        join_parts([p0, p2, p2], T, *plan.matrix_shape)
    with pytest.raises(DidiError, match=r"modules \[4\]; expected a non-empty subset of 0\.\.3"):
        decompose_streamed_part(zoo, plan, 4, [4])


@pytest.mark.parametrize("dtype,row_block", [(torch.float32, 97), (torch.float64, None)])
def test_sha256_is_the_whole_tensors(zoo, dtype, row_block):
    """(d) The hashes the manifest records equal tensor_sha256 of each whole tensor read in `dtype` (blocks
    of 97 rows, and the default block: the whole 600 rows at once)."""
    name = "tall.weight"
    *_, sha = decompose_streamed(
        zoo, _plan(zoo, name), 4, oversample=2, power_iters=0, dtype=dtype, row_block=row_block
    )
    base, xs = zoo.read(name, dtype)
    assert sha == {"base": tensor_sha256(base), **{t: tensor_sha256(x) for t, x in zip(zoo.task_names, xs)}}


def test_conv_kernels_stream_by_output_rows(tmp_path):
    """A 4-D kernel (out, in, kh, kw) is the (out, in·kh·kw) matrix read along dim 0."""

    class Convs(Adapter):
        matrix_ndims = (2, 4)

    base, tasks = _write_zoo(tmp_path / "conv", {"conv.weight": (48, 3, 2, 2)}, seed=3)
    zoo = Zoo(Convs(), base, tasks)
    plan = _plan(zoo, "conv.weight")
    f, *_, sha = decompose_streamed(
        zoo, plan, 3, oversample=4, power_iters=2, dtype=torch.float64, row_block=7
    )
    taus = _taus(base, tasks, "conv.weight", torch.float64)
    ref = decompose_batch(taus[None], mean_merge, 3, svd_method="randomized", oversample=4, power_iters=2)[0][
        0
    ]
    torch.testing.assert_close(f["S_t"], ref["S_t"], rtol=1e-10, atol=0)
    assert sha["base"] == tensor_sha256(zoo.read("conv.weight", torch.float64)[0])


def _refine_inputs(taus: torch.Tensor, r_s: int, r_t: list[int]):
    f = decompose_batch(taus[None].clone(), mean_merge, max(r_s, *r_t))[0][0]
    A_s, B_s = init_factors(f["U_s"], f["S_s"], f["V_s"], r_s)
    pairs = [init_factors(f["U_t"][t], f["S_t"][t], f["V_t"][t], r) for t, r in enumerate(r_t)]
    return A_s, B_s, [a for a, _ in pairs], [b for _, b in pairs]


@pytest.mark.parametrize(
    "dtype,tol,r_s", [(torch.float64, 1e-9, 4), (torch.float32, 1e-5, 4), (torch.float64, 1e-9, 0)]
)
def test_refine_streamed_equals_refine_als(zoo, dtype, tol, r_s):
    """(e) Same factors' products and errors as refine_als in memory, and the total error never increases
    (also without a shared part: every sweep is the experts' alone)."""
    name, r_t = "tall.weight", [3, 0, 5]
    taus = _taus(zoo.base, zoo.tasks, name, dtype)
    A_s, B_s, A_t, B_t = _refine_inputs(taus, r_s, r_t)
    ref = refine_als(taus, A_s.clone(), B_s.clone(), [a.clone() for a in A_t], [b.clone() for b in B_t], 3, 2)

    def read_rows(start: int, stop: int) -> torch.Tensor:
        base, xs = zoo.read_rows(name, start, stop, dtype)
        return torch.stack(xs).sub_(base)

    m, n = _plan(zoo, name).matrix_shape
    got = refine_als_streamed(read_rows, m, n, T, A_s, B_s, A_t, B_t, 3, 2, row_block=64)
    err_before, err_after = got[4], got[5]
    torch.testing.assert_close(
        got[0] @ got[1], ref[0] @ ref[1], rtol=tol, atol=tol * float(ref[0].abs().max()) if r_s else 0.0
    )
    for t in range(T):
        prod, ref_prod = got[2][t] @ got[3][t], ref[2][t] @ ref[3][t]
        torch.testing.assert_close(prod, ref_prod, rtol=tol, atol=tol * float(taus[t].abs().max()))
    torch.testing.assert_close(err_before, task_errors(taus, A_s, B_s, A_t, B_t).double(), rtol=tol, atol=0)
    torch.testing.assert_close(err_after, task_errors(taus, *ref).double(), rtol=tol, atol=0)
    assert err_after.sum() <= err_before.sum() and err_after.sum() < 0.99 * err_before.sum()
    assert got[2][1].shape == (m, 0)  # a rank-0 expert stays empty


def test_refine_streamed_consume_updates_the_callers_lists_and_changes_no_result(zoo):
    """`consume=True` (what the refinement stage passes, so the starting experts can be freed) leaves the
    returned factors in the caller's own lists, equal to a run without it."""
    name = "tall.weight"
    taus = _taus(zoo.base, zoo.tasks, name)
    A_s, B_s, A_t, B_t = _refine_inputs(taus, 2, [3, 0, 5])
    m, n = _plan(zoo, name).matrix_shape

    def read_rows(start: int, stop: int) -> torch.Tensor:
        base, xs = zoo.read_rows(name, start, stop)
        return torch.stack(xs).sub_(base)

    kept = refine_als_streamed(read_rows, m, n, T, A_s, B_s, list(A_t), list(B_t), 2, 1, row_block=64)
    lists = (list(A_t), list(B_t))
    got = refine_als_streamed(read_rows, m, n, T, A_s, B_s, *lists, 2, 1, row_block=64, consume=True)
    assert all(a is b for a, b in zip(lists[0], got[2])) and all(a is b for a, b in zip(lists[1], got[3]))
    assert not any(a is b for a, b in zip(lists[0], A_t) if a.numel())  # the starting experts are let go
    for x, y in zip(
        [got[0], got[1], *got[2], *got[3], got[4], got[5]],
        [kept[0], kept[1], *kept[2], *kept[3], kept[4], kept[5]],
    ):
        assert torch.equal(x, y)


def _counting(monkeypatch, cls, method: str) -> list[int]:
    """Wrap `cls.method` so that each call appends the start row it was called with."""
    calls: list[int] = []
    orig = getattr(cls, method)

    def counted(self, start, *a, **k):
        calls.append(start)
        return orig(self, start, *a, **k)

    monkeypatch.setattr(cls, method, counted)
    return calls


@pytest.mark.parametrize("parts", [[[0, 1, 2, 3]], [[0, 2], [1, 3]]])
def test_kept_rows_read_each_block_once_and_change_no_bit_of_the_decomposition(zoo, monkeypatch, parts):
    """`keep_rows` (the GPU default where the rows fit): the checkpoints are read in the first pass only,
    every later pass reuses the kept blocks, and the factors, norms and hashes are the same bits as when
    every pass reads the rows again (a whole decomposition, and a sharded run's parts)."""
    name, K, power_iters, row_block = "tall.weight", 6, 2, 64
    plan = _plan(zoo, name)
    reads = _counting(monkeypatch, BlockReader, "read")
    for mods in parts:
        got = {}
        for keep in (False, True):
            reads.clear()
            got[keep] = decompose_streamed_part(
                zoo, plan, K, mods, 4, power_iters, row_block=row_block, keep_rows=keep
            )
            passes = 1 if keep else 2 * power_iters + 3  # the passes the docstring counts
            assert reads == list(range(0, plan.matrix_shape[0], row_block)) * passes
        (read, read_sha), (kept, kept_sha) = got[False], got[True]
        assert read_sha == kept_sha and read.keys() == kept.keys()
        for k in read:
            assert torch.equal(read[k], kept[k]), k


@pytest.mark.parametrize("r_s", [2, 0])
def test_kept_rows_are_read_once_and_change_no_bit_of_the_refinement(zoo, r_s):
    """`refine_als_streamed(keep_rows=True)` calls its reader once per block (the first pass) and returns the
    same bits as the run that reads every block at every pass (with the refinement stage's reader, which
    returns a buffer that its next call overwrites)."""
    name, r_t, row_block = "tall.weight", [3, 0, 5], 64
    taus = _taus(zoo.base, zoo.tasks, name)
    A_s, B_s, A_t, B_t = _refine_inputs(taus, r_s, r_t)
    m, n = _plan(zoo, name).matrix_shape
    got, calls = {}, {}
    for keep in (False, True):
        starts: list[int] = []
        rows = TaskVectorRows(zoo, name, n)  # the stage's reader: its next call overwrites the block

        def read_rows(start: int, stop: int) -> torch.Tensor:
            starts.append(start)
            return rows(start, stop)

        read_rows.close = rows.close  # called at the end, as the stage's reader is
        got[keep] = refine_als_streamed(
            read_rows, m, n, T, A_s, B_s, list(A_t), list(B_t), 2, 1, row_block=row_block, keep_rows=keep
        )
        calls[keep] = starts
    once = list(range(0, m, row_block))
    assert calls[True] == once
    # without: every pass reads every block; with a shared part, the docstring's 2·(2·power_iters + 1)
    # passes a sweep, plus two
    assert calls[False] == once * (len(calls[False]) // len(once)) and len(calls[False]) > 5 * len(once)
    if r_s:
        assert len(calls[False]) == (2 * (2 * 1 + 1) * 2 + 2) * len(once)
    flat = lambda g: [g[0], g[1], *g[2], *g[3], g[4], g[5]]  # noqa: E731
    for x, y in zip(flat(got[False]), flat(got[True])):
        assert torch.equal(x, y)


def test_rows_are_kept_on_a_gpu_with_room_for_them_only(monkeypatch):
    """`keeps_rows`: never on the CPU (streaming bounds host memory), on a GPU when the rows take at most
    half its free memory (its free memory faked: no test needs a GPU)."""
    assert not keeps_rows(torch.device("cpu"), 1)
    free = 10 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    assert keeps_rows(torch.device("cuda"), free // 2)
    assert not keeps_rows(torch.device("cuda"), free // 2 + 1)


def test_refine_streamed_refuses_a_folded_shared_part():
    with pytest.raises(DidiError, match="folded"):
        refine_als_streamed(
            lambda s, e: torch.zeros(2, e - s, 3), 4, 3, 2, torch.zeros(4, 3), None, [], [], 1, 1
        )


def test_row_readers_return_the_rows_of_whole_reads(zoo, tmp_path):
    """(f) get_rows / read_rows are slices of get / read, for safetensors and pickled sources; bad names and
    ranges are DidiErrors naming the file and tensor."""
    name = "tall.weight"
    src = zoo.base_source
    assert torch.equal(src.get_rows(name, 17, 230), src.get(name)[17:230])
    assert src.get_rows(name, 5, 5).shape == (0, 40)
    base, xs = zoo.read(name, torch.float64)
    b, rows = zoo.read_rows(name, 590, 600, torch.float64)
    assert b.dtype == torch.float64 and torch.equal(b, base[590:]) and len(rows) == T
    assert all(torch.equal(r, x[590:]) for r, x in zip(rows, xs))
    with pytest.raises(DidiError, match=r"base\.safetensors.*no tensor named 'nope'"):
        src.get_rows("nope", 0, 1)
    with pytest.raises(DidiError, match=r"base\.safetensors.*'tall\.weight'.*\[590:601\)"):
        src.get_rows(name, 590, 601)
    torch.save({"w": torch.arange(12.0).reshape(4, 3)}, tmp_path / "ckpt.pt")
    pickled = TensorSource(tmp_path / "ckpt.pt", allow_pickle=True)
    rows = pickled.get_rows("w", 1, 3)
    assert torch.equal(rows, pickled.get("w")[1:3])
    rows += 1  # a copy: the loaded state dict is not changed
    assert torch.equal(pickled.get("w")[1:3], torch.arange(3.0, 9.0).reshape(2, 3))


def test_nan_in_a_block_names_the_task_and_tensor(tmp_path):
    base, tasks = _write_zoo(tmp_path / "nan", {"tall.weight": (600, 40)})
    bad = load_file(tasks["task1"])
    bad["tall.weight"][333, 7] = float("nan")
    save_file(bad, tasks["task1"])
    zoo = Zoo(Adapter(), base, tasks)
    with pytest.raises(
        DidiError, match=r"task 'task1' \(.*task1\.safetensors\): tensor 'tall\.weight' contains NaN"
    ):
        decompose_streamed(zoo, _plan(zoo, "tall.weight"), 4, oversample=2, power_iters=0, row_block=100)
    b, rows = zoo.read_rows("tall.weight", 0, 300)  # the blocks without it read fine
    assert len(rows) == T
