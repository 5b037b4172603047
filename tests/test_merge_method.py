"""MERGE (issue 13 items 2–4): the configuration space, the bi-objective search, the modular expert library.

- Space: a hand-built configuration's storage equals a hand count of its modules, and the artifact written
  from its terms is priced the same by the accounting; singletons are exact, groups are their static merge.
- Search (a synthetic objective, fast): every front point is non-dominated and its accuracy is a real
  evaluation, also with a deliberately wrong surrogate; same seed ⇒ same front, also after a kill and a resume
  from the cache (which then evaluates only what the killed run had not).
- End to end on a tiny BERT zoo: `didi merge --method merge` writes a library + front; a module used by two
  front points is stored once; an extracted point (by index and by budget) equals the directly built
  configuration, is priced at the front's ratio, and scores on the validation data what front.json reports.
- Bad input: clear DidiErrors naming the option, exit status 2, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from didi.artifact import load_artifact
from didi.backbones import Adapter, Zoo, build_adapter
from didi.errors import DidiError
from didi.methods import apply_method, get_method, write_method_artifact
from didi.methods.common import DeltaReader
from didi.methods.merge_library import choose_point, extract_point, read_library
from didi.methods.merge_search import EvaluationCache, SearchSettings, non_dominated, search_front
from didi.methods.merge_space import MergeSpace, dendrogram
from didi.synthetic import make_zoo
from helpers import add_vocab, make_bert_zoo, make_text_task_zoo

QUIET = {"accelerator": "cpu", "logger": "none", "progress_bar": False}


# ----------------------------------------------------------------------------------- configuration space
def test_storage_of_a_hand_built_configuration(tmp_path):
    base, tasks = make_zoo(tmp_path / "zoo", T=3, width=8, layers=2, noise=0.01, seed=0)
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in tasks.items()})
    reader = DeltaReader(zoo)
    space = MergeSpace.from_zoo(zoo, "averaging", reader=reader)
    assert [c.name for c in space.components] == ["layer.0", "layer.1"]  # `frozen` changed in no task
    # per block: in_proj bias 24 + in_proj 24×8 + out_proj 8×8 + ln 8 + c_fc 32×8 + c_proj 8×32 = 800
    assert [c.numel for c in space.components] == [800, 800] and zoo.base_params == 1632
    # layer.0 in 2 groups (1 stored + 1 folded), layer.1 in 3 (2 stored + 1 folded)
    genome = (2, 3)
    assert space.storage_ratio(genome) == 1 + (1 * 800 + 2 * 800) / 1632
    assert space.storage_ratio((1, 1)) == 1.0 and space.storage_ratio((3, 3)) == 1 + 4 * 800 / 1632
    # the artifact of its terms, priced by the accounting from the files, says the same
    art = load_artifact(
        write_method_artifact(tmp_path / "a", zoo, reader, "merge", get_method("merge").options(),
                              space.terms(genome))
    )  # fmt: skip
    assert art.storage_ratio == pytest.approx(space.storage_ratio(genome), rel=0, abs=1e-12)
    two = space.components[0].partition(2)
    group = next(g for g in two if len(g) == 2)
    names = zoo.task_names
    # the pair is the largest group of layer.0: folded into the base, so no group file; the third task stores
    # its own delta minus the pair's merge
    assert "groups" not in art.manifest and two == [group, tuple(set(range(3)) - set(group))]
    taus = {n: v for n, v in space.taus.items()}
    for j, t in enumerate(names):
        deltas = art.task_deltas(t)
        for n in space.components[1].tensors:  # every task exact where each has its own group
            torch.testing.assert_close(deltas[n], taus[n][j], atol=1e-6, rtol=0)
        for n in space.components[0].tensors:  # the pair gets its average, the other task its own delta
            want = taus[n][list(group)].mean(0) if j in group else taus[n][j]
            torch.testing.assert_close(deltas[n], want, atol=1e-6, rtol=0)
    with pytest.raises(DidiError, match="expected 2 integers in 1..3"):
        space.storage_ratio((1, 4))


def test_dendrogram_merges_the_most_similar_tasks_first():
    v = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1], [0, 0.2, 1]])
    parts = dendrogram(v @ v.T)
    assert parts[3] == [(0,), (1,), (2,), (3,)]
    assert parts[2] == [(0, 1), (2,), (3,)]  # the most alike pair first
    assert parts[1] == [(0, 1), (2, 3)] and parts[0] == [(0, 1, 2, 3)]


# ---------------------------------------------------------------------------------------------- search
C, T = 6, 3
W = np.linspace(1.0, 2.0, C)


def toy_storage(g) -> float:
    return 1 + float((np.array(g) - 1) @ W) / 10


def toy_evaluate(g) -> dict:
    g = np.array(g)
    return {"acc": float(1 - 0.3 * np.exp(-(g - 1) @ W / 3) + 0.01 * np.sin(g.sum()))}


class Killed(Exception):
    pass


def run_toy(path, seed=0, surrogate="default", resume=False, kill_after=None, counter=None):
    calls = counter if counter is not None else []

    def evaluate(g):
        if kill_after is not None and len(calls) >= kill_after:
            raise Killed
        calls.append(g)
        return toy_evaluate(g)

    cache = EvaluationCache(path, {"zoo": "toy"}, resume)
    settings = SearchSettings(evaluations=30, population=8, offspring=4, seed=seed)
    res = search_front(C, T, toy_storage, evaluate, lambda r: r["acc"], settings, cache,
                       first=[(T,) * C, (1,) * C], surrogate=surrogate, progress=False)  # fmt: skip
    return res, calls


class Wrong:
    """A surrogate that predicts the opposite of the truth."""

    def fit(self, X, y):
        return self

    def predict(self, X):
        return np.array([-toy_evaluate(x)["acc"] for x in X])


@pytest.mark.parametrize("surrogate", ["default", "wrong"])
def test_front_is_non_dominated_and_every_number_is_a_real_evaluation(tmp_path, surrogate):
    res, calls = run_toy(tmp_path / "ev.jsonl", surrogate=Wrong() if surrogate == "wrong" else "default")
    assert len(res.points) == len(calls) == 30 and res.fresh == 30 and len(set(calls)) == 30
    front = res.front
    assert front and [res.points[i] for i in non_dominated(res.points)] == front
    for p in front:
        assert p.score == toy_evaluate(p.genome)["acc"] and p.storage == toy_storage(p.genome)
        assert not any(
            q.score >= p.score and q.storage <= p.storage and (q.score > p.score or q.storage < p.storage)
            for q in res.points
        )
    assert len(res.fronts) == 1 + (30 - 8) // 4 + 1  # 8, then 4 per generation, the last takes the 2 left
    lines = (tmp_path / "ev.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"header": {"zoo": "toy"}} and len(lines) == 31


def test_same_seed_same_front_also_after_a_kill_and_resume(tmp_path):
    ref, _ = run_toy(tmp_path / "a.jsonl", seed=3)
    again, _ = run_toy(tmp_path / "b.jsonl", seed=3)
    key = lambda r: [(p.genome, p.score, p.storage) for p in r.front]  # noqa: E731
    assert key(again) == key(ref)
    other, _ = run_toy(tmp_path / "c.jsonl", seed=4)
    assert [p.genome for p in other.points] != [p.genome for p in ref.points]
    with pytest.raises(Killed):
        run_toy(tmp_path / "k.jsonl", seed=3, kill_after=13)
    with (tmp_path / "k.jsonl").open("a") as f:  # a record the kill cut short
        f.write('{"genome": [1, 2')
    resumed, calls = run_toy(tmp_path / "k.jsonl", seed=3, resume=True)
    assert key(resumed) == key(ref) and resumed.cached == 13 and len(calls) == resumed.fresh == 30 - 13
    with pytest.raises(DidiError, match="another zoo or other settings .*zoo"):
        EvaluationCache(tmp_path / "k.jsonl", {"zoo": "another"}, resume=True)


def test_evaluations_below_the_population_are_refused():
    with pytest.raises(DidiError, match=r"evaluations: the budget of real evaluations \(5\) is below"):
        SearchSettings(evaluations=5, population=8).validate()
    with pytest.raises(DidiError, match="evaluations"):
        get_method("merge").make_options({"evaluations": 4, "population": 6})


# ------------------------------------------------------------------------------------ tiny BERT zoo
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """3 tiny-BERT fine-tunes with heads, validation.jsonl and test.jsonl per task, and one MERGE library."""
    root = tmp_path_factory.mktemp("merge")
    base, tasks, data = make_text_task_zoo(root, {"validation.jsonl": 24, "test.jsonl": 8})
    zoo = Zoo(build_adapter("hf_encoder"), base, tasks)
    opts = {"validation": data, "evaluations": 10, "population": 6, "offspring": 2, "trainer": QUIET}
    lib = apply_method("merge", zoo, root / "lib", opts)
    return {"root": root, "base": base, "tasks": tasks, "zoo": zoo, "data": data, "lib": lib, "opts": opts}


def test_library_stores_each_module_once_and_lists_a_real_front(bert):
    lib = bert["lib"]
    manifest, front = read_library(lib)
    points = front["points"]
    assert manifest["method"]["name"] == "merge" and manifest["search"]["evaluations"] == 10
    assert len(points) >= 2 and [p["index"] for p in points] == list(range(len(points)))
    # non-dominated, sorted by storage
    for p in points:
        assert not any(
            q["accuracy"] >= p["accuracy"] and q["storage_ratio"] < p["storage_ratio"] for q in points
        )
    assert [p["storage_ratio"] for p in points] == sorted(p["storage_ratio"] for p in points)
    # each reported accuracy is a cached real evaluation, normalised by the exact configuration's
    lines = (lib / "search" / "evaluations.jsonl").read_text().splitlines()
    records = {tuple(json.loads(x)["genome"]): json.loads(x)["record"] for x in lines[1:]}
    ref = front["reference"]["tasks"]
    for p in points:
        rec = records[tuple(p["genome"].values())]
        assert p["tasks"] == rec["tasks"]
        want = sum(rec["tasks"][t]["accuracy"] / ref[t]["accuracy"] for t in ref) / len(ref)
        assert p["accuracy"] == pytest.approx(want, abs=1e-12)
    # deduplication: one file per (component, group), shared by every point that uses it
    used = {(c, tuple(g)) for p in points for c, gs in p["partitions"].items() for g in gs}
    assert len(manifest["modules"]) == len(used) == len(list((lib / "modules").iterdir()))
    mids = [m for p in points for ms in p["modules"].values() for m in ms]
    assert len(mids) > len(set(mids))  # some module serves two front points, and is stored once
    assert {(m["component"], tuple(m["tasks"])) for m in manifest["modules"].values()} == used
    for rel in ("fronts.csv", "front.png", "evaluations.jsonl"):
        assert (lib / "search" / rel).stat().st_size > 0
    assert not any(p.name.startswith(".") for p in lib.parent.iterdir())  # no work directory left


def test_extracted_point_equals_the_directly_built_configuration(bert, tmp_path):
    from didi.evaluate import evaluate_artifact

    lib, zoo = bert["lib"], bert["zoo"]
    manifest, front = read_library(lib)
    p = front["points"][-1]  # the largest: several groups per component
    out = extract_point(lib, tmp_path / "point", point=p["index"])
    art = load_artifact(out)
    assert art.storage_ratio == pytest.approx(p["storage_ratio"], rel=0, abs=1e-12)
    reader = DeltaReader(zoo)
    space = MergeSpace.from_zoo(zoo, reader=reader)
    genome = tuple(p["genome"].values())
    direct = load_artifact(
        write_method_artifact(tmp_path / "direct", zoo, reader, "merge", get_method("merge").options(),
                              space.terms(genome))
    )  # fmt: skip
    assert direct.storage_ratio == art.storage_ratio
    for t in art.tasks:
        a, b = art.task_deltas(t), direct.task_deltas(t)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # the front's validation accuracy is what the extracted artifact scores on the validation data
    val = {t: os.path.join(d, "validation.jsonl") for t, d in bert["data"].items()}
    rep = evaluate_artifact(out, val, batch_size=32, trainer=_cpu())
    assert {t: v["accuracy"] for t, v in rep["tasks"].items()} == {
        t: v["accuracy"] for t, v in p["tasks"].items()
    }
    # by budget: the most accurate point within it
    best = choose_point(front, budget=p["storage_ratio"])
    assert best["storage_ratio"] <= p["storage_ratio"]
    assert best["accuracy"] == max(q["accuracy"] for q in front["points"])
    with pytest.raises(DidiError, match="budget: 0.5 is below every front point"):
        choose_point(front, budget=0.5)
    with pytest.raises(DidiError, match="point / budget: give exactly one"):
        choose_point(front)


def test_in_memory_evaluation_equals_the_written_artifact_evaluation(bert):
    """The search scores text configurations from memory; other adapters write a temporary artifact and run
    `evaluate_artifact`. Both give the same numbers."""
    from didi.artifact import zoo_manifest
    from didi.methods.merge import ValidationEvaluator, validation_files

    zoo = bert["zoo"]
    reader = DeltaReader(zoo)
    space = MergeSpace.from_zoo(zoo, reader=reader)
    opts = get_method("merge").make_options(bert["opts"])
    files = validation_files(opts.validation, zoo.task_names, "text", "auto")
    manifest = {"method": {"name": "merge", "hyper_parameters": {}}, **zoo_manifest(zoo, reader.sha256)}
    mem = ValidationEvaluator(zoo, space, manifest, files, opts, in_memory=True)
    disk = ValidationEvaluator(zoo, space, manifest, files, opts, in_memory=False)
    C = len(space.components)
    for g in [(3,) * C, (1,) * C, tuple(1 + i % 3 for i in range(C))]:
        assert mem(g) == disk(g)


def _cpu():
    from didi.trainer import TrainerConfig

    return TrainerConfig(**QUIET)


def test_cli_merge_method_and_export(bert, tmp_path, capsys):
    from didi.cli import main

    tasks = "{" + ", ".join(f"{t}: {p}" for t, p in bert["tasks"].items()) + "}"
    val = "{" + ", ".join(f"{t}: {p}" for t, p in bert["data"].items()) + "}"
    cpu = ["--trainer.accelerator", "cpu", "--trainer.logger", "none", "--trainer.progress_bar", "false"]
    opts = f"{{validation: {val}, evaluations: 6, population: 6}}"
    lib = tmp_path / "lib"
    argv = ["merge", bert["base"], tasks, str(lib), "--backbone", "HFEncoderAdapter", "--method", "merge"]
    assert main([*argv, "--method_options", opts, *cpu]) == 0
    out = capsys.readouterr().out
    assert "MERGE library" in out and "front (index" in out
    _, front = read_library(lib)
    assert main(["inspect", str(lib)]) == 0 and "MERGE library" in capsys.readouterr().out
    assert main(["inspect", str(lib), "--verify", "true"]) == 0 and "files match" in capsys.readouterr().out
    assert main(["export", str(lib), str(tmp_path / "pt"), "--format", "artifact", "--budget", "100"]) == 0
    art = load_artifact(tmp_path / "pt")
    assert art.storage_ratio == pytest.approx(max(p["storage_ratio"] for p in front["points"]))
    assert main(["export", str(lib), str(tmp_path / "ck"), "--point", "0"]) == 0  # full checkpoints
    assert json.loads((tmp_path / "ck" / "export.json").read_text())["artifact"]["point"] == 0
    # a DiDi flag for another method, and export options that need a library
    assert main([*argv, "--method_options", opts, "--budget", "1.1", *cpu]) == 2
    assert "budget: a DiDi option; --method merge takes its options from --method_options" in (
        capsys.readouterr().err
    )
    assert main(["export", str(tmp_path / "pt"), str(tmp_path / "x"), "--point", "0"]) == 2
    assert "is not one" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change,msg",
    [
        ({"validation": None}, "validation: no validation data given"),
        ({"drop": "task1"}, "validation: no validation data for task 'task1'"),
        ({"rename": ("task2", "other")}, "validation: task 'other' is not in the zoo"),
        ({"evaluations": 3, "population": 4}, r"evaluations: the budget of real evaluations \(3\)"),
        ({"split": "test"}, "split: MERGE never scores on the test split"),
        ({"only_test": "task0"}, "validation: task 'task0'.* test"),
    ],
)
def test_bad_input_names_the_option_and_writes_nothing(bert, tmp_path, change, msg):
    data = dict(bert["data"])
    opts = {**bert["opts"], "validation": data}
    if "drop" in change:
        del data[change["drop"]]
    elif "rename" in change:
        a, b = change["rename"]
        data[b] = data.pop(a)
    elif "only_test" in change:
        data[change["only_test"]] = os.path.join(data[change["only_test"]], "test.jsonl")
    else:
        opts.update(change)
    with pytest.raises(DidiError, match=msg):
        apply_method("merge", bert["zoo"], tmp_path / "out", opts)
    assert not any(tmp_path.iterdir())  # no output, no work directory


def test_front_or_cache_of_another_zoo_is_refused(bert, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(bert["lib"], lib)
    front = json.loads((lib / "front.json").read_text())
    front["zoo_digest"] = "0" * 64
    (lib / "front.json").write_text(json.dumps(front))
    with pytest.raises(DidiError, match="front.json: a front of another zoo: its zoo_digest"):
        extract_point(lib, tmp_path / "pt", point=0)
    assert not (tmp_path / "pt").exists()
    # a resume whose cache was written for another zoo (here: another base, i.e. other task vectors)
    base2, tasks2 = make_bert_zoo(tmp_path / "zoo2", seed=1)
    for t in tasks2:
        shutil.copy(os.path.join(bert["tasks"][t], "head.safetensors"), tasks2[t])
    add_vocab(tmp_path / "zoo2" / "base" / "0_Transformer")
    zoo2 = Zoo(build_adapter("hf_encoder"), base2, tasks2)
    work = tmp_path / ".out.work"
    work.mkdir()
    shutil.copy(bert["lib"] / "search" / "evaluations.jsonl", work / "evaluations.jsonl")
    with pytest.raises(DidiError, match="resume: .*evaluations.jsonl holds evaluations of another zoo"):
        apply_method("merge", zoo2, tmp_path / "out", {**bert["opts"], "resume": True})
    assert not (tmp_path / "out").exists() and (work / "evaluations.jsonl").exists()


def test_cli_merge_method_runs_didi_variants_with_the_merge_flags(tmp_path, capsys):
    from didi.cli import main

    base, tasks = make_zoo(tmp_path / "zoo", T=3, width=8, layers=1)
    spec = "[" + ", ".join(str(p) for p in tasks.values()) + "]"
    quiet = ["--trainer.logger", "none", "--trainer.progress_bar", "false", "--search.steps", "10"]
    out = tmp_path / "g"
    argv = ["merge", str(base), spec, str(out), "--method", "didi_greedy", "--budget", "1.1", *quiet]
    assert main(argv) == 0
    m = load_artifact(out).manifest
    assert m["method"]["hyper_parameters"]["allocation"] == "greedy" and m["storage"]["ratio"] <= 1.1
    bad = ["merge", str(base), spec, str(tmp_path / "x"), "--method_options", "{k: 1}"]
    assert main(bad) == 2 and "method_options: only for --method" in capsys.readouterr().err


def test_killed_merge_resumes_to_the_same_front(bert, tmp_path, monkeypatch):
    """A search killed after 5 real evaluations keeps its work directory; `resume: true` evaluates only the
    5 it lacks and writes the front of the uninterrupted run (the fixture's library, same options)."""
    from didi.methods import merge as M

    real, calls = M.ValidationEvaluator.__call__, []

    def killed_after_five(self, genome):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(genome)
        return real(self, genome)

    monkeypatch.setattr(M.ValidationEvaluator, "__call__", killed_after_five)
    out = tmp_path / "lib"
    with pytest.raises(KeyboardInterrupt):
        apply_method("merge", bert["zoo"], out, bert["opts"])
    work = tmp_path / ".lib.work"
    assert not out.exists() and len((work / "evaluations.jsonl").read_text().splitlines()) == 1 + 5
    calls.clear()
    monkeypatch.setattr(M.ValidationEvaluator, "__call__", lambda self, g: calls.append(g) or real(self, g))
    apply_method("merge", bert["zoo"], out, {**bert["opts"], "resume": True})
    assert len(calls) == 10 - 5 and not work.exists()

    def key(lib):
        return [(p["genome"], p["storage_ratio"], p["accuracy"]) for p in read_library(lib)[1]["points"]]

    assert key(out) == key(bert["lib"])
