"""Storage accounting (docs/method.md §4): one function prices every artifact, DiDi's and every baseline's.

ratio = 1 + stored / θ0, in elements (the default, the paper's) or in bytes (`storage: bytes`). The backbone
θ0 is stored once and counts 1.0. Stored tensors are priced by kind: a rank-r factor pair of an m×n matrix
costs r(m + n) elements (the numel of A plus B), a dense tensor its numel, a binary mask numel/32 (1 bit
against fp32), a scalar 1, and a delta folded into the stored base (it replaces a base tensor) nothing.
Quantized factors (`didi.quantize`) count their codes as elements and their per-column scales as elements
too. In bytes every tensor costs what its stored dtype takes (an NF4 code half a byte, a scale 4 bytes), a
mask 1 bit per entry, a fold nothing, and θ0 counts the bytes of its own dtypes. Heads, routers and the text
tower are outside the budget. Terms shared by a subset of the tasks (artifact groups, FlexMerge's clusters)
are priced once per group, like the shared module.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import torch
from safetensors import safe_open

from didi.errors import DidiError
from didi.quantize import CODE_SUFFIXES, EXPERT_DTYPES, SCALE_BYTES, SCALE_SUFFIXES, code_count
from didi.sources import _ST_DTYPES

Kind = Literal["lora", "dense", "mask", "scalar", "fold", "qscale"]
Storage = Literal["elements", "bytes"]
STORAGES: tuple[str, ...] = ("elements", "bytes")
WEIGHTS: dict[str, float] = {
    "lora": 1.0,
    "dense": 1.0,
    "mask": 1.0 / 32.0,
    "scalar": 1.0,
    "fold": 0.0,
    "qscale": 1.0,
}
#: artifact key suffix -> kind (keys are "<tensor name>::<suffix>")
SUFFIX_KIND: dict[str, Kind] = {
    "lora_A": "lora",
    "lora_B": "lora",
    "dense": "dense",
    "ref": "dense",
    "mask": "mask",
    "scale": "scalar",
    **{s: "lora" for s in CODE_SUFFIXES},
    **{s: "qscale" for s in SCALE_SUFFIXES},
}


@dataclass(frozen=True)
class Stored:
    """One stored tensor: its kind, element count, the module it belongs to (for the breakdown) and its size
    in bytes as stored (None: 4 bytes per element, float32)."""

    kind: Kind
    numel: int
    module: str = "other"  # "shared", a task name, "fold", ...
    nbytes: float | None = None

    @property
    def bytes(self) -> float:
        """What the tensor costs in bytes: 0 for a fold, 1 bit per entry for a mask, else its stored size."""
        if self.kind == "fold":
            return 0.0
        if self.kind == "mask":
            return self.numel / 8.0
        return float(4 * self.numel if self.nbytes is None else self.nbytes)


def lora_elements(m: int, n: int, r: int) -> int:
    """Elements of a rank-r factor pair A (m×r), B (r×n) of an m×n matrix."""
    return r * (m + n)


def unit_cost(m, n, dtype: str = "float32", storage: str = "elements"):
    """What one rank unit (a column of A and a row of B) of an m×n matrix costs when the pair is stored in
    `dtype`, in the budget's unit. Elements: m + n (+ 2 scales when quantized). Bytes: float32 4(m + n),
    bfloat16 2(m + n), int8 (m + n) + 2 scales, nf4 ⌈m/2⌉ + ⌈n/2⌉ + 2 scales (a scale is 4 bytes).
    `m`, `n`: ints or int64 tensors (then per matrix)."""
    if dtype not in EXPERT_DTYPES:
        raise DidiError(f"expert_dtype: expected one of {', '.join(EXPERT_DTYPES)}, found {dtype!r}")
    if storage == "elements":
        return lora_elements(m, n, 1) + (2 if dtype in ("int8", "nf4") else 0)
    if storage != "bytes":
        raise DidiError(f"storage: expected one of {', '.join(STORAGES)}, found {storage!r}")
    if dtype == "float32":
        return 4 * (m + n)
    if dtype == "bfloat16":
        return 2 * (m + n)
    if dtype == "int8":
        return m + n + 2 * SCALE_BYTES
    return (m + 1) // 2 + (n + 1) // 2 + 2 * SCALE_BYTES


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def stored_elements(items: Iterable[Stored]) -> float:
    return sum(WEIGHTS[i.kind] * i.numel for i in items)


def stored_bytes(items: Iterable[Stored]) -> float:
    return sum(i.bytes for i in items)


def storage_report(
    items: Iterable[Stored], base_params: int, base_bytes: int | None = None, storage: str = "elements"
) -> dict:
    """Ratio plus a breakdown by module and by kind (what `didi inspect` prints).

    Elements always (`stored_elements`, `by_module`, `by_kind`); with `base_bytes` (θ0's bytes in its own
    dtypes) also bytes (`stored_bytes`, `ratio_bytes`, `by_module_bytes`, `by_kind_bytes`). `ratio` is the
    ratio in `storage`'s unit, the one a budget of that unit is held to."""
    if storage not in STORAGES:
        raise DidiError(f"storage: expected one of {', '.join(STORAGES)}, found {storage!r}")
    items = list(items)
    by_module: dict[str, float] = defaultdict(float)
    by_kind: dict[str, float] = defaultdict(float)
    for i in items:
        by_module[i.module] += WEIGHTS[i.kind] * i.numel
        by_kind[i.kind] += WEIGHTS[i.kind] * i.numel
    total = stored_elements(items)
    out = {
        "base_params": int(base_params),
        "stored_elements": total,
        "ratio": 1.0 + total / base_params,
        "by_module": dict(by_module),
        "by_kind": dict(by_kind),
    }
    if base_bytes is not None:
        mb: dict[str, float] = defaultdict(float)
        kb: dict[str, float] = defaultdict(float)
        for i in items:
            mb[i.module] += i.bytes
            kb[i.kind] += i.bytes
        nbytes = stored_bytes(items)
        out.update(
            base_bytes=int(base_bytes),
            stored_bytes=nbytes,
            ratio_elements=out["ratio"],
            ratio_bytes=1.0 + nbytes / base_bytes,
            by_module_bytes=dict(mb),
            by_kind_bytes=dict(kb),
            priced_in=storage,
        )
        out["ratio"] = out["ratio_bytes"] if storage == "bytes" else out["ratio_elements"]
    elif storage == "bytes":
        raise DidiError("storage bytes: the bytes of θ0 (base_bytes) are needed to price in bytes")
    return out


