"""Options dataclasses as a command line, a YAML file and help text: a config is a class signature.

The methods' options (`didi methods`, `--options '{k: 20}'`) and the merge options of
`didi merge|search|refine` are dataclasses whose Google-style `Args:` docstring is their help; these helpers
read them.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import fields, is_dataclass
from typing import Any

from didi.errors import DidiError


def strict_yaml_load(stream: str) -> Any:
    """jsonargparse's YAML loader, refusing a mapping with a repeated key:
    `'{a: x.safetensors, a: y.safetensors}'` would otherwise keep the last `a` and drop a task without a word
    (PyYAML keeps the last value)."""
    import yaml
    from jsonargparse._loaders_dumpers import yaml_load

    class Strict(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            seen: set = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise DidiError(
                            f"{key!r} appears twice in the mapping {stream.strip()[:200]!r} (line "
                            f"{key_node.start_mark.line + 1}); give each entry a unique name"
                        )
                    seen.add(key)
                except TypeError:  # an unhashable key: yaml itself refuses it below
                    pass
            return super().construct_mapping(node, deep)

    try:
        yaml.load(stream, Loader=Strict)
    except yaml.YAMLError:
        pass  # not YAML: jsonargparse decides what the string is
    return yaml_load(stream)


def option_parameters(cls: type, names: tuple[str, ...]) -> tuple[list[inspect.Parameter], list[str]]:
    """The fields `names` of dataclass `cls` as keyword parameters (annotation and default of the field) and
    as `Args:` lines of a docstring (from the class's own `Args:` section)."""
    hints = typing.get_type_hints(cls)
    helps = arg_help(cls.__doc__ or "")
    by_name = {f.name: f for f in fields(cls)}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise TypeError(f"{cls.__name__} has no option {unknown[0]!r}")
    params, docs = [], []
    for n in names:
        f = by_name[n]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        params.append(
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hints[n])
        )
        docs.append(f"        {n}: {helps.get(n, '')}")
    return params, docs


def describe_options(cls: type) -> list[dict]:
    helps = arg_help(cls.__doc__ or "")
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
        out.append(
            {
                "name": f.name,
                "type": _type_name(hints.get(f.name, f.type)),
                "default": default,
                "help": helps.get(f.name, ""),
            }
        )
    return out


def _type_name(t: Any) -> str:
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "")


def arg_help(doc: str) -> dict[str, str]:
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


def from_dict(cls: type, d: dict, where: str) -> Any:
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise DidiError(f"{where}: unknown option {unknown[0]!r}; options: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        t = hints.get(k)
        if isinstance(t, type) and is_dataclass(t) and isinstance(v, dict):
            v = from_dict(t, v, f"{where}.{k}")
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise DidiError(f"{where}: {e}") from e
