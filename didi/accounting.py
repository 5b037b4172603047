"""Storage accounting (docs/method.md §4): one function prices every artifact, DiDi's and every baseline's.

ratio = 1 + stored elements / |θ0|. The backbone θ0 is stored once and counts 1.0. Stored tensors are priced
by kind: a rank-r factor pair of an m×n matrix costs r(m + n) (the numel of A plus B), a dense tensor its
numel, a binary mask numel/32 (1 bit against fp32), a scalar 1, and a delta folded into the stored base
(it replaces a base tensor) nothing. Heads, routers and the text tower are outside the budget. Terms shared by
a subset of the tasks (artifact groups, FlexMerge's clusters) are priced once per group, like the shared
module.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from safetensors import safe_open

Kind = Literal["lora", "dense", "mask", "scalar", "fold"]
WEIGHTS: dict[str, float] = {"lora": 1.0, "dense": 1.0, "mask": 1.0 / 32.0, "scalar": 1.0, "fold": 0.0}
#: artifact key suffix -> kind (keys are "<tensor name>::<suffix>")
SUFFIX_KIND: dict[str, Kind] = {
    "lora_A": "lora",
    "lora_B": "lora",
    "dense": "dense",
    "ref": "dense",
    "mask": "mask",
    "scale": "scalar",
}


@dataclass(frozen=True)
class Stored:
    """One stored tensor: its kind, element count and the module it belongs to (for the breakdown)."""

    kind: Kind
    numel: int
    module: str = "other"  # "shared", a task name, "fold", ...


def lora_elements(m: int, n: int, r: int) -> int:
    """Elements of a rank-r factor pair A (m×r), B (r×n) of an m×n matrix."""
    return r * (m + n)


def stored_elements(items: Iterable[Stored]) -> float:
    return sum(WEIGHTS[i.kind] * i.numel for i in items)


def storage_report(items: Iterable[Stored], base_params: int) -> dict:
    """Ratio plus a breakdown by module and by kind (what `didi inspect` prints)."""
    items = list(items)
    by_module: dict[str, float] = defaultdict(float)
    by_kind: dict[str, float] = defaultdict(float)
    for i in items:
        by_module[i.module] += WEIGHTS[i.kind] * i.numel
        by_kind[i.kind] += WEIGHTS[i.kind] * i.numel
    total = stored_elements(items)
    return {
        "base_params": int(base_params),
        "stored_elements": total,
        "ratio": 1.0 + total / base_params,
        "by_module": dict(by_module),
        "by_kind": dict(by_kind),
    }


def kind_of_key(key: str) -> Kind:
    suffix = key.rsplit("::", 1)[-1]
    if suffix not in SUFFIX_KIND:
        raise ValueError(f"artifact key {key!r} has no known kind suffix ({sorted(SUFFIX_KIND)})")
    return SUFFIX_KIND[suffix]


def price_files(files: dict[str, Path]) -> list[Stored]:
    """Price safetensors files of an artifact from their headers; `files` maps module label -> path."""
    out = []
    for module, path in files.items():
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                numel = 1
                for s in shape:
                    numel *= s
                kind: Kind = "fold" if module == "fold" else kind_of_key(key)
                out.append(Stored(kind, numel, module))
    return out
