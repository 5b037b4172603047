"""The sharded decomposition (didi.shards): balanced shares, one store whatever the number of processes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lightning.fabric.utilities.distributed import _suggested_max_num_threads

from didi.backbones import Zoo
from didi.backbones.base import Adapter
from didi.decompose import (
    DecomposeConfig,
    ShareWriter,
    assemble,
    assign_shares,
    decompose,
    make_layout,
    module_cost,
    share_of,
    streams,
    svd_flops,
    tensor_cost,
    work_units,
)
from didi.errors import DidiError
from didi.shards import factor_store
from didi.trainer import TrainerConfig, Trainers
from helpers import write_finetune_zoo


def _files(root) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "shares.json"
    }


def test_assign_shares_balances_and_covers_every_tensor():
    costs = [9.0, 1.0, 1.0, 8.0, 2.0, 2.0, 5.0, 0.5]
    shares = assign_shares(costs, 2)
    assert sorted(p for s in shares for p in s) == list(range(len(costs)))
    loads = [sum(costs[p] for p in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= max(costs) / 2  # LPT: within half the largest item here
    assert shares == assign_shares(costs, 2)  # deterministic: every rank computes the same
    assert all(s == sorted(s) for s in shares)  # each share read in plan order
    assert assign_shares(costs, 1) == [list(range(len(costs)))]
    assert [len(s) for s in assign_shares(costs[:1], 3)] == [1, 0, 0]  # more ranks than tensors


@pytest.mark.slow
def test_two_process_store_is_byte_identical_to_one_process(tmp_path, tiny_zoo, fast):
    """2 gloo processes (ddp_spawn) write the same bytes as the one-process decomposition, each doing about
    half the estimated work, and the shares are recorded."""
    zoo = Zoo(Adapter(), *tiny_zoo)
    cfg = fast[0]
    one = decompose(zoo, cfg, progress=False).root
    aside = one.with_name("one")
    os.replace(one, aside)
    trainers = Trainers(
        TrainerConfig(accelerator="cpu", devices=2, strategy="ddp_spawn", logger="none", progress_bar=False)
    )
    two = factor_store(zoo, cfg, trainers, progress=False)
    assert two.root == one
    assert _files(two.root) == _files(aside)
    shares = two.shares
    assert shares["world"] == 2 and [s["rank"] for s in shares["shares"]] == [0, 1]
    assert sum(s["tensors"] for s in shares["shares"]) == len(zoo.plan)
    flops = [s["flops_est"] for s in shares["shares"]]
    assert min(flops) > 0.3 * sum(flops)  # each about half (the tiny zoo has few, unequal tensors)


def test_one_process_fit_equals_the_plain_decomposition(tmp_path, tiny_zoo, fast):
    zoo = Zoo(Adapter(), *tiny_zoo)
    cfg = fast[0]
    one = decompose(zoo, cfg, progress=False).root
    aside = one.with_name("one")
    os.replace(one, aside)
    store = factor_store(zoo, cfg, Trainers(fast[3]), progress=False)
    assert _files(store.root) == _files(aside)
    assert store.shares["world"] == 1


def test_a_share_whose_files_rank_0_cannot_see_is_an_error_naming_the_directory(tmp_path, tiny_zoo, fast):
    """What rank 0 meets when a rank wrote into a directory it does not share (a node-local cache)."""
    zoo = Zoo(Adapter(), *tiny_zoo)
    cfg = fast[0]
    out = tmp_path / "tmp-store"
    make_layout(out)
    shares = assign_shares([1.0] * len(zoo.plan), 2)
    records = []
    for rank, share in enumerate(shares):
        w = ShareWriter(zoo, cfg, out)
        for pos in share:
            w.add(pos)
        records.append(w.finish(rank))
    lost = next(iter(records[1]["matrices"]))  # rank 1's first matrix file never reached rank 0's disk
    (out / "matrices" / f"p{int(lost):06d}.safetensors").unlink()
    with pytest.raises(DidiError, match=rf"{out}.*rank 1.*file system every rank"):
        assemble(out, zoo, cfg, records)
    assert not (out / "index.json").exists()


def test_shares_assembled_in_any_order_give_the_same_index(tmp_path, tiny_zoo, fast):
    zoo = Zoo(Adapter(), *tiny_zoo)
    cfg = fast[0]
    index = []
    for order in ([0, 1, 2], [2, 0, 1]):
        out = tmp_path / f"s{order[0]}"
        make_layout(out)
        shares = assign_shares([float(p.numel) for p in zoo.plan], 3)
        records = []
        for rank in order:
            w = ShareWriter(zoo, cfg, out)
            for pos in shares[rank]:
                w.add(pos)
            records.append(w.finish(rank))
        assemble(out, zoo, cfg, records)
        index.append((out / "index.json").read_bytes())
        assert json.loads(index[-1])["matrices"][0]["idx"] == 0
    assert index[0] == index[1]


def test_prefetched_reads_write_the_same_share(tmp_path, tiny_zoo, fast):
    """The GPU path's read-ahead thread (forced here on the CPU) changes no byte of the share."""
    zoo = Zoo(Adapter(), *tiny_zoo)
    cfg = fast[0]
    records = []
    for prefetch in (False, True):
        out = tmp_path / f"p{prefetch}"
        make_layout(out)
        share = list(range(len(zoo.plan)))
        w = ShareWriter(zoo, cfg, out, share=share, prefetch=prefetch)
        assert (w.pool is not None) == prefetch
        for pos in share:
            w.add(pos)
        records.append(w.finish(rank=0))
        assemble(out, zoo, cfg, records[-1:])
    assert records[0]["file_sha256"] == records[1]["file_sha256"]
    assert records[0]["sha256"] == records[1]["sha256"]
    assert (tmp_path / "pFalse" / "index.json").read_bytes() == (
        tmp_path / "pTrue" / "index.json"
    ).read_bytes()


