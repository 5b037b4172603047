"""The backbone-adapter registry: `@register_adapter(name)` where an adapter is defined; the built-in families
are imported on the first lookup, other packages add theirs through the `didi.backbones` entry-point group."""

from __future__ import annotations

from didi.backbones.base import Adapter
from didi.registry import Registry

ADAPTERS: Registry[type[Adapter]] = Registry(
    "backbone adapter",
    group="didi.backbones",
    builtins=(
        "didi.backbones.hf_encoder",
        "didi.backbones.open_clip",
        "didi.backbones.hf_clip",
        "didi.backbones.hf_llama",
    ),
)


def register_adapter(name: str):
    """Class decorator: make an adapter selectable by `name` (CLI, YAML, manifests)."""

    def wrap(cls: type[Adapter]) -> type[Adapter]:
        ADAPTERS.add(name, cls)
        cls.registry_name = name
        return cls

    return wrap


register_adapter("state_dict")(Adapter)


def get_adapter_class(name: str) -> type[Adapter]:
    return ADAPTERS.get(name)


def build_adapter(name: str, settings: dict | None = None) -> Adapter:
    return get_adapter_class(name)(**(settings or {}))
