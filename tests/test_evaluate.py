"""Evaluation: per-task accuracy against a literal per-example computation, 2-process DDP = 1 process exactly,
report.json schema, and clear errors for bad inputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from didi.artifact import load_artifact
from didi.backbones import Zoo, build_adapter
from didi.datamodules.text import write_jsonl
from didi.errors import DidiError
from didi.evaluate import evaluate_artifact, evaluate_models
from didi.evaluators import load_head, mean_pool
from didi.trainer import TrainerConfig
from helpers import WORDS, add_vocab, make_bert_zoo, save_hf, tiny_merge

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU1 = TrainerConfig(accelerator="cpu", devices=1, logger="none", progress_bar=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A merged tiny-BERT zoo (3 tasks), heads beside each fine-tune, test data with uneven sizes."""
    root = tmp_path_factory.mktemp("eval")
    base, tasks = make_bert_zoo(root / "zoo")
    add_vocab(root / "zoo" / "base" / "0_Transformer")
    g = torch.Generator().manual_seed(5)
    classes = {"task0": 2, "task1": 3, "task2": 4}
    data = {}
    for t, C in classes.items():
        save_file(
            {"weight": torch.randn(C, 32, generator=g), "bias": torch.randn(C, generator=g)},
            os.path.join(tasks[t], "head.safetensors"),
        )
        n = {"task0": 13, "task1": 8, "task2": 10}[t]
        exs = [
            {
                "text": " ".join(
                    WORDS[int(i)]
                    for i in torch.randint(0, 45, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
                ),
                "label": int(torch.randint(0, C, (1,), generator=g)),
            }
            for _ in range(n)
        ]
        write_jsonl(root / "data" / t / "test.jsonl", exs)
        data[t] = str(root / "data" / t)
    art = tiny_merge(Zoo(build_adapter("hf_encoder"), base, tasks), root / "merged")
    return {"root": root, "base": base, "tasks": tasks, "data": data, "art": art, "classes": classes}


def literal_accuracy(s):
    """Per example: tokenise alone, run θ0+fold+shared+expert materialised, mean-pool, head, argmax."""
    from transformers import AutoTokenizer

    art = load_artifact(s["art"])
    adapter = art.adapter()
    base_sd = dict(adapter.open_source(s["base"]).items())
    tok = AutoTokenizer.from_pretrained(os.path.join(s["base"], "0_Transformer"), local_files_only=True)
    out = {}
    for t, d in s["data"].items():
        model = adapter.build_model(art.task_state_dict(t, base=base_sd))
        head = load_head(os.path.join(s["tasks"][t], "head.safetensors"))
        exs = [json.loads(x) for x in open(os.path.join(d, "test.jsonl"))]
        correct = 0
        for e in exs:
            enc = tok([e["text"]], return_tensors="pt")
            f = mean_pool(
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state,
                enc["attention_mask"],
            )
            correct += int(head(f).argmax(-1).item() == e["label"])
        out[t] = (correct / len(exs), len(exs))
    return out


def literal_predictions(s, art, task, texts):
    """Class predictions of task `task`'s materialised model of `art`, one text at a time."""
    from transformers import AutoTokenizer

    adapter = art.adapter()
    model = adapter.build_model(art.task_state_dict(task, base=dict(adapter.open_source(s["base"]).items())))
    head = load_head(os.path.join(s["tasks"][task], "head.safetensors"))
    tok = AutoTokenizer.from_pretrained(os.path.join(s["base"], "0_Transformer"), local_files_only=True)
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok([text], return_tensors="pt")
            h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            out.append(int(head(mean_pool(h, enc["attention_mask"])).argmax(-1).item()))
    return out


def test_routed_evaluation_matches_literal_and_report(setup, tmp_path):
    s = setup
    rep = evaluate_artifact(
        s["art"],
        s["data"],
        batch_size=4,
        trainer=CPU1,
        output=tmp_path / "rep",
        individual={"task0": 0.5, "task1": 0.5, "task2": 0.25},
    )
    lit = literal_accuracy(s)
    for t, (acc, n) in lit.items():
        assert rep["tasks"][t]["n"] == n
        assert rep["tasks"][t]["accuracy"] == pytest.approx(acc, abs=1e-9)
    on_disk = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(on_disk) >= {"tasks", "average", "storage_ratio", "average_normalized"}
    for v in on_disk["tasks"].values():
        assert isinstance(v["accuracy"], float) and isinstance(v["n"], int)
        assert 0.0 <= v["accuracy"] <= 1.0
    assert on_disk["average"] == pytest.approx(sum(a for a, _ in lit.values()) / 3)
    assert on_disk["tasks"]["task2"]["normalized_accuracy"] == pytest.approx(lit["task2"][0] / 0.25)
    assert on_disk["storage_ratio"] == pytest.approx(load_artifact(s["art"]).storage_ratio)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| task0 | 13 |" in md and "normalised" in md


@pytest.mark.slow
def test_ddp_two_processes_equal_one(setup):
    s = setup
    one = evaluate_artifact(s["art"], s["data"], batch_size=4, trainer=CPU1)
    two = evaluate_artifact(
        s["art"],
        s["data"],
        batch_size=4,
        trainer=TrainerConfig(
            accelerator="cpu", devices=2, strategy="ddp_spawn", logger="none", progress_bar=False
        ),
    )
    assert {t: v["n"] for t, v in two["tasks"].items()} == {"task0": 13, "task1": 8, "task2": 10}  # odd sizes
    assert two["tasks"] == one["tasks"]
    assert two["average"] == one["average"]


def test_unmerged_models(setup):
    """Individual fine-tunes vs θ0 + heads through evaluate_models (no artifact)."""
    s = setup
    ind = evaluate_models(
        s["tasks"], s["data"], tokenizer=os.path.join(s["base"], "0_Transformer"), batch_size=5, trainer=CPU1
    )
    assert ind["storage_ratio"] == 3.0 and set(ind["tasks"]) == set(s["tasks"])
    pre = evaluate_models(
        {"*": s["base"]},
        s["data"],
        heads={t: os.path.join(p, "head.safetensors") for t, p in s["tasks"].items()},
        batch_size=5,
        trainer=CPU1,
        individual=ind["tasks"] and {t: v["accuracy"] for t, v in ind["tasks"].items()},
    )
    assert pre["storage_ratio"] == 1.0 and "average_normalized" in pre


def test_bad_inputs(setup, tmp_path):
    s = setup
    with pytest.raises(DidiError, match="task 'nope' is not in the artifact"):
        evaluate_artifact(s["art"], {"nope": s["data"]["task0"]}, trainer=CPU1)
    empty = tmp_path / "empty"
    write_jsonl(empty / "test.jsonl", [])
    with pytest.raises(DidiError, match="task 'task0': the test data .* is empty"):
        evaluate_artifact(s["art"], {"task0": str(empty)}, trainer=CPU1)
    bad = tmp_path / "bad"
    write_jsonl(bad / "test.jsonl", [{"text": "w1 w2", "label": 0}, {"text": "w3", "label": 7}])
    with pytest.raises(DidiError, match=r"label 7 is outside the head's classes \[0, 2\)"):
        evaluate_artifact(s["art"], {"task0": str(bad)}, trainer=CPU1)
    (tmp_path / "junk.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DidiError, match="expected a JSON object with 'text' and 'label'"):
        evaluate_artifact(s["art"], {"task0": str(tmp_path / "junk.jsonl")}, trainer=CPU1)
    with pytest.raises(DidiError, match="no such head file"):
        evaluate_artifact(
            s["art"], {"task0": s["data"]["task0"]}, heads={"task0": str(tmp_path / "x")}, trainer=CPU1
        )
    # an artifact made for another backbone: the state_dict adapter cannot be served as a text encoder
    from didi.backbones import Adapter
    from didi.synthetic import make_zoo

    sb, st = make_zoo(tmp_path / "syn", T=2, width=8, layers=1)
    other = tiny_merge(
        Zoo(Adapter(), str(sb), {k: str(v) for k, v in st.items()}), tmp_path / "syn_merged", 1.5
    )
    with pytest.raises(DidiError, match="adapter 'state_dict' has no evaluation data module"):
        evaluate_artifact(other, {"task_0": s["data"]["task0"]}, trainer=CPU1)
    # the right adapter but another model: artifact/backbone mismatch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    wide = save_hf(
        BertModel(
            BertConfig(
                vocab_size=50,
                hidden_size=48,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=24,
            )
        ),
        tmp_path / "wide",
    )
    add_vocab(wide)
    with pytest.raises(DidiError, match="hidden_size 48 differs from the base model's 32"):
        evaluate_artifact(s["art"], s["data"], base=str(wide), trainer=CPU1)


def test_tall_masks_lambda_chosen_per_task_on_validation(setup, tmp_path):
    """TALL-masks with validation data: task t's λ is the grid value whose data-free TALL artifact scores best
    on t's validation split (ties: the larger λ), and its masks are exactly that artifact's masks."""
    from didi.methods import apply_method

    s = setup
    zoo = Zoo(build_adapter("hf_encoder"), s["base"], s["tasks"])
    grid = [0.0, 0.6, 100.0]
    val = {t: os.path.join(d, "test.jsonl") for t, d in s["data"].items() if t != "task2"}
    # task0's validation labels are what the λ = 0 artifact predicts: a small λ must win there
    lam0 = load_artifact(apply_method("tall_masks", zoo, tmp_path / "lam0", {"lam": 0.0}))
    exs = [json.loads(x) for x in open(val["task0"])]
    preds = literal_predictions(s, lam0, "task0", [e["text"] for e in exs])
    write_jsonl(tmp_path / "val0.jsonl", [{"text": e["text"], "label": p} for e, p in zip(exs, preds)])
    val["task0"] = str(tmp_path / "val0.jsonl")
    ev = {"batch_size": 4}
    art = load_artifact(
        apply_method(
            "tall_masks",
            zoo,
            tmp_path / "tv",
            {"validation": val, "lam_grid": grid, "evaluation": ev, "lam": 0.3},
        )
    )
    chosen = art.manifest["metrics"]["lam_per_task"]
    ref = {}
    for lam in grid:  # independent: each λ as its own data-free artifact, evaluated by didi evaluate
        ref[lam] = load_artifact(apply_method("tall_masks", zoo, tmp_path / f"ref{lam}", {"lam": lam}))
        rep = evaluate_artifact(ref[lam].path, val, batch_size=4, trainer=CPU1)
        for t in val:
            assert (
                art.manifest["metrics"]["validation_accuracy"][f"{lam:g}"][t] == rep["tasks"][t]["accuracy"]
            )
    for t in val:
        accs = {lam: art.manifest["metrics"]["validation_accuracy"][f"{lam:g}"][t] for lam in grid}
        best = max(accs.values())
        assert chosen[t] == max(lam for lam in grid if accs[lam] == best)
    assert chosen["task0"] == 0.0 and chosen["task1"] != 0.0
    assert chosen["task2"] == 0.3  # no validation data: the data-free λ
    other = load_artifact(apply_method("tall_masks", zoo, tmp_path / "ref03", {"lam": 0.3}))
    for t in art.tasks:
        src = other if t == "task2" else ref[chosen[t]]
        got, want = art.task_terms(t), src.task_terms(t)
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in got)
    with pytest.raises(DidiError, match="validation: task 'nope' is not in the zoo"):
        apply_method("tall_masks", zoo, tmp_path / "bad", {"validation": {"nope": "x.jsonl"}})
    with pytest.raises(DidiError, match="evaluation: unknown option 'trainer'"):
        apply_method("tall_masks", zoo, tmp_path / "bad2", {"validation": val, "evaluation": {"trainer": 1}})


def test_head_from_a_directory_or_a_bad_file(tmp_path):
    """A head is read from its file or from the directory that holds head.safetensors; a file that is not
    safetensors, or a directory without a head, is a DidiError naming the path."""
    w, b = torch.randn(3, 5), torch.randn(3)
    save_file({"weight": w, "bias": b}, str(tmp_path / "head.safetensors"))
    for where in (tmp_path, tmp_path / "head.safetensors"):
        head = load_head(where)
        torch.testing.assert_close(head.weight, w)
        torch.testing.assert_close(head.bias, b)
    (tmp_path / "bad.safetensors").write_text("not a tensor file")
    with pytest.raises(DidiError, match="bad.safetensors: not a readable safetensors head"):
        load_head(tmp_path / "bad.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DidiError, match="empty/head.safetensors: no such head file"):
        load_head(tmp_path / "empty")