def test_out_of_device_memory_names_the_matrix_and_the_bound(tmp_path, tiny_zoo, fast, monkeypatch):
    import didi.decompose as dec

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(dec, "decompose_batch", oom)
    zoo = Zoo(Adapter(), *tiny_zoo)
    with pytest.raises(
        DidiError, match=r"out of memory on cpu for matrix '.+', \d+×\d+.*--decompose.stream_mb 1"
    ):
        decompose(zoo, fast[0], progress=False)
    assert not list((tmp_path / "cache").glob("*/index.json"))  # nothing half-written


def _streaming_zoo(tmp_path) -> tuple[Zoo, DecomposeConfig]:
    """A 3000×40 matrix whose T+1 float copies pass stream_mb = 1 MB (row-streamed), beside in-memory ones."""
    shapes = {"tall.weight": (3000, 40), "sq.weight": (40, 40), "wide.weight": (24, 300)}
    zoo = Zoo(Adapter(), *write_finetune_zoo(tmp_path / "zoo", shapes, T=4))
    cfg = DecomposeConfig(
        cache_dir=str(tmp_path / "cache"),
        device="cpu",
        max_rank=8,
        svd="randomized",
        oversample=4,
        stream_mb=1,
    )
    return zoo, cfg


def test_streamed_matrices_are_shared_out_by_module(tmp_path):
    """With several processes each of a streamed matrix's T+1 modules is a unit (costs summing to the
    tensor's), whole tensors stay whole, and a process's modules of a matrix come as one item."""
    zoo, cfg = _streaming_zoo(tmp_path)
    T = len(zoo.tasks)
    tall = next(p for p, plan in enumerate(zoo.plan) if plan.name == "tall.weight")
    assert [p for p, plan in enumerate(zoo.plan) if streams(plan, T, cfg)] == [tall]
    units, costs = work_units(zoo, cfg, 1)
    assert units == [(p, None) for p in range(len(zoo.plan))]
    units, costs = work_units(zoo, cfg, 2)
    assert [u for u in units if u[0] == tall] == [(tall, i) for i in range(T + 1)]
    plan = zoo.plan[tall]
    (m, n), K = plan.matrix_shape, cfg.max_rank
    one = svd_flops(m, n, K, True, cfg.oversample, cfg.power_iters)  # the randomized SVD at the store's K
    assert [module_cost(plan, T, cfg, i) for i in range(3)] == [one + 2 * T * m * n * K] + [
        one + 2 * m * n * K
    ] * 2
    assert tensor_cost(plan, T, cfg) == pytest.approx((T + 1) * one + 4 * T * m * n * K, rel=1e-12)
    shares = [share_of(units, s) for s in assign_shares(costs, 2)]
    held = [mods for share in shares for p, mods in share if p == tall]
    assert len(held) == 2 and sorted(i for mods in held for i in mods) == list(range(T + 1))
    assert sorted(p for share in shares for p, mods in share if mods is None) == [
        p for p in range(len(zoo.plan)) if p != tall
    ]


