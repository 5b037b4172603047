"""The method registry: every merging method is a function registered by name over a typed options dataclass.

    @register_method("ties", options=TiesOptions)
    def ties(zoo: Zoo, opts: TiesOptions, reader: DeltaReader) -> Terms: ...

The options dataclass is the method's CLI/YAML surface (`didi apply ties BASE TASKS OUT --options '{k: 20}'`;
`didi methods` lists it); its `validate()` (when defined) raises a DidiError naming the bad option. A method
either returns `Terms` (written by `didi.methods.common.write_method_artifact`, so every method gives the same
artifact kind) or, with `writes_artifact=True`, writes the artifact itself (the DiDi ablations call
`didi.pipeline.run_merge`). Built-in methods are defined in the modules listed in `METHODS`; other packages
add theirs through the `didi.methods` entry-point group.
"""

from __future__ import annotations

from dataclasses import dataclass, is_dataclass
from typing import Any, Callable, Literal

from didi.errors import DidiError
from didi.options import describe_options, from_dict
from didi.registry import Registry

MethodKind = Literal["static", "dynamic", "didi"]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: its function, options class and what kind of model it serves."""

    name: str
    fn: Callable
    options: type
    kind: MethodKind
    writes_artifact: bool = False

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().split("\n")[0]

    def make_options(self, options: Any = None) -> Any:
        """Options from None (defaults), an instance, or a dict (YAML/JSON), validated."""
        if options is None:
            opts = self.options()
        elif isinstance(options, self.options):
            opts = options
        elif isinstance(options, dict):
            opts = from_dict(self.options, options, f"options of method '{self.name}'")
        else:
            raise DidiError(
                f"options of method '{self.name}': expected a mapping such as {{k: 20}}, "
                f"found {type(options).__name__}"
            )
        validate = getattr(opts, "validate", None)
        if validate is not None:
            validate()
        return opts


METHODS: Registry[MethodSpec] = Registry(
    "merging method",
    group="didi.methods",
    identity=lambda spec: spec.fn,
    builtins=(
        "didi.methods.static",
        "didi.methods.dynamic",
        "didi.methods.flexmerge",
        "didi.methods.merge",
        "didi.methods.didi_variants",
    ),
)


def register_method(name: str, options: type, kind: MethodKind = "static", writes_artifact: bool = False):
    """Decorator registering `fn(zoo, opts, reader) -> Terms` (or `fn(zoo, opts, output) -> Path` when it
    writes the artifact itself); `reader` (common.DeltaReader) streams the task vectors tensor by tensor."""
    if not is_dataclass(options):
        raise TypeError(f"method {name!r}: options must be a dataclass, got {options!r}")

    def deco(fn: Callable) -> Callable:
        METHODS.add(name, MethodSpec(name, fn, options, kind, writes_artifact))
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS.get(name)
    except DidiError as e:
        raise DidiError(f"method: {e}") from None


def list_methods() -> list[dict]:
    """Name, kind, one-line summary and options (name, type, default, help) of every registered method."""
    return [
        {"name": s.name, "kind": s.kind, "summary": s.summary, "options": describe_options(s.options)}
        for _, s in METHODS.items()
    ]
