"""Every merging method in one registry, each producing the same artifact kind as DiDi (see registry.py).

The methods register themselves where they are defined (`@register_method`); the registry imports the
built-in modules on its first lookup and plugins through the `didi.methods` entry-point group.
"""

from didi.methods.common import DeltaReader, Terms, apply_method, write_method_artifact
from didi.methods.registry import METHODS, MethodSpec, get_method, list_methods, register_method

__all__ = [
    "METHODS",
    "MethodSpec",
    "Terms",
    "DeltaReader",
    "apply_method",
    "get_method",
    "list_methods",
    "register_method",
    "write_method_artifact",
]
