"""Every YAML in configs/ parses against the CLI signature of its subcommand (file name prefix), arrives
with the values it writes, builds, and says honestly what it holds: either "Every option of `didi <sub>`"
(then it has every key that `didi <sub> --print_config` prints, with that default, except the required
arguments and lines marked `# not the default`) or "only some options of `didi <sub>`"."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

from didi.cli import COMMANDS, build_parser, main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
OVERLAYS = {"merge_ddp_cpu.yaml": "merge_synthetic.yaml"}  # applied on top of a base config
NOT_DEFAULT = re.compile(r"#\s*not the default\b")


def subcommand(path: Path) -> str:
    return path.name.split("_")[0]


def header(path: Path) -> str:
    """The comment lines at the top of the file."""
    lines = path.read_text().splitlines()
    return "\n".join(
        line for line in lines[: next((i for i, x in enumerate(lines) if not x.startswith("#")), len(lines))]
    )


def claims_every_option(path: Path) -> bool:
    return f"Every option of `didi {subcommand(path)}`" in header(path)


def required(sub: str) -> list[str]:
    """The subcommand's arguments without a default (positional on the command line)."""
    params = inspect.signature(COMMANDS[sub]).parameters.values()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in params if p.default is p.empty and p.kind not in variadic]


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; None, scalars and lists are leaves."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def marked_not_default(text: str) -> set[str]:
    """Dotted keys of the block-mapping lines whose comment says `# not the default`."""
    path: list[tuple[int, str]] = []
    marked = set()
    for line in text.splitlines():
        m = re.match(r"( *)([A-Za-z_]\w*):(.*)$", line)
        if not m:
            continue
        while path and path[-1][0] >= len(m[1]):
            path.pop()
        path.append((len(m[1]), m[2]))
        if NOT_DEFAULT.search(m[3]):
            marked.add(".".join(k for _, k in path))
    return marked


def print_config(sub: str, capsys) -> dict:
    """What `didi <sub> --print_config` prints: every option with its default."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([sub, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_there_are_configs():
    assert len(CONFIGS) >= 4
    assert any(claims_every_option(p) for p in CONFIGS)  # merge_synthetic.yaml lists every option


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_instantiates(path):
    sub = subcommand(path)
    assert sub in COMMANDS, f"{path.name}: name must start with a subcommand ({sorted(COMMANDS)})"
    parser = build_parser()
    args = [sub]
    if path.name in OVERLAYS:
        args += ["--config", str(path.with_name(OVERLAYS[path.name]))]
    cfg = parser.parse_args([*args, "--config", str(path)])
    # every value written in the YAML arrives as written (and, for an overlay, overrides the base config's)
    parsed = flatten(cfg[sub].as_dict())
    written = flatten(yaml.safe_load(path.read_text()))
    assert {k: parsed.get(k, "<missing>") for k in written} == written
    init = parser.instantiate_classes(cfg)[sub]
    assert required(sub), sub
    for name in required(sub):
        assert init[name], f"{path.name}: `{name}` is empty"
    for key in ("search", "refine", "decompose", "trainer"):
        if key in init:
            assert type(init[key]).__name__.endswith("Config")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_says_whether_it_lists_every_option(path):
    sub = subcommand(path)
    partial = f"only some options of `didi {sub}`" in header(path).lower()
    assert claims_every_option(path) != partial, (
        f"{path.name}: its header must say either 'Every option of `didi {sub}`' (then the test below "
        f"checks it) or 'only some options of `didi {sub}`'"
    )


@pytest.mark.parametrize("path", [p for p in CONFIGS if claims_every_option(p)], ids=lambda p: p.name)
def test_complete_config_has_every_default(path, capsys):
    sub = subcommand(path)
    text = path.read_text()
    defaults = flatten(print_config(sub, capsys))
    written = flatten(yaml.safe_load(text))
    marked = marked_not_default(text)
    assert "base" in required(sub) and "base" in defaults  # the defaults are those of the subcommand

    def exempt(key):
        return key.split(".")[0] in required(sub) or any(key == m or key.startswith(m + ".") for m in marked)

    missing = [k for k in defaults if k not in written and not any(w.startswith(k + ".") for w in written)]
    assert not missing, f"{path.name} lacks {missing} (see `didi {sub} --print_config`)"
    changed = {
        k: (written.get(k, "<a sub-block>"), v)
        for k, v in defaults.items()
        if not exempt(k) and written.get(k, "<a sub-block>") != v
    }
    assert not changed, f"{path.name}: (written, default) {changed}; mark such lines `# not the default`"
    extra = [k for k in written if k not in defaults and not exempt(k)]
    assert not extra, f"{path.name}: {extra} are not printed by `didi {sub} --print_config`"
    for m in marked:  # a line marked `# not the default` really differs from the default
        sub_written = {k: v for k, v in written.items() if k == m or k.startswith(m + ".")}
        sub_default = {k: v for k, v in defaults.items() if k == m or k.startswith(m + ".")}
        assert sub_written != sub_default, f"{path.name}: `{m}` is the default but marked `# not the default`"


def test_not_the_default_marker_is_read():
    text = (
        "# header\nbase: x\ntasks:\n  a: a.safetensors   # not the default\nsearch:\n"
        "  steps: 300  # not the default: longer\n  lr: 0.5\n"
        "backbone:   # not the default\n  class_path: didi.backbones.Adapter\n"
    )
    assert marked_not_default(text) == {"tasks.a", "search.steps", "backbone"}
