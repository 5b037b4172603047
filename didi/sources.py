"""Lazy, tensor-by-tensor readers for checkpoints (safetensors file, directory, sharded index, pickle).

Big backbones never fit in host memory T+1 times over, so a `TensorSource` only opens files and reads one
tensor when asked (safetensors memory-maps).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from didi.errors import DidiError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def tensor_sha256(t: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and bytes (what the manifest records for every tensor used)."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    t = t.detach().contiguous().cpu()
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no bytes copy
    return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or the usual wrappers ({'state_dict': ...}, {'model': ...})."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if (
                key in obj
                and isinstance(obj[key], dict)
                and not any(isinstance(v, torch.Tensor) for v in obj.values())
            ):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise DidiError(f"{path}: expected a state dict of tensors, found {type(obj).__name__} with no tensors")


def load_owned(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file`, copied out of the file's memory map.

    load_file's tensors are views of a map of the whole file: a small tensor kept from it (a norm, one
    singular value vector) keeps every page of the file that was read resident, and the process grows with
    the number of files read. The copies own their memory; the map goes when this returns.
    """
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def require_path(path: str | os.PathLike, what: str) -> None:
    """Refuse a missing checkpoint naming its role, `base (θ0): /p: no such file or directory`: a bare path
    does not say whether the base or a task was mistyped."""
    if not Path(path).exists():
        raise DidiError(f"{what}: {path}: no such file or directory")


class TensorSource:
    """Name → tensor reader over one checkpoint, opened lazily.

    Accepts: a `.safetensors` file; a directory holding `model.safetensors`, a sharded
    `model.safetensors.index.json`, or any `*.safetensors` files; and, only with `allow_pickle=True`,
    a pickle checkpoint (`.bin/.pt/.pth/.ckpt`, loaded with `torch.load(weights_only=True)`).
    """

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._pickled: dict[str, torch.Tensor] | None = None
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._index()

    # ----------------------------------------------------------------------------------------- discovery
    def _index(self) -> None:
        p = self.path
        if not p.exists():
            raise DidiError(f"{p}: no such file or directory")
        if p.is_dir():
            index = p / "model.safetensors.index.json"
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise DidiError(f"{index}: not a safetensors index (expected a 'weight_map'): {e}") from e
                for name, fname in weight_map.items():
                    f = p / fname
                    if not f.exists():
                        raise DidiError(f"{index}: tensor '{name}' points at missing shard {f}")
                    self._files[name] = f
                self._read_headers(sorted(set(self._files.values())))
                return
            files = sorted(p.glob("*.safetensors"))
            if files:
                self._read_headers(files, register=True)
                return
            pickles = [f for suf in PICKLE_SUFFIXES for f in sorted(p.glob(f"*{suf}"))]
            if pickles:
                if len(pickles) > 1:
                    raise DidiError(
                        f"{p}: several pickle checkpoints {[f.name for f in pickles]}; name one file"
                    )
                self._load_pickle(pickles[0])
                return
            raise DidiError(
                f"{p}: directory holds no *.safetensors files, no model.safetensors.index.json "
                f"and no pickle checkpoint"
            )
        if p.suffix == ".safetensors":
            self._read_headers([p], register=True)
        elif p.suffix in PICKLE_SUFFIXES:
            self._load_pickle(p)
        else:
            raise DidiError(
                f"{p}: unknown checkpoint format (expected .safetensors, a directory, or with "
                f"--allow_pickle a {'/'.join(PICKLE_SUFFIXES)} file)"
            )

    def _read_headers(self, files: list[Path], register: bool = False) -> None:
        for f in files:
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises SafetensorError / OSError for corrupt headers
                raise DidiError(f"{f}: corrupt or unreadable safetensors file ({e})") from e
            for name in h.keys():
                if register:
                    if name in self._files and self._files[name] != f:
                        raise DidiError(
                            f"{self.path}: tensor '{name}' appears in both {self._files[name].name} "
                            f"and {f.name}"
                        )
                    self._files[name] = f
                if self._files.get(name) == f:
                    sl = h.get_slice(name)
                    self._meta[name] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), torch.float32))

    def _load_pickle(self, f: Path) -> None:
        if not self.allow_pickle:
            raise DidiError(
                f"{f}: pickle checkpoints can run code when loaded and are refused by default; "
                f"convert it to safetensors, or pass --allow_pickle true to load it with "
                f"torch.load(weights_only=True)"
            )
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DidiError(f"{f}: could not be loaded with torch.load(weights_only=True): {e}") from e
        self._pickled = _unwrap_state_dict(obj, f)
        for name, t in self._pickled.items():
            self._files[name] = f
            self._meta[name] = (tuple(t.shape), t.dtype)

    # ------------------------------------------------------------------------------------------- access
    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    @property
    def pickled(self) -> bool:
        """A pickle checkpoint (loaded whole), not safetensors files read tensor by tensor."""
        return self._pickled is not None

    def file_of(self, name: str) -> Path:
        """The file holding tensor `name`: its safetensors shard, or the pickle checkpoint."""
        if name not in self._files:
            raise DidiError(f"{self.path}: no tensor named '{name}'")
        return self._files[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name` as an owned tensor; a floating one cast to `dtype` if given (one copy out of the map
        instead of a copy and then a cast)."""
        if name not in self._files:
            raise DidiError(f"{self.path}: no tensor named '{name}'")
        if self._pickled is not None:
            return self._pickled[name]
        try:  # opened per read, not kept: a kept handle maps its whole shard, and every page read stays
            # resident, so a 16 GB Llama would make the process look 16 GB larger per checkpoint
            with safe_open(str(self._files[name]), framework="pt", device="cpu") as h:
                return _owned(h.get_tensor(name), dtype)
        except Exception as e:
            raise DidiError(f"{self._files[name]}: tensor '{name}' could not be read ({e})") from e

    def get_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start:stop) along dim 0 of tensor `name`, as an owned tensor.

        Why: a matrix too large to hold T+1 times over (Llama's 128256×4096 embeddings) is decomposed and
        refined a row block at a time (didi.streamed). safetensors' `get_slice` maps only the pages of those
        rows, so a block costs its own bytes, not the tensor's; the handle is opened per call as in `get`, and
        the slice is copied out of the map (it is a view of the whole tensor's mapped storage).
        """
        if name not in self._files:
            raise DidiError(f"{self.path}: no tensor named '{name}'")
        shape = self._meta[name][0]
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise DidiError(
                f"{self._files[name]}: tensor '{name}' of shape {list(shape)} has no rows [{start}:{stop})"
            )
        if self._pickled is not None:
            return _owned(self._pickled[name][start:stop], dtype)
        try:
            with safe_open(str(self._files[name]), framework="pt", device="cpu") as h:
                return _owned(h.get_slice(name)[start:stop], dtype)
        except Exception as e:
            raise DidiError(f"{self._files[name]}: tensor '{name}' could not be read ({e})") from e

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._files:
            yield name, self.get(name)


def _owned(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A copy of `t` that owns its memory (not a view of a mapped shard), cast to `dtype` when it is floating
    and `dtype` is given."""
    if dtype is not None and t.dtype.is_floating_point and t.dtype != dtype:
        return t.to(dtype)
    return t.clone()


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
