"""Backbone adapters: how to read θ0 and θ_t of one model family tensor by tensor, which tensors are
decomposed, and how to rebuild a runnable model. The registry (`didi.backbones.registry`) finds them by
name."""

from __future__ import annotations

from didi.backbones.base import Adapter, TensorPlan, Zoo, parse_tasks
from didi.backbones.registry import ADAPTERS, build_adapter, get_adapter_class, register_adapter

__all__ = [
    "ADAPTERS",
    "Adapter",
    "TensorPlan",
    "Zoo",
    "build_adapter",
    "get_adapter_class",
    "parse_tasks",
    "register_adapter",
]
