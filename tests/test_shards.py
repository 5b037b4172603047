"""The sharded decomposition (didi.shards): balanced shares, one store whatever the number of processes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from didi.backbones import Zoo
from didi.backbones.base import Adapter
from didi.decompose import ShareWriter, assemble, assign_shares, decompose, make_layout
from didi.errors import DidiError
from didi.shards import factor_store
from didi.trainer import TrainerConfig, Trainers


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