def test_split_streamed_matrix_joins_to_the_one_process_store(tmp_path):
    """Shares that split a streamed matrix's modules (written here in one process, as two ranks would) give
    the 1-process store byte for byte; a part rank 0 cannot see is an error naming the directory."""
    zoo, cfg = _streaming_zoo(tmp_path)
    one = decompose(zoo, cfg, progress=False).root
    aside = one.with_name("one")
    os.replace(one, aside)
    tall = next(p for p, plan in enumerate(zoo.plan) if plan.name == "tall.weight")
    rest = [p for p in range(len(zoo.plan)) if p != tall]
    split = [
        [(tall, (1, 3))] + [(p, None) for p in rest[::2]],
        [(tall, (0, 2, 4))] + [(p, None) for p in rest[1::2]],
    ]
    for lose in (False, True):
        out = tmp_path / f"split-{lose}"
        make_layout(out)
        records = []
        for rank, share in enumerate(split):
            w = ShareWriter(zoo, cfg, out)
            for pos, mods in share:
                w.add(pos, mods)
            records.append(w.finish(rank))
        assert records[0]["parts"][str(tall)]["modules"] == [1, 3]
        if lose:
            (out / records[0]["parts"][str(tall)]["file"]).unlink()
            with pytest.raises(
                DidiError, match=rf"{out}.*rank 0's file .*modules-1-3.*file system every rank"
            ):
                assemble(out, zoo, cfg, records)
            continue
        assemble(out, zoo, cfg, records)
        assert not list(out.rglob("*modules-*"))  # the parts are joined and gone
        assert _files(out) == _files(aside)
        shares = json.loads((out / "shares.json").read_text())["shares"]
        assert [s["modules"] for s in shares] == [{"tall.weight": [1, 3]}, {"tall.weight": [0, 2, 4]}]


def test_a_split_streamed_matrix_no_task_changed_is_a_zero_delta_as_in_one_process(tmp_path):
    """The joined parts of a streamed matrix whose task vectors are all zero are recorded as a zero delta
    (not a matrix), by the share that holds the shared module, as the whole decomposition records it."""
    from safetensors.torch import load_file, save_file

    zoo, cfg = _streaming_zoo(tmp_path)
    base = load_file(zoo.base)["tall.weight"]
    for path in zoo.tasks.values():  # every task keeps θ0's tall matrix
        tensors = {k: v.clone() for k, v in load_file(path).items()}  # owned before the file is rewritten
        tensors["tall.weight"] = base.clone()
        save_file(tensors, path)
    zoo = Zoo(Adapter(), zoo.base, zoo.tasks)
    one = decompose(zoo, cfg, progress=False).root
    assert json.loads((one / "index.json").read_text())["nonmatrix"]["tall.weight"]["zero"] is True
    tall = next(p for p, plan in enumerate(zoo.plan) if plan.name == "tall.weight")
    out = tmp_path / "split"
    make_layout(out)
    records = []
    for rank, mods in enumerate([(2, 4), (0, 1, 3)]):
        w = ShareWriter(zoo, cfg, out)
        w.add(tall, mods)
        for pos in range(len(zoo.plan)):
            if pos != tall and pos % 2 == rank:
                w.add(pos)
        records.append(w.finish(rank))
    assemble(out, zoo, cfg, records)
    assert str(tall) in records[1]["nonmatrix"] and not list(out.rglob("*modules-*"))
    assert _files(out) == _files(one)


@pytest.mark.slow
def test_two_processes_split_a_streamed_matrix_and_write_the_one_process_store(tmp_path):
    """2 gloo processes (ddp_spawn): the streamed matrix's modules are decomposed by both, and the store is
    the 1-process one byte for byte, at equal threads per process (Lightning gives each of 2 processes half
    the cores, and CPU kernels round differently at other thread counts, the 24×300 matrix's SVD here)."""
    zoo, cfg = _streaming_zoo(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(_suggested_max_num_threads(2))
    try:
        one = decompose(zoo, cfg, progress=False).root
    finally:
        torch.set_num_threads(threads)
    aside = one.with_name("one")
    os.replace(one, aside)
    trainers = Trainers(
        TrainerConfig(accelerator="cpu", devices=2, strategy="ddp_spawn", logger="none", progress_bar=False)
    )
    two = factor_store(zoo, cfg, trainers, progress=False)
    assert _files(two.root) == _files(aside)
    held = [s["modules"].get("tall.weight", []) for s in two.shares["shares"]]
    assert all(held) and sorted(i for mods in held for i in mods) == list(range(len(zoo.tasks) + 1))
