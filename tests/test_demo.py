"""Both demos run end to end (at tiny sizes; the README's demo is the same code with its defaults)."""

import json

import pytest

from didi.cli import main


@pytest.mark.slow
def test_synthetic_demo(tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--kind",
                "synthetic",
                "--output",
                str(tmp_path / "d"),
                "--width",
                "16",
                "--layers",
                "2",
                "--budget",
                "1.3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "storage ratio" in out and "after refinement" in out
    m = json.loads(next((tmp_path / "d").glob("merged_*/manifest.json")).read_text())
    assert m["storage"]["ratio"] <= 1.3


@pytest.mark.slow
def test_real_demo_small(tmp_path, capsys):
    """The real MiniLM, the real package data, a few fine-tuning steps: the table has every row."""
    from didi.demo_real import run_real_demo

    rows = run_real_demo(
        str(tmp_path / "real"), n_train=16, n_test=8, steps=2, max_length=16, budgets=(1.24,), progress=False
    )
    assert set(rows) == {"individual", "pretrained + heads", "DiDi 1.24x"}
    assert rows["DiDi 1.24x"]["storage_ratio"] <= 1.24
    for rep in rows.values():
        assert set(rep["tasks"]) == {"rt_sentiment", "convention_party", "debate_speaker", "vader_polarity"}
    table = capsys.readouterr().out
    assert "| DiDi 1.24x |" in table and "normalised" in table
    # second run: the fine-tuned zoo is reused, not redone
    run_real_demo(
        str(tmp_path / "real"), n_train=16, n_test=8, steps=2, max_length=16, budgets=(1.24,), progress=False
    )
    assert "(cached)" in capsys.readouterr().out
