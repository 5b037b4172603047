"""`didi compare` end to end on a tiny zoo: table, JSON and Pareto PNG; the data-free metric against a literal
computation; reuse of earlier artifacts; the Pareto front on hand-made points."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from safetensors.numpy import load_file

from didi.backbones import Adapter, Zoo
from didi.compare import pareto_front, plan_runs, run_compare
from didi.errors import DidiError
from didi.synthetic import make_zoo


def test_pareto_front_by_hand():
    pts = [(1.0, 0.5), (1.2, 0.7), (1.2, 0.6), (2.0, 0.7), (1.5, 0.9), (3.0, 0.95)]
    # (1.2, 0.6) is beaten by (1.2, 0.7); (2.0, 0.7) by (1.5, 0.9)
    assert pareto_front(pts, higher_is_better=True) == [0, 1, 4, 5]
    assert pareto_front([(s, -v) for s, v in pts], higher_is_better=False) == [0, 1, 4, 5]


def test_plan_runs():
    runs = plan_runs(["ties", "flexmerge", "didi"], [1.1, 2.0], {"ties": {"k": 10}})
    assert [r["label"] for r in runs] == ["ties", "flexmerge@1.1", "flexmerge@2", "didi@1.1", "didi@2"]
    assert runs[0]["options"] == {"k": 10} and runs[2]["options"] == {"target": 2.0}
    assert runs[4]["options"] == {"budget": 2.0}
    # MERGE: one search, a front point per budget; its options carry no size
    front = plan_runs(["merge"], [1.05, 1.24], {"merge": {"evaluations": 8}})
    assert [(r["label"], r["budget"], r["options"], r.get("front")) for r in front] == [
        ("merge@1.05", 1.05, {"evaluations": 8}, True),
        ("merge@1.24", 1.24, {"evaluations": 8}, True),
    ]
    with pytest.raises(DidiError, match="method 'merge' needs at least one budget"):
        plan_runs(["merge"], [])
    with pytest.raises(DidiError, match="unknown merging method 'nope'"):
        plan_runs(["nope"], [1.2])
    with pytest.raises(DidiError, match="not in methods"):
        plan_runs(["ties"], [1.2], {"emr": {}})


def test_compare_end_to_end(tmp_path, fast):
    dcfg, scfg, rcfg, tcfg = fast
    base, tasks = make_zoo(tmp_path / "zoo", T=3, width=8, layers=1, noise=0.01)
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in tasks.items()})
    methods = ["averaging", "ties", "tsv_c", "emr", "tall_masks", "twin", "flexmerge", "didi_greedy"]
    options = {"didi_greedy": {"decompose": asdict(dcfg), "refine": asdict(rcfg), "trainer": asdict(tcfg)}}
    out = tmp_path / "cmp"
    res = run_compare(zoo, out, methods, [1.5, 3.0], options)
    labels = [r["label"] for r in res["rows"]]
    assert labels == [
        "averaging",
        "ties",
        "tsv_c",
        "emr",
        "tall_masks",
        "twin",
        "flexmerge@1.5",
        "flexmerge@3",
        "didi_greedy@1.5",
        "didi_greedy@3",
    ]
    rows = {r["label"]: r for r in res["rows"]}
    # the data-free metric, literally: averaging serves mean τ to every task
    b = load_file(str(base))
    ts = {t: load_file(str(p)) for t, p in tasks.items()}
    taus = {t: {k: ts[t][k].astype(np.float64) - b[k] for k in b} for t in ts}
    for t in ts:
        num = sum(((np.mean([taus[u][k] for u in ts], 0) - taus[t][k]) ** 2).sum() for k in b)
        den = sum((taus[t][k] ** 2).sum() for k in b)
        assert rows["averaging"]["tasks"][t]["rel_err"] == pytest.approx(num / den, rel=1e-5)
    # FlexMerge at T× keeps every fine-tune; DiDi at 3.0 is near exact; storage ≤ budget
    assert rows["flexmerge@3"]["average"] < 1e-10
    assert (
        rows["didi_greedy@3"]["average"] < rows["didi_greedy@1.5"]["average"] < rows["averaging"]["average"]
    )
    for r in res["rows"]:
        if r["budget"] is not None:
            assert r["storage_ratio"] <= r["budget"] + 1e-9
        assert r["wall_time_s"] > 0 and not r["reused"]
    assert rows["averaging"]["storage_ratio"] == 1.0
    # outputs
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == len(labels) + 1 and "| flexmerge | 1.5 |" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["pareto_front"] == res["pareto_front"]
    assert "averaging" in res["pareto_front"] and "flexmerge@3" in res["pareto_front"]
    # a second run reuses every artifact (no recomputation) and adds only what is new
    res2 = run_compare(zoo, out, ["averaging", "flexmerge"], [1.5, 2.0])
    assert [(r["label"], r["reused"]) for r in res2["rows"]] == [
        ("averaging", True),
        ("flexmerge@1.5", True),
        ("flexmerge@2", False),
    ]
    assert res2["rows"][0]["average"] == rows["averaging"]["average"]
    # an artifact of other settings under the same label is refused
    with pytest.raises(DidiError, match="other settings"):
        run_compare(zoo, out, ["ties"], [], {"ties": {"k": 50}})
    # a DiDi variant is reused under the settings it forces (greedy allocation), refused under other ones
    assert run_compare(zoo, out, ["didi_greedy"], [1.5], options)["rows"][0]["reused"]
    quantized = {"didi_greedy": {**options["didi_greedy"], "storage": "bytes", "expert_dtype": "int8"}}
    with pytest.raises(DidiError, match="other settings"):
        run_compare(zoo, out, ["didi_greedy"], [1.5], quantized)


def test_compare_cli(tmp_path, capsys):
    from didi.cli import main

    base, tasks = make_zoo(tmp_path / "zoo", T=2, width=8, layers=1)
    spec = "[" + ", ".join(str(p) for p in tasks.values()) + "]"
    rc = main(
        [
            "compare",
            str(base),
            spec,
            str(tmp_path / "c"),
            "--methods",
            "[task_arithmetic, flexmerge]",
            "--budgets",
            "[1.5]",
            "--wandb",
            "true",  # WANDB_MODE=disabled (conftest): the logging code runs, nothing is sent
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "| task_arithmetic |" in out and "Pareto front:" in out
    assert (
        main(["compare", str(base), spec, str(tmp_path / "d"), "--methods", "[ties]", "--metric", "accuracy"])
        == 2
    )
    assert "give the evaluation data" in capsys.readouterr().err


def test_compare_accuracy_metric(tmp_path):
    """metric = accuracy through didi.evaluate on a tiny BERT zoo: FlexMerge at T× serves the exact
    fine-tunes, so its accuracy equals the individual models' (normalised accuracy 1); masked and low-rank
    methods run as they are."""
    import os

    import torch
    from safetensors.torch import save_file

    from didi.backbones import build_adapter
    from didi.datamodules.text import write_jsonl
    from didi.evaluate import evaluate_models
    from didi.trainer import TrainerConfig
    from helpers import WORDS, add_vocab, make_bert_zoo

    base, tasks = make_bert_zoo(tmp_path / "zoo")
    add_vocab(tmp_path / "zoo" / "base" / "0_Transformer")
    g = torch.Generator().manual_seed(3)
    data = {}
    for t, C in (("task0", 2), ("task1", 3), ("task2", 2)):
        save_file(
            {"weight": torch.randn(C, 32, generator=g), "bias": torch.randn(C, generator=g)},
            os.path.join(tasks[t], "head.safetensors"),
        )
        exs = [
            {
                "text": " ".join(WORDS[int(i)] for i in torch.randint(0, 45, (6,), generator=g)),
                "label": int(torch.randint(0, C, (1,), generator=g)),
            }
            for _ in range(12)
        ]
        write_jsonl(tmp_path / "data" / t / "test.jsonl", exs)
        data[t] = str(tmp_path / "data" / t)
    cpu = TrainerConfig(accelerator="cpu", devices=1, logger="none", progress_bar=False)
    ind = evaluate_models(tasks, data, tokenizer=base, trainer=cpu, batch_size=8)
    zoo = Zoo(build_adapter("hf_encoder"), base, tasks)
    res = run_compare(
        zoo,
        tmp_path / "cmp",
        ["emr", "tsv_c", "flexmerge"],
        [3.0],
        metric="accuracy",
        evaluation={
            "data": data,
            "individual": {t: v["accuracy"] for t, v in ind["tasks"].items()},
            "trainer": cpu,
            "batch_size": 8,
        },
    )
    rows = {r["label"]: r for r in res["rows"]}
    assert res["pareto_key"] == "average_normalized"
    for t in data:
        assert rows["flexmerge@3"]["tasks"][t]["accuracy"] == ind["tasks"][t]["accuracy"]
        assert rows["flexmerge@3"]["tasks"][t]["n"] == 12
    assert rows["flexmerge@3"]["average_normalized"] == pytest.approx(1.0)
    assert all(0 <= r["average"] <= 1 for r in res["rows"])
    assert "normalised" in (tmp_path / "cmp" / "results.md").read_text()


def test_a_stopped_comparison_leaves_its_finished_rows(tmp_path, monkeypatch):
    """results.json / results.md are rewritten after every scored row, marked partial until the last one, so
    a comparison stopped midway still shows what it finished; the rerun completes them."""
    import didi.compare as compare

    base, tasks = make_zoo(tmp_path / "zoo", T=3, width=8, layers=1, noise=0.01)
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in tasks.items()})
    out = tmp_path / "cmp"
    score, calls = compare.reconstruction_errors, []

    def stop_at_third(art, zoo_):
        calls.append(art)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return score(art, zoo_)

    monkeypatch.setattr(compare, "reconstruction_errors", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        run_compare(zoo, out, ["averaging", "ties", "task_arithmetic"], [])
    partial = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in partial["rows"]] == ["averaging", "ties"]
    assert partial["complete"] is False and partial["rows_expected"] == 3
    assert (out / "results.md").read_text().startswith("**Partial: 2 of 3 rows")
    assert not (out / "pareto.png").exists()
    monkeypatch.setattr(compare, "reconstruction_errors", score)
    res = run_compare(zoo, out, ["averaging", "ties", "task_arithmetic"], [])
    done = json.loads((out / "results.json").read_text())
    assert "complete" not in done and [r["label"] for r in done["rows"]] == [r["label"] for r in res["rows"]]
    assert done["rows"][0]["average"] == partial["rows"][0]["average"]
    assert "Partial" not in (out / "results.md").read_text() and (out / "pareto.png").exists()
