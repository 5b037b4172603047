"""Inputs that used to be lost or written wrongly without a word: a repeated task name in a YAML mapping, one
file under two task names, and NaN in JSON that strict readers reject."""

from __future__ import annotations

import json
import math

import pytest

from didi.backbones import parse_tasks
from didi.cli import main
from didi.jsonio import dumps, finite
from didi.synthetic import make_zoo


def test_a_repeated_task_name_in_a_mapping_is_refused(tmp_path, capsys):
    base, tasks = make_zoo(tmp_path / "zoo", T=3, width=8, layers=1)
    t0, t1, t2 = (str(p) for p in tasks.values())
    spec = f"{{a: {t0}, a: {t1}, c: {t2}}}"
    assert main(["merge", str(base), spec, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'a' appears twice" in err and "didi: error" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.work").exists()


def test_one_file_under_two_names_is_warned_about(tmp_path):
    f = tmp_path / "t.safetensors"
    f.write_bytes(b"")
    with pytest.warns(UserWarning, match=r"given under 2 names \(a, b\)"):
        assert parse_tasks({"a": str(f), "b": str(tmp_path / "." / "t.safetensors")}) == {
            "a": str(f),
            "b": str(tmp_path / "." / "t.safetensors"),
        }


def test_json_has_no_nan_and_says_why():
    obj = {"acc": float("nan"), "ok": 1.5, "nested": [{"x": float("inf")}], "s": "nan"}
    text = dumps(obj)
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c} in {text}"))
    assert back == {
        "acc": None,
        "acc_not_finite": "nan",
        "ok": 1.5,
        "nested": [{"x": None, "x_not_finite": "inf"}],
        "s": "nan",
    }
    assert finite(float("-inf")) is None and math.isfinite(finite(2.0))


def test_a_full_disk_and_an_interrupt_end_with_a_message_not_a_traceback(monkeypatch, capsys):
    """ENOSPC (as OSError or as safetensors' own error) is a `didi: error` line with exit 2; Ctrl-C says how
    to resume, exit 130; any other exception is not swallowed."""
    import errno

    import didi.cli as cli

    def raising(exc):
        def command(**kwargs):
            raise exc

        return command

    cases = [
        (OSError(errno.ENOSPC, "No space left on device", "/x/out.tmp"), 2, "no space left on device"),
        (
            RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
            2,
            "no space",
        ),
        (KeyboardInterrupt(), 130, "--resume true"),
    ]
    for exc, rc, said in cases:
        monkeypatch.setitem(cli.COMMANDS, "methods", raising(exc))
        assert cli.main(["methods"]) == rc
        assert said in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "methods", raising(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["methods"])
