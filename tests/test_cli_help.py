"""`didi merge|search|refine` take their option flags from the one `MergeOptions` class: the flags, their help
and defaults must be those of the class, and each command's own arguments keep their descriptions."""

from __future__ import annotations

import pytest

from didi.cli import build_parser
from didi.options import arg_help
from didi.pipeline import MergeOptions

OWN = {
    "merge": ("budget", "allocation", "shared", "decompose", "search", "refine", "trainer", "resume"),
    "search": ("budget", "allocation", "shared", "decompose", "search", "trainer", "resume"),
    "refine": ("decompose", "refine", "trainer"),
}


@pytest.mark.parametrize("command", sorted(OWN))
def test_merge_commands_take_their_flags_from_merge_options(command: str) -> None:
    parser = build_parser()
    sub = parser._subcommands_action._name_parser_map[command]
    text = sub.format_help()
    helps = arg_help(MergeOptions.__doc__ or "")
    flat = {"budget", "allocation", "shared", "resume"}
    for name in OWN[command]:
        assert f"--{name}" in text, (command, name)
        if name in flat:  # a scalar option: its help is MergeOptions' own text
            assert " ".join(helps[name].split()[:4]) in " ".join(text.split()), (command, name)
    for name in set(OWN["merge"]) - set(OWN[command]):
        assert f"--{name} " not in text and f"--{name}." not in text, (command, name)
    assert "θ0: a .safetensors file" in " ".join(text.split())  # the command's own arguments keep their help
    assert "Args:" not in text  # the examples epilog stops before the argument docs
    if "budget" in OWN[command]:
        assert sub.get_defaults()["budget"] == MergeOptions().budget
