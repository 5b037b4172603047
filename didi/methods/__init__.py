"""Every merging method in one registry, each producing the same artifact kind as DiDi (see registry.py).

Importing this package registers the methods and adds TIES and TSV-M to `didi.decompose.SHARED_MERGES`, so any
of them can define DiDi's shared part (`--decompose.shared_merge ties`).
"""
from didi.decompose import SHARED_MERGES
from didi.methods import didi_variants, dynamic, flexmerge, static  # noqa: F401  (registration)
from didi.methods.common import DeltaReader, Terms, apply_method, write_method_artifact
from didi.methods.registry import METHODS, MethodSpec, get_method, list_methods, register_method
from didi.methods.static import SHARED_MERGE_FUNCTIONS

for _name, _fn in SHARED_MERGE_FUNCTIONS.items():
    SHARED_MERGES.setdefault(_name, _fn)

__all__ = ["METHODS", "MethodSpec", "Terms", "DeltaReader", "apply_method", "get_method", "list_methods",
           "register_method", "write_method_artifact"]
