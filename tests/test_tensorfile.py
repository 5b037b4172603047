"""Streamed safetensors writing: files equal what safetensors reads back; lazy tensors load one at a time."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from didi.errors import DidiError
from didi.tensorfile import LazyTensor, lazy_tensors, write_tensors


def test_round_trip_every_dtype_and_shape(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(5, 3, generator=g),
        "h": torch.randn(4, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2, generator=g).half(),
        "d": torch.randn(3, generator=g).double(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(7, 0),
        "mask": torch.rand(6, generator=g) > 0.5,
        "i": torch.arange(5),
        "strided": torch.randn(4, 6, generator=g)[:, ::2],
    }
    write_tensors(tmp_path / "a.safetensors", tensors, metadata={"format": "pt"})
    back = load_file(str(tmp_path / "a.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k], v)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    # a lazy copy of a file written by safetensors itself
    save_file({"x": torch.randn(3, 2, generator=g)}, str(tmp_path / "src.safetensors"))
    lazy = lazy_tensors(tmp_path / "src.safetensors")["x"]
    assert lazy.shape == (3, 2) and lazy.dtype == torch.float32
    write_tensors(tmp_path / "b.safetensors", {"y": lazy})
    assert torch.equal(
        load_file(str(tmp_path / "b.safetensors"))["y"], load_file(str(tmp_path / "src.safetensors"))["x"]
    )


def test_lazy_tensors_are_loaded_one_at_a_time(tmp_path):
    alive: list[weakref.ref] = []
    loaded = []

    def make(i):
        def load():
            gc.collect()
            loaded.append((i, sum(r() is not None for r in alive)))  # how many earlier tensors still exist
            t = torch.full((1000,), float(i))
            alive.append(weakref.ref(t))
            return t

        return LazyTensor((1000,), torch.float32, load)

    write_tensors(tmp_path / "c.safetensors", {f"t{i}": make(i) for i in range(5)})
    assert loaded == [(i, 0) for i in range(5)]  # in order, and nothing earlier kept alive
    back = load_file(str(tmp_path / "c.safetensors"))
    assert all(torch.equal(back[f"t{i}"], torch.full((1000,), float(i))) for i in range(5))


def test_declared_and_produced_must_agree(tmp_path):
    bad = LazyTensor((2, 3), torch.float32, lambda: torch.zeros(3, 2))
    with pytest.raises(DidiError, match=r"tensor 'a': declared \[2, 3\] torch.float32, produced \[3, 2\]"):
        write_tensors(tmp_path / "d.safetensors", {"a": bad})
    with pytest.raises(DidiError, match="expected a torch.Tensor or LazyTensor, found list"):
        write_tensors(tmp_path / "e.safetensors", {"a": [1, 2]})
