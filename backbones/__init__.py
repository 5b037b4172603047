"""Backbone adapters and their registry (decorator, plus the `didi.backbones` entry-point group)."""
from __future__ import annotations

from importlib.metadata import entry_points

from didi.backbones.base import Adapter, TensorPlan, Zoo, parse_tasks
from didi.errors import DidiError

ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(name: str):
    """Class decorator: make an adapter selectable by `name` (CLI, YAML, manifests)."""

    def wrap(cls: type[Adapter]) -> type[Adapter]:
        if name in ADAPTERS and ADAPTERS[name] is not cls:
            raise DidiError(f"adapter name '{name}' is registered twice ({ADAPTERS[name].__name__}, {cls.__name__})")
        cls.registry_name = name
        ADAPTERS[name] = cls
        return cls

    return wrap


register_adapter("state_dict")(Adapter)
_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group="didi.backbones"):
        ep.load()  # importing the module runs its @register_adapter


def get_adapter_class(name: str) -> type[Adapter]:
    _load_plugins()
    if name not in ADAPTERS:
        raise DidiError(f"unknown backbone adapter '{name}'; registered: {sorted(ADAPTERS)}")
    return ADAPTERS[name]


def build_adapter(name: str, settings: dict | None = None) -> Adapter:
    return get_adapter_class(name)(**(settings or {}))


__all__ = ["ADAPTERS", "Adapter", "TensorPlan", "Zoo", "build_adapter", "get_adapter_class", "parse_tasks",
           "register_adapter"]

from didi.backbones import hf_encoder as _hf_encoder  # noqa: E402,F401  (registers "hf_encoder")
from didi.backbones import open_clip as _open_clip  # noqa: E402,F401  (registers "open_clip")
from didi.backbones import hf_clip as _hf_clip  # noqa: E402,F401  (registers "hf_clip")
from didi.backbones import hf_llama as _hf_llama  # noqa: E402,F401  (registers "hf_llama")
