"""What a new user reads first: `didi inspect`'s breakdown in reading order, `didi methods` without the same
options block five times, `didi backbones` in aligned columns with a Literal option's allowed values, and a
missing θ0 named as the base by every command that takes one."""

from __future__ import annotations

import json
import re
from pathlib import Path

from didi.cli import main
from didi.inspect import breakdown_order
from helpers import CPU_QUIET

FAST = ["--search.steps", "10", "--refine.optimizer", "none", *CPU_QUIET]


def test_breakdown_order_puts_base_parts_and_shared_before_the_tasks():
    modules = ["alpha", "group:ab", "zeta", "shared", "fold", "gamma"]
    assert breakdown_order(modules, ["zeta", "alpha", "gamma"]) == [
        "fold",
        "shared",
        "zeta",
        "alpha",
        "gamma",
        "group:ab",
    ]
    assert breakdown_order(["b", "a"], ["a", "b"]) == ["a", "b"]  # no fold / shared: task order only


def test_inspect_lists_fold_shared_then_tasks_in_artifact_order(tmp_path, tiny_zoo, capsys):
    """Task names chosen so that an alphabetical sort would put `fold` and `shared` between them."""
    base, tasks = tiny_zoo
    named = dict(zip(["zeta", "alpha", "sigma", "gamma"], tasks.values()))
    out = tmp_path / "merged"
    args = ["merge", base, json.dumps(named), str(out), "--budget", "1.3"]
    assert main(args + ["--decompose.cache_dir", str(tmp_path / "cache"), *FAST]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    block = text.split("storage breakdown (elements):\n", 1)[1].split("\n\n", 1)[0]
    listed = [line.split()[0] for line in block.splitlines()]
    assert listed == ["fold", "shared", "zeta", "alpha", "sigma", "gamma"]


def test_methods_prints_each_options_block_once(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    # the DiDi variants share one options class: its fields appear once, under `didi`
    assert len(re.findall(r"^\s+decompose\s", text, flags=re.M)) == 1
    for variant in ("didi_greedy", "didi_uniform", "didi_norefine", "didi_folded"):
        head, rest = text.split(f"\n{variant} ", 1)
        assert rest.splitlines()[1].strip() == "options as `didi`", variant
    # Literal options show their values
    assert re.search(r"^\s+allocation\s+search \| greedy \| uniform\s+default 'search'", text, flags=re.M)
    # the JSON keeps every method's full options (machine-readable, no cross references)
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["didi_greedy"]["options"] == rows["didi"]["options"]


def test_backbones_columns_are_aligned_and_literals_listed(capsys):
    assert main(["backbones"]) == 0
    text = capsys.readouterr().out
    option_lines = [line for line in text.splitlines() if line.lstrip().startswith("--backbone.")]
    assert len(option_lines) > 10
    # the type column starts at one position on every line, and so does `default`
    type_at = {len(m.group(0)) for line in option_lines if (m := re.match(r"\s+--backbone\.\S+\s+", line))}
    default_at = {line.index(" default ") for line in option_lines}
    assert len(type_at) == 1 and len(default_at) == 1, (type_at, default_at)
    assert "decompose_word_embeddings" in text  # the longest option name, which used to shift its line
    assert re.search(r"--backbone\.nonmatrix_policy\s+shared \| per_task\s+default 'shared'", text)
    assert re.search(r"--backbone\.embeddings\s+low_rank \| per_task \| shared\s+default 'low_rank'", text)
    heads = [line for line in text.splitlines() if line and not line.startswith(" ")]
    assert len({line.index(" didi.") for line in heads if " didi." in line}) == 1  # class column aligned
    assert main(["backbones", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    opts = {o["name"]: o for o in rows["hf_llama"]["options"]}
    assert opts["embeddings"]["choices"] == ["low_rank", "per_task", "shared"]
    assert opts["nonmatrix_policy"]["choices"] == ["shared", "per_task"]


# ------------------------------------------------------------------------------------ the missing base
def _missing_base_message(path: Path) -> str:
    return f"base (θ0): {path}: no such file or directory"


def test_missing_base_is_named_by_merge_apply_compare(tmp_path, tiny_zoo, capsys):
    _, tasks = tiny_zoo
    missing = tmp_path / "nope" / "base.safetensors"
    spec = json.dumps(tasks)
    commands = [
        ["merge", str(missing), spec, str(tmp_path / "m"), *FAST],
        ["apply", "ties", str(missing), spec, str(tmp_path / "a")],
        ["compare", str(missing), spec, str(tmp_path / "c"), "--methods", "[ties]"],
    ]
    for argv in commands:
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert _missing_base_message(missing) in err, (argv[0], err)
    assert not any((tmp_path / d).exists() for d in ("m", "a", "c"))
    # a missing task says which task
    with_missing_task = json.dumps({**tasks, "extra": str(missing)})
    assert main(["merge", tiny_zoo[0], with_missing_task, str(tmp_path / "m")]) == 2
    assert f"task 'extra': {missing}: no such file or directory" in capsys.readouterr().err


def test_missing_base_is_named_by_export(tmp_path, tiny_zoo, capsys):
    base, tasks = tiny_zoo
    out = tmp_path / "merged"
    cache = ["--decompose.cache_dir", str(tmp_path / "cache")]
    assert main(["merge", base, json.dumps(tasks), str(out), "--budget", "1.3", *cache, *FAST]) == 0
    missing = tmp_path / "nope.safetensors"
    capsys.readouterr()
    assert main(["export", str(out), str(tmp_path / "x"), "--base", str(missing)]) == 2
    assert _missing_base_message(missing) in capsys.readouterr().err


def test_missing_base_is_named_by_evaluate(tmp_path, capsys):
    from didi.backbones import Zoo, build_adapter
    from helpers import make_bert_zoo, tiny_merge

    base, tasks = make_bert_zoo(tmp_path / "zoo", T=2)
    art = tiny_merge(Zoo(build_adapter("hf_encoder"), base, tasks), tmp_path / "merged")
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "a", "label": 0}) + "\n")
    missing = tmp_path / "nope"
    spec = json.dumps({t: str(data) for t in tasks})
    assert main(["evaluate", str(art), spec, "--base", str(missing), "--output", str(tmp_path / "e")]) == 2
    assert _missing_base_message(missing) in capsys.readouterr().err


def test_demo_works_under_the_cache_directory_by_default(tmp_path, monkeypatch, capsys):
    """The real demo's ~700 MB working directory goes to $XDG_CACHE_HOME/didi/demo, not the current one."""
    import didi.demo

    seen = []
    monkeypatch.setattr(didi.demo, "run_synthetic_demo", lambda output, *a: seen.append(output))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main(["demo", "--kind", "synthetic"]) == 0
    assert main(["demo", "--kind", "synthetic", "--output", str(tmp_path / "here")]) == 0
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["demo", "--kind", "synthetic"]) == 0
    assert seen == [
        str(tmp_path / "xdg" / "didi" / "demo"),
        str(tmp_path / "here"),
        str(tmp_path / "home" / ".cache" / "didi" / "demo"),
    ]
    assert f"demo working directory: {tmp_path / 'xdg' / 'didi' / 'demo'}" in capsys.readouterr().out
