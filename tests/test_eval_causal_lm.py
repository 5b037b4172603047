"""Causal-LM evaluation: routed perplexity, next-token accuracy and multiple-choice accuracy of a tiny Llama
artifact equal a literal computation with each task's own HF model (its `.loss` on the same windows, the
log-likelihood of each choice scored one question at a time)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from didi.artifact import load_artifact, write_artifact
from didi.backbones.hf_llama import HFLlamaAdapter
from didi.datamodules.causal_lm import CausalLMDataModule
from didi.errors import DidiError
from didi.eval_causal_lm import evaluate_causal_lm
from didi.trainer import TrainerConfig
from helpers import tiny_llama_config

CPU1 = TrainerConfig(accelerator="cpu", devices=1, logger="none", progress_bar=False)
WORDS = [f"w{i}" for i in range(58)]
MAXLEN = 12


def save_tokenizer(path):
    """A word-level tokenizer (ids 0-3: [PAD] <s> </s> [UNK]) that prepends <s>, saved in HF format."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "<s>", "</s>", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    ).save_pretrained(str(path))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("lm")
    cfg = tiny_llama_config()
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(root / "base"))
    save_tokenizer(root / "base")
    adapter = HFLlamaAdapter()
    base_sd = dict(adapter.open_source(root / "base").items())
    g = torch.Generator().manual_seed(1)

    def pair(name, m, n, r):
        return {
            f"{name}::lora_A": 0.3 * torch.randn(m, r, generator=g),
            f"{name}::lora_B": torch.randn(r, n, generator=g),
        }

    q0, up1, head = (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "lm_head.weight",
    )
    tasks = {
        "story": {**pair(q0, 32, 32, 2), **pair(head, 64, 32, 2)},
        "quiz": {**pair(up1, 64, 32, 3), **pair(head, 64, 32, 1)},
        "other": {**pair(q0, 32, 32, 1)},
    }
    tensors = {
        k: {"shape": list(v.shape), "dtype": "float32", "matrix_shape": None} for k, v in base_sd.items()
    }
    manifest = {
        "method": {"name": "handmade"},
        "adapter": {"name": "hf_llama", "settings": adapter.settings()},
        "sources": {"base": {"path": str(root / "base")}},
        "tasks": list(tasks),
        "base_params": sum(v.numel() for v in base_sd.values()),
        "tensors": tensors,
    }
    art = write_artifact(
        root / "art", manifest, {}, pair("model.layers.1.self_attn.o_proj.weight", 32, 32, 1), tasks
    )
    words = torch.randint(0, len(WORDS), (40,), generator=g).tolist()
    (root / "story.txt").write_text(" ".join(WORDS[i] for i in words) + "\n")
    qs = []
    for _ in range(5):
        ctx = " ".join(
            WORDS[int(i)]
            for i in torch.randint(0, 58, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        )
        choices = [
            " ".join(WORDS[int(i)] for i in torch.randint(0, 58, (k,), generator=g)) for k in (1, 2, 3)
        ]
        qs.append({"context": ctx, "choices": choices, "label": int(torch.randint(0, 3, (1,), generator=g))})
    (root / "quiz").mkdir()
    (root / "quiz" / "test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    data = {"story": str(root / "story.txt"), "quiz": str(root / "quiz")}
    return {"root": root, "adapter": adapter, "art": art, "data": data, "qs": qs}


def literal(s):
    """Per task, with the task's own materialised model and one sequence at a time."""
    from transformers import AutoTokenizer

    art = load_artifact(s["art"])
    adapter = s["adapter"]
    tok = AutoTokenizer.from_pretrained(str(s["root"] / "base"), local_files_only=True)
    out = {}
    with torch.no_grad():
        model = adapter.build_model(art.task_state_dict("story"))
        ids = tok((s["root"] / "story.txt").read_text())["input_ids"]
        assert ids[0] == 1 and len(ids) == 41
        nll, n, hits = 0.0, 0, 0
        for i in range(0, len(ids), MAXLEN):
            w = torch.tensor([ids[i : i + MAXLEN]])
            if w.shape[1] < 2:
                continue
            o = model(input_ids=w, labels=w)
            nll += float(o.loss) * (w.shape[1] - 1)
            n += w.shape[1] - 1
            hits += int((o.logits[0, :-1].argmax(-1) == w[0, 1:]).sum())
        out["story"] = {"perplexity": math.exp(nll / n), "n": n, "accuracy": hits / n}
        model = adapter.build_model(art.task_state_dict("quiz"))
        correct = 0
        for q in s["qs"]:
            ctx = tok(q["context"])["input_ids"]
            scores = []
            for c in q["choices"]:
                cid = tok(c, add_special_tokens=False)["input_ids"]
                lp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cid])).logits[0], -1)
                scores.append(sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cid)))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == q["label"])
        out["quiz"] = {"accuracy": correct / len(s["qs"]), "n": len(s["qs"])}
    return out


