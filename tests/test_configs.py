"""Every YAML in configs/ parses against the CLI signature of its subcommand (file name prefix) and builds."""
from pathlib import Path

import pytest

from didi.cli import COMMANDS, build_parser

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_instantiates(path):
    sub = path.name.split("_")[0]
    assert sub in COMMANDS, f"{path.name}: name must start with a subcommand ({sorted(COMMANDS)})"
    parser = build_parser()
    args = [sub]
    if path.name == "merge_ddp_cpu.yaml":  # an overlay: applied on top of the base config
        args += ["--config", str(path.with_name("merge_synthetic.yaml"))]
    cfg = parser.parse_args([*args, "--config", str(path)])
    init = parser.instantiate_classes(cfg)[sub]
    assert init["base"] if "base" in init else True
    for key in ("search", "refine", "decompose", "trainer"):
        if key in init:
            assert type(init[key]).__name__.endswith("Config")
