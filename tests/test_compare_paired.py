"""`didi compare` for issues 12 and 13: paired per-example differences, MERGE rows and learned-router rows.

- McNemar: the exact two-sided p-value against hand counts (and scipy's binomial test where installed).
- Reports keep each test example's correctness: it equals a literal one-text-at-a-time evaluation of the
  materialised task models, and the pairing of two rows equals a literal loop over their examples; rows of
  other data are refused.
- End to end on a tiny BERT zoo whose tasks use disjoint vocabularies (routing is trivially perfect): MERGE
  searches once and gives one row per budget, the front point within it (storage ≤ budget); a learned router
  is trained once and scores every dynamic row (no static one), equal to the oracle rows exactly; a second
  run (from the CLI) reuses everything; other settings are refused.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from didi.artifact import load_artifact
from didi.backbones import Zoo, build_adapter
from didi.compare import mcnemar_exact, paired_difference, run_compare
from didi.errors import DidiError
from didi.evaluate import evaluate_artifact
from didi.evaluators import load_head, mean_pool, pack_correct, unpack_correct
from didi.methods.merge_library import choose_point, read_library
from didi.router import RouterOptions
from didi.sources import file_sha256
from didi.trainer import TrainerConfig
from helpers import make_text_task_zoo

CPU = TrainerConfig(accelerator="cpu", devices=1, logger="none", progress_bar=False)
ROUTER = RouterOptions(layer="embedding", steps=100)
MERGE = {"evaluations": 6, "population": 6}
TEST_SIZES = {"task0": 13, "task1": 8, "task2": 10}  # uneven: a hex digit holds 4 examples


# ------------------------------------------------------------------------------------------------ McNemar
def test_mcnemar_exact_by_hand():
    # p = min(1, 2 Σ_{i ≤ min(b,c)} C(b+c, i) / 2^(b+c))
    assert mcnemar_exact(1, 5) == 2 * (1 + 6) / 2**6 == 0.21875
    assert mcnemar_exact(5, 1) == mcnemar_exact(1, 5)
    assert mcnemar_exact(0, 6) == 2 / 64
    assert mcnemar_exact(2, 10) == 2 * (1 + 12 + 66) / 2**12
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(0, 1) == 1.0
    assert 0.0 <= mcnemar_exact(1200, 1350) < 0.01  # exact integers: no overflow at thousands of pairs
    with pytest.raises(DidiError, match="non-negative"):
        mcnemar_exact(-1, 2)


def test_mcnemar_equals_scipy_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(1, 5), (7, 19), (40, 62), (130, 100), (0, 25)]:
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_pack_correct_round_trip():
    assert pack_correct([True, False, True, True, False, True, False, False]) == "b4"
    assert pack_correct([True]) == "8" and pack_correct([]) == ""
    g = torch.Generator().manual_seed(0)
    for n in range(0, 23):
        bits = (torch.rand(n, generator=g) < 0.5).tolist()
        assert unpack_correct(pack_correct(bits), n) == bits
    with pytest.raises(DidiError, match="cannot hold 9 examples"):
        unpack_correct("b4", 9)


def _row(label: str, outcomes: dict[str, list[bool]], sha: str = "s") -> dict:
    return {
        "label": label,
        "tasks": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in outcomes.items()},
        "average": sum(sum(v) / len(v) for v in outcomes.values()) / len(outcomes),
        "examples": {
            "encoding": "hex, 4 examples a digit, first example = highest bit",
            "tasks": {
                t: {"n": len(v), "sha256": sha + t, "correct": pack_correct(v)} for t, v in outcomes.items()
            },
        },
    }


def test_pairing_equals_a_literal_loop_and_refuses_other_data():
    g = torch.Generator().manual_seed(1)
    a = {t: (torch.rand(n, generator=g) < 0.7).tolist() for t, n in TEST_SIZES.items()}
    r = {t: (torch.rand(n, generator=g) < 0.5).tolist() for t, n in TEST_SIZES.items()}
    p = paired_difference(_row("a", a), _row("r", r))
    B = C = 0
    for t in a:
        b = c = 0
        for i in range(len(a[t])):
            if a[t][i] and not r[t][i]:
                b += 1
            elif r[t][i] and not a[t][i]:
                c += 1
        assert (p["tasks"][t]["b"], p["tasks"][t]["c"], p["tasks"][t]["n"]) == (b, c, len(a[t]))
        assert p["tasks"][t]["p_value"] == mcnemar_exact(b, c)
        B, C = B + b, C + c
    assert (p["b"], p["c"], p["n"], p["p_value"]) == (B, C, 31, mcnemar_exact(B, C))
    assert p["difference"] == pytest.approx(100 * (_row("a", a)["average"] - _row("r", r)["average"]))
    with pytest.raises(DidiError, match="different data for task 'task0'"):
        paired_difference(_row("a", a), _row("r", r, sha="other"))
    shorter = {**r, "task1": r["task1"][:-1]}
    with pytest.raises(DidiError, match="different data for task 'task1'"):
        paired_difference(_row("a", a), _row("r", shorter))
    no_examples = {k: v for k, v in _row("r", r).items() if k != "examples"}
    with pytest.raises(DidiError, match="no per-example outcomes"):
        paired_difference(_row("a", a), no_examples)


# ------------------------------------------------------------------------------------------ tiny BERT zoo
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """3 tasks on disjoint vocabularies (a router on θ0's embeddings separates them), random 2-class heads,
    validation.jsonl (the router's and MERGE's data) and test.jsonl (13, 8 and 10 examples) per task."""
    root = tmp_path_factory.mktemp("paired")
    base, tasks, data = make_text_task_zoo(root, {"validation.jsonl": 24, "test.jsonl": TEST_SIZES})
    zoo = Zoo(build_adapter("hf_encoder"), base, tasks)
    return {"root": root, "base": base, "tasks": tasks, "data": data, "zoo": zoo}


def _compare(bert, out, **kw):
    args = dict(
        methods=["task_arithmetic", "twin", "merge"],
        budgets=[1.0, 1.5],
        options={"merge": MERGE},
        metric="accuracy",
        evaluation={"data": bert["data"], "trainer": CPU, "batch_size": 4},
        reference="task_arithmetic",
        routers=["oracle", "learned"],
        validation=bert["data"],
        router=ROUTER,
    )
    return run_compare(bert["zoo"], out, **{**args, **kw})


@pytest.fixture(scope="module")
def compared(bert):
    out = bert["root"] / "cmp"
    return out, _compare(bert, out)


def literal_correct(bert, artifact, task) -> list[bool]:
    """Per test example of `task`, in file order: tokenised alone, run through the task's materialised model
    (θ0 + everything the artifact serves it), mean-pooled, the task's head, argmax == label."""
    from transformers import AutoTokenizer

    art = load_artifact(artifact)
    adapter = art.adapter()
    model = adapter.build_model(
        art.task_state_dict(task, base=dict(adapter.open_source(bert["base"]).items()))
    )
    head = load_head(os.path.join(bert["tasks"][task], "head.safetensors"))
    tok = AutoTokenizer.from_pretrained(os.path.join(bert["base"], "0_Transformer"), local_files_only=True)
    out = []
    with torch.no_grad():
        for line in open(os.path.join(bert["data"][task], "test.jsonl")):
            e = json.loads(line)
            enc = tok([e["text"]], return_tensors="pt")
            h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            out.append(int(head(mean_pool(h, enc["attention_mask"])).argmax(-1).item()) == e["label"])
    return out


def test_report_keeps_each_examples_correctness(bert, compared):
    out, _ = compared
    art = out / "artifacts" / "twin"
    rep = evaluate_artifact(art, bert["data"], batch_size=4, trainer=CPU)
    ex = rep["examples"]
    assert set(ex["tasks"]) == set(TEST_SIZES) and set(rep["tasks"]["task0"]) == {"accuracy", "n"}
    for t, n in TEST_SIZES.items():
        v = ex["tasks"][t]
        assert v["n"] == n and v["sha256"] == file_sha256(os.path.join(bert["data"][t], "test.jsonl"))
        right = unpack_correct(v["correct"], n)
        assert right == literal_correct(bert, art, t)
        assert sum(right) / n == rep["tasks"][t]["accuracy"]
    assert 0 < sum(sum(unpack_correct(v["correct"], v["n"])) for v in ex["tasks"].values()) < 31


@pytest.mark.slow
def test_ddp_keeps_the_same_per_example_outcomes(bert, compared):
    out, _ = compared
    art = out / "artifacts" / "twin"
    one = evaluate_artifact(art, bert["data"], batch_size=3, trainer=CPU)
    two = evaluate_artifact(
        art,
        bert["data"],
        batch_size=3,
        trainer=TrainerConfig(
            accelerator="cpu", devices=2, strategy="ddp_spawn", logger="none", progress_bar=False
        ),
    )
    assert two["examples"] == one["examples"] and two["tasks"] == one["tasks"]


def test_merge_rows_are_front_points_within_each_budget(bert, compared):
    out, res = compared
    rows = {r["label"]: r for r in res["rows"]}
    lib = out / "libraries" / "merge"
    _, front = read_library(lib)
    walls = set()
    for b in (1.0, 1.5):
        r = rows[f"merge@{b:g}"]
        chosen = choose_point(front, budget=b)  # what `didi export --budget` extracts
        art = load_artifact(r["artifact"])
        assert r["storage_ratio"] == art.storage_ratio <= b + 1e-12
        assert r["storage_ratio"] == pytest.approx(chosen["storage_ratio"], rel=0, abs=1e-12)
        assert r["front"]["point"] == chosen["index"] and r["front"]["library"] == str(lib)
        assert r["method"] == "merge" and r["budget"] == b
        walls.add(r["wall_time_s"])
    timings = json.loads((out / "timings.json").read_text())
    assert walls == {timings["merge:search"]} and timings["merge:search"] > 0  # the one search's time
    assert rows["merge@1"]["storage_ratio"] == 1.0  # every component in one group: the static point
    assert read_library(lib)[0]["search"]["evaluations"] == MERGE["evaluations"]


def test_learned_rows_for_dynamic_methods_equal_oracle_when_routing_is_perfect(bert, compared):
    out, res = compared
    labels = [r["label"] for r in res["rows"]]
    assert labels == [
        "task_arithmetic",
        "twin",
        "twin+learned",
        "merge@1",
        "merge@1+learned",
        "merge@1.5",
        "merge@1.5+learned",
    ]  # no learned row for the static merge
    rows = {r["label"]: r for r in res["rows"]}
    router = json.loads((out / "router" / "router.json").read_text())
    assert router["trained_with"] == str(out / "artifacts" / "twin")  # one router, trained once
    assert res["router"]["training"]["options"]["layer"] == "embedding"
    for lab in ("twin", "merge@1", "merge@1.5"):
        learned, oracle = rows[lab + "+learned"], rows[lab]
        assert learned["routing_accuracy"] == 1.0 and learned["fallback"] == 0.0
        assert learned["router"]["path"] == str(out / "router")
        assert learned["tasks"] == {
            t: {**v, "routing_accuracy": 1.0, "fallback": 0.0} for t, v in oracle["tasks"].items()
        }
        assert learned["examples"] == oracle["examples"] and learned["average"] == oracle["average"]
        assert learned["storage_ratio"] == oracle["storage_ratio"]
    # paired: every row against the reference; each learned row against its oracle row (identical here)
    pairs = {(p["row"], p["reference"]): p for p in res["paired"]}
    assert set(pairs) == {(lab, "task_arithmetic") for lab in labels[1:]} | {
        (lab + "+learned", lab) for lab in ("twin", "merge@1", "merge@1.5")
    }
    for lab in ("twin", "merge@1", "merge@1.5"):
        p = pairs[(lab + "+learned", lab)]
        assert (p["b"], p["c"], p["n"], p["p_value"], p["difference"]) == (0, 0, 31, 1.0, 0.0)
    ref = rows["task_arithmetic"]
    for lab in labels[1:]:  # the pooled counts, literally, from the rows' own per-example outcomes
        p, b, c = pairs[(lab, "task_arithmetic")], 0, 0
        for t, v in rows[lab]["examples"]["tasks"].items():
            mine = unpack_correct(v["correct"], v["n"])
            theirs = unpack_correct(ref["examples"]["tasks"][t]["correct"], v["n"])
            b += sum(1 for x, y in zip(mine, theirs) if x and not y)
            c += sum(1 for x, y in zip(mine, theirs) if y and not x)
        assert (p["b"], p["c"], p["p_value"]) == (b, c, mcnemar_exact(b, c))
        assert p["difference"] == pytest.approx(100 * (rows[lab]["average"] - ref["average"]), abs=1e-9)
    md = (out / "results.md").read_text()
    assert "McNemar p" in md and "| twin+learned | twin | +0.00 |" in md
    assert "| twin+learned |" in md and "routed right" in md


def test_second_run_from_the_cli_reuses_everything(bert, compared, capsys):
    from didi.cli import main

    out, res = compared
    lib_mtime = (out / "libraries" / "merge" / "manifest.json").stat().st_mtime_ns
    router_mtime = (out / "router" / "router.json").stat().st_mtime_ns
    tasks = "{" + ", ".join(f"{t}: {p}" for t, p in bert["tasks"].items()) + "}"
    data = "{" + ", ".join(f"{t}: {p}" for t, p in bert["data"].items()) + "}"
    argv = [
        "compare", bert["base"], tasks, str(out), "--backbone", "HFEncoderAdapter",
        "--methods", "[task_arithmetic, twin, merge]", "--budgets", "[1.0, 1.5]",
        "--options", "{merge: {evaluations: 6, population: 6}}",
        "--metric", "accuracy", "--data", data, "--validation", data, "--batch_size", "4",
        "--routers", "[oracle, learned]", "--router.layer", "embedding", "--router.steps", "100",
        "--reference", "[task_arithmetic, merge@1.5]",
        "--trainer.accelerator", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "McNemar p" in printed and "| merge@1.5+learned | merge@1.5 |" in printed
    again = json.loads((out / "results.json").read_text())
    assert all(r["reused"] for r in again["rows"]) and again["router"]["reused"]
    # every row's evaluation is reused too (its key holds), where the first run computed each
    assert all(r["evaluation_reused"] for r in again["rows"])
    assert not any(r["evaluation_reused"] for r in res["rows"])
    assert (out / "libraries" / "merge" / "manifest.json").stat().st_mtime_ns == lib_mtime
    assert (out / "router" / "router.json").stat().st_mtime_ns == router_mtime
    assert [r["label"] for r in again["rows"]] == [r["label"] for r in res["rows"]]
    for r, r0 in zip(again["rows"], res["rows"]):
        assert (
            r["examples"] == r0["examples"]
        )  # batch size 4 both times; the same examples, the same outcomes
    assert {p["reference"] for p in again["paired"]} == {"task_arithmetic", "merge@1.5", "twin", "merge@1"}


def test_an_evaluation_is_reused_only_for_the_same_artifact_data_and_settings(bert, compared, tmp_path):
    """The key of a kept evaluation: the trainer and the data's path do not enter it; the data's content,
    the evaluation settings and the artifact do."""
    import shutil

    from didi.compare import _evaluation_key

    out, _ = compared
    twin, ta = load_artifact(out / "artifacts" / "twin"), load_artifact(out / "artifacts" / "task_arithmetic")
    kw = {"data": dict(bert["data"]), "batch_size": 4, "trainer": CPU}
    key = _evaluation_key(twin, kw)
    assert key == _evaluation_key(twin, {**kw, "trainer": TrainerConfig(accelerator="cpu", devices=2)})
    t = next(iter(kw["data"]))
    copy = tmp_path / t
    shutil.copytree(kw["data"][t], copy)
    assert key == _evaluation_key(twin, {**kw, "data": {**kw["data"], t: str(copy)}})  # same content
    (copy / "test.jsonl").write_text((copy / "test.jsonl").read_text().splitlines()[0] + "\n")
    assert key != _evaluation_key(twin, {**kw, "data": {**kw["data"], t: str(copy)}})
    assert key != _evaluation_key(twin, {**kw, "batch_size": 8})
    assert key != _evaluation_key(ta, kw)


def test_other_settings_and_bad_options_are_refused(bert, compared, tmp_path):
    out, _ = compared
    with pytest.raises(DidiError, match="libraries/merge: a library of other settings"):
        _compare(bert, out, options={"merge": {**MERGE, "seed": 1}})
    with pytest.raises(DidiError, match="router: a router trained with other settings"):
        _compare(bert, out, router=RouterOptions(layer="final", steps=100))
    # refused before anything runs: nothing written
    fresh = tmp_path / "fresh"
    with pytest.raises(DidiError, match="reference: 'task_arithmetic\\+learned' is not a row"):
        _compare(bert, fresh, reference="task_arithmetic+learned")
    with pytest.raises(DidiError, match="routers: learned: give --validation"):
        _compare(bert, fresh, validation=None)
    with pytest.raises(DidiError, match="needs metric accuracy"):
        _compare(bert, fresh, metric="reconstruction", routers=["oracle"])
    with pytest.raises(DidiError, match="routers: expected"):
        _compare(bert, fresh, routers=["oracle", "psychic"])
    assert not fresh.exists()
    with pytest.raises(DidiError, match="validation: method merge scores its configurations"):
        _compare(bert, fresh, methods=["merge"], validation=None, routers=["oracle"], reference=None)
    with pytest.raises(DidiError, match="routers: learned: no dynamic method"):
        _compare(bert, tmp_path / "static", methods=["task_arithmetic"], options={}, reference=None)