def test_routed_causal_lm_metrics_match_literal(setup):
    s = setup
    art = load_artifact(s["art"])
    res = evaluate_causal_lm(
        art,
        art.adapter(),
        s["data"],
        None,
        None,
        batch_size=3,
        max_length=MAXLEN,
        limit_per_task=None,
        trainer=CPU1,
    )  # batch 3 of 4 windows + 5 questions: mixed
    lit = literal(s)
    assert res["story"]["n"] == lit["story"]["n"] == 40 - 3  # 4 windows (12, 12, 12, 5 tokens)
    assert res["story"]["metric"] == "next_token" and res["quiz"]["metric"] == "multiple_choice"
    assert res["story"]["perplexity"] == pytest.approx(lit["story"]["perplexity"], rel=1e-5)
    assert res["story"]["accuracy"] == pytest.approx(lit["story"]["accuracy"])
    assert res["quiz"] == {
        "accuracy": pytest.approx(lit["quiz"]["accuracy"]),
        "n": 5,
        "metric": "multiple_choice",
    }
    # the expert matters: θ0's perplexity on the same windows is different
    with torch.no_grad():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(s["root"] / "base"), local_files_only=True)
        w = torch.tensor([tok((s["root"] / "story.txt").read_text())["input_ids"][:MAXLEN]])
        m0 = s["adapter"].build_model(dict(s["adapter"].open_source(s["root"] / "base").items()))
        mt = s["adapter"].build_model(art.task_state_dict("story"))
        assert abs(float(m0(input_ids=w, labels=w).loss) - float(mt(input_ids=w, labels=w).loss)) > 1e-3


def test_causal_lm_data_refusals(setup, tmp_path):
    s = setup
    tokdir = str(s["root"] / "base")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "w1", "choices": ["w2", "w3"], "label": 2}) + "\n")
    with pytest.raises(DidiError, match="label 2 is outside the 2 choices"):
        CausalLMDataModule({"quiz": str(bad)}, tokdir).setup()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DidiError, match="is empty"):
        CausalLMDataModule({"story": str(tmp_path / "empty.txt")}, tokdir).setup()
    with pytest.raises(DidiError, match="not one of the model's tasks"):
        CausalLMDataModule({"zz": s["data"]["story"]}, tokdir, task_order=["story"])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DidiError, match=r"\.txt file"):
        CausalLMDataModule({"story": str(tmp_path / "x.csv")}, tokdir).setup()


def test_routed_choice_scores_of_a_mixed_batch(setup):
    """Row log-likelihoods of one mixed batch (story windows + quiz choices) through the routed model equal
    the same sums from each task's own model, sequence by sequence."""
    from didi.eval_causal_lm import row_scores
    from didi.routing import RoutedModel

    s = setup
    art = load_artifact(s["art"])
    adapter = s["adapter"]
    dm = CausalLMDataModule(
        s["data"], str(s["root"] / "base"), task_order=art.tasks, batch_size=6, max_length=MAXLEN
    )
    batch = next(iter(dm.test_dataloader()))
    assert set(batch["task_id"].tolist()) == {0, 1}  # story and quiz rows in one batch
    routed = RoutedModel(adapter.build_model(dict(adapter.open_source(s["root"] / "base").items())), art)
    with torch.no_grad():
        logits = routed(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            task_ids=batch["task_id"],
            use_cache=False,
        ).logits
        ll, n, _ = row_scores(logits, batch["input_ids"], batch["target_mask"])
        models = {t: adapter.build_model(art.task_state_dict(t)) for t in ("story", "quiz")}
        for i in range(batch["input_ids"].shape[0]):
            L_ = int(batch["attention_mask"][i].sum())
            ids = batch["input_ids"][i, :L_]
            start = int(batch["target_mask"][i].nonzero()[0])
            lp = torch.log_softmax(
                models[art.tasks[int(batch["task_id"][i])]](input_ids=ids[None]).logits[0], -1
            )
            want = sum(float(lp[k - 1, ids[k]]) for k in range(start, L_))
            assert float(n[i]) == L_ - start
            assert float(ll[i]) == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_ddp_two_processes_equal_one(setup):
    """9 items (4 windows + 5 questions) over 2 processes: nothing padded, dropped or counted twice."""
    s = setup
    art = load_artifact(s["art"])
    args = (art, art.adapter(), s["data"], None, None)
    one = evaluate_causal_lm(*args, batch_size=2, max_length=MAXLEN, limit_per_task=None, trainer=CPU1)
    two = evaluate_causal_lm(
        *args,
        batch_size=2,
        max_length=MAXLEN,
        limit_per_task=None,
        trainer=TrainerConfig(
            accelerator="cpu", devices=2, strategy="ddp_spawn", logger="none", progress_bar=False
        ),
    )
    assert {t: v["n"] for t, v in two.items()} == {"story": 37, "quiz": 5}
    assert two["quiz"] == one["quiz"] and two["story"]["accuracy"] == one["story"]["accuracy"]
    # equal up to fp32 logits computed in other batch shapes
    assert two["story"]["perplexity"] == pytest.approx(one["story"]["perplexity"], rel=1e-5)


def test_evaluate_artifact_report_with_perplexity(setup, tmp_path):
    from didi.evaluate import evaluate_artifact

    s = setup
    rep = evaluate_artifact(
        s["art"], s["data"], batch_size=4, max_length=MAXLEN, trainer=CPU1, output=tmp_path / "rep"
    )
    lit = literal(s)
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["tasks"]["story"]["perplexity"] == pytest.approx(lit["story"]["perplexity"], rel=1e-5)
    assert saved["tasks"]["quiz"]["n"] == 5 and "perplexity" not in saved["tasks"]["quiz"]
    assert saved["average"] == pytest.approx((lit["story"]["accuracy"] + lit["quiz"]["accuracy"]) / 2)
    assert rep["storage_ratio"] == saved["storage_ratio"] > 1
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "perplexity |" in md and f"{lit['story']['perplexity']:.4g}" in md
