"""The streamed paths' block reads and threaded QRs (didi.streamed.BlockReader, orthonormal_all,
didi.refine.TaskVectorRows) against `Zoo.read_rows` and `linalg.orthonormal`: the same rows and the same Q's,
the files closed at the end, NaN/Inf found where asked for."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from didi.backbones import Adapter, Zoo
from didi.errors import DidiError
from didi.linalg import orthonormal
from didi.refine import TaskVectorRows
from didi.streamed import BlockReader, orthonormal_all
from helpers import write_finetune_zoo

T, NAME = 3, "tall.weight"


def _zoo(root, dtype=torch.float32) -> Zoo:
    base, tasks = write_finetune_zoo(root, {NAME: (600, 40)}, T)
    for path in [base, *tasks.values()]:  # the sources stored in `dtype`
        save_file({k: v.to(dtype) for k, v in load_file(path).items()}, path)
    return Zoo(Adapter(), base, tasks)


@pytest.mark.parametrize("stored,dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)])
def test_block_reads_equal_read_rows_and_close_their_files(tmp_path, stored, dtype):
    zoo = _zoo(tmp_path / "zoo", stored)
    with BlockReader(zoo, NAME, 40, dtype, 64) as reader:
        for start, stop in ((0, 64), (64, 128), (590, 600), (5, 5)):
            base, xs = zoo.read_rows(NAME, start, stop, dtype)
            got = reader.read(start, stop, check=True)
            assert got.dtype == dtype and torch.equal(got, torch.stack([base, *xs]))
        files = list(reader.files)
        assert len(files) == T + 1 and not any(f.closed for f in files)
    assert all(f.closed for f in files) and reader.files == []


def test_block_reads_go_through_an_overridden_read_rows_and_pickles(tmp_path):
    """A zoo whose read_rows is its own (as a calibrated zoo's) is read through it; a pickle from memory."""
    zoo = _zoo(tmp_path / "zoo")

    class Doubled(Zoo):
        def read_rows(self, name, start, stop, dtype=torch.float32):
            base, xs = Zoo.read_rows(self, name, start, stop, dtype)
            return 2 * base, [2 * x for x in xs]

    doubled = Doubled.__new__(Doubled)
    doubled.__dict__.update(zoo.__dict__)
    with BlockReader(doubled, NAME, 40, torch.float32, 100) as reader:
        base, xs = zoo.read_rows(NAME, 100, 200)
        assert torch.equal(reader.read(100, 200), 2 * torch.stack([base, *xs])) and reader.files == []
    torch.save(load_file(zoo.base), tmp_path / "base.pt")
    pickled = Zoo(Adapter(), str(tmp_path / "base.pt"), zoo.tasks, allow_pickle=True)
    with BlockReader(pickled, NAME, 40, torch.float32, 100) as reader:
        base, xs = zoo.read_rows(NAME, 300, 400)
        assert torch.equal(reader.read(300, 400), torch.stack([base, *xs])) and len(reader.files) == T


def test_nan_is_found_only_where_checked(tmp_path):
    zoo = _zoo(tmp_path / "zoo")
    bad = load_file(zoo.tasks["task2"])
    bad[NAME][333, 7] = float("inf")
    save_file(bad, zoo.tasks["task2"])
    zoo = Zoo(Adapter(), zoo.base, zoo.tasks)
    with BlockReader(zoo, NAME, 40, torch.float32, 100) as reader:
        reader.read(300, 400)  # unchecked: a later pass over rows the first pass checked
        reader.read(0, 100, check=True)
        with pytest.raises(DidiError, match=r"task 'task2' \(.*task2\.safetensors\): tensor 'tall\.weight'"):
            reader.read(300, 400, check=True)


def test_task_vector_rows_pickle_without_files_and_close(tmp_path):
    zoo = _zoo(tmp_path / "zoo", torch.bfloat16)
    rows = TaskVectorRows(zoo, NAME, 40)
    base, xs = zoo.read_rows(NAME, 0, 50)
    assert torch.equal(rows(0, 50), torch.stack(xs) - base)
    files = list(rows._reader.files)
    clone = pickle.loads(pickle.dumps(rows))
    assert clone._reader is None and torch.equal(clone(0, 50), rows(0, 50))
    base, xs = zoo.read_rows(NAME, 10, 110)  # a larger block than the buffer: a new reader
    assert torch.equal(rows(10, 110), torch.stack(xs) - base)
    assert all(f.closed for f in files)
    rows.close()
    clone.close()
    assert rows._reader is None


def test_threaded_qrs_equal_one_at_a_time():
    g = torch.Generator().manual_seed(0)
    Ys = [torch.randn(500, 30, generator=g) for _ in range(5)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = orthonormal_all(Ys)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(q, orthonormal(Y)) for q, Y in zip(got, Ys))