def kind_of_key(key: str) -> Kind:
    suffix = key.rsplit("::", 1)[-1]
    if suffix not in SUFFIX_KIND:
        raise ValueError(f"artifact key {key!r} has no known kind suffix ({sorted(SUFFIX_KIND)})")
    return SUFFIX_KIND[suffix]


def price_files(files: dict[str, Path]) -> list[Stored]:
    """Price safetensors files of an artifact from their headers (shapes and dtypes); `files` maps module
    label -> path."""
    out = []
    for module, path in files.items():
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shape, dtype = tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise DidiError(
                        f"{path}: tensor '{key}' has dtype {sl.get_dtype()}, which didi cannot price"
                    )
                numel = math.prod(shape)
                nbytes = numel * dtype_bytes(dtype)
                kind: Kind = "fold" if module == "fold" else kind_of_key(key)
                suffix = key.rsplit("::", 1)[-1]
                if module != "fold" and suffix in CODE_SUFFIXES:
                    numel = code_count(suffix, shape)
                out.append(Stored(kind, numel, module, nbytes))
    return out


def base_bytes_of(plan: Iterable) -> int:
    """θ0's bytes in its own dtypes: Σ numel · element size over its floating tensors (a zoo's plan)."""
    return sum(p.numel * dtype_bytes(p.dtype) for p in plan if p.dtype.is_floating_point)


@dataclass(frozen=True)
class Pricing:
    """How a DiDi budget is priced (docs/method.md §4, §9): in `storage` units (elements or bytes), the shared
    factors in `shared_dtype` and the experts in `expert_dtype`; `base_bytes` is θ0's bytes in its own dtypes
    (needed for bytes). Dense per-task deltas are stored in float32. The default (elements, float32 factors)
    is the paper's accounting, and the rank problem it builds is the one didi always built."""

    storage: str = "elements"
    expert_dtype: str = "float32"
    shared_dtype: str = "float32"
    base_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.storage not in STORAGES:
            raise DidiError(f"storage: expected one of {', '.join(STORAGES)}, found {self.storage!r}")
        for opt, d in (("expert_dtype", self.expert_dtype), ("shared_dtype", self.shared_dtype)):
            if d not in EXPERT_DTYPES:
                raise DidiError(f"{opt}: expected one of {', '.join(EXPERT_DTYPES)}, found {d!r}")
        if self.storage == "bytes" and not self.base_bytes:
            raise DidiError("storage bytes: θ0's size in bytes (base_bytes) is needed to price in bytes")

    @property
    def is_default(self) -> bool:
        return self.storage == "elements" and self.expert_dtype == self.shared_dtype == "float32"

    @property
    def unit_name(self) -> str:
        return self.storage

    def base(self, base_params: int) -> int:
        """θ0 in the budget's unit."""
        return int(self.base_bytes) if self.storage == "bytes" else int(base_params)

    def dense(self, numel: float) -> float:
        """A dense float32 tensor of `numel` elements in the budget's unit."""
        return 4.0 * numel if self.storage == "bytes" else float(numel)

    def units(self, m, n) -> tuple:
        """(one shared rank unit, one expert rank unit) of m×n matrices in the budget's unit."""
        return unit_cost(m, n, self.shared_dtype, self.storage), unit_cost(
            m, n, self.expert_dtype, self.storage
        )
