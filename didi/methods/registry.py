"""The method registry: every merging method is a function registered by name over a typed options dataclass.

    @register_method("ties", options=TiesOptions)
    def ties(zoo: Zoo, opts: TiesOptions, reader: DeltaReader) -> Terms: ...

The options dataclass is the method's CLI/YAML surface (`didi apply ties BASE TASKS OUT --options '{k: 20}'`;
`didi methods` lists it); its `validate()` (when defined) raises a DidiError naming the bad option. A method
either returns `Terms` (written by `didi.methods.common.write_method_artifact`, so every method gives the same
artifact kind) or, with `writes_artifact=True`, writes the artifact itself (the DiDi ablations call
`didi.pipeline.run_merge`).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable, Literal

from didi.errors import DidiError

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
            opts = _from_dict(self.options, options, f"options of method '{self.name}'")
        else:
            raise DidiError(f"options of method '{self.name}': expected a mapping such as {{k: 20}}, "
                            f"found {type(options).__name__}")
        validate = getattr(opts, "validate", None)
        if validate is not None:
            validate()
        return opts


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, options: type, kind: MethodKind = "static", writes_artifact: bool = False):
    """Decorator registering `fn(zoo, opts, reader) -> Terms` (or `fn(zoo, opts, output) -> Path` when it
    writes the artifact itself); `reader` (common.DeltaReader) streams the task vectors tensor by tensor."""
    if not is_dataclass(options):
        raise TypeError(f"method {name!r}: options must be a dataclass, got {options!r}")

    def deco(fn: Callable) -> Callable:
        if name in METHODS and METHODS[name].fn is not fn:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = MethodSpec(name, fn, options, kind, writes_artifact)
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise DidiError(f"method: unknown merging method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def list_methods() -> list[dict]:
    """Name, kind, one-line summary and options (name, type, default, help) of every registered method."""
    return [{"name": s.name, "kind": s.kind, "summary": s.summary, "options": describe_options(s.options)}
            for s in sorted(METHODS.values(), key=lambda s: s.name)]


def describe_options(cls: type) -> list[dict]:
    helps = _arg_help(cls.__doc__ or "")
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        if is_dataclass(default):
            default = dataclasses.asdict(default)
        out.append({"name": f.name, "type": _type_name(hints.get(f.name, f.type)), "default": default,
                    "help": helps.get(f.name, "")})
    return out


def _type_name(t: Any) -> str:
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "")


def _arg_help(doc: str) -> dict[str, str]:
    """Parse the `Args:` section of a Google-style docstring into {name: text}."""
    out: dict[str, str] = {}
    if "Args:" not in doc:
        return out
    cur = None
    for line in doc.split("Args:", 1)[1].splitlines():
        m = re.match(r"\s{4,8}(\w+):\s*(.*)", line)
        if m and len(line) - len(line.lstrip()) <= 8:
            cur = m.group(1)
            out[cur] = m.group(2).strip()
        elif cur and line.strip():
            out[cur] += " " + line.strip()
    return out


def _from_dict(cls: type, d: dict, where: str) -> Any:
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise DidiError(f"{where}: unknown option {unknown[0]!r}; options: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        t = hints.get(k)
        if isinstance(t, type) and is_dataclass(t) and isinstance(v, dict):
            v = _from_dict(t, v, f"{where}.{k}")
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise DidiError(f"{where}: {e}") from e
