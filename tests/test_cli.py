"""The `didi` CLI end to end, and every bad input: a clear error, a non-zero exit, nothing left behind."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from didi.cli import main
from helpers import FAST_MERGE

FAST = FAST_MERGE


def _merge_args(tmp_path, base, tasks, out, budget="1.3"):
    return [
        "merge",
        base,
        json.dumps(tasks),
        str(out),
        "--budget",
        budget,
        "--decompose.cache_dir",
        str(tmp_path / "cache"),
        *FAST,
    ]


def test_merge_inspect_search_refine(tmp_path, tiny_zoo, capsys):
    base, tasks = tiny_zoo
    out = tmp_path / "merged"
    assert main(_merge_args(tmp_path, base, tasks, out)) == 0
    assert "storage ratio" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert isinstance(d["storage_ratio"], float) and d["storage_ratio"] <= 1.3
    assert isinstance(d["base_params"], int) and d["tasks"] == list(tasks)
    some = next(iter(d["ranks"].values()))
    assert set(some) == {"shared", *tasks} and all(isinstance(v, int) for v in some.values())
    assert d["published"]["method"] == "didi" and d["published"]["reason"]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ranks:" in text and "published ratio" in text
    # the stages alone: search writes ranks, refine turns them into the same kind of artifact
    ranks = tmp_path / "ranks.json"
    args = _merge_args(tmp_path, base, tasks, ranks)
    args[0] = "search"
    i = args.index("--refine.sweeps")
    del args[i : i + 2]
    assert main(args) == 0
    rk = json.loads(ranks.read_text())
    assert rk["ranks"] == json.loads((out / "manifest.json").read_text())["ranks"]
    out2 = tmp_path / "refined"
    assert (
        main(
            [
                "refine",
                base,
                json.dumps(tasks),
                str(ranks),
                str(out2),
                "--decompose.cache_dir",
                str(tmp_path / "cache"),
                "--refine.sweeps",
                "1",
                "--trainer.accelerator",
                "cpu",
                "--trainer.logger",
                "none",
                "--trainer.progress_bar",
                "false",
            ]
        )
        == 0
    )
    assert json.loads((out2 / "manifest.json").read_text())["ranks"] == rk["ranks"]


def test_yaml_config_and_list_tasks(tmp_path, tiny_zoo):
    base, tasks = tiny_zoo
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"base: {base}\ntasks:\n"
        + "".join(f"  - {p}\n" for p in tasks.values())
        + f"output: {tmp_path / 'y'}\nbudget: 1.3\nsearch:\n  steps: 10\nrefine:\n  optimizer: none\n"
        f"trainer:\n  accelerator: cpu\n  logger: none\n  progress_bar: false\n"
        f"decompose:\n  cache_dir: {tmp_path / 'cache'}\n"
    )
    assert main(["merge", "--config", str(cfg)]) == 0
    m = json.loads((tmp_path / "y" / "manifest.json").read_text())
    assert m["tasks"] == [Path(p).stem for p in tasks.values()]
    assert m["method"]["hyper_parameters"]["refine"]["optimizer"] == "none"


@pytest.mark.slow
def test_console_script_help_and_exit_code(tmp_path):
    exe = Path(sys.executable).with_name("didi")
    r = subprocess.run([str(exe), "merge", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "examples:" in r.stdout and "--search.steps" in r.stdout
    r = subprocess.run(
        [str(exe), "merge", str(tmp_path / "nope.safetensors"), "[a, b]", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "nope.safetensors: no such file or directory" in r.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- bad inputs
def _edit(path, fn):
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


def _nan(sd):
    k = next(k for k in sd if k.endswith("c_fc.weight"))
    sd[k][0, 0] = math.nan


def _inf(sd):
    sd["blocks.0.ln_1.weight"][0] = math.inf


BAD = {
    "shape mismatch": (
        lambda sd: sd.__setitem__("blocks.0.attn.out_proj.weight", torch.zeros(16, 15)),
        "has shape \\[16, 15\\], the base model has \\[16, 16\\]",
    ),
    "missing tensor": (
        lambda sd: sd.pop("blocks.1.mlp.c_proj.weight"),
        "'blocks.1.mlp.c_proj.weight' of the base model is missing",
    ),
    "extra tensor": (
        lambda sd: sd.__setitem__("head.weight", torch.zeros(2, 2)),
        "'head.weight' is not in the base",
    ),
    "nan": (_nan, "contains NaN or Inf"),
    "inf in a vector": (_inf, "contains NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_task_checkpoints(tmp_path, tiny_zoo, capsys, case):
    base, tasks = tiny_zoo
    fn, msg = BAD[case]
    _edit(tasks["task_2"], fn)
    out = tmp_path / "out"
    assert main(_merge_args(tmp_path, base, tasks, out)) == 2
    err = capsys.readouterr().err
    assert "didi: error:" in err
    import re

    assert re.search(msg, err), err
    if case in ("nan", "inf in a vector"):
        assert "task 'task_2'" in err
    _nothing_left(tmp_path)


def _nothing_left(tmp_path):
    left = [p.name for p in tmp_path.iterdir() if p.name not in ("zoo", "cache")]
    assert left == [], left
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(".tmp-" in p.name for p in cache.iterdir())


@pytest.mark.parametrize(
    "budget,msg",
    [
        ("50", "above full rank"),
        ("1.0000001", "below the cost of a single rank unit"),
        ("XL", "expected S, M, L"),
    ],
)
def test_unreachable_or_invalid_budget(tmp_path, tiny_zoo, capsys, budget, msg):
    base, tasks = tiny_zoo
    assert main(_merge_args(tmp_path, base, tasks, tmp_path / "out", budget)) == 2
    assert msg in capsys.readouterr().err
    _nothing_left(tmp_path)
    assert not (tmp_path / "cache").exists()  # refused before any SVD


@pytest.mark.parametrize(
    "tasks_fn,msg",
    [
        (lambda t: {"a": t["task_0"]}, "only one task"),
        (lambda t: {}, "no tasks given"),
        (lambda t: [t["task_0"], t["task_0"]], "duplicate task name"),
        (
            lambda t: {"a": t["task_0"], "b": "/nonexistent/x.safetensors"},
            "/nonexistent/x.safetensors: no such file",
        ),
    ],
)
def test_bad_task_lists(tmp_path, tiny_zoo, capsys, tasks_fn, msg):
    base, tasks = tiny_zoo
    assert main(_merge_args(tmp_path, base, tasks_fn(tasks), tmp_path / "out")) == 2
    assert msg in capsys.readouterr().err
    _nothing_left(tmp_path)


def test_corrupt_safetensors(tmp_path, tiny_zoo, capsys):
    base, tasks = tiny_zoo
    Path(tasks["task_1"]).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(_merge_args(tmp_path, base, tasks, tmp_path / "out")) == 2
    assert "corrupt or unreadable safetensors" in capsys.readouterr().err
    _nothing_left(tmp_path)


def test_pickle_refused_unless_allowed(tmp_path, tiny_zoo, capsys):
    base, tasks = tiny_zoo
    pt = Path(tasks["task_1"]).with_suffix(".pt")
    torch.save({"state_dict": load_file(tasks["task_1"])}, pt)
    tasks = {**tasks, "task_1": str(pt)}
    assert main(_merge_args(tmp_path, base, tasks, tmp_path / "out")) == 2
    assert "pickle checkpoints can run code" in capsys.readouterr().err
    _nothing_left(tmp_path)
    assert main(_merge_args(tmp_path, base, tasks, tmp_path / "out") + ["--allow_pickle", "true"]) == 0
    assert (tmp_path / "out" / "manifest.json").exists()


def test_output_exists_is_refused(tmp_path, tiny_zoo, capsys):
    base, tasks = tiny_zoo
    (tmp_path / "out").mkdir()
    assert main(_merge_args(tmp_path, base, tasks, tmp_path / "out")) == 2
    assert "already exists" in capsys.readouterr().err
