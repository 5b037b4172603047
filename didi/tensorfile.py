"""Safetensors files written one tensor at a time, from tensors that are only loaded when written.

`safetensors.torch.save_file` needs every tensor of a file in memory at once; an artifact's expert file for
Llama-3.1-8B holds one low-rank pair per matrix of 32 layers, so writing it that way makes the merge's peak
memory grow with the model. Here a file's header (names, dtypes, shapes, offsets) is written first from
`LazyTensor` descriptions, then each tensor is produced, written and dropped in turn: memory stays at one
tensor. The files are ordinary safetensors files (read back by `safetensors` in the tests).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Union

import torch
from safetensors import safe_open

from didi.errors import DidiError
from didi.sources import _ST_DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by shape and dtype now and computed (or read) only when it is written."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


def lazy_tensors(path: str | Path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file as a LazyTensor: the header is read once, now; each tensor's data
    when it is written."""

    def reader(key: str) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            with safe_open(str(path), framework="pt", device="cpu") as g:
                return g.get_tensor(key).clone()

        return read

    with safe_open(str(path), framework="pt", device="cpu") as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
        return {
            k: LazyTensor(tuple(sl.get_shape()), _ST_DTYPES[sl.get_dtype()], reader(k))
            for k, sl in slices.items()
        }


TensorLike = Union[torch.Tensor, LazyTensor]


def _spec(name: str, t: TensorLike) -> tuple[tuple[int, ...], torch.dtype]:
    if not isinstance(t, (LazyTensor, torch.Tensor)):
        raise DidiError(f"tensor '{name}': expected a torch.Tensor or LazyTensor, found {type(t).__name__}")
    return tuple(t.shape), t.dtype


def write_tensors(
    path: str | Path, tensors: Mapping[str, TensorLike], metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` as a safetensors file, loading lazy ones one at a time."""
    specs = {name: _spec(name, t) for name, t in tensors.items()}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        if dtype not in _DTYPE_NAMES:
            raise DidiError(f"tensor '{name}': dtype {dtype} cannot be stored in safetensors")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in tensors.items():
            value = t.load() if isinstance(t, LazyTensor) else t
            shape, dtype = specs[name]
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise DidiError(
                    f"tensor '{name}': declared {list(shape)} {dtype}, produced "
                    f"{list(value.shape)} {value.dtype}"
                )
            data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))
            del value, data
